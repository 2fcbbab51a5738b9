//! The decode-step projection side by side, in one process: candle's matmul (gemm) on f32
//! weights, koe's row kernel on the same f32 weights, and the row kernel on bf16 weights, for
//! the talker's and code predictor's shapes at 1 and 10 rows; the row kernel against gemm over
//! widened tiles at prefill sizes (16 to 96 rows, bf16 weights), which sets
//! `gemv::PROJECTION_ROWS`; then Q8_0: candle's `QMatMul` against koe's AVX2 kernel
//! (`model::q8`: AVX-512 VNNI tiles where the CPU has them, else AVX2) at 1, 10 and 48 rows;
//! where the CPU has AVX-512 VNNI or AVX2, Q4_K: candle's `QMatMul` against koe's tiles (`model::q4k`),
//! beside koe's Q8_0 (min of alternated repetitions); last, this CPU's roofline for a batched
//! Q4_K step: the `vpdpbusd` peak on one and on every thread and the memory read rate, against
//! what koe's Q4_K tiles reach at 1 row (weight bytes a second) and at 10 rows (multiply-adds a
//! second), and the tiles' time for a frame's projections at 1 and 10 rows.
//!
//! cargo bench --bench kernels

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use koe::model::gemv::{matmul_wt, matmul_wt_widened};
use koe::model::q4k::{self, Q4kWeight};
use koe::model::q8::Q8Weight;
use rayon::prelude::*;
use std::time::Instant;

/// `x Wᵀ` from `(x, m, k, w, n)`: the two bf16 paths of the prefill table.
type RowsProduct = fn(&[f32], usize, usize, &[half::bf16], usize) -> Vec<f32>;

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() * 1e3 / reps as f64
}

/// `rows` random input rows for each projection's input width, as tensors and as host vectors.
fn inputs(shapes: &[(usize, usize)], rows: usize) -> candle_core::Result<(Vec<Tensor>, Vec<Vec<f32>>)> {
    let xs: Vec<Tensor> = shapes
        .iter()
        .map(|&(_, i)| Tensor::randn(0f32, 1.0, (rows, i), &Device::Cpu))
        .collect::<candle_core::Result<_>>()?;
    let xh = xs
        .iter()
        .map(|x| x.flatten_all()?.to_vec1())
        .collect::<candle_core::Result<_>>()?;
    Ok((xs, xh))
}

