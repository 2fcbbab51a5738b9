//! Engine throughput on the checkpoint in `KOE_BENCH_MODEL` (a full-size random checkpoint made
//! with `../shared/parity/make_fixtures.py --preset full --seed 3 --no-run`), for f32, q8_0 and
//! q4_k: the reference workload's prefill, first frame, TTFA and single-sequence frames/s (via
//! `koe::bench`), then aggregate frames/s of 1, 2, 4, 8 and 10 sequences stepped together
//! (median of 3 rounds over all sizes, the 10 ÷ 1 ratio taken within each round); and
//! how closely q8_0 and q4_k follow f32 there (`koe::bench::agreement`).
//!
//! `KOE_BENCH_REF_WAV` is the 3 s reference clip (default: `voices/default/reference.wav`),
//! `KOE_BENCH_FRAMES` the frames per measurement (default 30).
//!
//! cargo bench --bench engine

use candle_core::Device;
use koe::bench::{agreement, batch_rate, upper_median, BenchOptions, BENCH_REF_TEXT};
use koe::config::Settings;
use koe::model::linear::WeightFormat;
use koe::synth::{Synthesizer, SAMPLE_RATE};
use std::path::PathBuf;

/// Batch sizes of the aggregate rates, the last one the ratio's numerator.
const BATCHES: [usize; 5] = [1, 2, 4, 8, 10];
/// Rounds over all batch sizes; each rate and the ratio are medians over them.
const ROUNDS: usize = 3;

fn main() -> anyhow::Result<()> {
    koe::fix_thread_count();
    let Some(model) = std::env::var_os("KOE_BENCH_MODEL").map(PathBuf::from) else {
        eprintln!("KOE_BENCH_MODEL is not set: nothing to measure (see the header of benches/engine.rs)");
        return Ok(());
    };
    let frames: usize = std::env::var("KOE_BENCH_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let clip_path = std::env::var_os("KOE_BENCH_REF_WAV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("voices/default/reference.wav"));
    let clip = koe::voices::load_reference(&clip_path, &Settings::default().limits, SAMPLE_RATE)?;
    println!(
        "| dtype | prefill s | first frame s | TTFA s | frames/s | batch 1 | 2 | 4 | 8 | 10 | 10 ÷ 1 (per round) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let load = |dtype: &str| -> anyhow::Result<Synthesizer> {
        let format: WeightFormat = dtype.parse().map_err(anyhow::Error::msg)?;
        Ok(Synthesizer::load(&model, &Device::Cpu, format)?)
    };
    let dense = load("f32")?;
    let mut agreements = Vec::new();
    for dtype in ["f32", "q8_0", "q4_k"] {
        let quantized = (dtype != "f32").then(|| load(dtype)).transpose()?;
        if let Some(q) = &quantized {
            agreements.push((dtype, agreement(&dense, q, &clip, frames)?));
        }
        let synth = quantized.as_ref().unwrap_or(&dense);
        let single = koe::bench::run(
            synth,
            &clip,
            &BenchOptions {
                frames,
                batch: 1,
                repeat: 1,
                xvec: false,
            },
        )?;
        let m = &single["median"];
        let voice = synth.encode_voice(&clip, Some(BENCH_REF_TEXT))?;
        // Rounds over all sizes, the 10 ÷ 1 ratio taken within each round: rates drift between
        // rounds on a shared host by more than the sizes differ.
        let mut rounds = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            rounds.push(
                BATCHES
                    .iter()
                    .map(|&b| batch_rate(synth, &voice, frames, b))
                    .collect::<koe::Result<Vec<f64>>>()?,
            );
        }
        let rates: Vec<f64> = (0..BATCHES.len())
            .map(|i| upper_median(rounds.iter().map(|r| r[i]).collect()))
            .collect();
        let speedup = upper_median(rounds.iter().map(|r| r[BATCHES.len() - 1] / r[0]).collect());
        println!(
            "| {dtype} | {:.3} | {:.3} | {:.3} | {:.2} | {} | {:.2}× |",
            m["prefill_s"].as_f64().unwrap_or(f64::NAN),
            m["first_frame_s"].as_f64().unwrap_or(f64::NAN),
            m["ttfa_s"].as_f64().unwrap_or(f64::NAN),
            m["frames_per_s"].as_f64().unwrap_or(f64::NAN),
            rates.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" | "),
            speedup
        );
    }
    println!("\n| dtype | first-frame logits rel. L2 error vs f32 | greedy frames identical to f32 |");
    println!("|---|---|---|");
    for (dtype, (rel_l2, identical)) in agreements {
        println!("| {dtype} | {rel_l2:.2e} | {identical} of {frames} |");
    }
    Ok(())
}
