//! The whole pipeline in one place: reference clip → voice, and text → streamed 24 kHz audio.
//!
//! `Synthesizer` owns every model of a checkpoint (talker + code predictor, speaker encoder,
//! speech tokenizer encoder and decoder). A `Voice` is what a reference encodes to, including
//! the decoder state primed with the reference codes, so an utterance never pays for decoding
//! the reference. An `Utterance` steps generation one frame at a time and decodes each frame as
//! it comes (exact streaming: the concatenation equals the whole-sequence decode).

use crate::config::Limits;
use crate::error::{Error, Result};
use crate::model::engine::{EndReason, GenerationParams, PromptPrefix, Sequence, StepInput, StepOutcome};
use crate::model::linear::WeightFormat;
use crate::model::prompt::{self, IclReference, TextMode, VoicePrompt};
use crate::model::speaker_encoder::{speaker_embedding, SpeakerEncoder};
use crate::model::speech_tokenizer::decoder::{DecoderConfig as CodecDecoderConfig, DecoderState, SpeechDecoder};
use crate::model::speech_tokenizer::encoder::{SpeechEncoder, SpeechTokenizerConfig};
use crate::model::tokenizer::{assistant_text, ref_text};
use crate::model::tts::TtsModel;
use crate::model::weights;
use crate::voices::{load_prompt, save_prompt, VoiceMode};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

/// Qwen3-TTS-12Hz's audio rate.
pub const SAMPLE_RATE: u32 = 24_000;

pub struct Synthesizer {
    pub tts: TtsModel,
    pub speaker_encoder: SpeakerEncoder,
    pub speech_encoder: SpeechEncoder,
    pub speech_decoder: SpeechDecoder,
}

/// A voice's talker prefixes by (codec language id, text mode).
type PrefixMap = HashMap<(Option<u32>, TextMode), Arc<PromptPrefix>>;

/// An encoded voice, ready for any number of utterances.
#[derive(Clone)]
pub struct Voice {
    pub prompt: VoicePrompt,
    /// Decoder state after the reference codes (ICL) or fresh (x-vector only).
    pub decoder_state: DecoderState,
    /// The last reference sample the primed decoder produced (see `package_icl_cut`).
    pub ref_tail_sample: f32,
    /// The talker's keys and values for the voice's prompt rows, per (language, text mode):
    /// filled by the first utterance of each, so later ones prefill only their own text.
    prefixes: Arc<Mutex<PrefixMap>>,
}

impl Voice {
    pub fn ref_frames(&self) -> usize {
        self.prompt.icl.as_ref().map_or(0, |icl| icl.codes.dim(0).unwrap_or(0))
    }
}

/// Where the package cuts an ICL waveform (`generate_voice_clone`): it decodes reference +
/// generated codes together and drops `int(ref / total · samples)` samples, computed in floating
/// point, which for some lengths is one sample short of the reference part (PORTING-NOTES).
pub fn package_icl_cut(ref_frames: usize, gen_frames: usize, samples_per_frame: usize) -> usize {
    let total = ref_frames + gen_frames;
    if total == 0 {
        return 0;
    }
    let samples = (total * samples_per_frame) as f64;
    (ref_frames as f64 / total as f64 * samples) as usize
}

impl Synthesizer {
    /// Loads every model of a checkpoint directory. The speaker encoder and the speech
    /// tokenizer encoder always run in f32 (their outputs pick codebook entries, which bf16
    /// would flip); the talker follows `format` and the device.
    pub fn load(dir: &Path, device: &Device, format: WeightFormat) -> Result<Self> {
        let tts = TtsModel::load(dir, device, format)?;
        let main_file = dir.join("model.safetensors");
        let spk_cfg = tts.config.speaker_encoder();
        let vb = weights::mmap(&main_file, DType::F32, device)?;
        let speaker_encoder = weights::in_file(&main_file, SpeakerEncoder::load(vb, &spk_cfg))?;

        let st_dir = dir.join("speech_tokenizer");
        let st_file = st_dir.join("model.safetensors");
        let st_cfg_file = st_dir.join("config.json");
        let enc_cfg = SpeechTokenizerConfig::from_file(&st_cfg_file)?;
        let dec_cfg = CodecDecoderConfig::load(&st_cfg_file)?;
        let vb = weights::mmap(&st_file, DType::F32, device)?;
        let speech_encoder = weights::in_file(&st_file, SpeechEncoder::load(vb.clone(), &enc_cfg))?;
        let speech_decoder = SpeechDecoder::load(vb.pp("decoder"), &dec_cfg)?;
        Ok(Self {
            tts,
            speaker_encoder,
            speech_encoder,
            speech_decoder,
        })
    }

    /// Speaks two frames with a silent x-vector voice, so that the first real request does not
    /// pay first-touch costs: paging in the memory-mapped weights, and candle's quantized
    /// weights repacked for its kernels on their first use (most of a second on the full model).
    pub fn warm_up(&self) -> Result<()> {
        let hidden = self.tts.config.talker_config.hidden_size;
        let prompt = VoicePrompt {
            speaker_embedding: Tensor::zeros(hidden, DType::F32, &self.tts.device)?,
            icl: None,
        };
        let voice = self.voice(prompt)?;
        let params = GenerationParams::greedy(3);
        let mut utterance = self.start(&voice, "Warm up.", "auto", TextMode::Streaming, &params)?;
        while utterance.next_audio(self)?.is_some() {}
        Ok(())
    }

