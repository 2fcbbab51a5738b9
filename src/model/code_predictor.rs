//! The code predictor (multi-token prediction head): a small Qwen3 decoder that, per frame,
//! reads [talker hidden, embed(code 0)] and predicts codebooks 1..G−1 autoregressively, with
//! one embedding table and one head per codebook and a KV cache that lives for one frame.

use super::config::{CodePredictorConfig, TalkerConfig};
use super::linear::{Linear, WeightFormat};
use super::transformer::{Decoder, DecoderConfig, DecoderOutput, SeqRows};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

#[derive(Debug, Clone)]
pub struct CodePredictor {
    /// Embeddings of codebooks 1..G−1, in the talker's width.
    codec_embedding: Vec<Embedding>,
    /// `small_to_mtp_projection`, present when the widths differ (1.7B); identity otherwise.
    projection: Option<Linear>,
    decoder: Decoder,
    /// Head g predicts codebook g+1.
    lm_head: Vec<Linear>,
}

impl CodePredictor {
    /// `vb` points at `talker.code_predictor`.
    pub fn load(vb: VarBuilder, talker: &TalkerConfig, format: WeightFormat) -> Result<Self> {
        let cfg: &CodePredictorConfig = &talker.code_predictor_config;
        let groups = cfg.num_code_groups - 1;
        let dcfg = DecoderConfig {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_layers: cfg.num_hidden_layers,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            rms_norm_eps: cfg.rms_norm_eps,
            rope_theta: cfg.rope_theta,
            attention_bias: cfg.attention_bias,
        };
        let model = vb.pp("model");
        let codec_embedding = (0..groups)
            .map(|g| {
                candle_nn::embedding(
                    cfg.vocab_size,
                    talker.hidden_size,
                    model.pp(format!("codec_embedding.{g}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let projection = if cfg.hidden_size != talker.hidden_size {
            Some(Linear::load(
                vb.pp("small_to_mtp_projection"),
                talker.hidden_size,
                cfg.hidden_size,
                true,
                format,
            )?)
        } else {
            None
        };
        let lm_head = (0..groups)
            .map(|g| {
                Linear::load(
                    vb.pp(format!("lm_head.{g}")),
                    cfg.hidden_size,
                    cfg.vocab_size,
                    false,
                    format,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            codec_embedding,
            projection,
            decoder: Decoder::load(model, &dcfg, format)?,
            lm_head,
        })
    }

    /// Number of codebooks this head predicts (G−1).
    pub fn groups(&self) -> usize {
        self.lm_head.len()
    }

    /// Embedding of codebook `g` (1..G−1) codes, in the talker's width: [n, talker hidden].
    pub fn embed(&self, g: usize, ids: &Tensor) -> Result<Tensor> {
        self.codec_embedding[g - 1].forward(ids)
    }

    /// Runs the decoder on talker-width input rows (projected first when the widths differ).
    pub fn forward(&self, x: &Tensor, seqs: &mut [SeqRows], keep_layers: bool) -> Result<DecoderOutput> {
        let x = match &self.projection {
            Some(p) => p.forward(x)?,
            None => x.clone(),
        };
        self.decoder.forward(&x, seqs, keep_layers)
    }

    /// Logits of codebook `g + 1` from final-norm hidden rows: [N, vocab].
    pub fn logits(&self, g: usize, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head[g].forward(hidden)
    }
}
