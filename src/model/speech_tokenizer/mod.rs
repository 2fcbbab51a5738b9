//! The 12 Hz speech tokenizer (codec): codes ↔ 24 kHz waveform.
pub mod decoder;
pub(crate) mod streaming;
