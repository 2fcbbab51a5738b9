//! Qwen3-TTS-12Hz in candle.
pub mod speaker_encoder;
pub mod weights;
