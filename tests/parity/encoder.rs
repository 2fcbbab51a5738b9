//! Speech-tokenizer encoder: `enc.seanet`, `enc.transformer`, `enc.downsample` and `ref.codes`
//! computed from the fixture's `ref.wav`.

use super::common::{Fixture, Tol};
use candle_core::{DType, Device};
use koe::model::speech_tokenizer::encoder::{SpeechEncoder, SpeechTokenizerConfig};
use koe::model::weights;

pub fn check(fx: &Fixture) {
    let dir = fx.checkpoint().join("speech_tokenizer");
    let cfg = SpeechTokenizerConfig::from_file(&dir.join("config.json")).unwrap();
    let file = dir.join("model.safetensors");
    let vb = weights::mmap(&file, DType::F32, &Device::Cpu).unwrap();
    let encoder = weights::in_file(&file, SpeechEncoder::load(vb, &cfg)).unwrap();

    let stages = encoder.stages(&fx.floats("ref.wav")).unwrap();
    fx.compare("enc.seanet", &stages.seanet, Tol::Encoder);
    fx.compare("enc.transformer", &stages.transformer, Tol::Encoder);
    fx.compare("enc.downsample", &stages.downsample, Tol::Encoder);
    let codes = stages
        .codes
        .to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap();
    let margins = stages.margins.expect("stages gives margins");
    let margins = margins.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    compare_codes(fx, &codes, &margins, stages.codes.dim(1).unwrap());
}

/// Distance gap under which a nearest-codeword choice is a float tie: the quantizer input
/// carries ~1e-6 of f32 error (`enc.downsample`), which moves distances of ~10–50 by ~1e-5.
const RVQ_TIE: f32 = 1e-4;

/// `ref.codes` identical, except where a frame's codes part at a float tie: from the first
/// differing codebook of a frame on, the residual differs, so the rest of that frame is not
/// compared. Such frames are reported, and the end-to-end check then takes the fixture's codes.
fn compare_codes(fx: &Fixture, ours: &[i64], margins: &[f32], kept: usize) {
    let reference = fx.ints("ref.codes");
    let mut ties = Vec::new();
    let same = ours.len() == reference.len()
        && ours
            .chunks(kept)
            .zip(reference.chunks(kept))
            .enumerate()
            .all(|(frame, (a, b))| match a.iter().zip(b).position(|(x, y)| x != y) {
                None => true,
                Some(c) if margins[frame * kept + c] < RVQ_TIE => {
                    ties.push(format!(
                        "frame {frame} codebook {c} (margin {:.2e})",
                        margins[frame * kept + c]
                    ));
                    true
                }
                Some(_) => false,
            });
    if same && !ties.is_empty() {
        println!(
            "{:<14} {:<34} {} integers  identical but for float ties at {}",
            fx.name,
            "ref.codes",
            reference.len(),
            ties.join(", ")
        );
    } else {
        fx.compare_ints("ref.codes", ours, &reference);
    }
}
