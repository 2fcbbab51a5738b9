//! The 12 Hz speech tokenizer's decoder: 16 codebook indices per frame → 1920 samples at 24 kHz
//! (`Qwen3TTSTokenizerV2Decoder` in qwen-tts 0.1.1).
//!
//! Stages: split residual-VQ lookup → causal conv → sliding-window transformer with layer scale →
//! transposed-conv + ConvNeXt upsampling → SnakeBeta vocoder → clamp to [−1, 1].
//!
//! Every stage is causal, so the decoder is written once, as a streaming step over a
//! per-utterance [`DecoderState`]: [`SpeechDecoder::decode`] is that step from a fresh state, and
//! feeding frames one at a time (or in any chunking) yields the same samples.
//!
//! Conv path, all gemm-shaped: candle's `conv1d` (im2col + gemm on CPU, cuDNN or im2col + gemm on
//! CUDA) for the causal convs; the transposed convs as one gemm + overlap-add of our own (see
//! [`CausalConvTranspose1d`] for why not candle's); the ConvNeXt depthwise conv as a sum over its
//! 7 taps, because candle runs a grouped conv as one conv per group (1024 of them in the release).

use super::host_f32;
use super::kernels::{self, ConvTransposeWeights, ConvWeights};
use super::streaming::{Carry, KvWindow};
use crate::error::{Error, Result};
use crate::model::linear::{Linear, WeightFormat};
use crate::model::{config, gemv};
use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{Activation, LayerNorm, LayerNormConfig, RmsNorm, VarBuilder};
use serde::Deserialize;
use std::path::Path;

type CResult<T> = candle_core::Result<T>;

/// `decoder_config` of the speech tokenizer's config.json, with the code defaults of
/// `Qwen3TTSTokenizerV2DecoderConfig`.
#[derive(Clone, Debug, Deserialize)]
pub struct DecoderConfig {
    #[serde(default = "default_codebook_size")]
    pub codebook_size: usize,
    /// No default: the official class reads it from the config's extra keys.
    pub codebook_dim: usize,
    #[serde(default = "default_1024")]
    pub hidden_size: usize,
    #[serde(default = "default_1024")]
    pub latent_dim: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_16")]
    pub num_attention_heads: usize,
    #[serde(default = "default_16")]
    pub num_key_value_heads: usize,
    /// `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_sliding_window")]
    pub sliding_window: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_16")]
    pub num_quantizers: usize,
    #[serde(default = "default_upsample_rates")]
    pub upsample_rates: Vec<usize>,
    #[serde(default = "default_upsampling_ratios")]
    pub upsampling_ratios: Vec<usize>,
    #[serde(default = "default_decoder_dim")]
    pub decoder_dim: usize,
    /// Only the default RoPE is supported; kept to reject anything else.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

fn default_codebook_size() -> usize {
    2048
}
fn default_1024() -> usize {
    1024
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_16() -> usize {
    16
}
fn default_sliding_window() -> usize {
    72
}
fn default_intermediate_size() -> usize {
    3072
}
fn default_hidden_act() -> Activation {
    Activation::Silu
}
fn default_rms_norm_eps() -> f64 {
    1e-5
}
fn default_num_hidden_layers() -> usize {
    8
}
fn default_upsample_rates() -> Vec<usize> {
    vec![8, 5, 4, 3]
}
fn default_upsampling_ratios() -> Vec<usize> {
    vec![2, 2]
}
fn default_decoder_dim() -> usize {
    1536
}

impl DecoderConfig {
    /// Reads `decoder_config` from the speech tokenizer's config.json.
    pub fn load(file: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct SpeechTokenizerFile {
            decoder_config: DecoderConfig,
        }
        let cfg = config::read_json::<SpeechTokenizerFile>(file)?.decoder_config;
        config::validated(file, cfg, Self::validate)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if let Some(serde_json::Value::Object(scaling)) = &self.rope_scaling {
            let kind = scaling.get("rope_type").or_else(|| scaling.get("type"));
            if kind.and_then(|k| k.as_str()) != Some("default") {
                return Err(format!("decoder_config.rope_scaling {kind:?} is not supported"));
            }
        }
        if self.sliding_window == 0 {
            return Err("decoder_config.sliding_window must be at least 1".into());
        }
        if self.num_quantizers < 2 {
            return Err("decoder_config.num_quantizers must be at least 2 (1 semantic + acoustic)".into());
        }
        if self.num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err("decoder_config.num_attention_heads must be a multiple of num_key_value_heads".into());
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Output samples per code frame (1920 in the release).
    pub fn samples_per_frame(&self) -> usize {
        self.upsampling_ratios.iter().chain(&self.upsample_rates).product()
    }
}

/// A stage output that [`SpeechDecoder::step_observed`] reports (batched along dim 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// RVQ decode, [B, codebook_dim, n].
    Quantized,
    /// Causal conv k3, [B, latent, n].
    PreConv,
    /// Sliding-window transformer, [B, n, latent].
    PreTransformer,
    /// Upsampling stage i (transposed conv + ConvNeXt), [B, latent, n·Π ratios[..=i]].
    Upsample(usize),
    /// Vocoder module i (`decoder.decoder[i]`): 0 the input conv, 1..=len(upsample_rates) the
    /// SnakeBeta blocks, then the output SnakeBeta and the output conv (before the clamp).
    Vocoder(usize),
}

// ---------------------------------------------------------------------------------------------
// Building blocks

/// `Qwen3TTSTokenizerV2CausalConvNet` with stride 1 (the only one the decoder uses): left zero
/// padding of `(kernel − 1)·dilation`, no extra right padding, so output t sees inputs ≤ t.
#[derive(Clone, Debug)]
struct CausalConv1d {
    weight: Tensor,
    bias: Tensor,
    dilation: usize,
    in_channels: usize,
    context: usize,
    /// The weights for [`kernels`], on CPU.
    cpu: Option<ConvWeights>,
}

impl CausalConv1d {
    fn load(in_channels: usize, out_channels: usize, kernel: usize, dilation: usize, vb: VarBuilder) -> CResult<Self> {
        let vb = vb.pp("conv");
        let weight = vb.get((out_channels, in_channels, kernel), "weight")?;
        let bias = vb.get(out_channels, "bias")?;
        let cpu = match weight.device() {
            Device::Cpu => Some(ConvWeights::new(
                &host_f32(&weight)?,
                host_f32(&bias)?,
                out_channels,
                in_channels,
                kernel,
                dilation,
            )),
            _ => None,
        };
        Ok(Self {
            weight,
            bias: bias.reshape((1, out_channels, 1))?,
            dilation,
            in_channels,
            context: (kernel - 1) * dilation,
            cpu,
        })
    }

    /// [`step`](Self::step) on CPU f32 rows: `xs` [B, in, t], optionally through `snake` first
    /// (the carry then holds SnakeBeta outputs, as when the activation is a separate module),
    /// plus `residual` [B, out, t] → [B, out, t].
    fn step_cpu(
        &self,
        carry: &mut Carry,
        xs: &[f32],
        b: usize,
        t: usize,
        snake: Option<&SnakeBeta>,
        residual: Option<&[f32]>,
    ) -> CResult<Vec<f32>> {
        let w = self
            .cpu
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("CPU conv weights missing".into()))?;
        let (ctx, c_in, c_out) = (w.context(), w.c_in, w.c_out);
        if ctx == 0 && snake.is_none() {
            let mut out = vec![0f32; b * c_out * t];
            match b * t <= gemv::MAX_ROWS {
                true => w.forward_rows(xs, b, t, residual, &mut out),
                false => {
                    for (row, (x, out)) in xs.chunks(c_in * t).zip(out.chunks_mut(c_out * t)).enumerate() {
                        w.forward(x, t, residual.map(|r| &r[row * c_out * t..(row + 1) * c_out * t]), out);
                    }
                }
            }
            return Ok(out);
        }
        let width = ctx + t;
        let old_carry = carry.get().map(host_f32).transpose()?;
        let mut new_carry = vec![0f32; b * c_in * ctx];
        // Row `row`'s input: its carried context, then the (activated) new samples; the last
        // `ctx` of them are carried on.
        let mut fill = |row: usize, input: &mut [f32]| {
            let x = &xs[row * c_in * t..(row + 1) * c_in * t];
            if let Some(old) = &old_carry {
                for (dst, src) in input.chunks_mut(width).zip(old[row * c_in * ctx..].chunks(ctx)) {
                    dst[..ctx].copy_from_slice(src);
                }
            }
            match snake {
                Some(snake) => snake.apply(x, t, input, width, ctx),
                None => {
                    for (dst, src) in input.chunks_mut(width).zip(x.chunks(t)) {
                        dst[ctx..].copy_from_slice(src);
                    }
                }
            }
            if ctx > 0 {
                for (dst, src) in new_carry[row * c_in * ctx..].chunks_mut(ctx).zip(input.chunks(width)) {
                    dst.copy_from_slice(&src[t..]);
                }
            }
        };
        let mut out = vec![0f32; b * c_out * t];
        if b * t <= gemv::MAX_ROWS {
            let mut inputs = vec![0f32; b * c_in * width];
            for (row, input) in inputs.chunks_mut(c_in * width).enumerate() {
                fill(row, input);
            }
            w.forward_rows(&inputs, b, t, residual, &mut out);
        } else {
            let mut input = vec![0f32; c_in * width];
            for (row, out) in out.chunks_mut(c_out * t).enumerate() {
                fill(row, &mut input);
                w.forward(
                    &input,
                    t,
                    residual.map(|r| &r[row * c_out * t..(row + 1) * c_out * t]),
                    out,
                );
            }
        }
        if ctx > 0 {
            carry.set(Tensor::from_vec(new_carry, (b, c_in, ctx), &Device::Cpu)?);
        }
        Ok(out)
    }

    fn fresh_carry(&self) -> CResult<Carry> {
        Carry::zeros(
            self.in_channels,
            self.context,
            self.weight.dtype(),
            self.weight.device(),
        )
    }

    /// [B, in, n] → [B, out, n]
    fn step(&self, carry: &mut Carry, xs: &Tensor) -> CResult<Tensor> {
        carry
            .prepend(xs)?
            .conv1d(&self.weight, 0, 1, self.dilation, 1)?
            .broadcast_add(&self.bias)
    }
}

/// The ConvNeXt block's causal depthwise conv (groups = channels, dilation 1).
#[derive(Clone, Debug)]
struct DepthwiseCausalConv1d {
    /// One [1, C, 1] weight column per kernel tap.
    taps: Vec<Tensor>,
    bias: Tensor,
}

impl DepthwiseCausalConv1d {
    fn load(channels: usize, kernel: usize, vb: VarBuilder) -> CResult<Self> {
        let vb = vb.pp("conv");
        let weight = vb.get((channels, 1, kernel), "weight")?;
        let taps = (0..kernel)
            .map(|k| weight.narrow(2, k, 1)?.reshape((1, channels, 1)))
            .collect::<CResult<_>>()?;
        Ok(Self {
            taps,
            bias: vb.get(channels, "bias")?.reshape((1, channels, 1))?,
        })
    }

