//! Voice profiles: a directory `voices/<id>/` holding `manifest.json` and a reference clip,
//! the clip's validation (length limits, mono, the model's rate), and the cache of a voice's
//! encoded prompt kept beside its manifest.
//!
//! ```json
//! { "id": "default", "display_name": "Default", "language": "english",
//!   "transcript": "The exact words spoken in the clip.", "reference": "reference.wav",
//!   "mode": "icl" }
//! ```
//! `mode` is `icl` (in-context cloning: the clip's codes and transcript lead the prompt; the
//! transcript is required) or `x_vector` (the speaker embedding alone).

use crate::audio::resample::resample;
use crate::audio::wav::{read_wav, Audio, PartFile};
use crate::config::Limits;
use crate::error::{Error, Result};
use crate::model::prompt::{IclReference, VoicePrompt};
use crate::model::weights::in_file;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

pub const MANIFEST_FILE: &str = "manifest.json";

/// How the voice conditions the talker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VoiceMode {
    /// In-context cloning: the reference codes and transcript are part of the prompt.
    Icl,
    /// The speaker embedding (x-vector) alone.
    XVector,
}

impl VoiceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VoiceMode::Icl => "icl",
            VoiceMode::XVector => "x_vector",
        }
    }
}

/// `manifest.json` of a voice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub id: String,
    pub display_name: String,
    /// A language name the model knows (`english`, …) or `auto`.
    pub language: String,
    /// The exact words spoken in the reference clip; required in `icl` mode.
    #[serde(default)]
    pub transcript: Option<String>,
    /// The clip's file name inside the voice directory.
    #[serde(default = "default_reference")]
    pub reference: String,
    pub mode: VoiceMode,
}

fn default_reference() -> String {
    "reference.wav".into()
}

/// A voice profile read from its directory.
#[derive(Debug, Clone)]
pub struct Voice {
    pub manifest: Manifest,
    pub dir: PathBuf,
}

/// Checks a voice id: `[a-z0-9_-]+`, so an id can never name a path outside the store.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "voice id {id:?}: only lowercase letters, digits, '_' and '-' are allowed"
        )))
    }
}

impl Voice {
    /// Reads and checks `dir/manifest.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&file).map_err(|source| Error::Io {
            path: file.clone(),
            source,
        })?;
        let bad = |msg: String| Error::Config {
            file: file.clone(),
            msg,
        };
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        validate_id(&manifest.id).map_err(|e| bad(e.to_string()))?;
        if manifest.language.trim().is_empty() {
            return Err(bad("language is empty (use \"auto\" to detect it)".into()));
        }
        let mut parts = Path::new(&manifest.reference).components();
        if !matches!((parts.next(), parts.next()), (Some(Component::Normal(_)), None)) {
            return Err(bad(format!(
                "reference {:?} must be a file name inside the voice directory",
                manifest.reference
            )));
        }
        let voice = Voice {
            manifest,
            dir: dir.to_path_buf(),
        };
        if voice.manifest.mode == VoiceMode::Icl && voice.transcript().is_none() {
            return Err(bad("mode \"icl\" needs the exact transcript of the reference clip \
                 (or use mode \"x_vector\")"
                .into()));
        }
        Ok(voice)
    }

    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    pub fn reference_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.reference)
    }

    /// The transcript, if it has any words.
    pub fn transcript(&self) -> Option<&str> {
        self.manifest.transcript.as_deref().filter(|t| !t.trim().is_empty())
    }

    /// The reference clip, checked against `limits`, mono at `sample_rate` Hz.
    pub fn load_reference(&self, limits: &Limits, sample_rate: u32) -> Result<Vec<f32>> {
        load_reference(&self.reference_path(), limits, sample_rate)
    }

    /// The cache key of this voice's encoded prompt for a model (see [`prompt_cache_key`]).
    pub fn prompt_cache_key(&self, model_identity: &str) -> Result<String> {
        let path = self.reference_path();
        let clip = std::fs::read(&path).map_err(|source| Error::Io { path, source })?;
        Ok(prompt_cache_key(
            model_identity,
            &clip,
            self.transcript(),
            self.manifest.mode,
        ))
    }

    /// Where this voice's encoded prompt for a model is cached: `prompt-<key>.safetensors`
    /// beside the manifest. A changed clip, transcript or mode gives a new name, so a stale
    /// cache is never read.
    pub fn prompt_cache_path(&self, model_identity: &str) -> Result<PathBuf> {
        let key = self.prompt_cache_key(model_identity)?;
        Ok(self.dir.join(format!("prompt-{key}.safetensors")))
    }
}

