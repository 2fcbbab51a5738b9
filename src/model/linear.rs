//! Weight projections: dense (the parity mode) or quantized at load (`--dtype q8_0|q4_k`).

use super::gemv;
use super::q4k::{self, Q4kWeight};
use super::q8::{self, Q8Weight};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Storage, Tensor};
use candle_nn::VarBuilder;

/// How the talker's and code predictor's linear weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Compute dtype of the device (f32 on CPU): the parity mode.
    #[default]
    Dense,
    /// The parity mode on CPU for a bf16 checkpoint: weights stay in their stored bf16 and the
    /// few-row kernel widens them exactly in registers (same products as f32, half the bytes).
    StoredBf16,
    /// Quantized on load to a GGML block format; activations and KV stay f32.
    Quantized(GgmlDType),
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "dense" => Ok(Self::Dense),
            "q8_0" => Ok(Self::Quantized(GgmlDType::Q8_0)),
            "q4_k" => Ok(Self::Quantized(GgmlDType::Q4K)),
            other => Err(format!("unknown dtype {other:?}: expected f32, q8_0 or q4_k")),
        }
    }
}

impl WeightFormat {
    /// Whether CPU projections in this format run on candle's quantized matmuls (its own
    /// thread pool) rather than on koe's rayon kernels.
    pub fn uses_candle_pool(self) -> bool {
        match self {
            Self::Quantized(GgmlDType::Q8_0) => !q8::preferred(),
            Self::Quantized(GgmlDType::Q4K) => !q4k::available(),
            Self::Quantized(_) => true,
            Self::Dense | Self::StoredBf16 => false,
        }
    }
}

/// `y = x Wᵀ (+ b)` over rows `x: [N, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Projection,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum Projection {
    Dense(Tensor),
    /// [out, in] bf16 on CPU.
    Bf16(Tensor),
    Quantized(QMatMul),
    /// Q8_0 through koe's kernels (AVX2, or AVX-512 VNNI tiles; `q8::preferred`).
    Q8(Q8Weight),
    /// Q4_K through koe's tiles (AVX-512 VNNI or AVX2; `q4k::available`).
    Q4k(Q4kWeight),
}

impl Linear {
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool, format: WeightFormat) -> Result<Self> {
        Self::load_stacked(&[(vb, out_dim)], in_dim, bias, format)
    }

    /// One projection whose output is the outputs of `parts` (each a module holding `weight`
    /// [out, in] and maybe `bias`) side by side, e.g. q, k and v of one input. One matmul
    /// instead of several: each weight row gives the same output as in its own projection, and
    /// the input is read (and for quantized weights quantized) once.
    pub fn load_stacked(
        parts: &[(VarBuilder, usize)],
        in_dim: usize,
        bias: bool,
        format: WeightFormat,
    ) -> Result<Self> {
        let stack = |name: &str, dtype: Option<DType>, with_in: bool| -> Result<Tensor> {
            let tensors = parts
                .iter()
                .map(|(vb, out)| match (with_in, dtype) {
                    (true, Some(dt)) => vb.get_with_hints_dtype((*out, in_dim), name, Default::default(), dt),
                    (true, None) => vb.get((*out, in_dim), name),
                    (false, _) => vb.get(*out, name),
                })
                .collect::<Result<Vec<_>>>()?;
            match tensors.len() {
                1 => tensors[0].contiguous(),
                _ => Tensor::cat(&tensors, 0),
            }
        };
        let bias = if bias { Some(stack("bias", None, false)?) } else { None };
        if format == WeightFormat::StoredBf16 {
            return Ok(Self {
                weight: Projection::Bf16(stack("weight", Some(DType::BF16), true)?),
                bias,
            });
        }
        let w = stack("weight", None, true)?;
        let weight = match format {
            WeightFormat::Quantized(GgmlDType::Q8_0) if w.device().is_cpu() && q8::preferred() => {
                let host = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                match Q8Weight::quantize(&host, w.dim(0)?, in_dim) {
                    Some(q) => Projection::Q8(q),
                    None => Projection::Dense(w),
                }
            }
            // Layers the tiles cannot take stay dense, as they do in candle's format.
            WeightFormat::Quantized(GgmlDType::Q4K) if w.device().is_cpu() && q4k::available() => {
                match Q4kWeight::quantize(&w.to_dtype(DType::F32)?)? {
                    Some(q) => Projection::Q4k(q),
                    None => Projection::Dense(w),
                }
            }
            // A row narrower than the format's block cannot be quantized: keep it dense.
            WeightFormat::Quantized(q) if in_dim.is_multiple_of(q.block_size()) => {
                Projection::Quantized(QMatMul::from_qtensor(QTensor::quantize(&w, q)?)?)
            }
            // Contiguous [out, in]: the few-row kernel reads the rows in place.
            _ => Projection::Dense(w),
        };
        Ok(Self { weight, bias })
    }

    pub fn is_quantized(&self) -> bool {
        matches!(
            self.weight,
            Projection::Quantized(_) | Projection::Q8(_) | Projection::Q4k(_)
        )
    }
}

