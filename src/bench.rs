//! `koe bench`: the workload of `../shared/parity/bench_reference.py`, timed the same way and
//! reported under the same JSON keys, so koe and the official implementation compare key by key.
//!
//! Exactly `frames` frames: EOS is held off with `min_new_tokens` (the reference masks the EOS
//! logit with a hook), greedy talker and code predictor, ICL voice from the same 3 s clip and
//! transcript, the same 110-character text. Median over `repeat` runs after one warm-up.

use crate::error::Result;
use crate::model::engine::{GenerationParams, Sequence, StepInput, StepOutcome};
use crate::model::prompt::TextMode;
use crate::synth::{Synthesizer, Voice};
use candle_core::DType;
use serde_json::{json, Map, Value};
use std::time::Instant;

/// The reference benchmark's text and transcript.
pub const BENCH_TEXT: &str =
    "Streaming speech should start quickly, sound natural, and never click between chunks; that is the whole point.";
pub const BENCH_REF_TEXT: &str = "She sells sea shells by the sea shore.";

pub struct BenchOptions {
    pub frames: usize,
    pub batch: usize,
    pub repeat: usize,
    /// x-vector only instead of ICL.
    pub xvec: bool,
}

fn greedy_exact(frames: usize) -> GenerationParams {
    let mut p = GenerationParams::greedy(frames + 1);
    p.min_new_tokens = frames + 1;
    p
}

/// One timed run; returns the reference's keys.
fn run_once(synth: &Synthesizer, clip: &[f32], opts: &BenchOptions) -> Result<Map<String, Value>> {
    let mut r = Map::new();
    // The reference's voice_prompt_s is the encoding alone; priming koe's streaming decoder with
    // the reference codes (done once per voice, then cached) is reported apart.
    let t0 = Instant::now();
    let prompt = synth.encode_voice_prompt(clip, (!opts.xvec).then_some(BENCH_REF_TEXT))?;
    r.insert("voice_prompt_s".into(), json!(t0.elapsed().as_secs_f64()));
    let t0 = Instant::now();
    let voice: Voice = synth.voice(prompt)?;
    r.insert("decoder_prime_s".into(), json!(t0.elapsed().as_secs_f64()));

    let params = greedy_exact(opts.frames);
    // The voice's first utterance prefills the whole prompt and keeps the voice's rows; every
    // later one (the timed run below) prefills only its own text.
    let t0 = Instant::now();
    drop(synth.start(&voice, BENCH_TEXT, "english", TextMode::Streaming, &params)?);
    let prefill_first_use_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut utt = synth.start(&voice, BENCH_TEXT, "english", TextMode::Streaming, &params)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut frame_times = Vec::with_capacity(opts.frames);
    let mut first_audio_s = None;
    let mut generated = Vec::with_capacity(opts.frames);
    // Generation, timed like the reference (codes only) ...
    while generated.len() < opts.frames {
        match synth
            .tts
            .step(&mut [&mut utt.sequence], &[StepInput::Sample], false)?
            .remove(0)
        {
            StepOutcome::Frame { codes, .. } => {
                frame_times.push(t0.elapsed().as_secs_f64());
                if generated.is_empty() {
                    // ... except that the first frame is decoded at once: that is time to first audio.
                    let row = candle_core::Tensor::new(codes.as_slice(), &synth.tts.device)?.unsqueeze(0)?;
                    let t1 = Instant::now();
                    synth.speech_decoder.step(&mut utt.decoder, &row)?;
                    let decode_first = t1.elapsed().as_secs_f64();
                    r.insert("first_chunk_decode_s".into(), json!(decode_first));
                    first_audio_s = Some(frame_times[0] + decode_first);
                }
                generated.push(codes);
            }
            StepOutcome::End(reason) => {
                return Err(crate::Error::InvalidRequest(format!(
                    "generation ended ({}) before {} frames",
                    reason.as_str(),
                    opts.frames
                )))
            }
        }
    }
    let decode_first = r["first_chunk_decode_s"].as_f64().unwrap_or(0.0);
    let generate_s = frame_times[frame_times.len() - 1] - decode_first;
    let n = generated.len();
    r.insert("prefill_s".into(), json!(prefill_s));
    r.insert("first_frame_s".into(), json!(frame_times[0]));
    r.insert("ttfa_s".into(), json!(first_audio_s.unwrap_or(0.0)));
    r.insert("prefill_first_use_s".into(), json!(prefill_first_use_s));
    // The same utterance as the voice's first: its full prefill instead of the suffix.
    r.insert(
        "ttfa_first_use_s".into(),
        json!(first_audio_s.unwrap_or(0.0) - prefill_s + prefill_first_use_s),
    );
    r.insert("generate_s".into(), json!(generate_s));
    r.insert("frames_generated".into(), json!(n));
    r.insert("frames_per_s".into(), json!(n as f64 / generate_s));
    let steady = (frame_times[n - 1] - frame_times[0]) / (n - 1).max(1) as f64;
    r.insert("steady_frames_per_s".into(), json!(1.0 / steady));
    r.insert("ms_per_frame".into(), json!(1000.0 * generate_s / n as f64));

    // Whole decode of the generated codes from a fresh state (the reference's `decode_s`), and
    // the same frames streamed one by one from the voice's primed state.
    let flat: Vec<u32> = generated.iter().flatten().copied().collect();
    let codes = candle_core::Tensor::from_vec(flat, (n, generated[0].len()), &synth.tts.device)?;
    let t1 = Instant::now();
    let wav = synth.speech_decoder.decode(&codes)?;
    let decode_s = t1.elapsed().as_secs_f64();
    let mut state = voice.decoder_state.clone();
    let t1 = Instant::now();
    for i in 0..n {
        synth.speech_decoder.step(&mut state, &codes.narrow(0, i, 1)?)?;
    }
    let stream_decode_s = t1.elapsed().as_secs_f64();
    let audio_s = wav.dim(0)? as f64 / 24000.0;
    r.insert("decode_s".into(), json!(decode_s));
    r.insert("audio_s".into(), json!(audio_s));
    r.insert("decoder_rtf".into(), json!(decode_s / audio_s));
    r.insert("stream_decoder_rtf".into(), json!(stream_decode_s / audio_s));
    r.insert("rtf".into(), json!((generate_s + decode_s) / audio_s));

    if opts.batch > 1 {
        // The speed-up is taken within each run, the two rates measured back to back: on a
        // shared 2-core host the rates drift by ±15 % between runs, more than they differ.
        let single = batch_rate(synth, &voice, opts.frames, 1)?;
        let batched = batch_rate(synth, &voice, opts.frames, opts.batch)?;
        r.insert("batch".into(), json!(opts.batch));
        r.insert("batch1_frames_per_s".into(), json!(single));
        r.insert("batch_frames_per_s".into(), json!(batched));
        r.insert("batch_speedup".into(), json!(batched / single));
    }
    Ok(r)
}

