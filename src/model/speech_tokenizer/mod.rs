//! The 12 Hz speech tokenizer (codec): 24 kHz audio → codes (encoder) and codes → audio
//! (decoder, exact streaming).
pub mod decoder;
pub mod encoder;
mod kernels;
pub(crate) mod streaming;
