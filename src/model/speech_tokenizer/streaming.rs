//! The state a streaming layer of the speech decoder carries from one step to the next.
//!
//! The decoder is strictly causal, so it can be run incrementally with no lookahead and no
//! approximation: every causal conv keeps its left context, every transposed conv the overlap
//! tail its last inputs still owe to future outputs, every attention layer its sliding window
//! of keys and values. Each piece is bounded, so a step costs the same at frame 10 and frame
//! 10 000. A state is plain data (cheap `Clone`: tensors are reference counted), batched along
//! dim 0 so that several utterances can step through one set of weight operations.

use candle_core::{DType, Device, Result, Tensor, D};

/// Samples a conv layer carries over, [B, C, len]: a causal conv's last `len` inputs, or a
/// transposed conv's overlap tail. `None` when the layer carries nothing (kernel 1, or a
/// transposed conv whose kernel equals its stride).
#[derive(Clone, Debug)]
pub(crate) struct Carry(Option<Tensor>);

impl Carry {
    /// The carry of a fresh utterance: zeros, which is exactly the causal conv's zero padding
    /// and a transposed conv's absent earlier contributions.
    pub fn zeros(channels: usize, len: usize, dtype: DType, device: &Device) -> Result<Self> {
        if len == 0 {
            return Ok(Self(None));
        }
        Ok(Self(Some(Tensor::zeros((1, channels, len), dtype, device)?)))
    }

    /// Causal conv input: the carried context followed by `xs` [B, C, n]; the carry becomes the
    /// last samples of that sequence.
    pub fn prepend(&mut self, xs: &Tensor) -> Result<Tensor> {
        let Some(context) = &mut self.0 else {
            return Ok(xs.clone());
        };
        let keep = context.dim(D::Minus1)?;
        let padded = Tensor::cat(&[&*context, xs], D::Minus1)?;
        *context = padded
            .narrow(D::Minus1, padded.dim(D::Minus1)? - keep, keep)?
            .contiguous()?;
        Ok(padded)
    }

    /// Transposed conv output: adds the carried tail to the first samples of `ys` [B, C, T]
    /// (the full, untrimmed output of the new inputs, without bias), keeps the last samples as
    /// the new tail and returns the rest, which no later input touches.
    pub fn overlap_add(&mut self, ys: &Tensor) -> Result<Tensor> {
        let Some(tail) = &mut self.0 else {
            return Ok(ys.clone());
        };
        let overlap = tail.dim(D::Minus1)?;
        let total = ys.dim(D::Minus1)?;
        let head = (ys.narrow(D::Minus1, 0, overlap)? + &*tail)?;
        let ys = Tensor::cat(&[&head, &ys.narrow(D::Minus1, overlap, total - overlap)?], D::Minus1)?;
        *tail = ys.narrow(D::Minus1, total - overlap, overlap)?.contiguous()?;
        ys.narrow(D::Minus1, 0, total - overlap)
    }

    /// The carried samples, [B, C, len] (`None` when the layer carries nothing).
    pub fn get(&self) -> Option<&Tensor> {
        self.0.as_ref()
    }

    /// Replaces the carried samples (same shape).
    pub fn set(&mut self, carried: Tensor) {
        self.0 = Some(carried);
    }

    /// The carries of several states as one batch (rows in order).
    pub fn stack(carries: &[&Carry]) -> Result<Self> {
        let rows: Option<Vec<&Tensor>> = carries.iter().map(|c| c.0.as_ref()).collect();
        Ok(Self(match rows {
            Some(rows) => Some(Tensor::cat(&rows, 0)?),
            None => None,
        }))
    }

    #[cfg(test)]
    pub fn dims(&self) -> Option<Vec<usize>> {
        self.0.as_ref().map(|t| t.dims().to_vec())
    }

    /// Row `row` of a batched carry.
    pub fn row(&self, row: usize) -> Result<Self> {
        Ok(Self(match &self.0 {
            Some(t) => Some(t.narrow(0, row, 1)?),
            None => None,
        }))
    }
}

/// One attention layer's keys and values of the last positions of one utterance, after RoPE,
/// [1, kv_heads, len, head_dim], with `len` < the sliding window: a query sees itself and the
/// `window - 1` positions before it, so older ones can never be read again.
#[derive(Clone, Debug, Default)]
pub(crate) struct KvWindow(Option<(Tensor, Tensor)>);

impl KvWindow {
    /// Number of past positions held.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Keys and values of the past positions of every row followed by the new ones
    /// (`keys`, `values`: [B, kv_heads, n, head_dim]); every row must hold the same number of
    /// past positions (all empty or none). Each window then keeps its row's last `window - 1` positions.
    pub fn extend(
        windows: &mut [&mut KvWindow],
        keys: &Tensor,
        values: &Tensor,
        window: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (keys, values) = match windows.iter().map(|w| w.0.as_ref()).collect::<Option<Vec<_>>>() {
            Some(past) => {
                let past_k: Vec<&Tensor> = past.iter().map(|(k, _)| k).collect();
                let past_v: Vec<&Tensor> = past.iter().map(|(_, v)| v).collect();
                (
                    Tensor::cat(&[&Tensor::cat(&past_k, 0)?, keys], 2)?,
                    Tensor::cat(&[&Tensor::cat(&past_v, 0)?, values], 2)?,
                )
            }
            None => (keys.clone(), values.clone()),
        };
        let total = keys.dim(2)?;
        let keep = total.min(window.saturating_sub(1));
        for (row, w) in windows.iter_mut().enumerate() {
            w.0 = if keep == 0 {
                None
            } else {
                let recent = |t: &Tensor| t.narrow(0, row, 1)?.narrow(2, total - keep, keep)?.contiguous();
                Some((recent(&keys)?, recent(&values)?))
            };
        }
        Ok((keys, values))
    }
}
