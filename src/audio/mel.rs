//! Log-mel spectrogram of the speaker encoder (the package's `mel_spectrogram` with
//! `center=False`): reflect padding of `(n_fft - hop) / 2` samples on each side, STFT with a
//! periodic Hann window as long as the FFT, magnitude `sqrt(re² + im² + 1e-9)`, librosa's
//! slaney-scale, slaney-normalised mel filterbank, then `log(max(x, 1e-5))`.
//!
//! The package computes in float32; here the FFT and the sums run in f64 and only the result
//! is rounded, so the remaining difference is the reference's own rounding.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use realfft::{RealFftPlanner, RealToComplex};
use std::sync::Arc;

/// Added to the squared magnitude before the square root (as the package does).
const POWER_FLOOR: f64 = 1e-9;
/// `dynamic_range_compression_torch`'s clamp before the log.
const LOG_CLAMP: f64 = 1e-5;

/// The arguments of `mel_spectrogram` (the window is always `n_fft` long, as at its call site).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MelParams {
    pub sample_rate: usize,
    pub n_fft: usize,
    pub hop_size: usize,
    pub n_mels: usize,
    pub fmin: f64,
    pub fmax: f64,
}

/// One triangular filter: its non-zero weights, starting at FFT bin `first_bin`.
#[derive(Clone, Debug)]
struct MelFilter {
    first_bin: usize,
    weights: Vec<f64>,
}

/// A planned log-mel spectrogram: window, filterbank and FFT plan are built once.
#[derive(Clone)]
pub struct MelSpectrogram {
    params: MelParams,
    window: Vec<f64>,
    filters: Vec<MelFilter>,
    fft: Arc<dyn RealToComplex<f64>>,
}

impl std::fmt::Debug for MelSpectrogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MelSpectrogram")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl MelSpectrogram {
    pub fn new(params: MelParams) -> Result<Self> {
        let MelParams {
            sample_rate,
            n_fft,
            hop_size,
            n_mels,
            fmin,
            fmax,
        } = params;
        if n_fft == 0 || hop_size == 0 || hop_size > n_fft || n_mels == 0 || sample_rate == 0 {
            return Err(Error::Audio(format!("invalid mel spectrogram parameters {params:?}")));
        }
        if !(0.0 <= fmin && fmin < fmax && fmax <= sample_rate as f64 / 2.0) {
            return Err(Error::Audio(format!(
                "mel band {fmin}..{fmax} Hz does not fit a {sample_rate} Hz signal"
            )));
        }
        Ok(Self {
            params,
            window: periodic_hann(n_fft),
            filters: slaney_filterbank(&params),
            fft: RealFftPlanner::<f64>::new().plan_fft_forward(n_fft),
        })
    }

    pub fn params(&self) -> &MelParams {
        &self.params
    }

    /// Log-mel spectrogram of mono `samples` at `params.sample_rate`: `[frames, n_mels]` f32,
    /// `frames = (len + 2·pad − n_fft) / hop + 1` with `pad = (n_fft − hop) / 2`.
    pub fn forward(&self, samples: &[f32], device: &Device) -> Result<Tensor> {
        let MelParams {
            n_fft,
            hop_size,
            n_mels,
            ..
        } = self.params;
        let pad = (n_fft - hop_size) / 2;
        // torch's reflect padding needs more samples than it pads, and the STFT a whole window.
        if samples.len() <= pad || samples.len() + 2 * pad < n_fft {
            return Err(Error::Audio(format!(
                "{} samples are too few for a mel spectrogram (n_fft {n_fft}, hop {hop_size})",
                samples.len()
            )));
        }
        let padded = reflect_pad(samples, pad);
        let frames = (padded.len() - n_fft) / hop_size + 1;

        let mut frame = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut magnitude = vec![0f64; spectrum.len()];
        let mut mels = Vec::with_capacity(frames * n_mels);
        for start in (0..frames).map(|f| f * hop_size) {
            for ((x, &s), &w) in frame.iter_mut().zip(&padded[start..start + n_fft]).zip(&self.window) {
                *x = s * w;
            }
            self.fft
                .process_with_scratch(&mut frame, &mut spectrum, &mut scratch)
                .map_err(|e| Error::Audio(format!("FFT: {e}")))?;
            for (m, c) in magnitude.iter_mut().zip(&spectrum) {
                *m = (c.re * c.re + c.im * c.im + POWER_FLOOR).sqrt();
            }
            mels.extend(self.filters.iter().map(|filter| {
                let bins = &magnitude[filter.first_bin..filter.first_bin + filter.weights.len()];
                let energy: f64 = bins.iter().zip(&filter.weights).map(|(m, w)| m * w).sum();
                energy.max(LOG_CLAMP).ln() as f32
            }));
        }
        Ok(Tensor::from_vec(mels, (frames, n_mels), device)?)
    }
}