/// The voices under one directory, one subdirectory per voice.
#[derive(Debug, Clone)]
pub struct VoiceStore {
    dir: PathBuf,
}

impl VoiceStore {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "voices directory not found"),
            });
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every voice (subdirectories with a manifest), sorted by id. A broken manifest is an
    /// error naming it.
    pub fn list(&self) -> Result<Vec<Voice>> {
        let mut voices = self
            .voice_dirs()?
            .iter()
            .map(|dir| self.read(dir))
            .collect::<Result<Vec<_>>>()?;
        voices.sort_by(|a, b| a.manifest.id.cmp(&b.manifest.id));
        Ok(voices)
    }

    /// The voice `id` (validated first: it never leaves the store).
    pub fn get(&self, id: &str) -> Result<Voice> {
        validate_id(id)?;
        let dir = self.dir.join(id);
        if !dir.join(MANIFEST_FILE).is_file() {
            let mut available: Vec<String> = self
                .voice_dirs()?
                .iter()
                .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            available.sort();
            return Err(Error::VoiceNotFound {
                id: id.to_string(),
                dir: self.dir.clone(),
                available: available.join(", "),
            });
        }
        self.read(&dir)
    }

    /// `--voice` on the command line: a voice id in this store, else a voice directory path.
    /// (Requests from the network go through [`VoiceStore::get`], which takes ids only.)
    pub fn resolve(&self, id_or_dir: &str) -> Result<Voice> {
        let path = Path::new(id_or_dir);
        let in_store = validate_id(id_or_dir).is_ok() && self.dir.join(id_or_dir).join(MANIFEST_FILE).is_file();
        if !in_store && path.join(MANIFEST_FILE).is_file() {
            return Voice::from_dir(path);
        }
        self.get(id_or_dir)
    }

    fn voice_dirs(&self) -> Result<Vec<PathBuf>> {
        let io = |source| Error::Io {
            path: self.dir.clone(),
            source,
        };
        let mut dirs = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.join(MANIFEST_FILE).is_file() {
                dirs.push(path);
            }
        }
        Ok(dirs)
    }

    /// A voice of the store: its manifest's id must be its directory's name.
    fn read(&self, dir: &Path) -> Result<Voice> {
        let voice = Voice::from_dir(dir)?;
        if dir.file_name() != Some(voice.manifest.id.as_ref()) {
            return Err(Error::Config {
                file: dir.join(MANIFEST_FILE),
                msg: format!("id {:?} differs from the directory's name", voice.manifest.id),
            });
        }
        Ok(voice)
    }
}

/// Reads a reference clip: any WAV, checked against the clip-length limits, mixed to mono
/// and resampled to `sample_rate` (the model's rate, 24 kHz for Qwen3-TTS-12Hz).
pub fn load_reference(path: &Path, limits: &Limits, sample_rate: u32) -> Result<Vec<f32>> {
    prepare_reference(read_wav(path)?, &path.display().to_string(), limits, sample_rate)
}

