//! koe: Qwen3-TTS voice synthesis in candle.
pub mod audio;
pub mod bench;
pub mod config;
pub mod error;
pub mod model;
pub mod synth;
pub mod voices;

pub use error::{Error, Result};