    /// Past samples the conv reads.
    fn context(&self) -> usize {
        self.taps.len() - 1
    }

    fn fresh_carry(&self) -> CResult<Carry> {
        let channels = self.bias.dim(1)?;
        Carry::zeros(channels, self.context(), self.bias.dtype(), self.bias.device())
    }

    fn step(&self, carry: &mut Carry, xs: &Tensor) -> CResult<Tensor> {
        let n = xs.dim(D::Minus1)?;
        let padded = carry.prepend(xs)?;
        let mut acc = padded.narrow(D::Minus1, 0, n)?.broadcast_mul(&self.taps[0])?;
        for (k, tap) in self.taps.iter().enumerate().skip(1) {
            acc = (acc + padded.narrow(D::Minus1, k, n)?.broadcast_mul(tap)?)?;
        }
        acc.broadcast_add(&self.bias)
    }
}

/// `Qwen3TTSTokenizerV2CausalTransConvNet`: a transposed conv whose last `kernel − stride`
/// outputs are cut. When streaming those outputs are the overlap tail that the next inputs
/// complete, so n inputs always yield n·stride final samples.
///
/// Computed as one gemm, [B·n, C_in] × [C_out·K, C_in]ᵀ, and an overlap-add of the K/stride
/// stride-long pieces of each input's output. Not candle 0.11.1's `conv_transpose1d`: its CPU
/// gemm + col2im path folds the batch into the gemm rows while reading the input transposed,
/// which gives wrong rows for batch > 1.
#[derive(Clone, Debug)]
struct CausalConvTranspose1d {
    /// [C_out · pieces · stride, C_in]: the kernel zero-padded to a multiple of the stride.
    weight: Tensor,
    bias: Tensor,
    out_channels: usize,
    stride: usize,
    /// Kernel length in strides (rounded up).
    pieces: usize,
}

impl CausalConvTranspose1d {
    fn load(in_channels: usize, out_channels: usize, kernel: usize, stride: usize, vb: VarBuilder) -> CResult<Self> {
        let vb = vb.pp("conv");
        let pieces = kernel.div_ceil(stride);
        let weight = vb
            .get((in_channels, out_channels, kernel), "weight")?
            .pad_with_zeros(2, 0, pieces * stride - kernel)?
            .reshape((in_channels, ()))?
            .t()?
            .contiguous()?;
        Ok(Self {
            weight,
            bias: vb.get(out_channels, "bias")?.reshape((1, out_channels, 1))?,
            out_channels,
            stride,
            pieces,
        })
    }

    /// [`step`](Self::step) on CPU f32 rows, optionally through `snake` first.
    /// `xs` [B, in, n] → [B, out, n · stride].
    fn step_cpu(
        &self,
        carry: &mut Carry,
        xs: &[f32],
        b: usize,
        n: usize,
        snake: Option<&SnakeBeta>,
    ) -> CResult<Vec<f32>> {
        // The kernels read the weights in place: the tensor is laid out for them.
        with_host_f32(&self.weight, |weight| {
            with_host_f32(&self.bias, |bias| {
                let w = ConvTransposeWeights {
                    weight,
                    bias,
                    c_in: weight.len() / (self.out_channels * self.pieces * self.stride),
                    c_out: self.out_channels,
                    stride: self.stride,
                    pieces: self.pieces,
                };
                self.step_with(&w, carry, xs, b, n, snake)
            })
        })
    }

    /// [`step_cpu`](Self::step_cpu) with the weights borrowed.
    fn step_with(
        &self,
        w: &ConvTransposeWeights,
        carry: &mut Carry,
        xs: &[f32],
        b: usize,
        n: usize,
        snake: Option<&SnakeBeta>,
    ) -> CResult<Vec<f32>> {
        let (c_in, c_out, overlap, emitted) = (w.c_in, w.c_out, w.overlap(), n * w.stride);
        let mut tail = match carry.get() {
            Some(t) => host_f32(t)?,
            None => Vec::new(),
        };
        let mut out = vec![0f32; b * c_out * emitted];
        let mut activated = vec![0f32; if snake.is_some() { c_in * n } else { 0 }];
        let row_kernel = b * n <= gemv::MAX_ROWS;
        // Inputs as rows [B·n, c_in], for the row kernel.
        let mut rows = vec![0f32; if row_kernel { b * n * c_in } else { 0 }];
        for row in 0..b {
            let mut x = &xs[row * c_in * n..(row + 1) * c_in * n];
            if let Some(snake) = snake {
                snake.apply(x, n, &mut activated, n, 0);
                x = &activated;
            }
            if row_kernel {
                for (i, channel) in x.chunks(n).enumerate() {
                    for (time, &v) in channel.iter().enumerate() {
                        rows[(row * n + time) * c_in + i] = v;
                    }
                }
            } else {
                let tail = &mut tail[row * c_out * overlap..(row + 1) * c_out * overlap];
                w.forward(x, n, &mut out[row * c_out * emitted..(row + 1) * c_out * emitted], tail);
            }
        }
        if row_kernel {
            w.forward_rows(&rows, b, n, &mut out, &mut tail);
        }
        if overlap > 0 {
            carry.set(Tensor::from_vec(tail, (b, c_out, overlap), &Device::Cpu)?);
        }
        Ok(out)
    }

