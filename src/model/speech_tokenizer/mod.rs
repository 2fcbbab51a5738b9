//! The 12 Hz speech tokenizer: audio → codes (encoder) and codes → audio (decoder).
pub mod decoder;
pub mod encoder;
pub(crate) mod streaming;
