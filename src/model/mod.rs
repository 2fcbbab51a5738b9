//! Qwen3-TTS-12Hz in candle.

/// Defines `fn $name` whose body is compiled three times, for AVX-512 F, for AVX2 and for
/// baseline x86-64, the widest the CPU has chosen at run time: the crate builds for baseline
/// x86-64, whose SSE2 code runs element-wise row loops 4 lanes wide. The same operations in the
/// same order in each (no FMA contraction), so the results are bit-identical.
macro_rules! simd_twins {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn portable($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) {
                portable($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            unsafe fn avx2($($arg: $ty),*) {
                portable($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512 F was detected.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 was detected.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}

pub mod activation;
pub mod attention;
pub mod code_predictor;
pub mod config;
pub mod engine;
pub mod gemv;
pub mod hub;
pub mod linear;
pub mod prompt;
pub mod q4k;
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

/// [`on_worker`] with a helper keeping a second worker awake ([`with_helper`]), for work whose
/// parallel kernels all run on rayon: candle's quantized matmuls and large element-wise ops run
/// on candle's own spin-waiting threads, which the helper would starve (a q4_k step took 3×
/// as long with it).
pub(crate) fn on_worker_helped<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::current_thread_index() {
        Some(_) => f(),
        None => on_worker(|| with_helper(f)),
    }
}

/// Runs `f` (on a worker) while a spawned helper keeps a second worker awake, taking the halves
/// of `f`'s parallel kernel calls as they appear (or any other pool work) until `f` returns.
/// Between two kernel calls an idle rayon worker yields a few dozen times and then sleeps, and a
/// sleeping one is woken by a futex for the next call: in a batch-10 step (~500 kernel calls)
/// the pool sat at ~1.76 of 2 CPUs. Steps alternated with and without the helper in one
/// process (Zen 4, 2 cores, q8_0, median of 120): batch 10 −5 to −7 %, one sequence −2 to −4 %.
/// `f` does not wait for the helper: it exits at its next look at the flag.
fn with_helper<R>(f: impl FnOnce() -> R) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    if rayon::current_num_threads() < 2 {
        return f();
    }
    let done = Arc::new(AtomicBool::new(false));
    let helper_done = done.clone();
    rayon::spawn(move || {
        while !helper_done.load(Ordering::Acquire) {
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                std::hint::spin_loop();
            }
        }
    });
    /// Stops the helper when `f` returns or unwinds.
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let _stop = Stop(done);
    f()
}
