//! Talker prompt assembly, exactly as `Qwen3TTSForConditionalGeneration.generate` (Base) and
//! `generate_icl_prompt` build it.

use super::tts::TtsModel;
use crate::error::{Error, Result};
use candle_core::Tensor;

/// How the target text enters the prompt (`non_streaming_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TextMode {
    /// Text is added position by position to the codec side; what is left trails one position
    /// per generated frame (the package default).
    #[default]
    Streaming,
    /// All text first (with `codec_pad`), then the codec side.
    NonStreaming,
}

/// A voice: the x-vector, plus the reference codes and transcript for in-context cloning.
#[derive(Debug, Clone)]
pub struct VoicePrompt {
    /// Speaker embedding, [talker hidden].
    pub speaker_embedding: Tensor,
    pub icl: Option<IclReference>,
}

#[derive(Debug, Clone)]
pub struct IclReference {
    /// Reference codes, [frames, code groups].
    pub codes: Tensor,
    /// Token ids of `ref_text(transcript)`.
    pub text_ids: Vec<u32>,
}

/// What the talker receives.
#[derive(Debug, Clone)]
pub struct TalkerPrompt {
    /// Input embeddings of the whole prompt, [P, hidden].
    pub embeds: Tensor,
    /// Text fed one row per generated frame after the prompt, [R, hidden].
    pub trailing: Tensor,
    /// `tts_pad` projected, fed once the trailing text is used up, [hidden].
    pub tts_pad: Tensor,
    /// Leading rows of `embeds` that depend only on the voice, the language and the mode
    /// (role tokens, codec tags, speaker, and the reference transcript's rows): their keys and
    /// values can be computed once per voice and reused (`engine::PromptPrefix`).
    pub voice_rows: usize,
}

/// The codec language id for a language name (`auto` → none).
pub fn language_id(model: &TtsModel, language: &str) -> Result<Option<u32>> {
    let lower = language.to_lowercase();
    if lower == "auto" {
        return Ok(None);
    }
    let ids = &model.config.talker_config.codec_language_id;
    ids.get(&lower)
        .copied()
        .map(Some)
        .ok_or_else(|| Error::UnsupportedLanguage {
            language: language.to_string(),
            supported: ids.keys().cloned().collect::<Vec<_>>().join(", "),
        })
}

