//! The ECAPA-TDNN speaker encoder (`Qwen3TTSSpeakerEncoder`): log-mels of a 24 kHz reference
//! clip in, one x-vector out (`extract_speaker_embedding`), which the talker takes as one input
//! position.
//!
//! Every conv of the package is `padding="same", padding_mode="reflect"`, so each pads its input
//! by reflection (`dilation·(kernel−1)` in all, the smaller half on the left) and then convolves
//! without padding.

use crate::audio::mel::{MelParams, MelSpectrogram};
use crate::error::Result;
use candle_core::{bail, DType, Device, Module, Tensor, D};
use candle_nn::{Conv1d, Conv1dConfig, VarBuilder};
use serde::Deserialize;

/// `Qwen3TTSSpeakerEncoderConfig`; absent fields take the class's code defaults (the release's
/// config.json writes only `enc_dim` and `sample_rate`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct SpeakerEncoderConfig {
    pub mel_dim: usize,
    pub enc_dim: usize,
    pub enc_channels: Vec<usize>,
    pub enc_kernel_sizes: Vec<usize>,
    pub enc_dilations: Vec<usize>,
    pub enc_attention_channels: usize,
    pub enc_res2net_scale: usize,
    pub enc_se_channels: usize,
    pub sample_rate: usize,
}

impl Default for SpeakerEncoderConfig {
    fn default() -> Self {
        Self {
            mel_dim: 128,
            // The code default; the class docstring says 192.
            enc_dim: 1024,
            enc_channels: vec![512, 512, 512, 512, 1536],
            enc_kernel_sizes: vec![5, 3, 3, 3, 1],
            enc_dilations: vec![1, 2, 3, 4, 1],
            enc_attention_channels: 128,
            enc_res2net_scale: 8,
            enc_se_channels: 128,
            sample_rate: 24000,
        }
    }
}

impl SpeakerEncoderConfig {
    /// The mel front end of `extract_speaker_embedding`. The package fixes n_fft 1024, hop and
    /// window 256/1024, 128 mels and 0–12 kHz at the call site and asserts a 24 kHz input; the
    /// mel count and rate are taken from here, which equal those wherever the package runs.
    pub fn mel_params(&self) -> MelParams {
        MelParams {
            sample_rate: self.sample_rate,
            n_fft: 1024,
            hop_size: 256,
            n_mels: self.mel_dim,
            fmin: 0.0,
            fmax: 12000.0,
        }
    }
}

/// Pads the last dim of `x` by reflection (no edge repeat), as `F.pad(mode="reflect")`.
fn reflect_pad_last(x: &Tensor, left: usize, right: usize) -> candle_core::Result<Tensor> {
    if left == 0 && right == 0 {
        return Ok(x.clone());
    }
    let len = x.dim(D::Minus1)?;
    if left >= len || right >= len {
        bail!("speaker encoder: {len} frames are too few for reflect padding of {left}+{right}");
    }
    let index: Vec<u32> = (0..left + len + right)
        .map(|p| {
            let src = p as i64 - left as i64;
            let reflected = if src < 0 {
                -src
            } else if src >= len as i64 {
                2 * (len as i64 - 1) - src
            } else {
                src
            };
            reflected as u32
        })
        .collect();
    let index = Tensor::new(index, x.device())?;
    x.index_select(&index, D::Minus1)
}

/// `nn.Conv1d(padding="same", padding_mode="reflect")`.
#[derive(Clone, Debug)]
struct ReflectSameConv {
    conv: Conv1d,
    pad_left: usize,
    pad_right: usize,
}

impl ReflectSameConv {
    fn load(in_ch: usize, out_ch: usize, kernel: usize, dilation: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let cfg = Conv1dConfig {
            dilation,
            ..Default::default()
        };
        let conv = candle_nn::conv1d(in_ch, out_ch, kernel, cfg, vb)?;
        let total = dilation * (kernel - 1);
        Ok(Self {
            conv,
            pad_left: total / 2,
            pad_right: total - total / 2,
        })
    }
}