    /// Output samples the last inputs still owe to later outputs (the carried tail).
    fn overlap(&self) -> usize {
        (self.pieces - 1) * self.stride
    }

    fn fresh_carry(&self) -> CResult<Carry> {
        Carry::zeros(
            self.out_channels,
            self.overlap(),
            self.weight.dtype(),
            self.weight.device(),
        )
    }

    /// [B, in, n] → [B, out, n·stride]. The bias is added once, after the overlap-add.
    fn step(&self, carry: &mut Carry, xs: &Tensor) -> CResult<Tensor> {
        let (b, c_in, n) = xs.dims3()?;
        let (pieces, stride) = (self.pieces, self.stride);
        let rows = xs.transpose(1, 2)?.contiguous()?.reshape((b * n, c_in))?;
        let cols = rows
            .matmul(&self.weight.t()?)?
            .reshape((b, n, self.out_channels, pieces, stride))?;
        // Piece p of input t lands at output samples (t + p)·stride ..
        let mut full: Option<Tensor> = None;
        for p in 0..pieces {
            let piece = cols
                .narrow(3, p, 1)?
                .squeeze(3)?
                .transpose(1, 2)?
                .reshape((b, self.out_channels, n * stride))?
                .pad_with_zeros(2, p * stride, (pieces - 1 - p) * stride)?;
            full = Some(match full {
                Some(sum) => (sum + piece)?,
                None => piece,
            });
        }
        let full = full.ok_or_else(|| candle_core::Error::Msg("transposed conv with an empty kernel".into()))?;
        carry.overlap_add(&full)?.broadcast_add(&self.bias)
    }
}

/// SnakeBeta: x + 1/(e^β + 1e-9) · sin²(x·e^α), per channel; the exponentials are taken at load.
#[derive(Clone, Debug)]
struct SnakeBeta {
    alpha: Tensor,
    inv_beta: Tensor,
    /// `alpha`, `inv_beta` as vectors, for [`kernels::snake`].
    alpha_cpu: Vec<f32>,
    inv_beta_cpu: Vec<f32>,
}

impl SnakeBeta {
    fn load(channels: usize, vb: VarBuilder) -> CResult<Self> {
        let alpha = vb.get(channels, "alpha")?.exp()?.reshape((1, channels, 1))?;
        let inv_beta = (vb.get(channels, "beta")?.exp()? + 1e-9)?
            .recip()?
            .reshape((1, channels, 1))?;
        Ok(Self {
            alpha_cpu: host_f32(&alpha)?,
            inv_beta_cpu: host_f32(&inv_beta)?,
            alpha,
            inv_beta,
        })
    }

    /// `x` [C, t] → columns `offset..offset + t` of `out`, whose rows are `stride` long.
    fn apply(&self, x: &[f32], t: usize, out: &mut [f32], stride: usize, offset: usize) {
        kernels::snake(x, t, &self.alpha_cpu, &self.inv_beta_cpu, out, stride, offset);
    }

    /// [`forward`](Module::forward) on CPU f32 rows [B, C, t].
    fn forward_cpu(&self, xs: &[f32], t: usize) -> Vec<f32> {
        let c = self.alpha_cpu.len();
        let mut out = vec![0f32; xs.len()];
        for (o, x) in out.chunks_mut(c * t).zip(xs.chunks(c * t)) {
            self.apply(x, t, o, t, 0);
        }
        out
    }
}

/// The f32 elements of a tensor in row-major order, on the host.
/// Runs `f` on the elements of a contiguous f32 tensor on the CPU, in place.
fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> CResult<R>) -> CResult<R> {
    let (storage, layout) = t.storage_and_layout();
    let (candle_core::Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        return Err(candle_core::Error::Msg(
            "the CPU kernels need a contiguous CPU tensor".into(),
        ));
    };
    f(&cpu.as_slice::<f32>()?[start..end])
}

/// A CPU step over `xs` [B, C, t] as a tensor: `step` takes the rows, B and t and returns the
/// output rows [B, C', t'] and t'.
fn on_cpu(xs: &Tensor, step: impl FnOnce(&[f32], usize, usize) -> CResult<(Vec<f32>, usize)>) -> CResult<Tensor> {
    let (b, _, t) = xs.dims3()?;
    let (ys, t_out) = step(&host_f32(xs)?, b, t)?;
    let channels = ys.len() / (b * t_out).max(1);
    Tensor::from_vec(ys, (b, channels, t_out), &Device::Cpu)
}

/// A dense projection `[out, in]` (+ bias): the row kernel on CPU for a few rows (streamed
/// frames), gemm otherwise.
fn dense(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> CResult<Linear> {
    Linear::load(vb, in_dim, out_dim, bias, WeightFormat::Dense)
}

/// `linear` over the last dim of `xs` [.., in] (its rows flattened).
fn project(linear: &Linear, xs: &Tensor) -> CResult<Tensor> {
    let mut dims = xs.dims().to_vec();
    let rows = xs.flatten_to(D::Minus2)?;
    let ys = linear.forward(&rows)?;
    if let Some(last) = dims.last_mut() {
        *last = ys.dim(1)?;
    }
    ys.reshape(dims)
}

impl Module for SnakeBeta {
    fn forward(&self, xs: &Tensor) -> CResult<Tensor> {
        xs + xs
            .broadcast_mul(&self.alpha)?
            .sin()?
            .sqr()?
            .broadcast_mul(&self.inv_beta)?
    }
}

#[derive(Clone, Debug)]
struct ConvNeXtBlock {
    dwconv: DepthwiseCausalConv1d,
    norm: LayerNorm,
    pwconv1: Linear,
    pwconv2: Linear,
    gamma: Tensor,
}

impl ConvNeXtBlock {
    fn load(dim: usize, vb: VarBuilder) -> CResult<Self> {
        let norm_cfg = LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        };
        Ok(Self {
            dwconv: DepthwiseCausalConv1d::load(dim, 7, vb.pp("dwconv"))?,
            norm: candle_nn::layer_norm(dim, norm_cfg, vb.pp("norm"))?,
            pwconv1: dense(vb.pp("pwconv1"), dim, 4 * dim, true)?,
            pwconv2: dense(vb.pp("pwconv2"), 4 * dim, dim, true)?,
            gamma: vb.get(dim, "gamma")?,
        })
    }

    /// [B, C, T] → [B, C, T]
    fn step(&self, carry: &mut Carry, xs: &Tensor) -> CResult<Tensor> {
        let h = self.dwconv.step(carry, xs)?.transpose(1, 2)?;
        let h = project(&self.pwconv1, &self.norm.forward(&h)?)?.gelu_erf()?;
        let h = project(&self.pwconv2, &h)?.broadcast_mul(&self.gamma)?;
        xs + h.transpose(1, 2)?
    }
}

#[derive(Clone, Debug)]
struct ResidualUnit {
    act1: SnakeBeta,
    conv1: CausalConv1d,
    act2: SnakeBeta,
    conv2: CausalConv1d,
}

