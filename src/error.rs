//! koe's typed errors: every bad input or broken file becomes one of these, with a message
//! that says what was wrong and where.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {file}: {msg}")]
    Config { file: PathBuf, msg: String },

    #[error("weights {file}: {source}")]
    Weights {
        file: PathBuf,
        #[source]
        source: candle_core::Error,
    },

    #[error("tokenizer in {dir}: {msg}")]
    Tokenizer { dir: PathBuf, msg: String },

    #[error("text is empty")]
    EmptyText,

    #[error("text has {chars} characters, over the limit of {max}")]
    TextTooLong { chars: usize, max: usize },

    #[error("unsupported language {language:?}; supported: auto, {supported}")]
    UnsupportedLanguage { language: String, supported: String },

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error(
        "model {repo} is not in the Hugging Face cache and cannot be downloaded ({reason}); \
         download it where the hub is reachable, or pass a local checkpoint directory with --model DIR"
    )]
    ModelUnavailable { repo: String, reason: String },

    #[error("audio: {0}")]
    Audio(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("no voice {id:?} in {dir} (available: {available})")]
    VoiceNotFound {
        id: String,
        dir: PathBuf,
        available: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
