//! Speech decoder parity: every stage on `decoder.codes`, the vocoder stages on its first
//! `decoder.short_frames` frames, and the streaming decoder (chunks of 1, 4, an irregular
//! pattern, a primed state, a batch of utterances at different points) against `decoder.whole`.

use super::common::{Fixture, Tol};
use candle_core::{DType, Device, Tensor};
use koe::model::speech_tokenizer::decoder::{DecoderConfig, DecoderState, SpeechDecoder, Stage};
use koe::model::weights;
use std::time::Instant;

pub fn check(fx: &Fixture) {
    let dir = fx.checkpoint().join("speech_tokenizer");
    let cfg = DecoderConfig::load(&dir.join("config.json")).expect("decoder config");
    let vb = weights::mmap(&dir.join("model.safetensors"), DType::F32, &Device::Cpu).expect("decoder weights");
    let decoder = SpeechDecoder::load(vb.pp("decoder"), &cfg).expect("decoder");
    let codes = fx.tensor("decoder.codes");
    let whole = fx.tensor("decoder.whole");
    let spf = decoder.samples_per_frame();
    let frames = codes.dim(0).unwrap();

    // Every stage of one call on all frames.
    let mut stages = Vec::new();
    let mut state = decoder.new_state().unwrap();
    let started = Instant::now();
    let ours = decoder
        .step_observed(&mut state, &codes, &mut |stage, t| stages.push((stage, t.clone())))
        .unwrap();
    let whole_ms = started.elapsed().as_secs_f64() * 1e3;
    for (stage, t) in &stages {
        let name = match stage {
            Stage::Quantized => "decoder.quantized".to_string(),
            Stage::PreConv => "decoder.pre_conv".to_string(),
            Stage::PreTransformer => "decoder.pre_transformer".to_string(),
            Stage::Upsample(i) => format!("decoder.upsample{i}"),
            Stage::Vocoder(0) => "decoder.block0".to_string(),
            Stage::Vocoder(_) => continue,
        };
        fx.compare(&name, &t.squeeze(0).unwrap(), Tol::Decoder);
    }
    fx.compare_to("decoder.whole (one step)", &ours, &whole, Tol::Wave);
    fx.compare("decoder.whole", &decoder.decode(&codes).unwrap(), Tol::Wave);

    // Vocoder stages on the first frames (the kit slices `codes[:short_frames]`, all of them
    // when there are fewer, as with `--decoder-frames 1`).
    let short_frames = (fx.json["decoder"]["short_frames"]
        .as_u64()
        .expect("decoder.short_frames") as usize)
        .min(frames);
    let mut short_stages = Vec::new();
    let mut state = decoder.new_state().unwrap();
    let short = decoder
        .step_observed(
            &mut state,
            &codes.narrow(0, 0, short_frames).unwrap(),
            &mut |stage, t| {
                if let Stage::Vocoder(i @ 1..) = stage {
                    short_stages.push((i, t.clone()));
                }
            },
        )
        .unwrap();
    for (i, t) in &short_stages {
        fx.compare(&format!("decoder.short.block{i}"), &t.squeeze(0).unwrap(), Tol::Wave);
    }
    fx.compare("decoder.short.whole", &short, Tol::Wave);

    // The package's own chunking (left context 25), which is an approximation of the whole.
    for chunk in [1, 4] {
        let name = format!("decoder.chunked{chunk}");
        if fx.has(&name) {
            fx.compare(&name, &package_chunked_decode(&decoder, &codes, chunk), Tol::Wave);
        }
    }

    // Streaming: any chunking gives the whole decode.
    let irregular = [1, 3, 2, 5, 1, 1, 7, 4];
    for (label, pattern) in [
        ("stream.chunk1", &[1][..]),
        ("stream.chunk4", &[4][..]),
        ("stream.irregular", &irregular[..]),
    ] {
        let mut state = decoder.new_state().unwrap();
        let started = Instant::now();
        let pcm = stream(&decoder, &mut state, &codes, 0, pattern);
        let ms_per_frame = started.elapsed().as_secs_f64() * 1e3 / frames as f64;
        fx.compare_to(label, &pcm, &whole, Tol::Wave);
        assert_eq!(state.frames(), frames);
        println!("{:<14} {label:<34} {ms_per_frame:.2} ms/frame", fx.name);
    }
    println!(
        "{:<14} {:<34} {:.2} ms/frame",
        fx.name,
        "decoder.whole (one step)",
        whole_ms / frames as f64
    );

    // A primed state (an ICL voice's reference codes) continues exactly; its clones are independent.
    let prime_frames = short_frames.min(frames - 1);
    let (primed, _) = decoder.prime(&codes.narrow(0, 0, prime_frames).unwrap()).unwrap();
    let rest = whole
        .narrow(0, prime_frames * spf, (frames - prime_frames) * spf)
        .unwrap();
    for label in ["stream.primed", "stream.primed.clone"] {
        let mut state = primed.clone();
        let pcm = stream(&decoder, &mut state, &codes, prime_frames, &[2]);
        fx.compare_to(label, &pcm, &rest, Tol::Wave);
    }

    // A batch of three utterances at different points: row 0 one frame per tick, row 1 one
    // frame per tick starting three ticks later (unequal windows), row 2 primed and two frames
    // per tick (its own group).
    let mut states: Vec<DecoderState> = vec![decoder.new_state().unwrap(), decoder.new_state().unwrap(), primed];
    let starts = [0, 0, prime_frames];
    let per_tick = [1, 1, 2];
    let mut next = starts;
    let mut pcm: Vec<Vec<Tensor>> = vec![Vec::new(); 3];
    for tick in 0.. {
        if next.iter().all(|&n| n >= frames) {
            break;
        }
        // Row 1 waits three ticks even when the others are done by then (a one-frame fixture).
        let active: Vec<usize> = (0..3).filter(|&r| next[r] < frames && (r != 1 || tick >= 3)).collect();
        if active.is_empty() {
            continue;
        }
        let chunks: Vec<Tensor> = active
            .iter()
            .map(|&r| {
                let n = per_tick[r].min(frames - next[r]);
                codes.narrow(0, next[r], n).unwrap()
            })
            .collect();
        let mut rows: Vec<&mut DecoderState> = states
            .iter_mut()
            .enumerate()
            .filter(|(r, _)| active.contains(r))
            .map(|(_, s)| s)
            .collect();
        let out = decoder.step_batch(&mut rows, &chunks).unwrap();
        for ((&r, chunk), samples) in active.iter().zip(&chunks).zip(out) {
            next[r] += chunk.dim(0).unwrap();
            pcm[r].push(samples);
        }
    }
    for (r, rows_pcm) in pcm.iter().enumerate() {
        let reference = whole.narrow(0, starts[r] * spf, (frames - starts[r]) * spf).unwrap();
        let ours = Tensor::cat(rows_pcm, 0).unwrap();
        fx.compare_to(&format!("stream.batch.row{r}"), &ours, &reference, Tol::Wave);
    }
}

