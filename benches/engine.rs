//! Engine throughput on the checkpoint in `KOE_BENCH_MODEL` (a full-size random checkpoint made
//! with `../shared/parity/make_fixtures.py --preset full --seed 3 --no-run`), for f32, q8_0 and
//! q4_k: the reference workload's prefill, first frame, TTFA and single-sequence frames/s (via
//! `koe::bench`), then aggregate frames/s of 1, 2, 4, 8 and 10 sequences stepped together; and
//! how closely q8_0 and q4_k follow f32 there (`koe::bench::agreement`).
//!
//! `KOE_BENCH_REF_WAV` is the 3 s reference clip (default: `voices/default/reference.wav`),
//! `KOE_BENCH_FRAMES` the frames per measurement (default 30).
//!
//! cargo bench --bench engine

use candle_core::Device;
use koe::bench::{agreement, batch_rate, BenchOptions, BENCH_REF_TEXT};
use koe::config::Settings;
use koe::model::linear::WeightFormat;
use koe::synth::{Synthesizer, SAMPLE_RATE};
use std::path::PathBuf;

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
    println!("| dtype | prefill s | first frame s | TTFA s | frames/s | batch 1 | 2 | 4 | 8 | 10 | 10 ÷ 1 |");
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
        let rates = [1, 2, 4, 8, 10]
            .iter()
            .map(|&b| batch_rate(synth, &voice, frames, b))
            .collect::<koe::Result<Vec<f64>>>()?;
        println!(
            "| {dtype} | {:.3} | {:.3} | {:.3} | {:.2} | {} | {:.2}× |",
            m["prefill_s"].as_f64().unwrap_or(f64::NAN),
            m["first_frame_s"].as_f64().unwrap_or(f64::NAN),
            m["ttfa_s"].as_f64().unwrap_or(f64::NAN),
            m["frames_per_s"].as_f64().unwrap_or(f64::NAN),
            rates.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" | "),
            rates[4] / rates[0]
        );
    }
    println!("\n| dtype | first-frame logits rel. L2 error vs f32 | greedy frames identical to f32 |");
    println!("|---|---|---|");
    for (dtype, (rel_l2, identical)) in agreements {
        println!("| {dtype} | {rel_l2:.2e} | {identical} of {frames} |");
    }
    Ok(())
}
