//! The speech tokenizer's encoder: 24 kHz audio → the reference codes of a voice prompt.
//!
//! It is transformers' `MimiModel` without its decoder (`Qwen3TTSTokenizerV2Encoder`), run the way
//! `Qwen3TTSTokenizerV2Model.encode` runs it: SEANet conv stack (25 Hz) → encoder transformer →
//! stride-2 downsample (12.5 Hz) → split residual vector quantizer; the first
//! `encoder_valid_num_quantizers` codebooks are kept and the frames are trimmed to
//! `ceil(samples / encode_downsample_rate)`.
//!
//! Reused from candle-transformers' `models::mimi`, whose weight names and arithmetic are those of
//! transformers' Mimi: the downsample conv (`conv::StreamableConv1d` with replicate padding).
//!
//! Ported here instead:
//! - The SEANet conv stack ([`super::seanet`]): the same layers and padding as candle's
//!   `seanet::SeaNetEncoder`, on koe's conv kernels instead of candle's im2col `conv1d` (speed).
//! - The encoder transformer. candle's `StreamingTransformer` keeps a KV cache (`&mut self`),
//!   masks with a sliding window of `context` frames, supports neither grouped KV heads nor a
//!   `head_dim` other than hidden/heads, and fixes the norm eps. The official package runs Mimi's
//!   transformer with SDPA (even when loaded with `attn_implementation="eager"`); under SDPA and
//!   eager alike `create_causal_mask` gives a plain causal mask over the whole clip, and
//!   `sliding_window` only takes effect under flash-attention, so it is not read here (the
//!   fixtures confirm it: a window of `sliding_window` frames is off by 7e-2 on tiny-seed0).
//! - The split RVQ. candle's hard-codes one semantic quantizer, always runs all 32 quantizers and
//!   ranks codewords by |c|²/2 − x·c. Here `num_semantic_quantizers` comes from the config, only the
//!   kept codebooks run (a residual quantizer's first k codes do not depend on later layers), and
//!   distances are computed the way `torch.cdist` computes them for codebooks of more than 25 rows
//!   (one matmul of [−2x, |x|², 1] with [c, 1, |c|²], clamped at 0, square root), so near-ties
//!   resolve as in the reference.

use super::seanet::SeaNetEncoder;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Activation, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::mimi::conv;
use serde::Deserialize;
use std::path::Path;

/// `speech_tokenizer/config.json` (`Qwen3TTSTokenizerV2Config`): the encoder's part. Unknown
/// fields, `decoder_config` among them, are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct SpeechTokenizerConfig {
    #[serde(default = "EncoderConfig::python_defaults")]
    pub encoder_config: EncoderConfig,
    #[serde(default = "default_valid_quantizers")]
    pub encoder_valid_num_quantizers: usize,
    #[serde(default = "default_sample_rate")]
    pub input_sample_rate: usize,
    #[serde(default = "default_sample_rate")]
    pub output_sample_rate: usize,
    #[serde(default = "default_samples_per_frame")]
    pub decode_upsample_rate: usize,
    #[serde(default = "default_samples_per_frame")]
    pub encode_downsample_rate: usize,
}

impl SpeechTokenizerConfig {
    pub fn from_file(file: &Path) -> Result<Self> {
        crate::model::config::read_json(file)
    }
}

/// Padding of the SEANet convs (`MimiConfig.pad_mode`); the downsample always replicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PadMode {
    Constant,
    Replicate,
}

