//! Choosing a code from logits: the package's logits processors for codebook 0, then greedy or
//! seeded temperature / top-k / top-p sampling.

use candle_core::{Device, Result, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

/// How one head picks its code.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Plain argmax when true (the parity mode).
    pub greedy: bool,
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
}

impl SamplingParams {
    pub const GREEDY: Self = Self {
        greedy: true,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    };

    pub fn validate(&self, what: &str) -> std::result::Result<(), String> {
        if !self.greedy {
            if !(self.temperature.is_finite() && self.temperature > 0.0) {
                return Err(format!("{what} temperature must be > 0, got {}", self.temperature));
            }
            if !(self.top_p > 0.0 && self.top_p <= 1.0) {
                return Err(format!("{what} top_p must be in (0, 1], got {}", self.top_p));
            }
        }
        Ok(())
    }
}

/// A seeded sampler owned by one sequence, so its codes do not depend on what it is batched with.
pub struct Sampler {
    params: SamplingParams,
    processor: Option<LogitsProcessor>,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        let processor = (!params.greedy).then(|| {
            let t = params.temperature as f64;
            let p = params.top_p as f64;
            let sampling = match (params.top_k, params.top_p < 1.0) {
                (0, false) => Sampling::All { temperature: t },
                (0, true) => Sampling::TopP { p, temperature: t },
                (k, false) => Sampling::TopK { k, temperature: t },
                (k, true) => Sampling::TopKThenTopP { k, p, temperature: t },
            };
            LogitsProcessor::from_sampling(seed, sampling)
        });
        Self { params, processor }
    }

    pub fn params(&self) -> SamplingParams {
        self.params
    }

    /// Picks a code from processed logits.
    pub fn pick(&mut self, logits: &[f32]) -> Result<u32> {
        match &mut self.processor {
            None => Ok(argmax(logits)),
            Some(p) => p.sample(&Tensor::new(logits, &Device::Cpu)?),
        }
    }
}

/// Index of the first maximum (torch's argmax).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Top-1 minus top-2: how far a greedy choice is from a tie.
pub fn margin(x: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in x {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}

/// The package's processors on codebook-0 logits, in place: repetition penalty over the code0s
/// generated so far (each id once), suppression of the reserved ids `[vocab−1024, vocab)` except
/// EOS, and EOS blocked until `min_new_tokens` (2) codes exist.
pub fn process_code0(logits: &mut [f32], history: &[u32], penalty: f32, eos: u32) {
    const MIN_NEW_TOKENS: usize = 2;
    if penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &id in history {
            let i = id as usize;
            if i < logits.len() && !seen[i] {
                seen[i] = true;
                let x = logits[i];
                logits[i] = if x < 0.0 { x * penalty } else { x / penalty };
            }
        }
    }
    let vocab = logits.len();
    for (i, x) in logits.iter_mut().enumerate().skip(vocab.saturating_sub(1024)) {
        if i != eos as usize {
            *x = f32::NEG_INFINITY;
        }
    }
    if history.len() < MIN_NEW_TOKENS {
        if let Some(x) = logits.get_mut(eos as usize) {
            *x = f32::NEG_INFINITY;
        }
    }
}
