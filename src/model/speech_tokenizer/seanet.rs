//! The speech tokenizer encoder's SEANet conv stack (transformers' `MimiEncoder`, the layout and
//! padding of candle-transformers' `mimi::seanet::SeaNetEncoder`) on koe's CPU conv kernels.
//!
//! Ported rather than reused because candle's CPU `conv1d` builds an im2col buffer per conv (at
//! 24 kHz with 64 channels and a 7-tap kernel ~100 MB for a few seconds of audio, paid in copies
//! and page faults): with it the SEANet took ~70 % of a voice prompt's encode here. The kernels
//! run causal convs as per-tap gemms over the padded input, and a strided conv as a stride-1 conv
//! over its polyphase components. A voice clip is encoded once (the prompt is cached), so the
//! stack runs on the CPU whatever the model's device.

use super::encoder::{EncoderConfig, PadMode};
use super::host_f32;
use super::kernels::ConvWeights;
use candle_core::{Device, Result, Tensor};
use candle_nn::VarBuilder;

/// `MimiConv1d` with `use_causal_conv`: left padding of `kernel − stride` (dilated kernel), right
/// padding up to a whole number of strides, then the conv. Stored as a stride-1 conv over
/// `c_in · stride` polyphase channels (the kernel cut into `kernel / stride` taps).
#[derive(Debug, Clone)]
struct CausalConv {
    weights: ConvWeights,
    c_in: usize,
    stride: usize,
    /// Dilated kernel length.
    span: usize,
    pad_mode: PadMode,
}

impl CausalConv {
    fn load(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        dilation: usize,
        pad_mode: PadMode,
    ) -> Result<Self> {
        let vb = vb.pp("conv");
        let weight = host_f32(&vb.get((c_out, c_in, kernel), "weight")?)?;
        let bias = host_f32(&vb.get(c_out, "bias")?)?;
        let weights = if stride == 1 {
            ConvWeights::new(&weight, bias, c_out, c_in, kernel, dilation)
        } else {
            if dilation != 1 || !kernel.is_multiple_of(stride) {
                candle_core::bail!("SEANet: a strided conv needs dilation 1 and a kernel ({kernel}) that is a multiple of its stride ({stride})");
            }
            // w'[o, c·s + r, p] = w[o, c, p·s + r]
            let taps = kernel / stride;
            let mut poly = vec![0f32; weight.len()];
            for o in 0..c_out {
                for c in 0..c_in {
                    for k in 0..kernel {
                        let (p, r) = (k / stride, k % stride);
                        poly[((o * c_in + c) * stride + r) * taps + p] = weight[(o * c_in + c) * kernel + k];
                    }
                }
            }
            ConvWeights::new(&poly, bias, c_out, c_in * stride, taps, 1)
        };
        Ok(Self {
            weights,
            c_in,
            stride,
            span: (kernel - 1) * dilation + 1,
            pad_mode,
        })
    }

    /// `x` [c_in, t] → ([c_out, t'], t'), plus `residual` [c_out, t'] when given.
    fn forward(&self, x: &[f32], t: usize, residual: Option<&[f32]>) -> (Vec<f32>, usize) {
        let (stride, span) = (self.stride, self.span);
        let left = span - stride;
        // As `get_extra_padding_for_conv1d`: pad the right so the last window is whole.
        let windows = (t + left).saturating_sub(span).div_ceil(stride) + 1;
        let right = ((windows - 1) * stride + span).saturating_sub(left + t);
        let len = left + t + right;
        let mut padded = vec![0f32; self.c_in * len];
        for (src, dst) in x.chunks_exact(t).zip(padded.chunks_exact_mut(len)) {
            dst[left..left + t].copy_from_slice(src);
            if self.pad_mode == PadMode::Replicate {
                dst[..left].fill(src[0]);
                dst[left + t..].fill(src[t - 1]);
            }
        }
        let input = match stride {
            1 => padded,
            s => {
                // len is a whole number of strides: row (c, r) holds samples r, r + s, … of c.
                let n = len / s;
                let mut poly = vec![0f32; self.c_in * len];
                for (c, channel) in padded.chunks_exact(len).enumerate() {
                    for (u, samples) in channel.chunks_exact(s).enumerate() {
                        for (r, &v) in samples.iter().enumerate() {
                            poly[(c * s + r) * n + u] = v;
                        }
                    }
                }
                poly
            }
        };
        let width = input.len() / self.weights.c_in;
        let t_out = width - self.weights.context();
        let mut out = vec![0f32; self.weights.c_out * t_out];
        self.weights.forward(&input, t_out, residual, &mut out);
        (out, t_out)
    }
}

