//! The 12 Hz speech tokenizer (codec): 24 kHz audio → codes (encoder) and codes → audio
//! (decoder, exact streaming).
pub mod decoder;
pub mod encoder;
mod kernels;
mod seanet;
pub(crate) mod streaming;

/// A tensor's elements as f32 on the host, flattened (copied off any device): the form the CPU
/// kernels take weights and activations in.
pub(crate) fn host_f32(t: &candle_core::Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()
}
