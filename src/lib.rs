//! koe: Qwen3-TTS voice synthesis in candle.
pub mod audio;
pub mod config;
pub mod error;
pub mod model;
pub mod voices;

pub use error::{Error, Result};