/// ELU (α = 1) as candle computes it: `x` when positive, else `exp(x) − 1`.
fn elu(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| if v.is_sign_positive() { v } else { v.exp() - 1.0 })
        .collect()
}

/// `MimiResnetBlock`: ELU, dilated conv to `dim / compress`, ELU, 1×1 conv back, plus the input
/// (or a 1×1 shortcut conv of it).
#[derive(Debug, Clone)]
struct ResnetBlock {
    convs: [CausalConv; 2],
    shortcut: Option<CausalConv>,
}

impl ResnetBlock {
    fn forward(&self, x: &[f32], t: usize) -> Vec<f32> {
        let (h, t) = self.convs[0].forward(&elu(x), t, None);
        match &self.shortcut {
            None => self.convs[1].forward(&elu(&h), t, Some(x)).0,
            Some(shortcut) => {
                let skip = shortcut.forward(x, t, None).0;
                self.convs[1].forward(&elu(&h), t, Some(&skip)).0
            }
        }
    }
}

/// The SEANet encoder: 24 kHz samples → [hidden_size, frames at the encodec frame rate].
#[derive(Debug, Clone)]
pub struct SeaNetEncoder {
    init: CausalConv,
    /// Per downsampling ratio: residual blocks, then the ELU and strided conv.
    layers: Vec<(Vec<ResnetBlock>, CausalConv)>,
    last: CausalConv,
}

impl SeaNetEncoder {
    /// `vb`: `encoder.encoder` (weights `layers.{i}.conv.*`, as transformers numbers them).
    pub fn load(vb: VarBuilder, cfg: &EncoderConfig) -> Result<Self> {
        let vb = vb.pp("layers");
        let pad = cfg.pad_mode;
        let mut index = 0;
        let mut next = || {
            index += 1;
            vb.pp(index - 1)
        };
        let mut dim = cfg.num_filters;
        let init = CausalConv::load(next(), cfg.audio_channels, dim, cfg.kernel_size, 1, 1, pad)?;
        let mut layers = Vec::new();
        for ratio in cfg.upsampling_ratios().into_iter().rev() {
            let hidden = dim / cfg.compress;
            let blocks = (0..cfg.num_residual_layers)
                .map(|j| {
                    let vb = next();
                    let dilation = cfg.dilation_growth_rate.pow(j as u32);
                    let block = vb.pp("block");
                    let k = cfg.residual_kernel_size;
                    Ok(ResnetBlock {
                        convs: [
                            CausalConv::load(block.pp(1), dim, hidden, k, 1, dilation, pad)?,
                            CausalConv::load(block.pp(3), hidden, dim, 1, 1, 1, pad)?,
                        ],
                        shortcut: match cfg.use_conv_shortcut {
                            true => Some(CausalConv::load(vb.pp("shortcut"), dim, dim, 1, 1, 1, pad)?),
                            false => None,
                        },
                    })
                })
                .collect::<Result<_>>()?;
            // The ELU before the downsample is module `index`, the conv `index + 1`.
            next();
            let downsample = CausalConv::load(next(), dim, 2 * dim, 2 * ratio, ratio, 1, pad)?;
            layers.push((blocks, downsample));
            dim *= 2;
        }
        next();
        let last = CausalConv::load(next(), dim, cfg.hidden_size, cfg.last_kernel_size, 1, 1, pad)?;
        Ok(Self { init, layers, last })
    }

    /// Mono samples → [1, hidden_size, frames] on `device`.
    pub fn forward(&self, samples: &[f32], device: &Device) -> Result<Tensor> {
        crate::model::on_worker(|| {
            let (mut x, mut t) = self.init.forward(samples, samples.len(), None);
            for (blocks, downsample) in &self.layers {
                for block in blocks {
                    x = block.forward(&x, t);
                }
                (x, t) = downsample.forward(&elu(&x), t, None);
            }
            let (x, t) = self.last.forward(&elu(&x), t, None);
            let channels = x.len() / t.max(1);
            Tensor::from_vec(x, (1, channels, t), &Device::Cpu)?.to_device(device)
        })
    }
}