/// Builds the prompt from the target's template ids (`assistant_text(text)` tokenized).
pub fn build(
    model: &TtsModel,
    input_ids: &[u32],
    voice: &VoicePrompt,
    language: Option<u32>,
    mode: TextMode,
) -> Result<TalkerPrompt> {
    if input_ids.len() < 9 {
        return Err(Error::InvalidRequest(format!(
            "{} template tokens: the text encodes to nothing",
            input_ids.len()
        )));
    }
    let cfg = &model.config;
    let tc = &cfg.talker_config;
    let talker = &model.talker;
    let special = talker.embed_text(&[cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id])?;
    let tts_bos = special.narrow(0, 0, 1)?;
    let tts_eos = special.narrow(0, 1, 1)?;
    let tts_pad = special.narrow(0, 2, 1)?;

    let mut codec_ids = match language {
        None => vec![tc.codec_nothink_id, tc.codec_think_bos_id, tc.codec_think_eos_id],
        Some(lang) => vec![tc.codec_think_id, tc.codec_think_bos_id, lang, tc.codec_think_eos_id],
    };
    let tag_len = codec_ids.len();
    codec_ids.extend([tc.codec_pad_id, tc.codec_bos_id]);
    let codec_all = talker.embed_codec(&codec_ids)?;
    let speaker = voice.speaker_embedding.reshape((1, ()))?.to_dtype(codec_all.dtype())?;
    // [tags…, speaker, codec_pad, codec_bos]
    let codec = Tensor::cat(
        &[
            &codec_all.narrow(0, 0, tag_len)?,
            &speaker,
            &codec_all.narrow(0, tag_len, 2)?,
        ],
        0,
    )?;
    let codec_len = codec.dim(0)?;
    let codec_bos = codec.narrow(0, codec_len - 1, 1)?;

    let role = talker.embed_text(&input_ids[..3])?;
    // tts_pad × (len − 2), tts_bos, summed with every codec position but the final codec_bos.
    let text_side = Tensor::cat(&[&tts_pad.repeat((codec_len - 2, 1))?, &tts_bos], 0)?;
    let head = (text_side + codec.narrow(0, 0, codec_len - 1)?)?;

    let text_ids = &input_ids[3..input_ids.len() - 5];
    let (tail, trailing, tail_voice_rows) = match &voice.icl {
        Some(icl) => icl_part(model, text_ids, icl, &tts_pad, &tts_eos, mode)?,
        None => match mode {
            TextMode::Streaming => {
                let first = (talker.embed_text(&text_ids[..1])? + &codec_bos)?;
                let rest = &text_ids[1..];
                let trailing = if rest.is_empty() {
                    tts_eos.clone()
                } else {
                    Tensor::cat(&[&talker.embed_text(rest)?, &tts_eos], 0)?
                };
                (first, trailing, 0)
            }
            TextMode::NonStreaming => {
                let text = Tensor::cat(&[&talker.embed_text(text_ids)?, &tts_eos], 0)?;
                let pads = talker.embed_codec(&vec![tc.codec_pad_id; text_ids.len() + 1])?;
                let tail = Tensor::cat(&[&(text + pads)?, &(&tts_pad + &codec_bos)?], 0)?;
                (tail, tts_pad.clone(), 0)
            }
        },
    };
    Ok(TalkerPrompt {
        voice_rows: role.dim(0)? + head.dim(0)? + tail_voice_rows,
        embeds: Tensor::cat(&[&role, &head, &tail], 0)?,
        trailing,
        tts_pad: tts_pad.squeeze(0)?,
    })
}

/// `generate_icl_prompt`: (prompt tail, trailing text, leading tail rows made of the reference
/// alone).
fn icl_part(
    model: &TtsModel,
    text_ids: &[u32],
    icl: &IclReference,
    tts_pad: &Tensor,
    tts_eos: &Tensor,
    mode: TextMode,
) -> Result<(Tensor, Tensor, usize)> {
    let talker = &model.talker;
    let tc = &model.config.talker_config;
    let n = icl.text_ids.len();
    if n < 6 {
        return Err(Error::InvalidRequest(
            "the reference transcript encodes to nothing".into(),
        ));
    }
    let ref_rows = n - 5;
    let ids: Vec<u32> = icl.text_ids[3..n - 2].iter().chain(text_ids).copied().collect();
    let text = Tensor::cat(&[&talker.embed_text(&ids)?, tts_eos], 0)?;
    let codec = Tensor::cat(
        &[
            &talker.embed_codec(&[tc.codec_bos_id])?,
            &model.frame_embeddings(&icl.codes)?,
        ],
        0,
    )?;
    let (text_len, codec_len) = (text.dim(0)?, codec.dim(0)?);
    Ok(match mode {
        TextMode::NonStreaming => {
            let pads = talker.embed_codec(&vec![tc.codec_pad_id; text_len])?;
            let tail = Tensor::cat(&[&(text + pads)?, &codec.broadcast_add(tts_pad)?], 0)?;
            (tail, tts_pad.clone(), ref_rows)
        }
        // Row i is text i + codec i: the reference transcript's rows come first.
        TextMode::Streaming if text_len > codec_len => {
            let tail = (text.narrow(0, 0, codec_len)? + codec)?;
            let trailing = text.narrow(0, codec_len, text_len - codec_len)?;
            (tail, trailing, ref_rows.min(codec_len))
        }
        TextMode::Streaming if text_len == codec_len => ((text + codec)?, tts_pad.clone(), ref_rows),
        TextMode::Streaming => {
            let padded = Tensor::cat(&[&text, &tts_pad.repeat((codec_len - text_len, 1))?], 0)?;
            ((padded + codec)?, tts_pad.clone(), ref_rows)
        }
    })
}