fn main() -> anyhow::Result<()> {
    koe::fix_thread_count();
    let dev = Device::Cpu;
    // One full-size layer's projections: q, k, v, o, gate, up, down ([out, in]).
    let shapes = [
        (2048, 1024),
        (1024, 1024),
        (1024, 1024),
        (1024, 2048),
        (3072, 1024),
        (3072, 1024),
        (1024, 3072),
    ];
    // Enough distinct layers that the weights do not stay in cache between repetitions.
    let layers = 24;
    let weights: Vec<Vec<Tensor>> = (0..layers)
        .map(|_| {
            shapes
                .iter()
                .map(|&(o, i)| Tensor::randn(0f32, 0.03, (o, i), &dev))
                .collect()
        })
        .collect::<candle_core::Result<_>>()?;
    let host_f32: Vec<Vec<Vec<f32>>> = weights
        .iter()
        .map(|l| l.iter().map(|w| w.flatten_all()?.to_vec1::<f32>()).collect())
        .collect::<candle_core::Result<_>>()?;
    let host_bf16: Vec<Vec<Vec<half::bf16>>> = host_f32
        .iter()
        .map(|l| {
            l.iter()
                .map(|w| w.iter().map(|&v| half::bf16::from_f32(v)).collect())
                .collect()
        })
        .collect();
    println!(
        "| rows | candle matmul f32 | row kernel f32 | row kernel bf16 | gemm ÷ kernel f32 | gemm ÷ kernel bf16 |"
    );
    println!("|---|---|---|---|---|---|");
    for rows in [1usize, 10] {
        let (xs, xh) = inputs(&shapes, rows)?;
        let gemm = time(3, || {
            for l in &weights {
                for (w, x) in l.iter().zip(&xs) {
                    let lin = candle_nn::Linear::new(w.clone(), None);
                    lin.forward(x).unwrap();
                }
            }
        });
        let f32k = time(3, || {
            for l in &host_f32 {
                for ((w, x), &(o, i)) in l.iter().zip(&xh).zip(&shapes) {
                    matmul_wt(x, rows, i, w, o);
                }
            }
        });
        let bf16k = time(3, || {
            for l in &host_bf16 {
                for ((w, x), &(o, i)) in l.iter().zip(&xh).zip(&shapes) {
                    matmul_wt(x, rows, i, w, o);
                }
            }
        });
        println!(
            "| {rows} | {gemm:.1} ms | {f32k:.1} ms | {bf16k:.1} ms | {:.2}× | {:.2}× |",
            gemm / f32k,
            gemm / bf16k
        );
    }

    // Prefill-sized row counts against bf16 weights: the row kernel or gemm over widened tiles.
    println!();
    println!("| rows | row kernel bf16 | widened gemm bf16 | gemm ÷ kernel |");
    println!("|---|---|---|---|");
    for rows in [16usize, 33, 48, 96] {
        let (_, xh) = inputs(&shapes, rows)?;
        let run = |f: RowsProduct| {
            time(3, || {
                for l in &host_bf16 {
                    for ((w, x), &(o, i)) in l.iter().zip(&xh).zip(&shapes) {
                        f(x, rows, i, w, o);
                    }
                }
            })
        };
        let (kernel, widened) = (run(matmul_wt), run(matmul_wt_widened));
        println!(
            "| {rows} | {kernel:.1} ms | {widened:.1} ms | {:.2}× |",
            widened / kernel
        );
    }

    // Quantizing at load, side by side: the same weights through candle and through koe.
    let t = Instant::now();
    let candle_q8: Vec<Vec<QMatMul>> = weights
        .iter()
        .map(|l| {
            l.iter()
                .map(|w| QMatMul::from_qtensor(QTensor::quantize(w, GgmlDType::Q8_0)?))
                .collect()
        })
        .collect::<candle_core::Result<_>>()?;
    let candle_load = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let koe_q8: Vec<Vec<Q8Weight>> = host_f32
        .iter()
        .map(|l| {
            l.iter()
                .zip(&shapes)
                .map(|(w, &(o, i))| Q8Weight::quantize(w, o, i).expect("whole Q8_0 blocks"))
                .collect()
        })
        .collect();
    let koe_load = t.elapsed().as_secs_f64() * 1e3;
    println!();
    println!(
        "Q8_0 quantization of the {layers} layers: candle {candle_load:.0} ms, koe {koe_load:.0} ms ({:.2}×)",
        candle_load / koe_load
    );
    println!("| rows | candle Q8_0 | koe Q8_0 | candle ÷ koe |");
    println!("|---|---|---|---|");
    for rows in [1usize, 10, 48] {
        let (xs, xh) = inputs(&shapes, rows)?;
        let candle = time(3, || {
            for l in &candle_q8 {
                for (w, x) in l.iter().zip(&xs) {
                    w.forward(x).unwrap();
                }
            }
        });
        let ours = time(3, || {
            for l in &koe_q8 {
                for (w, x) in l.iter().zip(&xh) {
                    w.matmul_wt(x, rows);
                }
            }
        });
        println!("| {rows} | {candle:.1} ms | {ours:.1} ms | {:.2}× |", candle / ours);
    }

    if !q4k::available() {
        return Ok(());
    }
    let quantize = |w: &Tensor| -> anyhow::Result<(QMatMul, Q4kWeight)> {
        let candle = QMatMul::from_qtensor(QTensor::quantize(w, GgmlDType::Q4K)?)?;
        Ok((candle, Q4kWeight::quantize(w)?.expect("whole tiles and super-blocks")))
    };
    let q4: Vec<Vec<(QMatMul, Q4kWeight)>> = weights
        .iter()
        .map(|l| l.iter().map(quantize).collect())
        .collect::<anyhow::Result<_>>()?;
    println!();
    println!("| rows | candle Q4_K | koe Q4_K | koe Q8_0 | candle ÷ koe Q4_K | Q8_0 ÷ Q4_K |");
    println!("|---|---|---|---|---|---|");
    let mut koe_q4k_ms = Vec::new();
    for rows in [1usize, 2, 10, 48] {
        let (xs, xh) = inputs(&shapes, rows)?;
        let mut best = [f64::INFINITY; 3];
        for _ in 0..5 {
            let times = [
                time(1, || {
                    for (l, (w, _)) in q4.iter().flatten().enumerate() {
                        w.forward(&xs[l % shapes.len()]).unwrap();
                    }
                }),
                time(1, || {
                    for (l, (_, w)) in q4.iter().flatten().enumerate() {
                        w.matmul_wt(&xh[l % shapes.len()], rows);
                    }
                }),
                time(1, || {
                    for (l, w) in koe_q8.iter().flatten().enumerate() {
                        w.matmul_wt(&xh[l % shapes.len()], rows);
                    }
                }),
            ];
            for (b, t) in best.iter_mut().zip(times) {
                *b = b.min(t);
            }
        }
        let [candle, ours, q8] = best;
        koe_q4k_ms.push((rows, ours));
        println!(
            "| {rows} | {candle:.1} ms | {ours:.1} ms | {q8:.1} ms | {:.2}× | {:.2}× |",
            candle / ours,
            q8 / ours
        );
    }
    let koe_ms = |rows| {
        koe_q4k_ms
            .iter()
            .find(|&&(r, _)| r == rows)
            .map(|&(_, t)| t)
            .expect("timed")
    };
    let values: usize = shapes.iter().map(|&(o, i)| o * i).sum::<usize>() * layers;
    roofline(values, koe_ms(1), koe_ms(10));

    // A frame of the release's model (0.6B) on the tiles alone, with the engine's fused
    // projections (q, k, v stacked, and gate with up): the talker's 28 layers once, the code
    // predictor's 5 layers 15 times. Those 5 hold 43 MB of Q4_K, a little more than a 32 MiB L3,
    // so at one row, whose time is the bytes it reads, part of each pass comes from the cache;
    // at ten rows, bound by multiply-adds, that does not help.
    let fused = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)];
    let fused_layer = || -> anyhow::Result<Vec<Q4kWeight>> {
        fused
            .iter()
            .map(|&(o, i)| {
                let w = Tensor::randn(0f32, 0.03, (o, i), &dev)?;
                Ok(Q4kWeight::quantize(&w)?.expect("whole tiles and super-blocks"))
            })
            .collect()
    };
    let talker: Vec<Vec<Q4kWeight>> = (0..28).map(|_| fused_layer()).collect::<anyhow::Result<_>>()?;
    let code_predictor: Vec<Vec<Q4kWeight>> = (0..5).map(|_| fused_layer()).collect::<anyhow::Result<_>>()?;
    let frame_ms = |rows| -> anyhow::Result<f64> {
        let (_, xh) = inputs(&fused, rows)?;
        let pass = |layer: &Vec<Q4kWeight>| {
            for (w, x) in layer.iter().zip(&xh) {
                w.matmul_wt(x, rows);
            }
        };
        let frame = || {
            talker.iter().for_each(pass);
            (0..15).for_each(|_| code_predictor.iter().for_each(pass));
        };
        Ok((0..5).map(|_| time(1, frame)).fold(f64::INFINITY, f64::min))
    };
    let (one, ten) = (frame_ms(1)?, frame_ms(10)?);
    println!(
        "- a frame's projections (fused as the engine's; 28 talker layers, 5 code-predictor layers 15 \
         times): 1 row {one:.1} ms, 10 rows {ten:.1} ms, 10 rows ÷ 1 row in frames a second {:.2}×: the \
         tiles' ceiling for the engine's batch-10 speed-up",
        10.0 * one / ten
    );
    Ok(())
}