impl ResidualUnit {
    fn load(dim: usize, dilation: usize, vb: VarBuilder) -> CResult<Self> {
        Ok(Self {
            act1: SnakeBeta::load(dim, vb.pp("act1"))?,
            conv1: CausalConv1d::load(dim, dim, 7, dilation, vb.pp("conv1"))?,
            act2: SnakeBeta::load(dim, vb.pp("act2"))?,
            conv2: CausalConv1d::load(dim, dim, 1, 1, vb.pp("conv2"))?,
        })
    }

    fn fresh_carries(&self) -> CResult<[Carry; 2]> {
        Ok([self.conv1.fresh_carry()?, self.conv2.fresh_carry()?])
    }

    fn step(&self, carries: &mut [Carry; 2], xs: &Tensor) -> CResult<Tensor> {
        let [c1, c2] = carries;
        let h = self.conv1.step(c1, &self.act1.forward(xs)?)?;
        let h = self.conv2.step(c2, &self.act2.forward(&h)?)?;
        h + xs
    }

    /// [`step`](Self::step) on CPU f32 rows [B, C, t].
    fn step_cpu(&self, carries: &mut [Carry; 2], xs: &[f32], b: usize, t: usize) -> CResult<Vec<f32>> {
        let [c1, c2] = carries;
        let h = self.conv1.step_cpu(c1, xs, b, t, Some(&self.act1), None)?;
        self.conv2.step_cpu(c2, &h, b, t, Some(&self.act2), Some(xs))
    }
}

/// `Qwen3TTSTokenizerV2DecoderDecoderBlock`: SnakeBeta, transposed conv ×rate (kernel 2·rate),
/// residual units with dilations 1, 3, 9.
#[derive(Clone, Debug)]
struct VocoderBlock {
    snake: SnakeBeta,
    upsample: CausalConvTranspose1d,
    units: Vec<ResidualUnit>,
}

impl VocoderBlock {
    fn load(in_dim: usize, out_dim: usize, rate: usize, vb: VarBuilder) -> CResult<Self> {
        let vb = vb.pp("block");
        let units = [1, 3, 9]
            .iter()
            .enumerate()
            .map(|(i, &dilation)| ResidualUnit::load(out_dim, dilation, vb.pp(i + 2)))
            .collect::<CResult<_>>()?;
        Ok(Self {
            snake: SnakeBeta::load(in_dim, vb.pp(0))?,
            upsample: CausalConvTranspose1d::load(in_dim, out_dim, 2 * rate, rate, vb.pp(1))?,
            units,
        })
    }

    fn fresh_carries(&self) -> CResult<BlockCarries> {
        Ok(BlockCarries {
            upsample: self.upsample.fresh_carry()?,
            units: self.units.iter().map(|u| u.fresh_carries()).collect::<CResult<_>>()?,
        })
    }

    fn step(&self, carries: &mut BlockCarries, xs: &Tensor) -> CResult<Tensor> {
        let mut h = self.upsample.step(&mut carries.upsample, &self.snake.forward(xs)?)?;
        for (unit, unit_carries) in self.units.iter().zip(&mut carries.units) {
            h = unit.step(unit_carries, &h)?;
        }
        Ok(h)
    }

    /// [`step`](Self::step) on CPU f32 rows [B, C_in, t] → ([B, C_out, t · rate], t · rate).
    fn step_cpu(&self, carries: &mut BlockCarries, xs: &[f32], b: usize, t: usize) -> CResult<(Vec<f32>, usize)> {
        let mut h = self
            .upsample
            .step_cpu(&mut carries.upsample, xs, b, t, Some(&self.snake))?;
        let t = t * self.upsample.stride;
        for (unit, unit_carries) in self.units.iter().zip(&mut carries.units) {
            h = unit.step_cpu(unit_carries, &h, b, t)?;
        }
        Ok((h, t))
    }
}

// ---------------------------------------------------------------------------------------------
// Split residual vector quantizer (decode only)

/// One `ResidualVectorQuantizer`: codebook lookups summed, then the 1×1 output projection.
#[derive(Clone, Debug)]
struct ResidualCodebooks {
    /// `embedding_sum / max(cluster_usage, 1e-5)`, [bins, dim] each.
    codebooks: Vec<Tensor>,
    /// [out, dim]
    output_proj: Tensor,
}

impl ResidualCodebooks {
    fn load(count: usize, bins: usize, dim: usize, out_dim: usize, vb: VarBuilder) -> CResult<Self> {
        let codebooks = (0..count)
            .map(|i| {
                let vb = vb.pp(format!("vq.layers.{i}._codebook"));
                let usage = vb.get(bins, "cluster_usage")?.maximum(1e-5)?;
                vb.get((bins, dim), "embedding_sum")?
                    .broadcast_div(&usage.unsqueeze(1)?)
            })
            .collect::<CResult<_>>()?;
        let output_proj = vb.get((out_dim, dim, 1), "output_proj.weight")?.squeeze(2)?;
        Ok(Self { codebooks, output_proj })
    }

    /// `codes`: one [rows] index vector per codebook → [rows, out]
    fn decode(&self, codes: &[Tensor]) -> CResult<Tensor> {
        let mut sum: Option<Tensor> = None;
        for (codebook, ids) in self.codebooks.iter().zip(codes) {
            let looked_up = codebook.index_select(ids, 0)?;
            sum = Some(match sum {
                Some(s) => (s + looked_up)?,
                None => looked_up,
            });
        }
        let sum = sum.ok_or_else(|| candle_core::Error::Msg("residual quantizer without codebooks".into()))?;
        sum.matmul(&self.output_proj.t()?)
    }
}

/// `SplitResidualVectorQuantizer` with one semantic codebook and the rest acoustic.
#[derive(Clone, Debug)]
struct SplitQuantizer {
    semantic: ResidualCodebooks,
    acoustic: ResidualCodebooks,
}

impl SplitQuantizer {
    fn load(cfg: &DecoderConfig, vb: VarBuilder) -> CResult<Self> {
        let (bins, out_dim) = (cfg.codebook_size, cfg.codebook_dim);
        let dim = out_dim / 2;
        Ok(Self {
            semantic: ResidualCodebooks::load(1, bins, dim, out_dim, vb.pp("rvq_first"))?,
            acoustic: ResidualCodebooks::load(cfg.num_quantizers - 1, bins, dim, out_dim, vb.pp("rvq_rest"))?,
        })
    }

    /// codes [B, n, Q] (u32) → [B, codebook_dim, n]
    fn decode(&self, codes: &Tensor) -> CResult<Tensor> {
        let (b, n, q) = codes.dims3()?;
        let per_codebook = (0..q)
            .map(|i| codes.i((.., .., i))?.flatten_all())
            .collect::<CResult<Vec<_>>>()?;
        let semantic = self.semantic.decode(&per_codebook[..1])?;
        let acoustic = self.acoustic.decode(&per_codebook[1..])?;
        (semantic + acoustic)?
            .reshape((b, n, ()))?
            .transpose(1, 2)?
            .contiguous()
    }
}

// ---------------------------------------------------------------------------------------------
// Sliding-window transformer

/// One utterance's transformer state: frames seen (its next RoPE position) and each layer's
/// window of past keys and values.
#[derive(Clone, Debug)]
struct KvRow {
    position: usize,
    layers: Vec<KvWindow>,
}

#[derive(Clone, Debug)]
struct Attention {
    /// q, k and v stacked: one projection (one pass over the weights, one parallel call).
    qkv_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: usize,
}

impl Attention {
    fn load(cfg: &DecoderConfig, vb: VarBuilder) -> CResult<Self> {
        let (hidden, head_dim) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let parts = [
            (vb.pp("q_proj"), heads * head_dim),
            (vb.pp("k_proj"), kv_heads * head_dim),
            (vb.pp("v_proj"), kv_heads * head_dim),
        ];
        Ok(Self {
            qkv_proj: Linear::load_stacked(&parts, hidden, cfg.attention_bias, WeightFormat::Dense)?,
            o_proj: dense(vb.pp("o_proj"), heads * head_dim, hidden, cfg.attention_bias)?,
            heads,
            kv_heads,
            head_dim,
            window: cfg.sliding_window,
        })
    }