/// `x Wᵀ` on CPU for f32 activations and a contiguous weight ([n, k], f32 or bf16): the row
/// kernel for a few rows, and for many rows of a bf16 weight gemm over widened tiles; `None`
/// when it does not apply.
fn cpu_rows(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let Storage::Cpu(xs) = &*xs else {
        return Ok(None);
    };
    let xv = &xs.as_slice::<f32>()?[xl.start_offset()..xl.start_offset() + m * k];
    let n = w.dim(0)?;
    host_rows(xv, m, k, w)?
        .map(|y| Tensor::from_vec(y, (m, n), &Device::Cpu))
        .transpose()
}

/// `x Wᵀ` for host rows `x` ([m, k]) and a contiguous CPU weight (f32 or bf16), as [`cpu_rows`].
fn host_rows(x: &[f32], m: usize, k: usize, w: &Tensor) -> Result<Option<Vec<f32>>> {
    let n = w.dim(0)?;
    let (ws, wl) = w.storage_and_layout();
    let Storage::Cpu(ws) = &*ws else {
        return Ok(None);
    };
    let (start, end) = (wl.start_offset(), wl.start_offset() + n * k);
    let few = m <= gemv::PROJECTION_ROWS;
    Ok(Some(match w.dtype() {
        DType::F32 if few => gemv::matmul_wt(x, m, k, &ws.as_slice::<f32>()?[start..end], n),
        DType::BF16 if few => gemv::matmul_wt(x, m, k, &ws.as_slice::<half::bf16>()?[start..end], n),
        DType::BF16 => gemv::matmul_wt_widened(x, m, k, &ws.as_slice::<half::bf16>()?[start..end], n),
        _ => return Ok(None),
    }))
}

impl Linear {
    /// `x Wᵀ (+ b)` for `m` f32 rows held on the host ([m, in], row-major), on CPU: what the
    /// decoder's host step path calls, without a tensor around its buffers.
    pub fn forward_host(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let k = x.len() / m.max(1);
        let through_tensor = |x: &[f32]| -> Result<Vec<f32>> {
            let y = self.forward(&Tensor::from_slice(x, (m, k), &Device::Cpu)?)?;
            y.flatten_all()?.to_vec1::<f32>()
        };
        let mut y = match &self.weight {
            Projection::Q8(q) => q.matmul_wt(x, m),
            Projection::Q4k(q) => q.matmul_wt(x, m),
            Projection::Dense(w) | Projection::Bf16(w) => match host_rows(x, m, k, w)? {
                Some(y) => y,
                None => return through_tensor(x),
            },
            Projection::Quantized(_) => return through_tensor(x),
        };
        if let Some(b) = &self.bias {
            let b = b.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            for row in y.chunks_exact_mut(b.len()) {
                for (y, b) in row.iter_mut().zip(&b) {
                    *y += b;
                }
            }
        }
        Ok(y)
    }
}

/// `x Wᵀ` ([m, n]) of a kernel over host rows, for tensor input.
fn host_product(x: &Tensor, n: usize, product: impl Fn(&[f32], usize) -> Vec<f32>) -> Result<Tensor> {
    let m = x.dim(0)?;
    let x = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Tensor::from_vec(product(&x, m), (m, n), &Device::Cpu)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            // Up to a long prefill: the row kernel; more rows: gemm.
            Projection::Dense(w) => match x.dim(0)? <= gemv::PROJECTION_ROWS {
                true => cpu_rows(x, w)?,
                false => None,
            }
            .map_or_else(|| x.matmul(&w.t()?), Ok)?,
            Projection::Bf16(w) => cpu_rows(x, w)?.expect("bf16 weights are kept only on CPU"),
            Projection::Quantized(q) => q.forward(x)?,
            Projection::Q8(q) => host_product(x, q.out_dim(), |x, m| q.matmul_wt(x, m))?,
            Projection::Q4k(q) => host_product(x, q.out_dim(), |x, m| q.matmul_wt(x, m))?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A q4_k weight the tiles can take (whole 16-row tiles, 256-wide super-blocks) runs on them
    /// where the CPU has AVX-512 VNNI or AVX2 (elsewhere on candle's `QMatMul`); tensor and host entry
    /// points agree, and the product is Q4_K-close to the f32 one.
    #[test]
    fn q4_k_projection_follows_f32() -> Result<()> {
        let (n, k, m) = (32, 512, 3);
        let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu)?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let vb = VarBuilder::from_tensors(
            HashMap::from([("weight".to_string(), w.clone())]),
            DType::F32,
            &Device::Cpu,
        );
        let q4k_format = "q4_k".parse().expect("a known dtype");
        let linear = Linear::load(vb, k, n, false, q4k_format)?;
        assert_eq!(matches!(linear.weight, Projection::Q4k(_)), q4k::available());
        let got = linear.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let host = linear.forward_host(&x.flatten_all()?.to_vec1::<f32>()?, m)?;
        assert_eq!(got, host);
        let want = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        // 4 bits a weight on Gaussian values: ~8 % relative error; a broken kernel is off by ~1.
        let error = crate::bench::rel_l2(&got, &want);
        assert!(error < 0.15, "q4_k product off by {error:.3} (relative L2)");
        Ok(())
    }
}