/// A batched Q4_K decode step's two bounds on this CPU, measured, beside koe's tiles: one row
/// streams the weights (4.5 bits each: 144 bytes a 256-value super-block), so its ceiling is
/// the memory read rate; ten rows multiply-add every weight ten times on `vpdpbusd`, so theirs
/// is the instruction's peak. `values`: weights in the timed layers; `ms1`, `ms10`: koe's time
/// over them at 1 and 10 rows.
fn roofline(values: usize, ms1: f64, ms10: f64) {
    let threads = rayon::current_num_threads();
    let bytes = (values / 256 * 144) as f64;
    let read = read_rate();
    println!();
    println!("Roofline ({threads} threads):");
    println!(
        "- 1 row: koe streams {:.1} GB/s of Q4_K weights; reading memory runs at {read:.1} GB/s ({:.0} %)",
        bytes / ms1 / 1e6,
        100.0 * bytes / ms1 / 1e6 / read
    );
    let Some((one, all)) = vnni_peak(threads) else {
        println!("- 10 rows: no AVX-512 VNNI here, no `vpdpbusd` peak");
        return;
    };
    let gmacs = 10.0 * values as f64 / ms10 / 1e6;
    println!(
        "- 10 rows: koe {gmacs:.0} GMAC/s; `vpdpbusd` peak {all:.0} GMAC/s ({:.0} %), {one:.0} on one thread",
        100.0 * gmacs / all
    );
    println!(
        "- 10 rows ÷ 1 row, rows a second: koe {:.2}×; at the peak against the read rate {:.2}×",
        10.0 * ms1 / ms10,
        all * 1e9 / values as f64 / (read * 1e9 / bytes)
    );
}