/// transformers' `MimiConfig`, with the defaults of its code. Fields the encoder does not use
/// (decoder-only, training, `sliding_window`: see the module comment) are left out.
#[derive(Debug, Clone, Deserialize)]
pub struct EncoderConfig {
    #[serde(default = "default_sample_rate")]
    pub sampling_rate: usize,
    /// `None`: derived from the strides, as the Python property does.
    #[serde(default)]
    pub frame_rate: Option<f64>,
    #[serde(default = "one")]
    pub audio_channels: usize,
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    #[serde(default = "default_num_filters")]
    pub num_filters: usize,
    #[serde(default = "one")]
    pub num_residual_layers: usize,
    /// The decoder's order; the encoder downsamples by them reversed. `None` or empty: [8, 6, 5, 4].
    #[serde(default)]
    pub upsampling_ratios: Option<Vec<usize>>,
    #[serde(default = "default_kernel_size")]
    pub kernel_size: usize,
    #[serde(default = "three")]
    pub last_kernel_size: usize,
    #[serde(default = "three")]
    pub residual_kernel_size: usize,
    #[serde(default = "two")]
    pub dilation_growth_rate: usize,
    #[serde(default = "yes")]
    pub use_causal_conv: bool,
    #[serde(default = "default_pad_mode")]
    pub pad_mode: PadMode,
    #[serde(default = "two")]
    pub compress: usize,
    #[serde(default = "default_codebook_size")]
    pub codebook_size: usize,
    /// `None`: `hidden_size`.
    #[serde(default = "default_codebook_dim")]
    pub codebook_dim: Option<usize>,
    #[serde(default = "default_num_quantizers")]
    pub num_quantizers: usize,
    #[serde(default)]
    pub use_conv_shortcut: bool,
    #[serde(default = "default_vq_hidden")]
    pub vector_quantization_hidden_dimension: usize,
    #[serde(default = "one")]
    pub num_semantic_quantizers: usize,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_heads")]
    pub num_key_value_heads: usize,
    /// `None`: `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub attention_bias: bool,
}

fn default_valid_quantizers() -> usize {
    16
}
fn default_sample_rate() -> usize {
    24000
}
fn default_samples_per_frame() -> usize {
    1920
}
fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn three() -> usize {
    3
}
fn yes() -> bool {
    true
}
fn default_hidden() -> usize {
    512
}
fn default_num_filters() -> usize {
    64
}
fn default_kernel_size() -> usize {
    7
}
fn default_pad_mode() -> PadMode {
    PadMode::Constant
}
fn default_codebook_size() -> usize {
    2048
}
fn default_codebook_dim() -> Option<usize> {
    Some(256)
}
fn default_num_quantizers() -> usize {
    32
}
fn default_vq_hidden() -> usize {
    256
}
fn default_layers() -> usize {
    8
}
fn default_intermediate() -> usize {
    2048
}
fn default_heads() -> usize {
    8
}
fn default_act() -> Activation {
    Activation::Gelu
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    10000.0
}

