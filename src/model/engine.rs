//! The stepwise, batched generation engine the scheduler drives.
//!
//! `start` assembles nothing itself: it prefills a `TalkerPrompt` into a fresh `Sequence`.
//! `step` advances any set of live sequences by one frame each. Inside a step the weight
//! matmuls run once over the stacked rows of all sequences (talker and all 15 code-predictor
//! steps); attention runs per sequence against its own cache. Sequences can join or be dropped
//! between any two steps.
//!
//! Frame accounting follows the package (PORTING-NOTES): each step first picks code 0 from the
//! logits of the previous talker call; EOS ends the sequence without a frame, and with
//! `max_new_tokens = N` at most N − 1 frames are emitted. Then the code predictor fills codes
//! 1..G−1 from [talker hidden, embed(code 0)], and the summed frame embedding (+ trailing text or
//! `tts_pad`) is fed to the talker for the next logits.

use super::prompt::TalkerPrompt;
use super::sampling::{margin, process_code0, Sampler, SamplingParams};
use super::transformer::{KvCache, SeqRows};
use super::tts::TtsModel;
use crate::error::{Error, Result};
use candle_core::{DType, IndexOp, Tensor};

/// Settings of one utterance's generation.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub talker: SamplingParams,
    pub code_predictor: SamplingParams,
    pub repetition_penalty: f32,
    /// The package's `max_new_tokens`: at most this − 1 frames.
    pub max_new_tokens: usize,
    /// EOS is blocked until this many codes were picked (the package uses 2).
    pub min_new_tokens: usize,
    pub seed: u64,
}

impl GenerationParams {
    /// Greedy everywhere (the parity mode), with the package's repetition penalty.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            talker: SamplingParams::GREEDY,
            code_predictor: SamplingParams::GREEDY,
            repetition_penalty: 1.05,
            max_new_tokens,
            min_new_tokens: 2,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = Error::InvalidRequest;
        self.talker.validate("talker").map_err(bad)?;
        self.code_predictor.validate("code predictor").map_err(bad)?;
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            )));
        }
        if self.max_new_tokens < 2 {
            return Err(bad(format!(
                "max_new_tokens must be at least 2, got {}",
                self.max_new_tokens
            )));
        }
        Ok(())
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Code 0 was EOS.
    Eos,
    /// `max_new_tokens` reached.
    Length,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Eos => "eos",
            EndReason::Length => "length",
        }
    }
}

/// What to feed back at a step.
#[derive(Debug, Clone)]
pub enum StepInput {
    /// Pick the codes with the sequence's samplers.
    Sample,
    /// Teacher forcing: feed these G codes back instead (never ends the sequence).
    Force(Vec<u32>),
}

/// Internals of a step, for parity checks.
#[derive(Debug, Clone)]
pub struct FrameTrace {
    /// Raw code-predictor logits for codebooks 1..G−1, [G−1, cp vocab].
    pub cp_logits: Tensor,
    /// The fed-back talker input, [hidden].
    pub input: Tensor,
    /// Final-norm talker hidden state after it, [hidden].
    pub hidden: Tensor,
    /// Raw talker logits after it, [vocab].
    pub logits: Tensor,
    /// Top-1 minus top-2 of the processed code-0 logits this frame was picked from.
    pub code0_margin: f32,
}

#[derive(Debug, Clone)]
pub enum StepOutcome {
    Frame { codes: Vec<u32>, trace: Option<FrameTrace> },
    End(EndReason),
}

/// One utterance being generated: its KV cache and everything its next step needs.
pub struct Sequence {
    cache: KvCache,
    /// The code predictor's cache, emptied each frame; kept so its buffers are reused.
    cp_cache: KvCache,
    /// Final-norm hidden state of the last talker call, [1, hidden].
    past_hidden: Tensor,
    /// Raw logits of the last talker call, [vocab].
    logits: Tensor,
    trailing: Tensor,
    tts_pad: Tensor,
    code0_history: Vec<u32>,
    frames: usize,
    params: GenerationParams,
    talker_sampler: Sampler,
    cp_sampler: Sampler,
    ended: Option<EndReason>,
}

impl Sequence {
    pub fn frames(&self) -> usize {
        self.frames
    }

    pub fn ended(&self) -> Option<EndReason> {
        self.ended
    }

