//! The 12 Hz speech tokenizer (codec): 24 kHz audio → codes (encoder) and codes → audio
//! (decoder, exact streaming).
pub mod decoder;
pub mod encoder;
mod kernels;
mod seanet;
pub(crate) mod streaming;