impl EncoderConfig {
    /// `MimiConfig()` with no arguments.
    pub fn python_defaults() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every EncoderConfig field has a default")
    }

    pub fn upsampling_ratios(&self) -> Vec<usize> {
        match &self.upsampling_ratios {
            Some(ratios) if !ratios.is_empty() => ratios.clone(),
            _ => vec![8, 6, 5, 4],
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn codebook_dim(&self) -> usize {
        self.codebook_dim.unwrap_or(self.hidden_size)
    }

    /// Audio samples per SEANet output frame.
    fn hop_length(&self) -> usize {
        self.upsampling_ratios().iter().product()
    }

    /// `MimiConfig.frame_rate`: as given, or the sample rate over all strides (SEANet × 2).
    pub fn frame_rate(&self) -> f64 {
        self.frame_rate
            .unwrap_or(self.sampling_rate as f64 / (2 * self.hop_length()) as f64)
    }

    /// `MimiConfig.encodec_frame_rate`: the SEANet output rate, rounded up.
    pub fn encodec_frame_rate(&self) -> usize {
        self.sampling_rate.div_ceil(self.hop_length())
    }
}

/// Every stage of one encode, batch dimension removed.
pub struct EncoderStages {
    /// SEANet output [hidden, T25].
    pub seanet: Tensor,
    /// Encoder transformer output [T25, hidden].
    pub transformer: Tensor,
    /// Downsample output = quantizer input [hidden, T12].
    pub downsample: Tensor,
    /// Codes [frames, encoder_valid_num_quantizers], u32, frames = ceil(samples / encode_downsample_rate).
    pub codes: Tensor,
    /// Per code [frames, kept], f32: how much farther the second-nearest codeword lay than the
    /// chosen one. Where that is a few ulps of the distance, the choice is a float tie that
    /// the reference's own rounding may resolve the other way. `stages` gives them; `encode`,
    /// which serves voices, skips their cost (~3× the nearest-codeword search).
    pub margins: Option<Tensor>,
}

pub struct SpeechEncoder {
    seanet: SeaNetEncoder,
    transformer: EncoderTransformer,
    downsample: conv::StreamableConv1d,
    quantizer: SplitQuantizer,
    samples_per_frame: usize,
    device: Device,
    dtype: DType,
}

impl SpeechEncoder {
    /// `vb`: the root of `speech_tokenizer/model.safetensors` (the encoder's tensors are under
    /// `encoder.`). Load it in f32 on every device: the codes are nearest-codeword choices, and
    /// bf16 activations would flip some of them.
    pub fn load(vb: VarBuilder, cfg: &SpeechTokenizerConfig) -> candle_core::Result<Self> {
        let enc = &cfg.encoder_config;
        if !enc.use_causal_conv {
            // The SEANet port pads its convs causally only.
            candle_core::bail!("speech tokenizer encoder: use_causal_conv = false is not supported");
        }
        let vb = vb.pp("encoder");
        let seanet = SeaNetEncoder::load(vb.pp("encoder"), enc)?;
        let transformer = EncoderTransformer::load(vb.pp("encoder_transformer"), enc)?;
        // `int(encodec_frame_rate / frame_rate)` truncates, as Python's int() does.
        let downsample_kernel = 2 * (enc.encodec_frame_rate() as f64 / enc.frame_rate()) as usize;
        let downsample = conv::StreamableConv1d::new(
            enc.hidden_size,
            enc.hidden_size,
            downsample_kernel,
            /* stride */ 2,
            /* dilation */ 1,
            /* groups */ 1,
            /* bias */ false,
            /* causal */ true,
            /* norm */ None,
            conv::PadMode::Replicate,
            vb.pp("downsample"),
        )?;
        let quantizer = SplitQuantizer::load(vb.pp("quantizer"), enc, cfg.encoder_valid_num_quantizers)?;
        Ok(Self {
            seanet,
            transformer,
            downsample,
            quantizer,
            samples_per_frame: cfg.encode_downsample_rate,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Reference codes [frames, encoder_valid_num_quantizers] (u32) of a mono 24 kHz clip.
    pub fn encode(&self, samples: &[f32]) -> Result<Tensor> {
        Ok(self.run(samples, false)?.codes)
    }

    /// The whole encode, keeping every stage's output and the codes' margins.
    pub fn stages(&self, samples: &[f32]) -> Result<EncoderStages> {
        self.run(samples, true)
    }

    /// Every stage, and the codes' margins only `with_margins`.
    fn run(&self, samples: &[f32], with_margins: bool) -> Result<EncoderStages> {
        if samples.is_empty() {
            return Err(Error::Audio("cannot encode an empty reference clip".into()));
        }
        let seanet = self.seanet.forward(samples, &self.device)?.to_dtype(self.dtype)?;
        let transformer = self.transformer.forward(&seanet.transpose(1, 2)?)?;
        let downsample = self.downsample.forward(&transformer.transpose(1, 2)?.contiguous()?)?;
        let (codes, margins) = self.quantizer.encode(&downsample.squeeze(0)?, with_margins)?;
        // The wrapper keeps ceil(valid samples / encode_downsample_rate) frames.
        let frames = samples.len().div_ceil(self.samples_per_frame).min(codes.dim(0)?);
        Ok(EncoderStages {
            seanet: seanet.squeeze(0)?,
            transformer: transformer.squeeze(0)?,
            downsample: downsample.squeeze(0)?,
            codes: codes.narrow(0, 0, frames)?,
            margins: margins.map(|m| m.narrow(0, 0, frames)).transpose()?,
        })
    }
}

/// `MimiTransformerModel` as the encoder runs it: pre-norm layers with layer scale, RoPE, causal
/// attention over the whole sequence, no final norm.
struct EncoderTransformer {
    layers: Vec<TransformerLayer>,
    head_dim: usize,
    rope_theta: f64,
}

impl EncoderTransformer {
    fn load(vb: VarBuilder, cfg: &EncoderConfig) -> candle_core::Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| TransformerLayer::load(vb.pp(format!("layers.{i}")), cfg))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            layers,
            head_dim: cfg.head_dim(),
            rope_theta: cfg.rope_theta,
        })
    }

    /// [1, T, hidden] → [1, T, hidden].
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let t = xs.dim(1)?;
        let (cos, sin) = rope_tables(t, self.head_dim, self.rope_theta, xs.device(), xs.dtype())?;
        let mask = causal_mask(t, xs.device(), xs.dtype())?;
        let mut xs = xs.clone();
        for layer in &self.layers {
            xs = layer.forward(&xs, &cos, &sin, &mask)?;
        }
        Ok(xs)
    }
}

