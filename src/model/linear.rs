//! Weight projections: dense (the parity mode) or quantized at load (`--dtype q8_0|q4_k`).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// How the talker's and code predictor's linear weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Compute dtype of the device (f32 on CPU): the parity mode.
    #[default]
    Dense,
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

/// `y = x Wᵀ (+ b)` over rows `x: [N, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Projection,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum Projection {
    Dense(Tensor),
    Quantized(QMatMul),
}

impl Linear {
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool, format: WeightFormat) -> Result<Self> {
        let w = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        let weight = match format {
            // A row narrower than the format's block cannot be quantized: keep it dense.
            WeightFormat::Quantized(q) if in_dim.is_multiple_of(q.block_size()) => {
                Projection::Quantized(QMatMul::from_qtensor(QTensor::quantize(&w, q)?)?)
            }
            _ => Projection::Dense(w),
        };
        Ok(Self { weight, bias })
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, Projection::Quantized(_))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Projection::Dense(w) => x.matmul(&w.t()?)?,
            Projection::Quantized(q) => q.forward(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
