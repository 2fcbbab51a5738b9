//! Where a checkpoint comes from: a local directory, or a Hugging Face repo id fetched with
//! hf-hub into its usual cache (`HF_HOME`, default `~/.cache/huggingface`).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The release checkpoint koe serves by default.
pub const DEFAULT_MODEL: &str = "Qwen/Qwen3-TTS-12Hz-0.6B-Base";

/// Files of a Qwen3-TTS-12Hz checkpoint, relative to its root.
pub const CHECKPOINT_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "speech_tokenizer/config.json",
    "speech_tokenizer/preprocessor_config.json",
    "speech_tokenizer/model.safetensors",
];

/// Resolves `--model`: an existing directory is used as is; anything else is a repo id, taken
/// from the cache, downloaded (with a progress bar) unless `offline`. `HF_HUB_OFFLINE=1` also
/// means offline.
pub fn resolve(model: &str, offline: bool) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.is_absolute() || model.starts_with('.') || model.split('/').count() != 2 {
        return Err(Error::InvalidRequest(format!(
            "--model {model:?} is neither a checkpoint directory nor a Hugging Face repo id (owner/name)"
        )));
    }
    let offline = offline || std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let unavailable = |reason: String| Error::ModelUnavailable {
        repo: model.to_string(),
        reason,
    };
    let cache = hf_hub::Cache::from_env();
    let cached = cache.model(model.to_string());
    let mut root = None;
    for file in CHECKPOINT_FILES {
        let local = match cached.get(file) {
            Some(p) => p,
            None if offline => {
                return Err(unavailable(format!(
                    "offline, and {file} is not in {}",
                    cache.path().display()
                )))
            }
            None => {
                let api = hf_hub::api::sync::ApiBuilder::from_env()
                    .with_progress(true)
                    .build()
                    .map_err(|e| unavailable(e.to_string()))?;
                api.model(model.to_string())
                    .get(file)
                    .map_err(|e| unavailable(format!("{file}: {e}")))?
            }
        };
        if root.is_none() {
            root = local.parent().map(Path::to_path_buf);
        }
    }
    root.ok_or_else(|| unavailable("no files".into()))
}