/// cos and sin [T, head_dim / 2] of positions 0..T, computed in f32 as `MimiRotaryEmbedding`
/// does (inv_freq = 1 / theta^(2i / head_dim)).
fn rope_tables(
    t: usize,
    head_dim: usize,
    theta: f64,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<(Tensor, Tensor)> {
    let theta = theta as f32;
    let inv_freq: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / head_dim as f32))
        .collect();
    let freqs: Vec<f32> = (0..t)
        .flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f))
        .collect();
    let cos: Vec<f32> = freqs.iter().map(|f| f.cos()).collect();
    let sin: Vec<f32> = freqs.iter().map(|f| f.sin()).collect();
    let shape = (t, inv_freq.len());
    Ok((
        Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
    ))
}

/// Additive [T, T] mask: 0 where key ≤ query, −∞ after.
fn causal_mask(t: usize, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|q| (0..t).map(move |k| if k <= q { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)
}

struct TransformerLayer {
    input_layernorm: LayerNorm,
    self_attn: Attention,
    self_attn_layer_scale: Tensor,
    post_attention_layernorm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
    mlp_layer_scale: Tensor,
}

impl TransformerLayer {
    fn load(vb: VarBuilder, cfg: &EncoderConfig) -> candle_core::Result<Self> {
        let hidden = cfg.hidden_size;
        Ok(Self {
            input_layernorm: candle_nn::layer_norm(hidden, cfg.norm_eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            self_attn_layer_scale: vb.get(hidden, "self_attn_layer_scale.scale")?,
            post_attention_layernorm: candle_nn::layer_norm(hidden, cfg.norm_eps, vb.pp("post_attention_layernorm"))?,
            fc1: candle_nn::linear_no_bias(hidden, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: candle_nn::linear_no_bias(cfg.intermediate_size, hidden, vb.pp("mlp.fc2"))?,
            activation: cfg.hidden_act,
            mlp_layer_scale: vb.get(hidden, "mlp_layer_scale.scale")?,
        })
    }

    fn forward(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&xs.apply(&self.input_layernorm)?, cos, sin, mask)?;
        let xs = (xs + attn.broadcast_mul(&self.self_attn_layer_scale)?)?;
        let mlp = xs
            .apply(&self.post_attention_layernorm)?
            .apply(&self.fc1)?
            .apply(&self.activation)?
            .apply(&self.fc2)?;
        xs + mlp.broadcast_mul(&self.mlp_layer_scale)?
    }
}

/// `MimiAttention` (eager): GQA, RoPE on the two halves of each head, softmax(q·kᵀ/√d + mask)·v.
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &EncoderConfig) -> candle_core::Result<Self> {
        let (hidden, head_dim, bias) = (cfg.hidden_size, cfg.head_dim(), cfg.attention_bias);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: candle_nn::linear_b(hidden, heads * head_dim, bias, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear_b(hidden, kv_heads * head_dim, bias, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear_b(hidden, kv_heads * head_dim, bias, vb.pp("v_proj"))?,
            o_proj: candle_nn::linear_b(heads * head_dim, hidden, bias, vb.pp("o_proj"))?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
        })
    }

    fn forward(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let heads = |proj: &Linear, n: usize| -> candle_core::Result<Tensor> {
            xs.apply(proj)?
                .reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = candle_nn::rotary_emb::rope(&heads(&self.q_proj, self.num_heads)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&heads(&self.k_proj, self.num_kv_heads)?, cos, sin)?;
        let v = heads(&self.v_proj, self.num_kv_heads)?;
        let n_rep = self.num_heads / self.num_kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, n_rep)?;
        let v = candle_transformers::utils::repeat_kv(v, n_rep)?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (self.head_dim as f64).sqrt()))?;
        let weights = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(mask)?)?;
        weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?
            .apply(&self.o_proj)
    }
}

