//! Q8_0 projections on CPUs with AVX2 but without AVX-512 VNNI: `y = x Wᵀ` where `W` is
//! quantized at load in ggml's Q8_0 (blocks of 32 int8 values with an f16 scale, the same
//! rounding) and each row of `x` is quantized to Q8_0 per call, exactly as candle's `QMatMul`
//! does; only the order of the float sums differs.
//!
//! Hand-written because on such CPUs candle 0.11 computes every (input row, weight row) Q8_0
//! dot product on its own (`vec_dot_q8_0_q8_0`), widening each block's f16 scale through a
//! function call: the weights are streamed once per input row, so a batched decode step or a
//! prefill pays for every row again. Here a weight row is loaded once and multiplied with up to
//! 8 input rows from registers, and the scales are f32 from load time. On CPUs with AVX-512
//! VNNI candle repacks Q8_0 into tiles for `vpdpbusd` and is faster than this: `linear` keeps
//! candle's path there.

use super::gemv::by_weight_rows;
use half::f16;
use rayon::prelude::*;

/// Values per Q8_0 block (one scale each).
pub const BLOCK: usize = 32;
/// Input rows multiplied per load of a weight block.
const MAX_GROUP: usize = 8;

/// Whether this kernel is the one to use on this CPU: AVX2 and FMA, and no AVX-512 VNNI (where
/// candle's repacked kernel wins).
pub fn preferred() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && !std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// ggml's `quantize_row_q8_0` on one block (candle's `BlockQ8_0::from_float`): scale
/// d = max|v| / 127 stored as f16, values round(v / d). Returns the stored scale as f32.
#[inline(always)]
fn quantize_block(v: &[f32], q: &mut [i8]) -> f32 {
    let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &x) in q.iter_mut().zip(v) {
        *q = (x * id).round() as i8;
    }
    f16::from_f32(d).to_f32()
}

/// `quantize_block` over whole blocks of `x`, into `values` and `scales` (a plain loop, so the
/// block code is inlined into the AVX2 copy below, not into an iterator adapter compiled
/// without it).
#[inline(always)]
fn quantize_blocks(x: &[f32], values: &mut [i8], scales: &mut [f32]) {
    for (b, scale) in scales.iter_mut().enumerate() {
        let range = b * BLOCK..(b + 1) * BLOCK;
        *scale = quantize_block(&x[range.clone()], &mut values[range]);
    }
}

/// The same code compiled for AVX2: with SSE4.1 `round` is a few vector instructions instead of
/// a call into libm per value (the whole cost of quantizing the weights at load).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_blocks_avx2(x: &[f32], values: &mut [i8], scales: &mut [f32]) {
    quantize_blocks(x, values, scales)
}

/// Rows `[rows, k]` in Q8_0: int8 values row-major, and one f32 scale per block.
#[derive(Debug, Clone)]
struct Q8Rows {
    k: usize,
    values: Vec<i8>,
    scales: Vec<f32>,
}

/// Rows quantized per parallel task when quantizing a weight.
const ROWS_PER_TASK: usize = 64;

impl Q8Rows {
    /// `x` ([rows, k] row-major, `k` a multiple of [`BLOCK`]), block by block; large inputs
    /// (weights at load) on all threads.
    fn quantize(x: &[f32], k: usize) -> Self {
        let mut values = vec![0i8; x.len()];
        let mut scales = vec![0f32; x.len() / BLOCK];
        let quantize = |x: &[f32], values: &mut [i8], scales: &mut [f32]| {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 was detected.
                return unsafe { quantize_blocks_avx2(x, values, scales) };
            }
            quantize_blocks(x, values, scales)
        };
        let task = ROWS_PER_TASK * k;
        if x.len() > task {
            x.par_chunks(task)
                .zip(values.par_chunks_mut(task))
                .zip(scales.par_chunks_mut(task / BLOCK))
                .for_each(|((x, q), d)| quantize(x, q, d));
        } else {
            quantize(x, &mut values, &mut scales);
        }
        Self { k, values, scales }
    }

    /// Values and scales of the rows from `i` on.
    fn rows_from(&self, i: usize) -> (&[i8], &[f32]) {
        (&self.values[i * self.k..], &self.scales[i * self.k / BLOCK..])
    }
}

