//! `<case>.wav` end to end: from the reference clip and the texts through our speaker encoder,
//! speech encoder, talker, code predictor and streaming decoder, greedy.

use super::common::{Fixture, Tol};
use candle_core::{Device, Tensor};
use koe::model::engine::GenerationParams;
use koe::model::linear::WeightFormat;
use koe::model::prompt::TextMode;
use koe::synth::{package_icl_cut, Synthesizer};

pub fn check(fx: &Fixture) {
    let synth = Synthesizer::load(&fx.checkpoint(), &Device::Cpu, WeightFormat::Dense).expect("load pipeline");
    let clip = fx.floats("ref.wav");
    let transcript = fx.json["ref_text"].as_str().expect("ref_text");
    let icl_voice = synth.encode_voice(&clip, Some(transcript)).unwrap();
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
        let ref_frames = voice.ref_frames();
        if icl && package_icl_cut(ref_frames, utt.frames.len(), spf) + 1 == ref_frames * spf {
            pcm.insert(0, voice.ref_tail_sample);
        }
        fx.compare(
            &format!("{case}.wav"),
            &Tensor::new(pcm.as_slice(), &Device::Cpu).unwrap(),
            Tol::Wave,
        );
    }
}