    /// Raw talker logits the next frame's code 0 will be picked from, [vocab].
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// Bytes of KV cache this sequence holds.
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// The keys and values of the prompt's first `embeds.dim(0)` rows (`embeds` being those
    /// rows), for later prompts that start the same way.
    pub fn prompt_prefix(&self, embeds: &Tensor) -> Result<PromptPrefix> {
        Ok(PromptPrefix {
            embeds: embeds.clone(),
            cache: self.cache.copy_prefix(embeds.dim(0)?)?,
        })
    }
}

/// The talker's keys and values for the leading rows of a prompt: a voice's rows
/// (`TalkerPrompt::voice_rows`), computed by its first utterance and reused by the next, which
/// then prefill only their own rows.
pub struct PromptPrefix {
    /// The rows, [L, hidden]: a prompt reuses the prefix only if it starts with exactly these.
    embeds: Tensor,
    cache: KvCache,
}

impl PromptPrefix {
    /// How many leading rows of `embeds` this prefix covers (0 when they differ), keeping at
    /// least one row to prefill (its logits pick the first code).
    pub fn reusable_rows(&self, embeds: &Tensor) -> Result<usize> {
        let len = self.embeds.dim(0)?.min(embeds.dim(0)?.saturating_sub(1));
        if len == 0 {
            return Ok(0);
        }
        let host = |t: &Tensor| {
            t.narrow(0, 0, len)?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()
        };
        let (ours, theirs) = (host(&self.embeds)?, host(embeds)?);
        Ok(if ours == theirs { len } else { 0 })
    }
}

/// Prefill outputs kept for parity checks.
pub struct PrefillTrace {
    /// Each talker layer's output over the prompt.
    pub layers: Vec<Tensor>,
    /// Final-norm hidden state at the last position, [hidden].
    pub hidden: Tensor,
}

impl TtsModel {
    /// Prefills the prompt into a new sequence.
    pub fn start(&self, prompt: &TalkerPrompt, params: &GenerationParams) -> Result<Sequence> {
        self.start_with_prefix(prompt, params, None)
    }

    /// `start`, taking the keys and values of the prompt's leading rows from `prefix` when the
    /// prompt starts with its rows: only the rest is prefilled.
    pub fn start_with_prefix(
        &self,
        prompt: &TalkerPrompt,
        params: &GenerationParams,
        prefix: Option<&PromptPrefix>,
    ) -> Result<Sequence> {
        super::on_worker(|| self.prefill(prompt, params, prefix))
    }

    fn prefill(
        &self,
        prompt: &TalkerPrompt,
        params: &GenerationParams,
        prefix: Option<&PromptPrefix>,
    ) -> Result<Sequence> {
        params.validate()?;
        let reused = match prefix {
            Some(p) => p.reusable_rows(&prompt.embeds)?,
            None => 0,
        };
        if reused == 0 {
            return Ok(self.start_traced(prompt, params, false)?.0);
        }
        let mut cache = prefix.expect("rows reused from a prefix").cache.copy_prefix(reused)?;
        let rows = prompt.embeds.dim(0)? - reused;
        let out = self.talker.forward(
            &prompt.embeds.narrow(0, reused, rows)?,
            &mut [SeqRows {
                rows,
                cache: &mut cache,
            }],
            false,
        )?;
        self.new_sequence(prompt, params, cache, out.hidden.narrow(0, rows - 1, 1)?)
    }

    /// `start`, also returning each layer's output when `keep_layers`.
    pub fn start_traced(
        &self,
        prompt: &TalkerPrompt,
        params: &GenerationParams,
        keep_layers: bool,
    ) -> Result<(Sequence, PrefillTrace)> {
        params.validate()?;
        let mut cache = KvCache::default();
        let rows = prompt.embeds.dim(0)?;
        let out = self.talker.forward(
            &prompt.embeds,
            &mut [SeqRows {
                rows,
                cache: &mut cache,
            }],
            keep_layers,
        )?;
        let past_hidden = out.hidden.narrow(0, rows - 1, 1)?;
        let seq = self.new_sequence(prompt, params, cache, past_hidden.clone())?;
        let trace = PrefillTrace {
            layers: out.layers,
            hidden: past_hidden.squeeze(0)?,
        };
        Ok((seq, trace))
    }

