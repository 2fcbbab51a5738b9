//! The talker's text tokenizer and the package's prompt templates.
//!
//! The release ships `vocab.json` + `merges.txt` + `tokenizer_config.json` and no
//! `tokenizer.json`, so the Qwen2 byte-level BPE is assembled here exactly as transformers'
//! `Qwen2TokenizerFast` converts it: NFC, the Qwen2 split regex, byte level, and the added tokens
//! of `added_tokens_decoder` (matched before splitting). A `tokenizer.json` in the checkpoint
//! directory wins when present.
//!
//! Deliberately *not* reproduced: transformers 4.57.3's `fix_mistral_regex` patch, which swaps
//! in a Mistral regex for local checkpoints with > 100 000 entries. The model was trained with
//! the Qwen2 regex (and loading by hub repo id skips the patch), so koe always uses Qwen2's.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's pre-tokenizer split pattern.
pub const QWEN2_SPLIT_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Deserialize)]
struct TokenizerConfigFile {
    #[serde(default)]
    added_tokens_decoder: BTreeMap<String, AddedTokenEntry>,
}

#[derive(Deserialize)]
struct AddedTokenEntry {
    content: String,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    normalized: bool,
    #[serde(default)]
    special: bool,
}

/// Text tokenizer of a Qwen3-TTS checkpoint.
pub struct TextTokenizer {
    inner: Tokenizer,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` if the directory has one, else builds the BPE from
    /// `vocab.json` + `merges.txt` + `tokenizer_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let err = |msg: String| Error::Tokenizer {
            dir: dir.to_path_buf(),
            msg,
        };
        let json = dir.join("tokenizer.json");
        let inner = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| err(format!("tokenizer.json: {e}")))?
        } else {
            Self::build_qwen2_bpe(dir).map_err(err)?
        };
        Ok(Self { inner })
    }

    fn build_qwen2_bpe(dir: &Path) -> std::result::Result<Tokenizer, String> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for f in [&vocab, &merges] {
            if !f.is_file() {
                return Err(format!("{} is missing (and there is no tokenizer.json)", f.display()));
            }
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(|e| format!("vocab.json/merges.txt: {e}"))?;
        let mut tok = Tokenizer::new(bpe);
        tok.with_normalizer(Some(NFC));
        let split = Split::new(
            SplitPattern::Regex(QWEN2_SPLIT_REGEX.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("split regex: {e}"))?;
        // add_prefix_space = false, trim_offsets = true, use_regex = false (the split above does it).
        let byte_level = ByteLevel::new(false, true, false);
        tok.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), byte_level.into()])));
        tok.with_decoder(Some(ByteLevelDecoder::default()));

        let config_file = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&config_file).map_err(|e| format!("{}: {e}", config_file.display()))?;
        let config: TokenizerConfigFile =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", config_file.display()))?;
        let mut added: Vec<(u32, AddedTokenEntry)> = Vec::new();
        for (id, entry) in config.added_tokens_decoder {
            let id: u32 = id
                .parse()
                .map_err(|_| format!("added token id {id:?} is not a number"))?;
            added.push((id, entry));
        }
        added.sort_by_key(|(id, _)| *id);
        for (id, e) in &added {
            let token = AddedToken::from(e.content.clone(), e.special)
                .lstrip(e.lstrip)
                .rstrip(e.rstrip)
                .single_word(e.single_word)
                .normalized(e.normalized);
            // Added tokens take the next free ids in order; the release numbers them that way.
            tok.add_tokens(&[token]);
            let got = tok.token_to_id(&e.content);
            if got != Some(*id) {
                return Err(format!("added token {:?} should have id {id}, got {got:?}", e.content));
            }
        }
        Ok(tok)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer {
            dir: Default::default(),
            msg: format!("encode: {e}"),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// The target text as the package wraps it (`_build_assistant_text`).
pub fn assistant_text(text: &str) -> String {
    format!("<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n")
}

/// The reference transcript as the package wraps it (`_build_ref_text`).
pub fn ref_text(text: &str) -> String {
    format!("<|im_start|>assistant\n{text}<|im_end|>\n")
}
