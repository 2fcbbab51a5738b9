//! `config.json` and `generation_config.json` of a Qwen3-TTS checkpoint.
//!
//! Defaults are the *code* defaults of the package's config classes
//! (`core/models/configuration_qwen3_tts.py`), so a sparse published config loads as the
//! package would load it.

use super::speaker_encoder::SpeakerEncoderConfig;
use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Reads and deserialises a JSON file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(file: &Path) -> Result<T> {
    let text = std::fs::read_to_string(file).map_err(|source| Error::Io {
        path: file.to_path_buf(),
        source,
    })?;
    // The path names the offending key, e.g. `talker_config.hidden_size: invalid type …`.
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| Error::Config {
        file: file.to_path_buf(),
        msg: e.to_string(),
    })
}

/// `cfg` once `check` accepts it; its complaint becomes a config error naming `file`.
pub fn validated<T>(file: &Path, cfg: T, check: impl FnOnce(&T) -> std::result::Result<(), String>) -> Result<T> {
    check(&cfg).map_err(|msg| Error::Config {
        file: file.to_path_buf(),
        msg,
    })?;
    Ok(cfg)
}

macro_rules! defaults {
    ($($name:ident: $ty:ty = $value:expr;)*) => {
        $(fn $name() -> $ty { $value })*
    };
}

defaults! {
    tts_pad_default: u32 = 151671;
    tts_bos_default: u32 = 151672;
    tts_eos_default: u32 = 151673;
    im_start_default: u32 = 151644;
    im_end_default: u32 = 151645;
    assistant_default: u32 = 77091;
    talker_vocab_default: usize = 3072;
    talker_hidden_default: usize = 1024;
    talker_intermediate_default: usize = 2048;
    talker_layers_default: usize = 20;
    talker_heads_default: usize = 16;
    talker_kv_heads_default: usize = 2;
    eps_default: f64 = 1e-6;
    rope_theta_default: f64 = 10000.0;
    code_groups_default: usize = 32;
    text_hidden_default: usize = 2048;
    text_vocab_default: usize = 151936;
    codec_eos_default: u32 = 4198;
    codec_think_default: u32 = 4202;
    codec_nothink_default: u32 = 4203;
    codec_think_bos_default: u32 = 4204;
    codec_think_eos_default: u32 = 4205;
    codec_pad_default: u32 = 4196;
    codec_bos_default: u32 = 4197;
    cp_vocab_default: usize = 2048;
    cp_hidden_default: usize = 1024;
    cp_intermediate_default: usize = 3072;
    cp_layers_default: usize = 5;
    cp_heads_default: usize = 16;
    cp_kv_heads_default: usize = 8;
    cp_head_dim_default: usize = 128;
    silu_default: String = "silu".to_string();
}

/// Top-level `config.json` (`Qwen3TTSConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3TtsConfig {
    #[serde(default)]
    pub talker_config: TalkerConfig,
    /// Absent or null means every default, as in `Qwen3TTSConfig`.
    #[serde(default)]
    pub speaker_encoder_config: Option<SpeakerEncoderConfig>,
    #[serde(default)]
    pub tts_model_type: Option<String>,
    #[serde(default = "im_start_default")]
    pub im_start_token_id: u32,
    #[serde(default = "im_end_default")]
    pub im_end_token_id: u32,
    #[serde(default = "tts_pad_default")]
    pub tts_pad_token_id: u32,
    #[serde(default = "tts_bos_default")]
    pub tts_bos_token_id: u32,
    #[serde(default = "tts_eos_default")]
    pub tts_eos_token_id: u32,
    #[serde(default = "assistant_default")]
    pub assistant_token_id: u32,
}

/// `talker_config` (`Qwen3TTSTalkerConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct TalkerConfig {
    #[serde(default = "talker_vocab_default")]
    pub vocab_size: usize,
    #[serde(default = "talker_hidden_default")]
    pub hidden_size: usize,
    #[serde(default = "talker_intermediate_default")]
    pub intermediate_size: usize,
    #[serde(default = "talker_layers_default")]
    pub num_hidden_layers: usize,
    #[serde(default = "talker_heads_default")]
    pub num_attention_heads: usize,
    #[serde(default = "talker_kv_heads_default")]
    pub num_key_value_heads: usize,
    /// The attention uses `getattr(config, "head_dim", hidden / heads)`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "silu_default")]
    pub hidden_act: String,
    #[serde(default = "eps_default")]
    pub rms_norm_eps: f64,
    #[serde(default = "rope_theta_default")]
    pub rope_theta: f64,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "code_groups_default")]
    pub num_code_groups: usize,
    #[serde(default = "text_hidden_default")]
    pub text_hidden_size: usize,
    /// Not a parameter of the Python class (it arrives through `**kwargs`); the release's value.
    #[serde(default = "text_vocab_default")]
    pub text_vocab_size: usize,
    #[serde(default = "codec_eos_default")]
    pub codec_eos_token_id: u32,
    #[serde(default = "codec_think_default")]
    pub codec_think_id: u32,
    #[serde(default = "codec_nothink_default")]
    pub codec_nothink_id: u32,
    #[serde(default = "codec_think_bos_default")]
    pub codec_think_bos_id: u32,
    #[serde(default = "codec_think_eos_default")]
    pub codec_think_eos_id: u32,
    #[serde(default = "codec_pad_default")]
    pub codec_pad_id: u32,
    #[serde(default = "codec_bos_default")]
    pub codec_bos_id: u32,
    #[serde(default)]
    pub codec_language_id: BTreeMap<String, u32>,
    #[serde(default)]
    pub code_predictor_config: CodePredictorConfig,
}

