//! koe's settings: `config/default.toml` (compiled in), an optional file, then `KOE_…`
//! environment overrides. Every value is validated; a bad one is an error naming its key.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The defaults shipped with koe.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub model: ModelSettings,
    pub limits: Limits,
    pub generation: GenerationDefaults,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    pub id: String,
    pub dtype: String,
    pub device: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_text_chars: usize,
    pub min_ref_seconds: f64,
    pub max_ref_seconds: f64,
    pub max_frames: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationDefaults {
    pub greedy: bool,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub repetition_penalty: f32,
}

impl Default for Settings {
    fn default() -> Self {
        toml::from_str(DEFAULT_TOML).expect("config/default.toml is valid")
    }
}

impl Settings {
    /// Defaults, overlaid with `file` (if any) and then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut value: toml::Table = toml::from_str(DEFAULT_TOML).expect("config/default.toml is valid");
        let origin = file
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("config/default.toml"));
        let err = |msg: String| Error::Config {
            file: origin.clone(),
            msg,
        };
        if let Some(file) = file {
            let text = std::fs::read_to_string(file).map_err(|source| Error::Io {
                path: file.to_path_buf(),
                source,
            })?;
            let user: toml::Table = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
            merge(&mut value, user);
        }
        for (key, raw) in std::env::vars() {
            if let Some(rest) = key.strip_prefix("KOE_") {
                apply_env(&mut value, rest, &raw).map_err(|m| err(format!("{key}: {m}")))?;
            }
        }
        let settings: Settings = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| err(e.to_string()))?;
        settings.validate().map_err(err)?;
        Ok(settings)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let l = &self.limits;
        if l.max_text_chars == 0 {
            return Err("limits.max_text_chars must be > 0".into());
        }
        if !(l.min_ref_seconds > 0.0 && l.min_ref_seconds < l.max_ref_seconds) {
            return Err(format!(
                "limits.min_ref_seconds ({}) must be > 0 and below limits.max_ref_seconds ({})",
                l.min_ref_seconds, l.max_ref_seconds
            ));
        }
        if l.max_frames < 1 {
            return Err("limits.max_frames must be >= 1".into());
        }
        self.model
            .dtype
            .parse::<crate::model::linear::WeightFormat>()
            .map_err(|e| format!("model.dtype: {e}"))?;
        if !["cpu", "cuda", "metal"].contains(&self.model.device.as_str()) {
            return Err(format!(
                "model.device {:?}: expected cpu, cuda or metal",
                self.model.device
            ));
        }
        let g = &self.generation;
        crate::model::sampling::SamplingParams {
            greedy: g.greedy,
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
        }
        .validate("generation")?;
        if !(g.repetition_penalty.is_finite() && g.repetition_penalty > 0.0) {
            return Err(format!(
                "generation.repetition_penalty must be > 0, got {}",
                g.repetition_penalty
            ));
        }
        Ok(())
    }

    /// Checks a text against the limits: not empty, not too long.
    pub fn check_text(&self, text: &str) -> Result<()> {
        if text.trim().is_empty() {
            return Err(Error::EmptyText);
        }
        let chars = text.chars().count();
        if chars > self.limits.max_text_chars {
            return Err(Error::TextTooLong {
                chars,
                max: self.limits.max_text_chars,
            });
        }
        Ok(())
    }
}

fn merge(base: &mut toml::Table, user: toml::Table) {
    for (k, v) in user {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(u)) => merge(b, u),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// `SECTION_KEY=value` onto the table, typed like the default it replaces.
fn apply_env(table: &mut toml::Table, name: &str, raw: &str) -> std::result::Result<(), String> {
    let lower = name.to_lowercase();
    let Some((section, key)) = lower.split_once('_') else {
        return Ok(());
    };
    let Some(toml::Value::Table(sec)) = table.get_mut(section) else {
        return Ok(()); // not a settings variable (e.g. KOE_PARITY_DIRS)
    };
    let Some(old) = sec.get(key) else {
        return Err(format!("no setting {section}.{key}"));
    };
    let new = match old {
        toml::Value::String(_) => toml::Value::String(raw.to_string()),
        toml::Value::Integer(_) => toml::Value::Integer(raw.parse().map_err(|_| format!("{raw:?} is not an integer"))?),
        toml::Value::Float(_) => toml::Value::Float(raw.parse().map_err(|_| format!("{raw:?} is not a number"))?),
        toml::Value::Boolean(_) => toml::Value::Boolean(raw.parse().map_err(|_| format!("{raw:?} is not true/false"))?),
        _ => return Err("not settable from the environment".into()),
    };
    sec.insert(key.to_string(), new);
    Ok(())
}
