//! Qwen3-TTS-12Hz in candle.
pub mod activation;
pub mod attention;
pub mod code_predictor;
pub mod config;
pub mod engine;
pub mod gemv;
pub mod hub;
pub mod linear;
pub mod prompt;
pub mod q8;
pub mod sampling;
pub mod speaker_encoder;
pub mod speech_tokenizer;
pub mod talker;
pub mod tokenizer;
pub mod transformer;
pub mod tts;
pub mod weights;

/// Runs `f` on a rayon worker (here, if this thread is one). A model step makes a few hundred
/// parallel kernel calls; started on a worker they are shared by work stealing, where from any
/// other thread each call parks the caller and wakes it again. On a 2-core Zen 4 this took
/// `koe bench --dtype q8_0` from 15.3 to 18.5 frames/s, alternated with the previous binary.
pub(crate) fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::current_thread_index() {
        Some(_) => f(),
        None => rayon::join(f, || ()).0,
    }
}
