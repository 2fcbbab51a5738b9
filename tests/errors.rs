//! Bad input becomes a typed error with a clear message, never a panic.

use candle_core::{Device, Tensor};
use koe::config::Settings;
use koe::model::linear::WeightFormat;
use koe::model::tts::TtsModel;
use koe::model::{hub, prompt};
use koe::Error;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn checkpoint() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-seed0/checkpoint")
}

/// A scratch copy of the tiny checkpoint's top-level files (the speech tokenizer is not needed).
/// Removed when the returned guard drops.
fn scratch_checkpoint(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("koe-errors-{name}-"))
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    for entry in std::fs::read_dir(checkpoint()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    tmp
}

fn load(dir: &Path) -> koe::Result<TtsModel> {
    TtsModel::load(dir, &Device::Cpu, WeightFormat::Dense)
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let file = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &file).unwrap();
}

#[test]
fn empty_and_too_long_text() {
    let settings = Settings::default();
    assert!(matches!(settings.check_text(""), Err(Error::EmptyText)));
    assert!(matches!(settings.check_text(" \n\t"), Err(Error::EmptyText)));
    let long = "a".repeat(settings.limits.max_text_chars + 1);
    let err = settings.check_text(&long).unwrap_err();
    assert!(matches!(err, Error::TextTooLong { chars, max } if chars == max + 1));
    assert!(err.to_string().contains("over the limit of 2000"), "{err}");
    // Characters, not bytes: 2000 umlauts are fine.
    settings
        .check_text(&"ü".repeat(settings.limits.max_text_chars))
        .unwrap();
}

#[test]
fn unknown_language() {
    let model = load(&checkpoint()).unwrap();
    let err = prompt::language_id(&model, "klingon").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::UnsupportedLanguage { .. }));
    assert!(msg.contains("klingon") && msg.contains("english"), "{msg}");
    assert_eq!(prompt::language_id(&model, "English").unwrap(), Some(66));
    assert_eq!(prompt::language_id(&model, "auto").unwrap(), None);
}

#[test]
fn missing_tensor_names_tensor_and_file() {
    let tmp = scratch_checkpoint("missing");
    let dir = tmp.path();
    rewrite_weights(dir, |t| {
        t.remove("talker.model.layers.1.mlp.up_proj.weight").unwrap();
    });
    let err = load(dir)
        .err()
        .expect("a checkpoint with a missing tensor must not load");
    let msg = err.to_string();
    assert!(matches!(err, Error::Weights { .. }));
    assert!(msg.contains("talker.model.layers.1.mlp.up_proj.weight"), "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let tmp = scratch_checkpoint("shape");
    let dir = tmp.path();
    rewrite_weights(dir, |t| {
        let name = "talker.code_predictor.lm_head.3.weight";
        let (rows, cols) = t[name].dims2().unwrap();
        t.insert(
            name.into(),
            Tensor::zeros((rows + 1, cols), t[name].dtype(), &Device::Cpu).unwrap(),
        );
    });
    let msg = load(dir).err().expect("a wrong shape must not load").to_string();
    assert!(msg.contains("lm_head.3.weight") && msg.contains("shape"), "{msg}");
}

#[test]
fn malformed_config_names_file() {
    let tmp = scratch_checkpoint("config");
    let dir = tmp.path();
    std::fs::write(
        dir.join("config.json"),
        "{ \"talker_config\": { \"hidden_size\": \"wide\" } }",
    )
    .unwrap();
    let err = load(dir).err().expect("a malformed config must not load");
    assert!(matches!(err, Error::Config { .. }));
    let msg = err.to_string();
    assert!(msg.contains("config.json") && msg.contains("hidden_size"), "{msg}");

    std::fs::write(dir.join("config.json"), "not json").unwrap();
    assert!(matches!(load(dir), Err(Error::Config { .. })));

    // Inconsistent sizes are caught before any weight is read.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint().join("config.json")).unwrap()).unwrap();
    cfg["talker_config"]["num_key_value_heads"] = 3.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let msg = load(dir).err().unwrap().to_string();
    assert!(msg.contains("key/value heads"), "{msg}");
}

#[test]
fn sparse_config_takes_package_defaults() {
    let tmp = scratch_checkpoint("sparse");
    let dir = tmp.path();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    let cfg = koe::model::config::Qwen3TtsConfig::load(&dir.join("config.json")).unwrap();
    assert_eq!(cfg.talker_config.hidden_size, 1024);
    assert_eq!(cfg.talker_config.code_predictor_config.num_hidden_layers, 5);
    assert_eq!(cfg.tts_pad_token_id, 151671);
}

#[test]
fn offline_and_not_cached_is_one_clear_error() {
    let empty = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HOME", empty.path());
    let started = std::time::Instant::now();
    let err = hub::resolve(hub::DEFAULT_MODEL, true).unwrap_err();
    assert!(
        started.elapsed().as_secs() < 5,
        "offline resolution must not wait on the network"
    );
    let msg = err.to_string();
    assert!(matches!(err, Error::ModelUnavailable { .. }));
    assert!(msg.contains(hub::DEFAULT_MODEL) && msg.contains("--model DIR"), "{msg}");
    // A directory is used as is, offline or not.
    assert_eq!(
        hub::resolve(checkpoint().to_str().unwrap(), true).unwrap(),
        checkpoint()
    );
    assert!(matches!(
        hub::resolve("not a repo id", true),
        Err(Error::InvalidRequest(_))
    ));
}

#[test]
fn bad_settings_are_rejected_with_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    for (text, needle) in [
        ("[limits]\nmax_text_chars = 0\n", "max_text_chars"),
        ("[limits]\nmin_ref_seconds = 40.0\n", "min_ref_seconds"),
        ("[model]\ndtype = \"q3\"\n", "model.dtype"),
        ("[generation]\ntemperature = -1.0\n", "temperature"),
        ("[limits]\nmax_text_charz = 5\n", "max_text_charz"),
    ] {
        std::fs::write(&file, text).unwrap();
        let msg = Settings::load(Some(&file)).unwrap_err().to_string();
        assert!(msg.contains(needle), "{text:?} gave {msg}");
    }
}