/// Aggregate frames/s of `batch` sequences of the bench workload stepped together for `frames`
/// steps (talker and code predictor; prefill excluded).
pub fn batch_rate(synth: &Synthesizer, voice: &Voice, frames: usize, batch: usize) -> Result<f64> {
    let params = greedy_exact(frames);
    let mut seqs: Vec<Sequence> = (0..batch)
        .map(|_| {
            synth
                .start(voice, BENCH_TEXT, "english", TextMode::Streaming, &params)
                .map(|u| u.sequence)
        })
        .collect::<Result<_>>()?;
    let t0 = Instant::now();
    let mut done = 0;
    for _ in 0..frames {
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        let inputs = vec![StepInput::Sample; refs.len()];
        done += synth
            .tts
            .step(&mut refs, &inputs, false)?
            .iter()
            .filter(|o| matches!(o, StepOutcome::Frame { .. }))
            .count();
    }
    Ok(done as f64 / t0.elapsed().as_secs_f64())
}

/// How closely `quantized` follows `dense` (the same checkpoint in f32) on the bench workload:
/// the relative L2 error of the first frame's talker logits, and how many of `frames` greedy
/// frames are identical before the first difference.
pub fn agreement(dense: &Synthesizer, quantized: &Synthesizer, clip: &[f32], frames: usize) -> Result<(f64, usize)> {
    let params = greedy_exact(frames);
    // The voice prompt comes from the audio half, which quantization leaves alone: encode once.
    let prompt = dense.encode_voice_prompt(clip, Some(BENCH_REF_TEXT))?;
    let mut runs = Vec::new();
    for synth in [dense, quantized] {
        let voice = synth.voice(prompt.clone())?;
        let mut utt = synth.start(&voice, BENCH_TEXT, "english", TextMode::Streaming, &params)?;
        let logits = utt
            .sequence
            .logits()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut codes = Vec::with_capacity(frames);
        while codes.len() < frames {
            match synth
                .tts
                .step(&mut [&mut utt.sequence], &[StepInput::Sample], false)?
                .remove(0)
            {
                StepOutcome::Frame { codes: frame, .. } => codes.push(frame),
                StepOutcome::End(_) => break,
            }
        }
        runs.push((logits, codes));
    }
    let ((want, dense_codes), (got, quantized_codes)) = (&runs[0], &runs[1]);
    let identical = dense_codes
        .iter()
        .zip(quantized_codes)
        .take_while(|(a, b)| a == b)
        .count();
    Ok((rel_l2(got, want), identical))
}

/// ‖got − want‖ / ‖want‖, summed in f64.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let error: f64 = got.iter().zip(want).map(|(g, w)| (*g as f64 - *w as f64).powi(2)).sum();
    let size: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    (error / size).sqrt()
}

/// The middle value of `v` (not empty), the upper one of the two middle values when `v.len()`
/// is even.
pub fn upper_median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark: one warm-up (when repeating), `repeat` timed runs, their median.
pub fn run(synth: &Synthesizer, clip: &[f32], opts: &BenchOptions) -> Result<Value> {
    let warmup = usize::from(opts.repeat > 1);
    let mut runs = Vec::new();
    for i in 0..opts.repeat + warmup {
        let r = run_once(synth, clip, opts)?;
        tracing::info!(run = i, frames_per_s = r["frames_per_s"].as_f64(), "bench run");
        runs.push(r);
    }
    let kept = &runs[warmup..];
    let mut median = Map::new();
    for key in kept[0].keys() {
        let v: Vec<f64> = kept.iter().filter_map(|r| r[key].as_f64()).collect();
        if !v.is_empty() {
            median.insert(key.clone(), json!(upper_median(v)));
        }
    }
    Ok(json!({
        "implementation": "koe",
        "frames": opts.frames,
        "batch": opts.batch,
        "mode": if opts.xvec { "xvec" } else { "icl" },
        "text_chars": BENCH_TEXT.chars().count(),
        // The threads that computed (`RAYON_NUM_THREADS` or every core), as the reference's
        // `threads` is its torch thread count.
        "threads": rayon::current_num_threads(),
        "runs": kept,
        "median": median,
    }))
}
