//! The talker: Qwen3 decoder over summed text + codec embeddings, predicting codebook 0.

use super::config::TalkerConfig;
use super::linear::{Linear, WeightFormat};
use super::transformer::{Decoder, DecoderConfig, DecoderOutput, SeqRows};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

/// `text_projection`: a two-layer SiLU MLP from the text embedding width to the talker width.
#[derive(Debug, Clone)]
struct TextProjection {
    fc1: Linear,
    fc2: Linear,
}

impl Module for TextProjection {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&candle_nn::ops::silu(&self.fc1.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
pub struct Talker {
    text_embedding: Embedding,
    text_projection: TextProjection,
    codec_embedding: Embedding,
    decoder: Decoder,
    codec_head: Linear,
}

impl Talker {
    /// `vb` points at `talker`.
    pub fn load(vb: VarBuilder, cfg: &TalkerConfig, format: WeightFormat) -> Result<Self> {
        let h = cfg.hidden_size;
        let th = cfg.text_hidden_size;
        let dcfg = DecoderConfig {
            hidden_size: h,
            intermediate_size: cfg.intermediate_size,
            num_layers: cfg.num_hidden_layers,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim(),
            rms_norm_eps: cfg.rms_norm_eps,
            rope_theta: cfg.rope_theta,
            attention_bias: cfg.attention_bias,
        };
        let model = vb.pp("model");
        let tp = vb.pp("text_projection");
        Ok(Self {
            text_embedding: candle_nn::embedding(cfg.text_vocab_size, th, model.pp("text_embedding"))?,
            text_projection: TextProjection {
                // The projection keeps its dense weights in every mode: it runs only on prompt text.
                fc1: Linear::load(tp.pp("linear_fc1"), th, th, true, WeightFormat::Dense)?,
                fc2: Linear::load(tp.pp("linear_fc2"), th, h, true, WeightFormat::Dense)?,
            },
            codec_embedding: candle_nn::embedding(cfg.vocab_size, h, model.pp("codec_embedding"))?,
            decoder: Decoder::load(model, &dcfg, format)?,
            codec_head: Linear::load(vb.pp("codec_head"), h, cfg.vocab_size, false, format)?,
        })
    }

    /// `text_projection(text_embedding(ids))`: [n, hidden].
    pub fn embed_text(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(ids, self.codec_head_device())?;
        self.text_projection.forward(&self.text_embedding.forward(&ids)?)
    }

    /// Codec embeddings (codebook 0 and the special codec ids): [n, hidden].
    pub fn embed_codec(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(ids, self.codec_head_device())?;
        self.codec_embedding.forward(&ids)
    }

    fn codec_head_device(&self) -> &candle_core::Device {
        self.codec_embedding.embeddings().device()
    }

    /// Runs the decoder over stacked rows of several sequences (see `Decoder::forward`).
    pub fn forward(&self, x: &Tensor, seqs: &mut [SeqRows], keep_layers: bool) -> Result<DecoderOutput> {
        self.decoder.forward(x, seqs, keep_layers)
    }

    /// Raw `codec_head` logits of final-norm hidden rows: [N, vocab].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.codec_head.forward(hidden)
    }
}
