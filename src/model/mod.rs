//! Qwen3-TTS-12Hz in candle.
pub mod speech_tokenizer;
pub mod weights;