/// `torch.nn.functional.pad(mode="reflect")` of a signal: the edge sample is not repeated.
fn reflect_pad(samples: &[f32], pad: usize) -> Vec<f64> {
    let n = samples.len();
    let left = (1..=pad).rev().map(|i| samples[i]);
    let right = (1..=pad).map(|i| samples[n - 1 - i]);
    left.chain(samples.iter().copied())
        .chain(right)
        .map(f64::from)
        .collect()
}

/// `torch.hann_window(n)` (periodic): `0.5 − 0.5·cos(2πk/n)`.
fn periodic_hann(n: usize) -> Vec<f64> {
    (0..n)
        .map(|k| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * k as f64 / n as f64).cos())
        .collect()
}

// librosa's slaney mel scale: linear below 1 kHz, logarithmic above.
const SLANEY_HZ_PER_MEL: f64 = 200.0 / 3.0;
const SLANEY_LOG_START_HZ: f64 = 1000.0;

fn slaney_log_step() -> f64 {
    6.4f64.ln() / 27.0
}

/// `librosa.hz_to_mel(htk=False)`.
fn hz_to_mel(hz: f64) -> f64 {
    let log_start_mel = SLANEY_LOG_START_HZ / SLANEY_HZ_PER_MEL;
    if hz >= SLANEY_LOG_START_HZ {
        log_start_mel + (hz / SLANEY_LOG_START_HZ).ln() / slaney_log_step()
    } else {
        hz / SLANEY_HZ_PER_MEL
    }
}

/// `librosa.mel_to_hz(htk=False)`.
fn mel_to_hz(mel: f64) -> f64 {
    let log_start_mel = SLANEY_LOG_START_HZ / SLANEY_HZ_PER_MEL;
    if mel >= log_start_mel {
        SLANEY_LOG_START_HZ * (slaney_log_step() * (mel - log_start_mel)).exp()
    } else {
        SLANEY_HZ_PER_MEL * mel
    }
}

/// `librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax, htk=False, norm="slaney")`, with its
/// float32 rounding: the triangles are stored as f32, then scaled by the f64 slaney norm and
/// rounded to f32 again.
fn slaney_filterbank(p: &MelParams) -> Vec<MelFilter> {
    let n_bins = p.n_fft / 2 + 1;
    // np.fft.rfftfreq(n_fft, d=1/sr)
    let bin_hz_step = 1.0 / (p.n_fft as f64 * (1.0 / p.sample_rate as f64));
    let bin_hz: Vec<f64> = (0..n_bins).map(|k| k as f64 * bin_hz_step).collect();
    // mel_frequencies(n_mels + 2): np.linspace over the mel scale (last point exactly fmax's mel)
    let (min_mel, max_mel) = (hz_to_mel(p.fmin), hz_to_mel(p.fmax));
    let points = p.n_mels + 2;
    let mel_step = (max_mel - min_mel) / (points - 1) as f64;
    let edges_hz: Vec<f64> = (0..points)
        .map(|i| {
            mel_to_hz(if i + 1 == points {
                max_mel
            } else {
                i as f64 * mel_step + min_mel
            })
        })
        .collect();

    (0..p.n_mels)
        .map(|m| {
            let (lo, center, hi) = (edges_hz[m], edges_hz[m + 1], edges_hz[m + 2]);
            let norm = 2.0 / (hi - lo);
            let weights: Vec<f64> = bin_hz
                .iter()
                .map(|&f| {
                    let rising = -(lo - f) / (center - lo);
                    let falling = (hi - f) / (hi - center);
                    let triangle = rising.min(falling).max(0.0) as f32;
                    (triangle as f64 * norm) as f32 as f64
                })
                .collect();
            let first_bin = weights.iter().position(|&w| w != 0.0).unwrap_or(0);
            let end = weights
                .iter()
                .rposition(|&w| w != 0.0)
                .map_or(first_bin, |last| last + 1);
            MelFilter {
                first_bin,
                weights: weights[first_bin..end].to_vec(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn speaker_params() -> MelParams {
        MelParams {
            sample_rate: 24000,
            n_fft: 1024,
            hop_size: 256,
            n_mels: 128,
            fmin: 0.0,
            fmax: 12000.0,
        }
    }

    #[test]
    fn frame_count_follows_padding_and_hop() {
        let mel = MelSpectrogram::new(speaker_params()).unwrap();
        let out = mel.forward(&vec![0.1; 64551], &Device::Cpu).unwrap();
        assert_eq!(out.dims(), &[252, 128]);
    }

    #[test]
    fn too_short_input_is_an_error() {
        let mel = MelSpectrogram::new(speaker_params()).unwrap();
        assert!(mel.forward(&[0.0; 384], &Device::Cpu).is_err());
    }

    #[test]
    fn slaney_scale_round_trips() {
        for hz in [0.0, 440.0, 1000.0, 5000.0, 12000.0] {
            assert!((mel_to_hz(hz_to_mel(hz)) - hz).abs() < 1e-9 * hz.max(1.0));
        }
    }
}