/// `MimiSplitResidualVectorQuantizer.encode`: the semantic and the acoustic RVQ both quantize the
/// same input; their codes are concatenated.
struct SplitQuantizer {
    semantic: ResidualQuantizer,
    acoustic: ResidualQuantizer,
}

impl SplitQuantizer {
    /// Loads only the codebooks of the first `kept` codes.
    fn load(vb: VarBuilder, cfg: &EncoderConfig, kept: usize) -> candle_core::Result<Self> {
        let kept = kept.min(cfg.num_quantizers);
        let semantic = kept.min(cfg.num_semantic_quantizers);
        Ok(Self {
            semantic: ResidualQuantizer::load(vb.pp("semantic_residual_vector_quantizer"), cfg, semantic)?,
            acoustic: ResidualQuantizer::load(vb.pp("acoustic_residual_vector_quantizer"), cfg, kept - semantic)?,
        })
    }

    /// [hidden, T] → codes [T, kept] (u32) and, `with_margins`, their margins [T, kept] (f32).
    fn encode(&self, xs: &Tensor, with_margins: bool) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let (mut codes, mut margins) = self.semantic.encode(xs, with_margins)?;
        let (acoustic_codes, acoustic_margins) = self.acoustic.encode(xs, with_margins)?;
        codes.extend(acoustic_codes);
        margins.extend(acoustic_margins);
        let margins = with_margins.then(|| Tensor::stack(&margins, 1)).transpose()?;
        Ok((Tensor::stack(&codes, 1)?, margins))
    }
}

/// `MimiResidualVectorQuantizer.encode`: 1×1 input projection, then each codebook quantizes what
/// the previous ones left.
struct ResidualQuantizer {
    input_proj: Option<Linear>,
    codebooks: Vec<Codebook>,
}

impl ResidualQuantizer {
    fn load(vb: VarBuilder, cfg: &EncoderConfig, layers: usize) -> candle_core::Result<Self> {
        let (hidden, vq_dim) = (cfg.hidden_size, cfg.vector_quantization_hidden_dimension);
        // A kernel-1 Conv1d without bias, applied here as a linear map over time steps.
        let input_proj = if vq_dim != hidden {
            let weight = vb.get((vq_dim, hidden, 1), "input_proj.weight")?.squeeze(2)?;
            Some(Linear::new(weight, None))
        } else {
            None
        };
        let codebooks = (0..layers)
            .map(|i| Codebook::load(vb.pp(format!("layers.{i}.codebook")), cfg))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { input_proj, codebooks })
    }

    /// [hidden, T] → per codebook, the codes (u32 [T]) and, `with_margins`, their margins
    /// (f32 [T]; none without).
    fn encode(&self, xs: &Tensor, with_margins: bool) -> candle_core::Result<(Vec<Tensor>, Vec<Tensor>)> {
        let mut residual = xs
            .t()?
            .apply(&self.input_proj.as_ref())?
            .to_dtype(DType::F32)?
            .contiguous()?;
        let (mut codes, mut margins) = (Vec::new(), Vec::new());
        for codebook in &self.codebooks {
            let (indices, margin) = codebook.nearest(&residual, with_margins)?;
            residual = (residual - codebook.embed.index_select(&indices, 0)?)?;
            codes.push(indices);
            margins.extend(margin);
        }
        Ok((codes, margins))
    }
}