impl Module for ReflectSameConv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        reflect_pad_last(x, self.pad_left, self.pad_right)?.apply(&self.conv)
    }
}

/// `TimeDelayNetBlock`: reflect-"same" conv then ReLU.
#[derive(Clone, Debug)]
struct TdnnBlock {
    conv: ReflectSameConv,
}

impl TdnnBlock {
    fn load(in_ch: usize, out_ch: usize, kernel: usize, dilation: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            conv: ReflectSameConv::load(in_ch, out_ch, kernel, dilation, vb.pp("conv"))?,
        })
    }
}

impl Module for TdnnBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.apply(&self.conv)?.relu()
    }
}

/// `Res2NetBlock`: the channels split into `scale` groups; group 0 passes through, group i ≥ 1
/// goes through its own TDNN after adding the previous group's output (from group 2 on).
#[derive(Clone, Debug)]
struct Res2NetBlock {
    blocks: Vec<TdnnBlock>,
    scale: usize,
}

impl Res2NetBlock {
    fn load(
        channels: usize,
        scale: usize,
        kernel: usize,
        dilation: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let group = channels / scale;
        let vb = vb.pp("blocks");
        let blocks = (0..scale - 1)
            .map(|i| TdnnBlock::load(group, group, kernel, dilation, vb.pp(i)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { blocks, scale })
    }
}

impl Module for Res2NetBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let groups = x.chunk(self.scale, 1)?;
        let mut outputs = Vec::with_capacity(self.scale);
        outputs.push(groups[0].clone());
        for (i, (block, group)) in self.blocks.iter().zip(&groups[1..]).enumerate() {
            let input = match (i, outputs.last()) {
                (1.., Some(previous)) => (group + previous)?,
                _ => group.clone(),
            };
            outputs.push(input.apply(block)?);
        }
        Tensor::cat(&outputs, 1)
    }
}

/// `SqueezeExcitationBlock`: channel gates from the time-averaged input.
#[derive(Clone, Debug)]
struct SqueezeExcitation {
    conv1: ReflectSameConv,
    conv2: ReflectSameConv,
}

impl SqueezeExcitation {
    fn load(channels: usize, se_channels: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            conv1: ReflectSameConv::load(channels, se_channels, 1, 1, vb.pp("conv1"))?,
            conv2: ReflectSameConv::load(se_channels, channels, 1, 1, vb.pp("conv2"))?,
        })
    }
}

impl Module for SqueezeExcitation {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gates = x.mean_keepdim(2)?.apply(&self.conv1)?.relu()?.apply(&self.conv2)?;
        x.broadcast_mul(&candle_nn::ops::sigmoid(&gates)?)
    }
}

/// `SqueezeExcitationRes2NetBlock`: TDNN(k1) → Res2Net → TDNN(k1) → SE, plus the input.
#[derive(Clone, Debug)]
struct SeRes2NetBlock {
    tdnn1: TdnnBlock,
    res2net: Res2NetBlock,
    tdnn2: TdnnBlock,
    se: SqueezeExcitation,
}

impl SeRes2NetBlock {
    fn load(
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        dilation: usize,
        cfg: &SpeakerEncoderConfig,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            tdnn1: TdnnBlock::load(in_ch, out_ch, 1, 1, vb.pp("tdnn1"))?,
            res2net: Res2NetBlock::load(out_ch, cfg.enc_res2net_scale, kernel, dilation, vb.pp("res2net_block"))?,
            tdnn2: TdnnBlock::load(out_ch, out_ch, 1, 1, vb.pp("tdnn2"))?,
            se: SqueezeExcitation::load(out_ch, cfg.enc_se_channels, vb.pp("se_block"))?,
        })
    }
}

impl Module for SeRes2NetBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x
            .apply(&self.tdnn1)?
            .apply(&self.res2net)?
            .apply(&self.tdnn2)?
            .apply(&self.se)?;
        y + x
    }
}

