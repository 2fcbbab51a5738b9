//! Memory-mapped safetensors weights.
//!
//! The release stores the talker in bfloat16. On CPU we compute in f32 (candle widens bf16 on
//! every call there, which is slower than f32 and no more exact), so bf16 tensors are upcast once
//! at load; on CUDA/Metal they stay in bf16.

use crate::error::{Error, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::path::Path;

/// The compute dtype for a device: f32 on CPU, bf16 on accelerators.
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// Memory-maps one safetensors file as a `VarBuilder` whose tensors come out in `dtype`.
pub fn mmap(file: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    if !file.is_file() {
        return Err(Error::Io {
            path: file.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "weights file not found"),
        });
    }
    // SAFETY: the file is mapped read-only; like every safetensors loader we assume nobody
    // truncates the checkpoint while the process runs.
    unsafe { VarBuilder::from_mmaped_safetensors(&[file], dtype, device) }.map_err(|source| Error::Weights {
        file: file.to_path_buf(),
        source,
    })
}

/// Attaches the weights file to a candle error raised while building a model from it
/// (candle's own message names the tensor and, for a wrong shape, both shapes).
pub fn in_file<T>(file: &Path, r: candle_core::Result<T>) -> Result<T> {
    r.map_err(|source| Error::Weights {
        file: file.to_path_buf(),
        source,
    })
}

/// The dtype a tensor is stored in, read from the file's header.
pub fn stored_dtype(file: &Path, name: &str) -> Result<DType> {
    // SAFETY: as in `mmap`.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(file) };
    let dtype = st.and_then(|st| Ok(st.get(name)?.dtype()));
    match in_file(file, dtype)? {
        safetensors::Dtype::BF16 => Ok(DType::BF16),
        safetensors::Dtype::F16 => Ok(DType::F16),
        _ => Ok(DType::F32),
    }
}
