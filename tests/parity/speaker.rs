//! Speaker encoder: log-mels of `ref.wav`, then every ECAPA-TDNN stage, all computed by koe end
//! to end (the encoder runs on our own mels).

use super::common::{Fixture, Tol};
use candle_core::{DType, Device, Tensor};
use koe::model::config::Qwen3TtsConfig;
use koe::model::speaker_encoder::{SpeakerEncoder, SpeakerStages};
use koe::model::weights;

pub fn check(fx: &Fixture) {
    let checkpoint = fx.checkpoint();
    let cfg = Qwen3TtsConfig::load(&checkpoint.join("config.json"))
        .expect("config.json")
        .speaker_encoder();
    let file = checkpoint.join("model.safetensors");
    let vb = weights::mmap(&file, DType::F32, &Device::Cpu).expect("checkpoint weights");
    let encoder = weights::in_file(&file, SpeakerEncoder::load(vb, &cfg)).expect("speaker encoder");

    let samples = fx.floats("ref.wav");
    let mels = encoder.mel().forward(&samples, &Device::Cpu).expect("mel spectrogram");
    fx.compare("spk.mels", &mels, Tol::Mel);

    let stages = encoder
        .forward_stages(&mels.unsqueeze(0).unwrap())
        .expect("speaker encoder forward");
    compare_stages(fx, &stages);

    // Diagnosis only: the same encoder on the reference's mels separates mel from encoder error.
    let reference_mels = fx.tensor("spk.mels").unsqueeze(0).unwrap();
    let from_reference = encoder.forward(&reference_mels).expect("speaker encoder forward");
    let reference_embedding = fx.tensor("spk.embedding");
    let (rel, max_abs) = errors(&from_reference.squeeze(0).unwrap(), &reference_embedding);
    println!(
        "{:<14} {:<34} rel_l2 {rel:.2e}  max_abs {max_abs:.2e}  (not compared: on the fixture's mels)",
        fx.name, "spk.embedding from spk.mels"
    );

    let whole = koe::model::speaker_encoder::speaker_embedding(&encoder, &samples).expect("speaker embedding");
    fx.compare_to(
        "spk.embedding via speaker_embedding",
        &whole,
        &reference_embedding,
        Tol::Encoder,
    );
}

fn compare_stages(fx: &Fixture, stages: &SpeakerStages) {
    let mut block = 0;
    while fx.has(&format!("spk.block{block}")) {
        match stages.blocks.get(block) {
            Some(ours) => fx.compare(&format!("spk.block{block}"), &ours.get(0).unwrap(), Tol::Encoder),
            None => fx.fail(format!(
                "spk.block{block}: the encoder has only {} blocks",
                stages.blocks.len()
            )),
        }
        block += 1;
    }
    if block != stages.blocks.len() {
        fx.fail(format!(
            "the fixture has {block} spk.block* tensors, the encoder {} blocks",
            stages.blocks.len()
        ));
    }
    fx.compare("spk.mfa", &stages.mfa.get(0).unwrap(), Tol::Encoder);
    fx.compare("spk.asp", &stages.asp.get(0).unwrap(), Tol::Encoder);
    fx.compare("spk.embedding", &stages.embedding.get(0).unwrap(), Tol::Encoder);
}

/// (relative L2, max abs) of `ours` against `reference`, for a diagnostic line.
fn errors(ours: &Tensor, reference: &Tensor) -> (f32, f32) {
    let diff = (ours - reference).unwrap();
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let max_abs = diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    (norm(&diff) / norm(reference).max(1e-30), max_abs)
}