impl Default for TalkerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every talker field has a default")
    }
}

impl TalkerConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

/// `code_predictor_config` (`Qwen3TTSTalkerCodePredictorConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct CodePredictorConfig {
    #[serde(default = "cp_vocab_default")]
    pub vocab_size: usize,
    #[serde(default = "cp_hidden_default")]
    pub hidden_size: usize,
    #[serde(default = "cp_intermediate_default")]
    pub intermediate_size: usize,
    #[serde(default = "cp_layers_default")]
    pub num_hidden_layers: usize,
    #[serde(default = "cp_heads_default")]
    pub num_attention_heads: usize,
    #[serde(default = "cp_kv_heads_default")]
    pub num_key_value_heads: usize,
    #[serde(default = "cp_head_dim_default")]
    pub head_dim: usize,
    #[serde(default = "silu_default")]
    pub hidden_act: String,
    #[serde(default = "eps_default")]
    pub rms_norm_eps: f64,
    #[serde(default = "rope_theta_default")]
    pub rope_theta: f64,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "code_groups_default")]
    pub num_code_groups: usize,
}

impl Default for CodePredictorConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every code predictor field has a default")
    }
}

impl Qwen3TtsConfig {
    pub fn speaker_encoder(&self) -> SpeakerEncoderConfig {
        self.speaker_encoder_config.clone().unwrap_or_default()
    }

    /// Loads `config.json` and checks the facts the port relies on.
    pub fn load(file: &Path) -> Result<Self> {
        validated(file, read_json(file)?, Self::validate)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let t = &self.talker_config;
        let cp = &t.code_predictor_config;
        if t.hidden_act != "silu" || cp.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?}/{:?} is not supported (only silu)",
                t.hidden_act, cp.hidden_act
            ));
        }
        for (what, heads, kv) in [
            ("talker", t.num_attention_heads, t.num_key_value_heads),
            ("code predictor", cp.num_attention_heads, cp.num_key_value_heads),
        ] {
            if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
                return Err(format!(
                    "{what}: {heads} attention heads are not a multiple of {kv} key/value heads"
                ));
            }
        }
        if t.num_code_groups < 2 || t.num_code_groups != cp.num_code_groups {
            return Err(format!(
                "talker has {} code groups, code predictor {}",
                t.num_code_groups, cp.num_code_groups
            ));
        }
        if t.vocab_size < 1024 {
            return Err(format!(
                "talker vocab_size {} is below the 1024 special ids it reserves",
                t.vocab_size
            ));
        }
        Ok(())
    }
}

/// `generation_config.json`: the package's default sampling settings.
#[derive(Debug, Clone, Deserialize)]
pub struct GenerationConfig {
    #[serde(default = "yes")]
    pub do_sample: bool,
    #[serde(default = "penalty_default")]
    pub repetition_penalty: f32,
    #[serde(default = "temperature_default")]
    pub temperature: f32,
    #[serde(default = "one")]
    pub top_p: f32,
    #[serde(default = "top_k_default")]
    pub top_k: usize,
    #[serde(default = "yes")]
    pub subtalker_dosample: bool,
    #[serde(default = "temperature_default")]
    pub subtalker_temperature: f32,
    #[serde(default = "one")]
    pub subtalker_top_p: f32,
    #[serde(default = "top_k_default")]
    pub subtalker_top_k: usize,
    #[serde(default = "max_new_tokens_default")]
    pub max_new_tokens: usize,
}

defaults! {
    yes: bool = true;
    penalty_default: f32 = 1.05;
    temperature_default: f32 = 0.9;
    one: f32 = 1.0;
    top_k_default: usize = 50;
    max_new_tokens_default: usize = 8192;
}

impl Default for GenerationConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every generation field has a default")
    }
}

impl GenerationConfig {
    /// A missing `generation_config.json` means the package defaults.
    pub fn load_or_default(file: &Path) -> Result<Self> {
        if file.is_file() {
            read_json(file)
        } else {
            Ok(Self::default())
        }
    }
}