/// [`load_reference`] for a clip already read (an upload); `source` names it in errors.
pub fn prepare_reference(audio: Audio, source: &str, limits: &Limits, sample_rate: u32) -> Result<Vec<f32>> {
    let seconds = audio.duration_seconds();
    if audio.samples.is_empty() {
        return Err(Error::Audio(format!("{source}: the reference clip is empty")));
    }
    if seconds < limits.min_ref_seconds {
        return Err(Error::Audio(format!(
            "{source}: the reference clip is {seconds:.2} s long; at least {} s of speech is needed",
            limits.min_ref_seconds
        )));
    }
    if seconds > limits.max_ref_seconds {
        return Err(Error::Audio(format!(
            "{source}: the reference clip is {seconds:.2} s long; at most {} s is accepted",
            limits.max_ref_seconds
        )));
    }
    resample(&audio.samples, audio.sample_rate, sample_rate)
}

/// The cache key of an encoded voice prompt: SHA-256 (first 16 bytes, hex) of everything the
/// encoding depends on. `model_identity` must change whenever the encoders' output would
/// (checkpoint id and revision, and the dtype when it changes the result).
pub fn prompt_cache_key(model_identity: &str, clip: &[u8], transcript: Option<&str>, mode: VoiceMode) -> String {
    let mut hash = Sha256::new();
    // Each field length-prefixed, so no two different inputs hash the same byte stream.
    for field in [
        PROMPT_FORMAT.as_bytes(),
        model_identity.as_bytes(),
        clip,
        transcript.unwrap_or("").as_bytes(),
        mode.as_str().as_bytes(),
    ] {
        hash.update((field.len() as u64).to_le_bytes());
        hash.update(field);
    }
    hash.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Names the layout of a cached prompt file; part of the key, so a new layout re-encodes.
const PROMPT_FORMAT: &str = "koe-voice-prompt-v1";

const SPEAKER_EMBEDDING: &str = "speaker_embedding";
const REF_CODES: &str = "ref_codes";
const REF_TEXT_IDS: &str = "ref_text_ids";

/// Saves an encoded voice prompt as safetensors (`speaker_embedding`, and for ICL `ref_codes`
/// and `ref_text_ids` as u32). Written beside `path` and renamed onto it, so a reader never
/// sees half a file.
pub fn save_prompt(prompt: &VoicePrompt, path: &Path) -> Result<()> {
    let mut tensors = HashMap::from([(SPEAKER_EMBEDDING, prompt.speaker_embedding.clone())]);
    if let Some(icl) = &prompt.icl {
        tensors.insert(REF_CODES, icl.codes.clone());
        let ids = Tensor::new(icl.text_ids.as_slice(), &Device::Cpu);
        tensors.insert(REF_TEXT_IDS, in_file(path, ids)?);
    }
    let (part, file) = PartFile::create(path)?;
    drop(file);
    in_file(path, candle_core::safetensors::save(&tensors, part.path()))?;
    part.rename_to(path)
}

/// Loads a prompt saved by [`save_prompt`] onto `device`, checking its tensors' ranks.
pub fn load_prompt(path: &Path, device: &Device) -> Result<VoicePrompt> {
    let mut tensors = in_file(path, candle_core::safetensors::load(path, device))?;
    let bad = |msg: String| Error::Config {
        file: path.to_path_buf(),
        msg,
    };
    let mut take = |name: &str, rank: usize| -> Result<Option<Tensor>> {
        match tensors.remove(name) {
            Some(t) if t.rank() != rank => Err(bad(format!("{name} has shape {:?}, expected rank {rank}", t.dims()))),
            t => Ok(t),
        }
    };
    let speaker_embedding = take(SPEAKER_EMBEDDING, 1)?.ok_or_else(|| bad(format!("no {SPEAKER_EMBEDDING}")))?;
    let icl = match (take(REF_CODES, 2)?, take(REF_TEXT_IDS, 1)?) {
        (Some(codes), Some(ids)) => {
            let text_ids = in_file(path, ids.to_dtype(DType::U32).and_then(|t| t.to_vec1::<u32>()))?;
            Some(IclReference { codes, text_ids })
        }
        (None, None) => None,
        _ => return Err(bad(format!("{REF_CODES} and {REF_TEXT_IDS} come together"))),
    };
    Ok(VoicePrompt { speaker_embedding, icl })
}