/// A weight `[n, k]` quantized to Q8_0 at load.
#[derive(Debug, Clone)]
pub struct Q8Weight {
    n: usize,
    rows: Q8Rows,
}

impl Q8Weight {
    /// Quantizes `w` ([n, k] row-major). `None` when `k` is not a multiple of [`BLOCK`].
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if !k.is_multiple_of(BLOCK) || w.len() != n * k {
            return None;
        }
        Some(Self {
            n,
            rows: Q8Rows::quantize(w, k),
        })
    }

    pub fn out_dim(&self) -> usize {
        self.n
    }

    /// `x`: [m, k] row-major → `x Wᵀ`: [m, n] row-major.
    ///
    /// Any number of rows: at 48 rows (a prefill) this integer kernel beat f32 gemm on
    /// dequantized weight tiles by 1.2–1.4× on an AVX2 Zen CPU, alternated in one session.
    pub fn matmul_wt(&self, x: &[f32], m: usize) -> Vec<f32> {
        let k = self.rows.k;
        assert_eq!(x.len(), m * k, "input rows of {k} values");
        let input = Q8Rows::quantize(x, k);
        by_weight_rows(m, self.n, |j, y| {
            let (w, w_scales) = self.rows.rows_from(j);
            let (w, w_scales) = (&w[..k], &w_scales[..k / BLOCK]);
            for (g, y) in y.chunks_mut(MAX_GROUP).enumerate() {
                let (xq, xs) = input.rows_from(g * MAX_GROUP);
                dot_group(xq, xs, w, w_scales, y);
            }
        })
    }
}

/// `y[r]` for the `y.len()` (≤ [`MAX_GROUP`]) input rows starting at `x`, against one weight row.
fn dot_group(x: &[i8], x_scales: &[f32], w: &[i8], w_scales: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA were detected; the slices hold `y.len()` whole rows.
        unsafe {
            match y.len() {
                8 => avx2::dot::<8>(x, x_scales, w, w_scales, y),
                7 => avx2::dot::<7>(x, x_scales, w, w_scales, y),
                6 => avx2::dot::<6>(x, x_scales, w, w_scales, y),
                5 => avx2::dot::<5>(x, x_scales, w, w_scales, y),
                4 => avx2::dot::<4>(x, x_scales, w, w_scales, y),
                3 => avx2::dot::<3>(x, x_scales, w, w_scales, y),
                2 => avx2::dot::<2>(x, x_scales, w, w_scales, y),
                _ => avx2::dot::<1>(x, x_scales, w, w_scales, y),
            }
        }
        return;
    }
    dot_portable(x, x_scales, w, w_scales, y);
}