    /// A sequence whose prompt is in `cache`, `past_hidden` ([1, hidden]) its last row's output.
    fn new_sequence(
        &self,
        prompt: &TalkerPrompt,
        params: &GenerationParams,
        cache: KvCache,
        past_hidden: Tensor,
    ) -> Result<Sequence> {
        let logits = self.talker.logits(&past_hidden)?.squeeze(0)?;
        Ok(Sequence {
            cache,
            cp_cache: KvCache::default(),
            past_hidden,
            logits,
            trailing: prompt.trailing.clone(),
            tts_pad: prompt.tts_pad.reshape((1, ()))?,
            code0_history: Vec::new(),
            frames: 0,
            talker_sampler: Sampler::new(params.talker, params.seed),
            // A distinct stream for the code predictor, still a function of the seed alone.
            cp_sampler: Sampler::new(params.code_predictor, params.seed ^ 0x9e37_79b9_7f4a_7c15),
            params: params.clone(),
            ended: None,
        })
    }

    /// Advances each sequence by one frame. `inputs[i]` says how sequence i picks its codes;
    /// `trace` adds the step's internals to each frame. A sequence that has ended stays ended.
    pub fn step(&self, seqs: &mut [&mut Sequence], inputs: &[StepInput], trace: bool) -> Result<Vec<StepOutcome>> {
        // A decode step's kernels are koe's (host path) unless candle's quantized matmuls are.
        match self.format.uses_candle_pool() {
            true => super::on_worker(|| self.step_here(seqs, inputs, trace)),
            false => super::on_worker_helped(|| self.step_here(seqs, inputs, trace)),
        }
    }