/// Frames of left context in the package's `chunked_decode`.
const PACKAGE_LEFT_CONTEXT: usize = 25;

/// The package's `chunked_decode(codes, chunk, 25)` on koe's decoder: every `chunk` new frames
/// decoded afresh with up to 25 frames before them, whose samples are dropped. Its `decode`
/// does this with 300-frame chunks, so past 300 frames the package's audio is this
/// approximation; koe's streaming decoder stays equal to the whole decode (PORTING-NOTES).
pub fn package_chunked_decode(decoder: &SpeechDecoder, codes: &Tensor, chunk: usize) -> Tensor {
    let (frames, spf) = (codes.dim(0).unwrap(), decoder.samples_per_frame());
    let mut parts = Vec::new();
    let mut start = 0;
    while start < frames {
        let end = (start + chunk).min(frames);
        // As the package: all the frames before `start` until there are 25 of them.
        let context = start.min(PACKAGE_LEFT_CONTEXT);
        let window = codes.narrow(0, start - context, end - start + context).unwrap();
        let pcm = decoder.decode(&window).unwrap();
        parts.push(pcm.narrow(0, context * spf, (end - start) * spf).unwrap());
        start = end;
    }
    Tensor::cat(&parts, 0).unwrap()
}

/// Feeds `codes[start..]` in chunks cycling through `pattern`; returns the concatenated samples.
fn stream(
    decoder: &SpeechDecoder,
    state: &mut DecoderState,
    codes: &Tensor,
    start: usize,
    pattern: &[usize],
) -> Tensor {
    let frames = codes.dim(0).unwrap();
    let mut pcm = Vec::new();
    let mut at = start;
    for &n in pattern.iter().cycle() {
        if at >= frames {
            break;
        }
        let n = n.min(frames - at);
        pcm.push(decoder.step(state, &codes.narrow(0, at, n).unwrap()).unwrap());
        at += n;
    }
    Tensor::cat(&pcm, 0).unwrap()
}
