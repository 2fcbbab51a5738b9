//! `<case>.wav` end to end: from the reference clip and the texts through our speaker encoder,
//! speech encoder, talker, code predictor and streaming decoder, greedy.

use super::common::{Fixture, Tol};
use super::decoder::package_chunked_decode;
use candle_core::{DType, Device, Tensor};
use koe::model::engine::GenerationParams;
use koe::model::linear::WeightFormat;
use koe::model::prompt::TextMode;
use koe::synth::{package_icl_cut, Synthesizer};

/// Frames per call of the package's `decode` (`chunked_decode(codes, 300, 25)`).
const PACKAGE_DECODE_CHUNK: usize = 300;

pub fn check(fx: &Fixture) {
    let synth = Synthesizer::load(&fx.checkpoint(), &Device::Cpu, WeightFormat::Dense).expect("load pipeline");
    let clip = fx.floats("ref.wav");
    let transcript = fx.json["ref_text"].as_str().expect("ref_text");
    let mut icl_prompt = synth.encode_voice_prompt(&clip, Some(transcript)).unwrap();
    let reference_codes = fx.tensor("ref.codes").to_dtype(DType::U32).unwrap();
    let icl = icl_prompt.icl.as_mut().expect("an ICL prompt");
    if icl.codes.to_vec2::<u32>().unwrap() != reference_codes.to_vec2::<u32>().unwrap() {
        // Only at float ties, or the encoder check has failed: the audio after it is compared
        // on the package's codes.
        println!(
            "{:<14} {:<34} the fixture's ref.codes (ours differ at a float tie)",
            fx.name, "e2e voice"
        );
        icl.codes = reference_codes;
    }
    let icl_voice = synth.voice(icl_prompt).unwrap();
    let xvec_voice = synth.encode_voice(&clip, None).unwrap();
    let spf = synth.speech_decoder.samples_per_frame();
    let max_new_tokens = fx.json["max_new_tokens"].as_u64().unwrap() as usize;
    for case in fx.cases() {
        let c = fx.case(&case);
        let icl = !c["x_vector_only_mode"].as_bool().unwrap();
        let voice = if icl { &icl_voice } else { &xvec_voice };
        let mode = if c["non_streaming_mode"].as_bool().unwrap() {
            TextMode::NonStreaming
        } else {
            TextMode::Streaming
        };
        let mut utt = synth
            .start(
                voice,
                c["text"].as_str().unwrap(),
                c["language"].as_str().unwrap(),
                mode,
                &GenerationParams::greedy(max_new_tokens),
            )
            .unwrap();
        let mut pcm = Vec::new();
        while let Some(chunk) = utt.next_audio(&synth).unwrap() {
            pcm.extend(chunk.to_vec1::<f32>().unwrap());
        }
        // The package cuts the jointly decoded reference + generated waveform in floating point;
        // where that leaves the reference's last sample, so must we.
        let (ref_frames, frames) = (voice.ref_frames(), utt.frames.len());
        let cut = if icl {
            package_icl_cut(ref_frames, frames, spf)
        } else {
            0
        };
        if icl && cut + 1 == ref_frames * spf {
            pcm.insert(0, voice.ref_tail_sample);
        }
        let pcm = Tensor::new(pcm.as_slice(), &Device::Cpu).unwrap();
        let label = format!("{case}.wav");
        if ref_frames + frames <= PACKAGE_DECODE_CHUNK {
            fx.compare(&label, &pcm, Tol::Wave);
            continue;
        }
        // Past 300 frames the package's audio is its chunked approximation: compare that with
        // the package's chunking of our codes, and our streamed audio with our whole decode.
        let generated = Tensor::from_vec(utt.frames.concat(), (frames, utt.frames[0].len()), &Device::Cpu).unwrap();
        let codes = match &voice.prompt.icl {
            Some(reference) => Tensor::cat(&[&reference.codes, &generated], 0).unwrap(),
            None => generated,
        };
        let tail = |wav: Tensor| wav.narrow(0, cut, wav.dim(0).unwrap() - cut).unwrap();
        let chunked = tail(package_chunked_decode(
            &synth.speech_decoder,
            &codes,
            PACKAGE_DECODE_CHUNK,
        ));
        let package = fx.tensor(&label);
        fx.compare_to(
            &format!("{label} (package chunking of our codes)"),
            &chunked,
            &package,
            Tol::Wave,
        );
        let whole = tail(synth.speech_decoder.decode(&codes).unwrap());
        fx.compare_to(
            &format!("{label} (ours, streamed) vs our whole decode"),
            &pcm,
            &whole,
            Tol::Wave,
        );
    }
}
