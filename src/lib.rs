//! koe: Qwen3-TTS voice synthesis in candle.
pub mod audio;
pub mod bench;
pub mod config;
pub mod error;
pub mod model;
pub mod synth;
pub mod voices;

pub use error::{Error, Result};

/// Fixes the CPU thread count candle uses, once, before any thread starts.
///
/// candle 0.11 asks for its thread count on every CPU matmul and, unless `RAYON_NUM_THREADS`
/// is set, recounts the cores each time by reading and parsing `/proc/cpuinfo`: about a tenth
/// of a batched decode step on a 2-core machine. Call it first thing in `main` (setting a
/// variable while other threads read the environment is a data race).
pub fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
    }
}
