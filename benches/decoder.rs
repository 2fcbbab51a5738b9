//! Speech decoder speed on the checkpoint in `KOE_BENCH_MODEL` (its `speech_tokenizer/`, f32):
//! N frames of random valid codes decoded whole, streamed in chunks of 1, 2 and 4 frames, and
//! streamed one frame per step for a batch of 4 utterances (`step_batch`; ms per frame of one
//! utterance), as ms/frame and RTF (decoder seconds per audio second), then each stage's time in
//! one whole step.
//! On CPU each mode also runs through candle tensor ops (`set_cpu_kernels(false)`), alternating
//! with the default path in the same process, and prints the ratio.
//!
//! `KOE_BENCH_FRAMES` the frames per measurement (default 38, about 3 s of audio),
//! `KOE_BENCH_REPEAT` the measurements per mode (default 3; the median is printed).
//!
//! cargo bench --bench decoder

use candle_core::{DType, Device, Tensor};
use koe::model::speech_tokenizer::decoder::{DecoderConfig, SpeechDecoder, Stage};
use koe::model::weights;
use std::path::PathBuf;
use std::time::Instant;

const FRAME_RATE: f64 = 12.5;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Random codes [frames, q] below `bins` (a fixed LCG, so runs see the same input).
fn random_codes(frames: usize, q: usize, bins: usize) -> candle_core::Result<Tensor> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u32> = (0..frames * q)
        .map(|_| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 33) % bins as u64) as u32
        })
        .collect();
    Tensor::from_vec(data, (frames, q), &Device::Cpu)
}

/// Streams `codes` in chunks of `chunk` frames to `utterances` states at once (one `step_batch`
/// per chunk; one utterance through `step`).
fn stream(decoder: &SpeechDecoder, codes: &Tensor, chunk: usize, utterances: usize) -> koe::Result<()> {
    let frames = codes.dim(0)?;
    let mut states = (0..utterances)
        .map(|_| decoder.new_state())
        .collect::<koe::Result<Vec<_>>>()?;
    let mut at = 0;
    while at < frames {
        let n = chunk.min(frames - at);
        let chunk = codes.narrow(0, at, n)?;
        match &mut states[..] {
            [state] => {
                decoder.step(state, &chunk)?;
            }
            states => {
                let mut batch: Vec<_> = states.iter_mut().collect();
                decoder.step_batch(&mut batch, &vec![chunk; utterances])?;
            }
        }
        at += n;
    }
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() -> anyhow::Result<()> {
    koe::fix_thread_count();
    let Some(model) = std::env::var_os("KOE_BENCH_MODEL").map(PathBuf::from) else {
        eprintln!("KOE_BENCH_MODEL is not set: nothing to measure (see the header of benches/decoder.rs)");
        return Ok(());
    };
    let frames = env_usize("KOE_BENCH_FRAMES", 38);
    let repeat = env_usize("KOE_BENCH_REPEAT", 3).max(1);
    let dir = model.join("speech_tokenizer");
    let cfg = DecoderConfig::load(&dir.join("config.json"))?;
    let vb = weights::mmap(&dir.join("model.safetensors"), DType::F32, &Device::Cpu)?;
    let decoder = SpeechDecoder::load(vb.pp("decoder"), &cfg)?;
    let mut reference = decoder.clone();
    reference.set_cpu_kernels(false);
    let compare = std::env::var("KOE_BENCH_COMPARE").map_or(true, |v| v != "0");
    let codes = random_codes(frames, cfg.num_quantizers, cfg.codebook_size)?;
    // Warm-up (page in the weights, size the allocator).
    decoder.decode(&codes.narrow(0, 0, frames.min(8))?)?;

    println!(
        "{frames} frames ({:.2} s of audio), median of {repeat}",
        frames as f64 / FRAME_RATE
    );
    println!("| mode | ms/frame | RTF | candle ops ms/frame | speed-up |");
    println!("|---|---|---|---|---|");
    // (label, chunk, utterances): seconds are per utterance.
    let modes: [(&str, Option<usize>, usize); 5] = [
        ("whole", None, 1),
        ("stream chunk 1", Some(1), 1),
        ("stream chunk 2", Some(2), 1),
        ("stream chunk 4", Some(4), 1),
        ("batch of 4, chunk 1", Some(1), 4),
    ];
    for (label, chunk, utterances) in modes {
        let run = |d: &SpeechDecoder| -> koe::Result<f64> {
            let started = Instant::now();
            match chunk {
                None => d.decode(&codes).map(|_| ()),
                Some(c) => stream(d, &codes, c, utterances),
            }?;
            Ok(started.elapsed().as_secs_f64() / utterances as f64)
        };
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..repeat {
            ours.push(run(&decoder)?);
            if compare {
                theirs.push(run(&reference)?);
            }
        }
        let secs = median(ours);
        let (old, ratio) = if compare {
            let old = median(theirs);
            (
                format!("{:.2}", old * 1e3 / frames as f64),
                format!("{:.2}×", old / secs),
            )
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "| {label} | {:.2} | {:.3} | {old} | {ratio} |",
            secs * 1e3 / frames as f64,
            secs / (frames as f64 / FRAME_RATE)
        );
    }

    // Stage times (the observer runs after each stage; its copy of the stage output is
    // included): one whole step, and the sum over one-frame steps.
    let whole = stage_times(&decoder, &codes, frames)?;
    let streamed = stage_times(&decoder, &codes, 1)?;
    println!("\n| stage | whole ms/frame | share | stream chunk 1 ms/frame | share | stream ÷ whole |");
    println!("|---|---|---|---|---|---|");
    let (total_w, total_s): (f64, f64) = (whole.iter().map(|s| s.1).sum(), streamed.iter().map(|s| s.1).sum());
    for ((stage, w), (_, st)) in whole.iter().zip(&streamed) {
        println!(
            "| {stage:?} | {:.2} | {:.1} % | {:.2} | {:.1} % | {:.2} |",
            w * 1e3 / frames as f64,
            100.0 * w / total_w,
            st * 1e3 / frames as f64,
            100.0 * st / total_s,
            st / w
        );
    }
    println!(
        "| total | {:.2} | RTF {:.3} | {:.2} | RTF {:.3} | {:.2} |",
        total_w * 1e3 / frames as f64,
        total_w / (frames as f64 / FRAME_RATE),
        total_s * 1e3 / frames as f64,
        total_s / (frames as f64 / FRAME_RATE),
        total_s / total_w
    );
    Ok(())
}

/// Seconds per stage over a decode of `codes` in steps of `chunk` frames.
fn stage_times(decoder: &SpeechDecoder, codes: &Tensor, chunk: usize) -> koe::Result<Vec<(Stage, f64)>> {
    let frames = codes.dim(0)?;
    let mut state = decoder.new_state()?;
    let mut totals: Vec<(Stage, f64)> = Vec::new();
    let mut at = 0;
    while at < frames {
        let n = chunk.min(frames - at);
        let mut last = Instant::now();
        let mut i = 0;
        decoder.step_observed(&mut state, &codes.narrow(0, at, n)?, &mut |stage, _| {
            let now = Instant::now();
            if totals.len() <= i {
                totals.push((stage, 0.0));
            }
            totals[i].1 += now.duration_since(last).as_secs_f64();
            last = now;
            i += 1;
        })?;
        at += n;
    }
    Ok(totals)
}
