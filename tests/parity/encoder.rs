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
    fx.compare_ints("ref.codes", &codes, &fx.ints("ref.codes"));
}