/// `MimiEuclideanCodebook`: codewords embed_sum / max(cluster_usage, 1e-5).
struct Codebook {
    /// [codebook_size, dim], f32.
    embed: Tensor,
    /// [dim + 2, codebook_size] = [c, 1, |c|²]ᵀ, the right operand of torch.cdist's matmul.
    augmented_t: Tensor,
}

impl Codebook {
    const EPSILON: f64 = 1e-5;

    fn load(vb: VarBuilder, cfg: &EncoderConfig) -> candle_core::Result<Self> {
        let (size, dim) = (cfg.codebook_size, cfg.codebook_dim());
        let usage = vb.get(size, "cluster_usage")?.to_dtype(DType::F32)?;
        let embed_sum = vb.get((size, dim), "embed_sum")?.to_dtype(DType::F32)?;
        let embed = embed_sum.broadcast_div(&usage.maximum(Self::EPSILON)?.unsqueeze(1)?)?;
        let ones = Tensor::ones((size, 1), DType::F32, embed.device())?;
        let norms = embed.sqr()?.sum_keepdim(1)?;
        let augmented_t = Tensor::cat(&[&embed, &ones, &norms], 1)?.t()?.contiguous()?;
        Ok(Self { embed, augmented_t })
    }

    /// Index of the nearest codeword for each row of `xs` [N, dim] (f32), first on ties, and
    /// `with_margin`, the second-nearest distance minus the nearest (f32 [N]).
    fn nearest(&self, xs: &Tensor, with_margin: bool) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let norms = xs.sqr()?.sum_keepdim(1)?;
        let ones = norms.ones_like()?;
        let augmented = Tensor::cat(&[&(xs * -2.0)?, &norms, &ones], 1)?;
        let distances = augmented.matmul(&self.augmented_t)?.maximum(0f32)?.sqrt()?;
        let nearest = distances.argmin_keepdim(D::Minus1)?;
        if !with_margin {
            return Ok((nearest.squeeze(1)?, None));
        }
        // The second nearest is the nearest of the others (an exact tie gives 0, a single
        // codeword infinity): three element-wise passes, where sorting each row cost ~15×
        // the argmin (155 ms for a 30 s reference).
        let device = distances.device();
        let columns = Tensor::arange(0u32, distances.dim(1)? as u32, device)?.unsqueeze(0)?;
        let others = columns
            .broadcast_eq(&nearest)?
            .where_cond(&Tensor::full(f32::INFINITY, distances.shape(), device)?, &distances)?;
        let margins = (others.min_keepdim(D::Minus1)? - distances.gather(&nearest, 1)?)?;
        Ok((nearest.squeeze(1)?, Some(margins.squeeze(1)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_config_gets_mimi_code_defaults() {
        let cfg: SpeechTokenizerConfig = serde_json::from_str(r#"{"encoder_config": {"codebook_dim": null}}"#).unwrap();
        let enc = &cfg.encoder_config;
        assert_eq!(cfg.encoder_valid_num_quantizers, 16);
        assert_eq!(cfg.encode_downsample_rate, 1920);
        assert_eq!(enc.upsampling_ratios(), vec![8, 6, 5, 4]);
        assert_eq!((enc.hidden_size, enc.head_dim(), enc.codebook_dim()), (512, 64, 512));
        assert_eq!((enc.frame_rate(), enc.encodec_frame_rate()), (12.5, 25));
        assert_eq!((enc.hidden_act, enc.pad_mode), (Activation::Gelu, PadMode::Constant));
        assert_eq!(EncoderConfig::python_defaults().codebook_dim(), 256);
    }
}