/// `AttentiveStatisticsPooling`: per-channel attention over time, conditioned on the global
/// mean and std, then the attention-weighted mean and std.
#[derive(Clone, Debug)]
struct AttentiveStatisticsPooling {
    tdnn: TdnnBlock,
    conv: ReflectSameConv,
}

/// `AttentiveStatisticsPooling.eps`: floor of the variance.
const ASP_VARIANCE_FLOOR: f64 = 1e-12;

impl AttentiveStatisticsPooling {
    fn load(channels: usize, attention_channels: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            tdnn: TdnnBlock::load(3 * channels, attention_channels, 1, 1, vb.pp("tdnn"))?,
            conv: ReflectSameConv::load(attention_channels, channels, 1, 1, vb.pp("conv"))?,
        })
    }

    /// `_compute_statistics`: mean and std over time of `x` [B, C, T] under weights
    /// broadcastable to it, each [B, C, 1].
    fn statistics(x: &Tensor, weights: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mean = x.broadcast_mul(weights)?.sum_keepdim(2)?;
        let variance = x.broadcast_sub(&mean)?.sqr()?.broadcast_mul(weights)?.sum_keepdim(2)?;
        Ok((mean, variance.maximum(ASP_VARIANCE_FLOOR)?.sqrt()?))
    }
}

impl Module for AttentiveStatisticsPooling {
    /// [B, C, T] → [B, 2C, 1]. The package's length mask is all ones for a single clip, so
    /// the global statistics weigh every frame by 1/T and the masked fill does nothing.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, _, frames) = x.dims3()?;
        let uniform = Tensor::full(1f32 / frames as f32, (batch, 1, frames), x.device())?.to_dtype(x.dtype())?;
        let (mean, std) = Self::statistics(x, &uniform)?;
        let context = Tensor::cat(&[x, &mean.broadcast_as(x.shape())?, &std.broadcast_as(x.shape())?], 1)?;
        let scores = context.apply(&self.tdnn)?.tanh()?.apply(&self.conv)?;
        let attention = candle_nn::ops::softmax_last_dim(&scores)?;
        let (mean, std) = Self::statistics(x, &attention)?;
        Tensor::cat(&[mean, std], 1)
    }
}

/// Every stage of one encoder pass; batch first.
#[derive(Clone, Debug)]
pub struct SpeakerStages {
    /// `blocks[i]` outputs [B, C_i, T]: the first TDNN, then the SE-Res2Net blocks.
    pub blocks: Vec<Tensor>,
    /// Multi-layer feature aggregation [B, C_last, T].
    pub mfa: Tensor,
    /// Attentive statistics pooling, cat(mean, std) [B, 2·C_last].
    pub asp: Tensor,
    /// The x-vectors [B, enc_dim].
    pub embedding: Tensor,
}

/// `Qwen3TTSSpeakerEncoder` with its mel front end.
#[derive(Clone, Debug)]
pub struct SpeakerEncoder {
    first: TdnnBlock,
    res2net_blocks: Vec<SeRes2NetBlock>,
    mfa: TdnnBlock,
    asp: AttentiveStatisticsPooling,
    fc: ReflectSameConv,
    mel: MelSpectrogram,
    dtype: DType,
    device: Device,
}