/// Bytes a second read from memory on every thread: a sum over 1 GiB, far past the caches
/// (min of 3).
fn read_rate() -> f64 {
    let words: Vec<u64> = (0..1u64 << 27).collect();
    let chunk = words.len() / rayon::current_num_threads();
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let sum: u64 = words
                .par_chunks(chunk)
                .map(|c| c.iter().fold(0u64, |a, &w| a.wrapping_add(w)))
                .reduce(|| 0, u64::wrapping_add);
            std::hint::black_box(sum);
            (words.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// `vpdpbusd` multiply-adds a second (64 per instruction) on one thread and on `threads`,
/// in G; `None` without AVX-512 VNNI.
fn vnni_peak(threads: usize) -> Option<(f64, f64)> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni") {
        const ITERATIONS: usize = 50_000_000;
        let rate = |threads: usize| {
            let t = Instant::now();
            let sum: i64 = (0..threads)
                .into_par_iter()
                // SAFETY: the CPU has AVX-512 F and VNNI (checked above).
                .map(|_| unsafe { vnni::chains(ITERATIONS) })
                .sum();
            std::hint::black_box(sum);
            (threads * ITERATIONS * vnni::CHAINS * 64) as f64 / t.elapsed().as_secs_f64() / 1e9
        };
        let best = |threads| (0..3).map(|_| rate(threads)).fold(0.0, f64::max);
        return Some((best(1), best(threads)));
    }
    let _ = threads;
    None
}

/// Hand-written: the peak is the instruction's own, so the loop issues nothing else.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    /// Independent accumulators: enough to cover `vpdpbusd`'s latency at one a cycle.
    pub const CHAINS: usize = 12;

    /// `iterations` × [`CHAINS`] `vpdpbusd` on values the compiler cannot see.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn chains(iterations: usize) -> i64 {
        let (a, b) = std::hint::black_box((_mm512_set1_epi8(1), _mm512_set1_epi8(3)));
        let mut acc = [_mm512_setzero_si512(); CHAINS];
        for _ in 0..iterations {
            for c in &mut acc {
                *c = _mm512_dpbusd_epi32(*c, a, b);
            }
        }
        acc.iter().map(|&c| _mm512_reduce_add_epi32(c) as i64).sum()
    }
}
