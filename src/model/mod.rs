//! Qwen3-TTS-12Hz in candle.
pub mod weights;