impl SpeakerEncoder {
    /// `vb` is the whole model's VarBuilder (weights under `speaker_encoder.`).
    pub fn load(vb: VarBuilder, cfg: &SpeakerEncoderConfig) -> candle_core::Result<Self> {
        let layers = cfg.enc_channels.len();
        if layers != cfg.enc_kernel_sizes.len() || layers != cfg.enc_dilations.len() {
            bail!("speaker_encoder_config: enc_channels, enc_kernel_sizes and enc_dilations should have same length");
        }
        if layers < 3 {
            bail!("speaker_encoder_config: enc_channels needs at least 3 entries (TDNN, SE-Res2Net blocks, MFA), has {layers}");
        }
        let scale = cfg.enc_res2net_scale;
        if scale == 0 || cfg.enc_channels[1..layers - 1].iter().any(|c| c % scale != 0) {
            bail!(
                "speaker_encoder_config: enc_res2net_scale {scale} must divide the SE-Res2Net channels {:?}",
                &cfg.enc_channels[1..layers - 1]
            );
        }
        let mel = MelSpectrogram::new(cfg.mel_params()).map_err(candle_core::Error::msg)?;

        let vb = vb.pp("speaker_encoder");
        let blocks_vb = vb.pp("blocks");
        let (ch, ks, dil) = (&cfg.enc_channels, &cfg.enc_kernel_sizes, &cfg.enc_dilations);
        let first = TdnnBlock::load(cfg.mel_dim, ch[0], ks[0], dil[0], blocks_vb.pp(0))?;
        let res2net_blocks = (1..layers - 1)
            .map(|i| SeRes2NetBlock::load(ch[i - 1], ch[i], ks[i], dil[i], cfg, blocks_vb.pp(i)))
            .collect::<candle_core::Result<_>>()?;
        let last = ch[layers - 1];
        Ok(Self {
            first,
            res2net_blocks,
            mfa: TdnnBlock::load(last, last, ks[layers - 1], dil[layers - 1], vb.pp("mfa"))?,
            asp: AttentiveStatisticsPooling::load(last, cfg.enc_attention_channels, vb.pp("asp"))?,
            fc: ReflectSameConv::load(2 * last, cfg.enc_dim, 1, 1, vb.pp("fc"))?,
            mel,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The mel front end this encoder expects.
    pub fn mel(&self) -> &MelSpectrogram {
        &self.mel
    }

    /// All stages for log-mels [B, T, mel_dim].
    pub fn forward_stages(&self, mels: &Tensor) -> Result<SpeakerStages> {
        let x = mels.to_dtype(self.dtype)?.transpose(1, 2)?.contiguous()?;
        let mut blocks = vec![x.apply(&self.first)?];
        for block in &self.res2net_blocks {
            let next = blocks[blocks.len() - 1].apply(block)?;
            blocks.push(next);
        }
        let mfa = Tensor::cat(&blocks[1..], 1)?.apply(&self.mfa)?;
        let pooled = mfa.apply(&self.asp)?;
        let embedding = pooled.apply(&self.fc)?.squeeze(2)?;
        Ok(SpeakerStages {
            blocks,
            mfa,
            asp: pooled.squeeze(2)?,
            embedding,
        })
    }

    /// The x-vectors [B, enc_dim] for log-mels [B, T, mel_dim].
    pub fn forward(&self, mels: &Tensor) -> Result<Tensor> {
        Ok(self.forward_stages(mels)?.embedding)
    }
}

/// `extract_speaker_embedding`: the x-vector [enc_dim] of a mono clip already at the
/// encoder's sample rate (24 kHz).
pub fn speaker_embedding(encoder: &SpeakerEncoder, samples: &[f32]) -> Result<Tensor> {
    let mels = encoder.mel.forward(samples, &encoder.device)?.unsqueeze(0)?;
    Ok(encoder.forward(&mels)?.squeeze(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_config_takes_code_defaults() {
        let cfg: SpeakerEncoderConfig = serde_json::from_str(r#"{"enc_dim": 1024, "sample_rate": 24000}"#).unwrap();
        assert_eq!(cfg, SpeakerEncoderConfig::default());
        assert_eq!(cfg.enc_channels, [512, 512, 512, 512, 1536]);
        assert_eq!(
            (cfg.enc_attention_channels, cfg.enc_se_channels, cfg.enc_res2net_scale),
            (128, 128, 8)
        );
    }

    #[test]
    fn reflect_padding_mirrors_without_the_edge() {
        let x = Tensor::new(&[[[0f32, 1., 2., 3., 4.]]], &Device::Cpu).unwrap();
        let padded = reflect_pad_last(&x, 2, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(padded, [2., 1., 0., 1., 2., 3., 4., 3., 2., 1.]);
    }
}