    /// xs [B, n, hidden]; cos/sin [B, n, head_dim/2]; one window per row.
    fn step(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor, windows: &mut [&mut KvWindow]) -> CResult<Tensor> {
        let (b, n, _) = xs.dims3()?;
        let split_heads =
            |t: Tensor, heads: usize| t.reshape((b, n, heads, self.head_dim))?.transpose(1, 2)?.contiguous();
        let qkv = project(&self.qkv_proj, xs)?;
        let (q_len, kv_len) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let q = split_heads(qkv.narrow(D::Minus1, 0, q_len)?, self.heads)?;
        let k = split_heads(qkv.narrow(D::Minus1, q_len, kv_len)?, self.kv_heads)?;
        let v = split_heads(qkv.narrow(D::Minus1, q_len + kv_len, kv_len)?, self.kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        // Rows whose windows hold the same number of positions attend as one batch (the steady
        // state of a streaming batch); otherwise row by row.
        let out = if windows.iter().all(|w| w.len() == windows[0].len()) {
            self.attend(&q, &k, &v, windows)?
        } else {
            let rows = windows
                .iter_mut()
                .enumerate()
                .map(|(r, w)| {
                    let row = |t: &Tensor| t.narrow(0, r, 1);
                    self.attend(&row(&q)?, &row(&k)?, &row(&v)?, &mut [&mut **w])
                })
                .collect::<CResult<Vec<_>>>()?;
            Tensor::cat(&rows, 0)?
        };
        project(&self.o_proj, &out.transpose(1, 2)?.reshape((b, n, ()))?)
    }

    /// Eager attention of the new positions over each row's window and themselves, under the
    /// sliding-window causal mask (`key > query − window`); every window holds as many positions.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, windows: &mut [&mut KvWindow]) -> CResult<Tensor> {
        let past = windows[0].len();
        let n = q.dim(2)?;
        let (k, v) = KvWindow::extend(windows, k, v, self.window)?;
        let groups = self.heads / self.kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, groups)?;
        let v = candle_transformers::utils::repeat_kv(v, groups)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? * (self.head_dim as f64).powf(-0.5))?;
        let scores = match sliding_window_mask(past, n, self.window, q.device())? {
            Some(mask) => scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?,
            None => scores,
        };
        candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)
    }
}