/// `y[r] = Σ_b dx_rb · dw_b · Σ_{i∈b} xq_ri · wq_i` without SIMD.
fn dot_portable(x: &[i8], x_scales: &[f32], w: &[i8], w_scales: &[f32], y: &mut [f32]) {
    let k = w.len();
    for (r, out) in y.iter_mut().enumerate() {
        let xr = &x[r * k..(r + 1) * k];
        let sr = &x_scales[r * k / BLOCK..];
        *out = w
            .chunks(BLOCK)
            .zip(xr.chunks(BLOCK))
            .enumerate()
            .map(|(b, (wb, xb))| {
                let dot: i32 = wb.iter().zip(xb).map(|(&a, &c)| a as i32 * c as i32).sum();
                dot as f32 * (w_scales[b] * sr[b])
            })
            .sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::BLOCK;
    use crate::model::gemv::simd::hsum;
    use std::arch::x86_64::*;

    /// `y[r] = Σ_b dx_rb · dw_b · Σ_{i∈b} xq_ri · wq_i` for `R` input rows and one weight row.
    /// Per block, ggml's sign trick: |w| (u8) times x carrying w's sign (i8) with
    /// `vpmaddubsw` (pairs ≤ 2·127² fit in i16), pairs summed to i32 lanes, then scaled by
    /// dx·dw and accumulated in f32. The weight block is loaded once for all `R` rows.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot<const R: usize>(x: &[i8], x_scales: &[f32], w: &[i8], w_scales: &[f32], y: &mut [f32]) {
        let k = w.len();
        let blocks = k / BLOCK;
        assert!(x.len() >= R * k && x_scales.len() >= R * blocks && w_scales.len() >= blocks && y.len() >= R);
        let (xp, sp, wp) = (x.as_ptr(), x_scales.as_ptr(), w.as_ptr());
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            let wv = _mm256_loadu_si256(wp.add(b * BLOCK) as *const __m256i);
            let w_abs = _mm256_sign_epi8(wv, wv);
            let dw = *w_scales.get_unchecked(b);
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_si256(xp.add(r * k + b * BLOCK) as *const __m256i);
                let pairs = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(xv, wv));
                let dots = _mm256_madd_epi16(pairs, ones);
                let scale = _mm256_set1_ps(dw * *sp.add(r * blocks + b));
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            y[r] = hsum(*a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn inputs(m: usize, k: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        // A zero block (scale 0) first, then values of mixed signs and sizes.
        let x = (0..m * k)
            .map(|i| {
                if i < 32 {
                    0.0
                } else {
                    ((i * 7 % 13) as f32 - 6.0) / 7.0 + (i % 5) as f32 * 0.01
                }
            })
            .collect();
        let w = (0..n * k)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 9.0 + (i % 3) as f32 * 0.02)
            .collect();
        (x, w)
    }

    /// The same quantization as candle's Q8_0 `QMatMul`, so the products
    /// agree up to float summation order (and with the portable loop); a row's result does not
    /// depend on the rows beside it.
    #[test]
    fn matches_candle_q8_0() -> candle_core::Result<()> {
        // One and several blocks, groups of 8 and fewer, several weight-row tasks.
        for (m, k, n) in [(1, 1024, 70), (3, 96, 5), (10, 160, 33), (17, 2048, 65), (48, 32, 40)] {
            let (x, w) = inputs(m, k, n);
            let q = Q8Weight::quantize(&w, n, k).expect("whole blocks");
            let ours = q.matmul_wt(&x, m);
            let last = q.matmul_wt(&x[(m - 1) * k..], 1);
            assert_eq!(last, ours[(m - 1) * n..], "m{m} k{k} n{n}: last row alone");
            let wt = Tensor::from_vec(w, (n, k), &Device::Cpu)?;
            let candle = QMatMul::from_qtensor(QTensor::quantize(&wt, GgmlDType::Q8_0)?)?;
            let want = candle.forward(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?)?;
            let want = want.flatten_all()?.to_vec1::<f32>()?;
            let input = Q8Rows::quantize(&x, k);
            for j in 0..n {
                let (wq, ws) = q.rows.rows_from(j);
                let mut plain = vec![0f32; m];
                dot_portable(&input.values, &input.scales, &wq[..k], &ws[..k / BLOCK], &mut plain);
                for i in 0..m {
                    let (got, want) = (ours[i * n + j], want[i * n + j]);
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "m{m} k{k} n{n} [{i},{j}]: {got} vs candle {want}"
                    );
                    assert!(
                        (got - plain[i]).abs() <= 1e-5 * (1.0 + plain[i].abs()),
                        "m{m} k{k} n{n} [{i},{j}]: {got} vs portable {}",
                        plain[i]
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn partial_blocks_are_refused() {
        assert!(Q8Weight::quantize(&[0.0; 48], 1, 48).is_none());
    }
}