    fn step_here(&self, seqs: &mut [&mut Sequence], inputs: &[StepInput], trace: bool) -> Result<Vec<StepOutcome>> {
        if inputs.len() != seqs.len() {
            return Err(Error::InvalidRequest(format!(
                "{} step inputs for {} sequences",
                inputs.len(),
                seqs.len()
            )));
        }
        let groups = self.num_code_groups();
        let eos = self.config.talker_config.codec_eos_token_id;
        let mut outcomes: Vec<Option<StepOutcome>> = vec![None; seqs.len()];
        let mut live = Vec::new(); // (index, codes so far, code-0 margin)
        let all_logits = if seqs.is_empty() {
            Vec::new()
        } else {
            let rows: Vec<Tensor> = seqs.iter().map(|s| s.logits.clone()).collect();
            Tensor::stack(&rows, 0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?
        };
        for (i, (seq, input)) in seqs.iter_mut().zip(inputs).enumerate() {
            if let Some(reason) = seq.ended {
                outcomes[i] = Some(StepOutcome::End(reason));
                continue;
            }
            let mut logits = all_logits[i].clone();
            process_code0(
                &mut logits,
                &seq.code0_history,
                seq.params.repetition_penalty,
                eos,
                seq.params.min_new_tokens,
            );
            let m = margin(&logits);
            let code0 = match input {
                StepInput::Force(codes) => {
                    if codes.len() != groups {
                        return Err(Error::InvalidRequest(format!(
                            "{} forced codes, expected {groups}",
                            codes.len()
                        )));
                    }
                    codes[0]
                }
                StepInput::Sample => {
                    let code0 = seq.talker_sampler.pick(&logits)?;
                    let reason = if code0 == eos {
                        Some(EndReason::Eos)
                    } else if seq.frames + 1 >= seq.params.max_new_tokens {
                        Some(EndReason::Length)
                    } else {
                        None
                    };
                    if let Some(reason) = reason {
                        seq.ended = Some(reason);
                        outcomes[i] = Some(StepOutcome::End(reason));
                        continue;
                    }
                    code0
                }
            };
            seq.code0_history.push(code0);
            live.push((i, vec![code0], m));
        }

        if !live.is_empty() {
            let cp_logits = self.predict_residual_codes(seqs, inputs, &mut live, trace)?;
            self.feed_frames(seqs, &live, cp_logits, trace, &mut outcomes)?;
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every sequence has an outcome"))
            .collect())
    }

    /// Runs the code predictor for the live sequences, appending codes 1..G−1 to each entry of
    /// `live`. Returns the raw logits per codebook ([live, vocab] each) when tracing.
    fn predict_residual_codes(
        &self,
        seqs: &mut [&mut Sequence],
        inputs: &[StepInput],
        live: &mut [(usize, Vec<u32>, f32)],
        trace: bool,
    ) -> Result<Vec<Tensor>> {
        let cp = &self.code_predictor;
        let n = live.len();
        let code0: Vec<u32> = live.iter().map(|(_, c, _)| c[0]).collect();
        let code0_embeds = self.talker.embed_codec(&code0)?;
        // Rows [hidden_i, embed(code0_i)] for each live sequence, stacked.
        let mut rows = Vec::with_capacity(2 * n);
        for (k, (i, _, _)) in live.iter().enumerate() {
            rows.push(seqs[*i].past_hidden.clone());
            rows.push(code0_embeds.narrow(0, k, 1)?);
        }
        let mut x = Tensor::cat(&rows, 0)?;
        let mut caches: Vec<KvCache> = live
            .iter()
            .map(|(i, _, _)| {
                let mut cache = std::mem::take(&mut seqs[*i].cp_cache);
                cache.clear();
                cache
            })
            .collect();
        let mut rows_per_seq = 2;
        let mut traced = Vec::new();
        for g in 0..cp.groups() {
            let mut seq_rows: Vec<SeqRows> = caches
                .iter_mut()
                .map(|cache| SeqRows {
                    rows: rows_per_seq,
                    cache,
                })
                .collect();
            let hidden = cp.forward(&x, &mut seq_rows, false)?.hidden;
            let last = if rows_per_seq == 1 {
                hidden
            } else {
                let idx: Vec<u32> = (0..n as u32).map(|k| 2 * k + 1).collect();
                hidden.index_select(&Tensor::new(idx.as_slice(), hidden.device())?, 0)?
            };
            let logits = cp.logits(g, &last)?;
            let host = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (k, (i, codes, _)) in live.iter_mut().enumerate() {
                let code = match &inputs[*i] {
                    StepInput::Force(forced) => forced[g + 1],
                    StepInput::Sample => seqs[*i].cp_sampler.pick(&host[k])?,
                };
                codes.push(code);
            }
            if trace {
                traced.push(logits);
            }
            if g + 1 < cp.groups() {
                let ids: Vec<u32> = live.iter().map(|(_, c, _)| c[g + 1]).collect();
                x = cp.embed(g + 1, &Tensor::new(ids.as_slice(), &self.device)?)?;
                rows_per_seq = 1;
            }
        }
        for (cache, (i, _, _)) in caches.into_iter().zip(live.iter()) {
            seqs[*i].cp_cache = cache;
        }
        Ok(traced)
    }

    /// Feeds each live sequence's frame back into the talker (one batched call) and records
    /// the frame outcomes.
    fn feed_frames(
        &self,
        seqs: &mut [&mut Sequence],
        live: &[(usize, Vec<u32>, f32)],
        cp_logits: Vec<Tensor>,
        trace: bool,
        outcomes: &mut [Option<StepOutcome>],
    ) -> Result<()> {
        let n = live.len();
        let flat: Vec<u32> = live.iter().flat_map(|(_, c, _)| c.iter().copied()).collect();
        let codes = Tensor::from_vec(flat, (n, self.num_code_groups()), &self.device)?;
        let frame_embeds = self.frame_embeddings(&codes)?;
        let mut text_rows = Vec::with_capacity(n);
        for (i, _, _) in live {
            let seq = &seqs[*i];
            let r = seq.trailing.dim(0)?;
            text_rows.push(if seq.frames < r {
                seq.trailing.narrow(0, seq.frames, 1)?
            } else {
                seq.tts_pad.clone()
            });
        }
        let input = (frame_embeds + Tensor::cat(&text_rows, 0)?)?;
        let mut ordered: Vec<&mut Sequence> = Vec::with_capacity(n);
        {
            // Borrow the live sequences mutably, in `live` order.
            let mut rest: Vec<Option<&mut Sequence>> = seqs.iter_mut().map(|s| Some(&mut **s)).collect();
            for (i, _, _) in live {
                ordered.push(rest[*i].take().expect("each live sequence once"));
            }
        }
        let mut seq_rows: Vec<SeqRows> = ordered
            .iter_mut()
            .map(|s| SeqRows {
                rows: 1,
                cache: &mut s.cache,
            })
            .collect();
        let hidden = self.talker.forward(&input, &mut seq_rows, false)?.hidden;
        let logits = self.talker.logits(&hidden)?;
        for (k, ((i, codes, m), seq)) in live.iter().zip(ordered).enumerate() {
            seq.past_hidden = hidden.narrow(0, k, 1)?;
            seq.logits = logits.i(k)?;
            seq.frames += 1;
            let trace = if trace {
                let cp = cp_logits
                    .iter()
                    .map(|l| l.i(k))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Some(FrameTrace {
                    cp_logits: Tensor::stack(&cp, 0)?,
                    input: input.i(k)?,
                    hidden: hidden.i(k)?,
                    logits: logits.i(k)?,
                    code0_margin: *m,
                })
            } else {
                None
            };
            outcomes[*i] = Some(StepOutcome::Frame {
                codes: codes.clone(),
                trace,
            });
        }
        Ok(())
    }
}