    /// Encodes a 24 kHz mono reference: x-vector always; with a transcript also the reference
    /// codes (in-context cloning).
    pub fn encode_voice_prompt(&self, samples_24k: &[f32], transcript: Option<&str>) -> Result<VoicePrompt> {
        let speaker_embedding = speaker_embedding(&self.speaker_encoder, samples_24k)?;
        let icl = match transcript {
            Some(t) if t.trim().is_empty() => {
                return Err(Error::InvalidRequest("the reference transcript is empty".into()))
            }
            Some(t) => Some(IclReference {
                codes: self.speech_encoder.encode(samples_24k)?,
                text_ids: self.tts.tokenizer.encode(&ref_text(t))?,
            }),
            None => None,
        };
        Ok(VoicePrompt { speaker_embedding, icl })
    }

    /// `encode_voice_prompt`, then `voice`.
    pub fn encode_voice(&self, samples_24k: &[f32], transcript: Option<&str>) -> Result<Voice> {
        self.voice(self.encode_voice_prompt(samples_24k, transcript)?)
    }

    /// A ready voice from an encoded prompt: for ICL the decoder is primed with the reference
    /// codes (the package decodes them together with the generated ones).
    pub fn voice(&self, prompt: VoicePrompt) -> Result<Voice> {
        let mut decoder_state = self.speech_decoder.new_state()?;
        let mut ref_tail_sample = 0.0;
        if let Some(icl) = &prompt.icl {
            let pcm;
            (decoder_state, pcm) = self.speech_decoder.prime(&icl.codes)?;
            if let Some(n) = pcm.dim(0)?.checked_sub(1) {
                ref_tail_sample = pcm.get(n)?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            }
        }
        Ok(Voice {
            prompt,
            decoder_state,
            ref_tail_sample,
            prefixes: Default::default(),
        })
    }

    /// A voice profile's prompt, from its cache beside the manifest when the model and clip are
    /// unchanged, else encoded and cached. `x_vector_only` drops the ICL part whatever the
    /// manifest says.
    pub fn profile_voice(
        &self,
        profile: &crate::voices::Voice,
        limits: &Limits,
        model_identity: &str,
        x_vector_only: bool,
    ) -> Result<Voice> {
        let cache = profile.prompt_cache_path(model_identity)?;
        let mut prompt = if cache.is_file() {
            load_prompt(&cache, &self.tts.device)?
        } else {
            let clip = profile.load_reference(limits, SAMPLE_RATE)?;
            let transcript = match profile.manifest.mode {
                VoiceMode::Icl => profile.transcript(),
                VoiceMode::XVector => None,
            };
            let prompt = self.encode_voice_prompt(&clip, transcript)?;
            if let Err(e) = save_prompt(&prompt, &cache) {
                // A read-only voices directory still works, only without the cache.
                tracing::warn!("cannot cache the voice prompt at {}: {e}", cache.display());
            }
            prompt
        };
        if x_vector_only {
            prompt.icl = None;
        }
        self.voice(prompt)
    }

    /// Prepares an utterance: tokenizes, assembles the prompt and prefills the talker.
    pub fn start(
        &self,
        voice: &Voice,
        text: &str,
        language: &str,
        mode: TextMode,
        params: &GenerationParams,
    ) -> Result<Utterance> {
        let language = prompt::language_id(&self.tts, language)?;
        let input_ids = self.tts.tokenizer.encode(&assistant_text(text))?;
        let talker_prompt = prompt::build(&self.tts, &input_ids, &voice.prompt, language, mode)?;
        let key = (language, mode);
        let prefix = voice
            .prefixes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned();
        tracing::debug!(
            rows = talker_prompt.embeds.dim(0)?,
            voice_rows = talker_prompt.voice_rows,
            prefix_cached = prefix.is_some(),
            "prefill"
        );
        let sequence = self.tts.start_with_prefix(&talker_prompt, params, prefix.as_deref())?;
        if prefix.is_none() && talker_prompt.voice_rows > 0 {
            let rows = talker_prompt.embeds.narrow(0, 0, talker_prompt.voice_rows)?;
            let prefix = Arc::new(sequence.prompt_prefix(&rows)?);
            voice
                .prefixes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key, prefix);
        }
        Ok(Utterance {
            sequence,
            decoder: voice.decoder_state.clone(),
            frames: Vec::new(),
            end: None,
        })
    }
}

/// One utterance being generated and decoded.
pub struct Utterance {
    pub sequence: Sequence,
    pub decoder: DecoderState,
    /// Codes of every frame so far.
    pub frames: Vec<Vec<u32>>,
    pub end: Option<EndReason>,
}

impl Utterance {
    /// Generates and decodes the next frame: its PCM (1920 samples at 24 kHz), or `None` once
    /// the utterance has ended (`end` says why).
    pub fn next_audio(&mut self, synth: &Synthesizer) -> Result<Option<Tensor>> {
        self.next_audio_frames(synth, 1)
    }

    /// Generates up to `frames` frames (fewer when the utterance ends) and decodes them in one
    /// decoder step: their PCM, or `None` once nothing is left. The audio equals frame-by-frame
    /// decoding; a step of several frames costs less per frame (the decoder's weights are read
    /// once per step), at the price of that many frames of latency.
    pub fn next_audio_frames(&mut self, synth: &Synthesizer, frames: usize) -> Result<Option<Tensor>> {
        let first = self.frames.len();
        while self.end.is_none() && self.frames.len() - first < frames.max(1) {
            match synth
                .tts
                .step(&mut [&mut self.sequence], &[StepInput::Sample], false)?
                .remove(0)
            {
                StepOutcome::End(reason) => self.end = Some(reason),
                StepOutcome::Frame { codes, .. } => self.frames.push(codes),
            }
        }
        let new = &self.frames[first..];
        if new.is_empty() {
            return Ok(None);
        }
        let width = new[0].len();
        let codes = Tensor::from_vec(new.concat(), (new.len(), width), &synth.tts.device)?;
        Ok(Some(synth.speech_decoder.step(&mut self.decoder, &codes)?))
    }
}