/// Additive mask [n, past + n] for queries at positions past..past+n over keys 0..past+n:
/// a key is visible when it is not in the future and fewer than `window` positions back.
/// `None` when everything is visible.
fn sliding_window_mask(past: usize, n: usize, window: usize, device: &Device) -> CResult<Option<Tensor>> {
    let total = past + n;
    let visible = |q: usize, k: usize| k <= q && q - k < window;
    if (past..total).all(|q| (0..total).all(|k| visible(q, k))) {
        return Ok(None);
    }
    let mask: Vec<f32> = (past..total)
        .flat_map(|q| (0..total).map(move |k| if visible(q, k) { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (n, total), device).map(Some)
}

#[derive(Clone, Debug)]
struct Mlp {
    /// gate and up stacked, as q, k and v.
    gate_up_proj: Linear,
    down_proj: Linear,
    intermediate: usize,
    act: Activation,
}

impl Mlp {
    fn load(cfg: &DecoderConfig, vb: VarBuilder) -> CResult<Self> {
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let parts = [(vb.pp("gate_proj"), inter), (vb.pp("up_proj"), inter)];
        Ok(Self {
            gate_up_proj: Linear::load_stacked(&parts, hidden, false, WeightFormat::Dense)?,
            down_proj: dense(vb.pp("down_proj"), inter, hidden, false)?,
            intermediate: inter,
            act: cfg.hidden_act,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> CResult<Tensor> {
        let gate_up = project(&self.gate_up_proj, xs)?;
        let gate = self.act.forward(&gate_up.narrow(D::Minus1, 0, self.intermediate)?)?;
        let up = gate_up.narrow(D::Minus1, self.intermediate, self.intermediate)?;
        project(&self.down_proj, &(gate * up)?)
    }
}

#[derive(Clone, Debug)]
struct TransformerLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    self_attn_layer_scale: Tensor,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    mlp_layer_scale: Tensor,
}

impl TransformerLayer {
    fn load(cfg: &DecoderConfig, vb: VarBuilder) -> CResult<Self> {
        let (hidden, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: candle_nn::rms_norm(hidden, eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::load(cfg, vb.pp("self_attn"))?,
            self_attn_layer_scale: vb.get(hidden, "self_attn_layer_scale.scale")?,
            post_attention_layernorm: candle_nn::rms_norm(hidden, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::load(cfg, vb.pp("mlp"))?,
            mlp_layer_scale: vb.get(hidden, "mlp_layer_scale.scale")?,
        })
    }

    fn step(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor, windows: &mut [&mut KvWindow]) -> CResult<Tensor> {
        let attn = self
            .self_attn
            .step(&self.input_layernorm.forward(xs)?, cos, sin, windows)?;
        let xs = (xs + attn.broadcast_mul(&self.self_attn_layer_scale)?)?;
        let mlp = self.mlp.forward(&self.post_attention_layernorm.forward(&xs)?)?;
        xs + mlp.broadcast_mul(&self.mlp_layer_scale)?
    }
}

/// `Qwen3TTSTokenizerV2DecoderTransformerModel`: input projection, sliding-window layers with
/// layer scale, final norm, output projection.
#[derive(Clone, Debug)]
struct PreTransformer {
    input_proj: Linear,
    layers: Vec<TransformerLayer>,
    norm: RmsNorm,
    output_proj: Linear,
    /// Default RoPE frequencies, [1, 1, head_dim/2].
    inv_freq: Tensor,
}

impl PreTransformer {
    fn load(cfg: &DecoderConfig, vb: VarBuilder) -> CResult<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| TransformerLayer::load(cfg, vb.pp(format!("layers.{i}"))))
            .collect::<CResult<_>>()?;
        let head_dim = cfg.head_dim();
        // As transformers computes it, in f32: 1 / theta^(2i / head_dim).
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Ok(Self {
            input_proj: dense(vb.pp("input_proj"), cfg.latent_dim, cfg.hidden_size, true)?,
            layers,
            norm: candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?,
            output_proj: dense(vb.pp("output_proj"), cfg.hidden_size, cfg.latent_dim, true)?,
            inv_freq: Tensor::from_vec(inv_freq, (1, 1, head_dim / 2), vb.device())?,
        })
    }

    fn fresh_row(&self) -> KvRow {
        KvRow {
            position: 0,
            layers: vec![KvWindow::default(); self.layers.len()],
        }
    }

    /// xs [B, n, latent] → [B, n, latent]; row b continues at position `rows[b].position`.
    fn step(&self, rows: &mut [KvRow], xs: &Tensor) -> CResult<Tensor> {
        let (b, n, _) = xs.dims3()?;
        let positions: Vec<f32> = rows
            .iter()
            .flat_map(|row| (row.position..row.position + n).map(|p| p as f32))
            .collect();
        let freqs = Tensor::from_vec(positions, (b, n, 1), xs.device())?.broadcast_mul(&self.inv_freq)?;
        let cos = freqs.cos()?.to_dtype(xs.dtype())?;
        let sin = freqs.sin()?.to_dtype(xs.dtype())?;
        let mut hidden = project(&self.input_proj, xs)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let mut windows: Vec<&mut KvWindow> = rows.iter_mut().map(|row| &mut row.layers[l]).collect();
            hidden = layer.step(&hidden, &cos, &sin, &mut windows)?;
        }
        for row in rows.iter_mut() {
            row.position += n;
        }
        project(&self.output_proj, &self.norm.forward(&hidden)?)
    }
}

// ---------------------------------------------------------------------------------------------
// The decoder and its streaming state

/// Carries of one vocoder block: its transposed conv, then each residual unit's two convs.
#[derive(Clone, Debug)]
struct BlockCarries {
    upsample: Carry,
    units: Vec<[Carry; 2]>,
}

/// Everything one utterance's decoder carries between steps: bounded (conv contexts, overlap
/// tails, `sliding_window − 1` keys/values per layer), so a step costs the same however long the
/// utterance is. Clone it to fork a stream (e.g. a voice prompt's primed state).
///
/// Internally a state may hold several rows (utterances batched along dim 0); every public
/// state holds one.
#[derive(Clone, Debug)]
pub struct DecoderState {
    pre_conv: Carry,
    /// Per upsampling stage: transposed conv tail, ConvNeXt depthwise context.
    upsample: Vec<[Carry; 2]>,
    vocoder_input: Carry,
    vocoder_blocks: Vec<BlockCarries>,
    output_conv: Carry,
    rows: Vec<KvRow>,
}

impl DecoderState {
    /// Frames decoded so far.
    pub fn frames(&self) -> usize {
        self.rows[0].position
    }

    fn carries_mut(&mut self) -> Vec<&mut Carry> {
        let mut all = vec![&mut self.pre_conv];
        all.extend(self.upsample.iter_mut().flatten());
        all.push(&mut self.vocoder_input);
        for block in &mut self.vocoder_blocks {
            all.push(&mut block.upsample);
            all.extend(block.units.iter_mut().flatten());
        }
        all.push(&mut self.output_conv);
        all
    }

    /// The states as one batch, row i = states[i].
    fn stack(states: &mut [&mut DecoderState]) -> CResult<DecoderState> {
        let mut batched = states[0].clone();
        let per_state: Vec<Vec<&mut Carry>> = states.iter_mut().map(|s| s.carries_mut()).collect();
        for (i, slot) in batched.carries_mut().into_iter().enumerate() {
            let column: Vec<&Carry> = per_state.iter().map(|carries| &*carries[i]).collect();
            *slot = Carry::stack(&column)?;
        }
        drop(per_state);
        batched.rows = states.iter().flat_map(|s| s.rows.iter().cloned()).collect();
        Ok(batched)
    }

    /// Writes row i of a batch back into states[i].
    fn unstack_into(mut self, states: &mut [&mut DecoderState]) -> CResult<()> {
        let rows = std::mem::take(&mut self.rows);
        let batched = self.carries_mut();
        for (row, (state, kv)) in states.iter_mut().zip(rows).enumerate() {
            for (slot, carry) in state.carries_mut().into_iter().zip(&batched) {
                *slot = carry.row(row)?;
            }
            state.rows = vec![kv];
        }
        Ok(())
    }
}

/// Frames per step of [`SpeechDecoder::decode`]: bounds the vocoder's activation memory on long
/// inputs (the official `decode` also works in 300-frame chunks). The output does not depend on
/// it, since the streaming state carries everything across steps.
const DECODE_CHUNK_FRAMES: usize = 300;

/// The speech tokenizer's decoder, codes → waveform.
#[derive(Clone, Debug)]
pub struct SpeechDecoder {
    quantizer: SplitQuantizer,
    pre_conv: CausalConv1d,
    pre_transformer: PreTransformer,
    upsample: Vec<(CausalConvTranspose1d, ConvNeXtBlock)>,
    vocoder_input: CausalConv1d,
    vocoder_blocks: Vec<VocoderBlock>,
    output_snake: SnakeBeta,
    output_conv: CausalConv1d,
    num_quantizers: usize,
    samples_per_frame: usize,
    /// Run the vocoder through [`kernels`] (CPU only).
    cpu_kernels: bool,
}

impl SpeechDecoder {
    /// `vb`: the `decoder.` prefix of the speech tokenizer's model.safetensors.
    pub fn load(vb: VarBuilder, cfg: &DecoderConfig) -> Result<Self> {
        let latent = cfg.latent_dim;
        let upsample = cfg
            .upsampling_ratios
            .iter()
            .enumerate()
            .map(|(i, &factor)| {
                let vb = vb.pp(format!("upsample.{i}"));
                Ok((
                    CausalConvTranspose1d::load(latent, latent, factor, factor, vb.pp(0))?,
                    ConvNeXtBlock::load(latent, vb.pp(1))?,
                ))
            })
            .collect::<CResult<_>>()?;
        let vocoder = vb.pp("decoder");
        let blocks = cfg.upsample_rates.len();
        let vocoder_blocks = cfg
            .upsample_rates
            .iter()
            .enumerate()
            .map(|(i, &rate)| {
                let in_dim = cfg.decoder_dim >> i;
                VocoderBlock::load(in_dim, in_dim / 2, rate, vocoder.pp(i + 1))
            })
            .collect::<CResult<_>>()?;
        let output_dim = cfg.decoder_dim >> blocks;
        Ok(Self {
            quantizer: SplitQuantizer::load(cfg, vb.pp("quantizer"))?,
            pre_conv: CausalConv1d::load(cfg.codebook_dim, latent, 3, 1, vb.pp("pre_conv"))?,
            pre_transformer: PreTransformer::load(cfg, vb.pp("pre_transformer"))?,
            upsample,
            vocoder_input: CausalConv1d::load(latent, cfg.decoder_dim, 7, 1, vocoder.pp(0))?,
            vocoder_blocks,
            output_snake: SnakeBeta::load(output_dim, vocoder.pp(blocks + 1))?,
            output_conv: CausalConv1d::load(output_dim, 1, 7, 1, vocoder.pp(blocks + 2))?,
            num_quantizers: cfg.num_quantizers,
            samples_per_frame: cfg.samples_per_frame(),
            cpu_kernels: vb.device().is_cpu() && vb.dtype() == DType::F32,
        })
    }

    pub fn samples_per_frame(&self) -> usize {
        self.samples_per_frame
    }

    /// Whether the vocoder runs through the fused CPU kernels (the default on CPU) or through
    /// candle tensor ops (the only way on other devices); for benchmarks and checks of one
    /// against the other. Has no effect off the CPU.
    #[doc(hidden)]
    pub fn set_cpu_kernels(&mut self, on: bool) {
        self.cpu_kernels = on && self.output_conv.cpu.is_some();
    }

    /// The state of an utterance before its first frame.
    pub fn new_state(&self) -> Result<DecoderState> {
        Ok(DecoderState {
            pre_conv: self.pre_conv.fresh_carry()?,
            upsample: self
                .upsample
                .iter()
                .map(|(tr, convnext)| Ok([tr.fresh_carry()?, convnext.dwconv.fresh_carry()?]))
                .collect::<CResult<_>>()?,
            vocoder_input: self.vocoder_input.fresh_carry()?,
            vocoder_blocks: self
                .vocoder_blocks
                .iter()
                .map(|b| b.fresh_carries())
                .collect::<CResult<_>>()?,
            output_conv: self.output_conv.fresh_carry()?,
            rows: vec![self.pre_transformer.fresh_row()],
        })
    }

    /// A fresh state fed `codes` [n, Q], as an ICL voice's reference codes precede the generated
    /// ones, so that the generated frames continue them exactly (clone it for each utterance);
    /// and the last frame's samples.
    ///
    /// Only the quantizer, pre-conv and pre-transformer (whose sliding window reaches far back)
    /// see every frame. The conv stack after them remembers [`conv_history_frames`] frames,
    /// so it starts from a fresh state that many frames (plus one) before the end and ends in
    /// the state a full decode ends in: same values up to float rounding, as for any chunking.
    /// On the full-size decoder the history is 10 frames: the 3.3 s bench clip's 41 reference
    /// frames then run 11 through the conv stack (priming 1.42–1.56 s → 0.42–0.49 s, alternated).
    pub fn prime(&self, codes: &Tensor) -> Result<(DecoderState, Tensor)> {
        let codes = self.frame_codes(codes)?;
        let frames = codes.dim(0)?;
        let tail = (self.conv_history_frames() + 1).min(frames);
        let mut state = self.new_state()?;
        if frames > tail {
            let head = codes.narrow(0, 0, frames - tail)?.unsqueeze(0)?;
            crate::model::on_worker(|| self.front(&mut state, &head, &mut |_, _| {}))?;
        }
        let pcm = self.step(&mut state, &codes.narrow(0, frames - tail, tail)?)?;
        let last = pcm.dim(0)?.min(self.samples_per_frame);
        Ok((state, pcm.narrow(0, pcm.dim(0)? - last, last)?))
    }

    /// Frames of the past that the stages after the pre-transformer still see: each causal
    /// conv's context and each transposed conv's tail, in frames at that stage's rate, summed
    /// along the chain (activations and norms are per sample).
    fn conv_history_frames(&self) -> usize {
        let mut samples_per_frame = 1;
        let mut frames = 0.0;
        let mut add = |samples: usize, samples_per_frame: usize| frames += samples as f64 / samples_per_frame as f64;
        for (upsample, convnext) in &self.upsample {
            samples_per_frame *= upsample.stride;
            add(upsample.overlap(), samples_per_frame);
            add(convnext.dwconv.context(), samples_per_frame);
        }
        add(self.vocoder_input.context, samples_per_frame);
        for block in &self.vocoder_blocks {
            samples_per_frame *= block.upsample.stride;
            add(block.upsample.overlap(), samples_per_frame);
            for unit in &block.units {
                add(unit.conv1.context + unit.conv2.context, samples_per_frame);
            }
        }
        add(self.output_conv.context, samples_per_frame);
        frames.ceil() as usize
    }

    /// Decodes `codes` [frames, Q] in one go: [frames · samples_per_frame] samples in [−1, 1].
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let mut state = self.new_state()?;
        let frames = codes.dim(0)?;
        let chunks = (0..frames)
            .step_by(DECODE_CHUNK_FRAMES)
            .map(|start| {
                self.step(
                    &mut state,
                    &codes.narrow(0, start, DECODE_CHUNK_FRAMES.min(frames - start))?,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        self.concat_pcm(&chunks, codes.device())
    }

    /// Feeds the next `codes` [n, Q] of an utterance; returns their n · samples_per_frame samples.
    pub fn step(&self, state: &mut DecoderState, codes: &Tensor) -> Result<Tensor> {
        crate::model::on_worker(|| self.step_observed(state, codes, &mut |_, _| {}))
    }

    /// [`step`](Self::step), reporting every stage's output to `observe` (parity checks).
    pub fn step_observed(
        &self,
        state: &mut DecoderState,
        codes: &Tensor,
        observe: &mut dyn FnMut(Stage, &Tensor),
    ) -> Result<Tensor> {
        let codes = self.frame_codes(codes)?;
        if codes.dim(0)? == 0 {
            return self.concat_pcm(&[], codes.device());
        }
        Ok(self.step_rows(state, &codes.unsqueeze(0)?, observe)?.get(0)?)
    }

    /// Steps several utterances at once, `codes[i]` [n_i, Q] for `states[i]`: the weight work of
    /// the utterances with equally many new frames runs as one batch, attention against each
    /// one's own window. Returns each utterance's new samples.
    pub fn step_batch(&self, states: &mut [&mut DecoderState], codes: &[Tensor]) -> Result<Vec<Tensor>> {
        crate::model::on_worker(|| self.step_batch_here(states, codes))
    }

    fn step_batch_here(&self, states: &mut [&mut DecoderState], codes: &[Tensor]) -> Result<Vec<Tensor>> {
        if states.len() != codes.len() {
            return Err(Error::InvalidRequest(format!(
                "step_batch: {} states but {} code chunks",
                states.len(),
                codes.len()
            )));
        }
        let codes = codes.iter().map(|c| self.frame_codes(c)).collect::<Result<Vec<_>>>()?;
        let mut frame_counts = codes.iter().map(|c| c.dim(0)).collect::<CResult<Vec<_>>>()?;
        let mut pcm: Vec<Option<Tensor>> = vec![None; codes.len()];
        let counts = {
            frame_counts.sort_unstable();
            frame_counts.dedup();
            frame_counts
        };
        for count in counts {
            let members: Vec<usize> = (0..codes.len())
                .filter(|&i| codes[i].dim(0).ok() == Some(count))
                .collect();
            if count == 0 {
                for &i in &members {
                    pcm[i] = Some(self.concat_pcm(&[], codes[i].device())?);
                }
                continue;
            }
            let batch_codes = Tensor::stack(&members.iter().map(|&i| &codes[i]).collect::<Vec<_>>(), 0)?;
            let mut group: Vec<&mut DecoderState> = states
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| members.contains(i))
                .map(|(_, s)| &mut **s)
                .collect();
            let mut batched = DecoderState::stack(&mut group)?;
            let out = self.step_rows(&mut batched, &batch_codes, &mut |_, _| {})?;
            batched.unstack_into(&mut group)?;
            for (row, &i) in members.iter().enumerate() {
                pcm[i] = Some(out.get(row)?);
            }
        }
        Ok(pcm.into_iter().flatten().collect())
    }

    /// Checks one utterance's codes [n, Q] and converts them to u32 indices.
    fn frame_codes(&self, codes: &Tensor) -> Result<Tensor> {
        match codes.dims() {
            [_, q] if *q == self.num_quantizers => Ok(codes.to_dtype(DType::U32)?),
            dims => Err(Error::InvalidRequest(format!(
                "decoder codes must be [frames, {}], got {dims:?}",
                self.num_quantizers
            ))),
        }
    }

    fn concat_pcm(&self, chunks: &[Tensor], device: &Device) -> Result<Tensor> {
        let dtype = self.output_conv.weight.dtype();
        Ok(match chunks {
            [] => Tensor::zeros(0, dtype, device)?,
            chunks => Tensor::cat(chunks, 0)?,
        })
    }

    /// The stages that see every frame: quantizer, pre-conv, pre-transformer. Codes [B, n, Q]
    /// → [B, latent, n].
    fn front(
        &self,
        state: &mut DecoderState,
        codes: &Tensor,
        observe: &mut dyn FnMut(Stage, &Tensor),
    ) -> CResult<Tensor> {
        let hidden = self.quantizer.decode(codes)?;
        observe(Stage::Quantized, &hidden);
        let hidden = match self.cpu_kernels {
            true => on_cpu(&hidden, |x, b, t| {
                let y = self.pre_conv.step_cpu(&mut state.pre_conv, x, b, t, None, None)?;
                Ok((y, t))
            })?,
            false => self.pre_conv.step(&mut state.pre_conv, &hidden)?,
        };
        observe(Stage::PreConv, &hidden);
        let hidden = self
            .pre_transformer
            .step(&mut state.rows, &hidden.transpose(1, 2)?.contiguous()?)?;
        observe(Stage::PreTransformer, &hidden);
        hidden.transpose(1, 2)?.contiguous()
    }

    /// One step of a batch of rows: codes [B, n, Q] (u32) → samples [B, n · samples_per_frame].
    fn step_rows(
        &self,
        state: &mut DecoderState,
        codes: &Tensor,
        observe: &mut dyn FnMut(Stage, &Tensor),
    ) -> CResult<Tensor> {
        let (b, n, _) = codes.dims3()?;
        let mut hidden = self.front(state, codes, observe)?;
        for (i, ((upsample, convnext), [tail, context])) in self.upsample.iter().zip(&mut state.upsample).enumerate() {
            let upsampled = match self.cpu_kernels {
                true => on_cpu(&hidden, |x, b, n| {
                    Ok((upsample.step_cpu(tail, x, b, n, None)?, n * upsample.stride))
                })?,
                false => upsample.step(tail, &hidden)?,
            };
            hidden = convnext.step(context, &upsampled)?;
            observe(Stage::Upsample(i), &hidden);
        }
        if self.cpu_kernels {
            return self.vocoder_cpu(state, &hidden, observe);
        }
        hidden = self.vocoder_input.step(&mut state.vocoder_input, &hidden)?;
        observe(Stage::Vocoder(0), &hidden);
        for (i, (block, carries)) in self.vocoder_blocks.iter().zip(&mut state.vocoder_blocks).enumerate() {
            hidden = block.step(carries, &hidden)?;
            observe(Stage::Vocoder(i + 1), &hidden);
        }
        let last = self.vocoder_blocks.len() + 1;
        hidden = self.output_snake.forward(&hidden)?;
        observe(Stage::Vocoder(last), &hidden);
        hidden = self.output_conv.step(&mut state.output_conv, &hidden)?;
        observe(Stage::Vocoder(last + 1), &hidden);
        hidden.clamp(-1f32, 1f32)?.reshape((b, n * self.samples_per_frame))
    }

    /// The vocoder of [`step_rows`](Self::step_rows) through [`kernels`]: `hidden` [B, latent, t].
    fn vocoder_cpu(
        &self,
        state: &mut DecoderState,
        hidden: &Tensor,
        observe: &mut dyn FnMut(Stage, &Tensor),
    ) -> CResult<Tensor> {
        let (b, _, mut t) = hidden.dims3()?;
        let mut report = |stage: Stage, data: &[f32], t: usize| -> CResult<()> {
            let c = data.len() / (b * t).max(1);
            observe(stage, &Tensor::from_slice(data, (b, c, t), &Device::Cpu)?);
            Ok(())
        };
        let mut h = self
            .vocoder_input
            .step_cpu(&mut state.vocoder_input, &host_f32(hidden)?, b, t, None, None)?;
        report(Stage::Vocoder(0), &h, t)?;
        for (i, (block, carries)) in self.vocoder_blocks.iter().zip(&mut state.vocoder_blocks).enumerate() {
            (h, t) = block.step_cpu(carries, &h, b, t)?;
            report(Stage::Vocoder(i + 1), &h, t)?;
        }
        let last = self.vocoder_blocks.len() + 1;
        let h = self.output_snake.forward_cpu(&h, t);
        report(Stage::Vocoder(last), &h, t)?;
        let mut pcm = self
            .output_conv
            .step_cpu(&mut state.output_conv, &h, b, t, None, None)?;
        report(Stage::Vocoder(last + 1), &pcm, t)?;
        for v in &mut pcm {
            *v = v.clamp(-1.0, 1.0);
        }
        Tensor::from_vec(pcm, (b, t), &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed tiny fixture's decoder, on CPU in f32.
    fn tiny_decoder() -> Result<(DecoderConfig, SpeechDecoder)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-seed0/checkpoint/speech_tokenizer");
        let cfg = DecoderConfig::load(&dir.join("config.json"))?;
        let vb = crate::model::weights::mmap(&dir.join("model.safetensors"), DType::F32, &Device::Cpu)?;
        let decoder = SpeechDecoder::load(vb.pp("decoder"), &cfg)?;
        Ok((cfg, decoder))
    }

    /// The candle-ops path (the only one off the CPU) and the CPU kernels agree, whole and in
    /// a batch of one-frame steps (the row kernels).
    #[test]
    fn candle_ops_match_cpu_kernels() -> Result<()> {
        let (cfg, decoder) = tiny_decoder()?;
        let mut reference = decoder.clone();
        reference.set_cpu_kernels(false);
        let frames = 6;
        let ids: Vec<u32> = (0..frames * cfg.num_quantizers)
            .map(|i| (i * 37 % cfg.codebook_size) as u32)
            .collect();
        let codes = Tensor::from_vec(ids, (frames, cfg.num_quantizers), &Device::Cpu)?;
        let want = reference.decode(&codes)?;
        let close = |got: &Tensor, what: &str| -> Result<()> {
            let worst = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(worst < 1e-4, "{what}: max abs difference {worst}");
            Ok(())
        };
        close(&decoder.decode(&codes)?, "whole")?;
        for d in [&decoder, &reference] {
            let (mut a, mut b) = (d.new_state()?, d.new_state()?);
            let mut pcm = [Vec::new(), Vec::new()];
            for f in 0..frames {
                let frame = codes.narrow(0, f, 1)?;
                let out = d.step_batch(&mut [&mut a, &mut b], &[frame.clone(), frame])?;
                for (p, o) in pcm.iter_mut().zip(out) {
                    p.push(o);
                }
            }
            for p in &pcm {
                close(&Tensor::cat(p, 0)?, "batched one-frame steps")?;
            }
        }
        Ok(())
    }

    /// Priming runs the conv stack on the last frames only, yet the state it leaves continues
    /// as the whole decode does, and the samples it returns are the whole decode's last ones.
    #[test]
    fn priming_the_conv_stack_on_the_last_frames_is_exact() -> Result<()> {
        let (cfg, decoder) = tiny_decoder()?;
        let history = decoder.conv_history_frames();
        assert!(history > 0);
        let (primed_frames, more) = (3 * (history + 1), 5);
        let frames = primed_frames + more;
        let ids: Vec<u32> = (0..frames * cfg.num_quantizers)
            .map(|i| (i * 7919 % cfg.codebook_size) as u32)
            .collect();
        let codes = Tensor::from_vec(ids, (frames, cfg.num_quantizers), &Device::Cpu)?;
        let whole = decoder.decode(&codes)?;
        let spf = decoder.samples_per_frame();
        let (mut state, tail) = decoder.prime(&codes.narrow(0, 0, primed_frames)?)?;
        assert_eq!(state.frames(), primed_frames);
        assert_eq!(tail.dim(0)?, spf);
        let rest = decoder.step(&mut state, &codes.narrow(0, primed_frames, more)?)?;
        let close = |got: &Tensor, from: usize, what: &str| -> Result<()> {
            let want = whole.narrow(0, from, got.dim(0)?)?;
            let worst = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(worst < 1e-5, "{what}: max abs difference {worst}");
            Ok(())
        };
        close(&tail, (primed_frames - 1) * spf, "primed last frame")?;
        close(&rest, primed_frames * spf, "continuation")?;
        // One frame less of conv history is not enough: the check above can fail.
        let mut short = decoder.new_state()?;
        let head = codes.narrow(0, 0, primed_frames - history + 1)?.unsqueeze(0)?;
        decoder.front(&mut short, &head, &mut |_, _| {})?;
        decoder.step(&mut short, &codes.narrow(0, primed_frames - history + 1, history - 1)?)?;
        let rest = decoder.step(&mut short, &codes.narrow(0, primed_frames, more)?)?;
        let worst = (rest - whole.narrow(0, primed_frames * spf, more * spf)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(worst > 1e-5, "{} frames of history already exact", history - 1);
        Ok(())
    }

    /// However long the utterance, a state keeps the same conv carries and at most
    /// `sliding_window − 1` positions per attention layer: a step's cost does not grow.
    #[test]
    fn state_stays_bounded() -> Result<()> {
        let (cfg, decoder) = tiny_decoder()?;
        let mut state = decoder.new_state()?;
        let carry_dims = |s: &mut DecoderState| s.carries_mut().iter().map(|c| c.dims()).collect::<Vec<_>>();
        let fresh = carry_dims(&mut state);
        let frame = Tensor::arange(0u32, cfg.num_quantizers as u32, &Device::Cpu)?.reshape((1, ()))?;
        for frames in 1..=3 * cfg.sliding_window {
            decoder.step(&mut state, &frame)?;
            assert_eq!(carry_dims(&mut state), fresh);
            let expected = frames.min(cfg.sliding_window - 1);
            assert!(state.rows[0].layers.iter().all(|w| w.len() == expected));
            assert_eq!(state.frames(), frames);
        }
        Ok(())
    }
}
