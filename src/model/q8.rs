//! Q8_0 projections on CPU with AVX-512 VNNI: `y = x Wᵀ` where `W` is quantized at load in
//! ggml's Q8_0 (blocks of 32 int8 values with an f16 scale, the same rounding) and each row of
//! `x` is quantized to Q8_0 per call, exactly as candle's `QMatMul` does; only the order of the
//! float sums differs.
//!
//! Hand-written because candle's Q8_0 matmul computes every (input row, weight row) dot product
//! on its own: at 10 rows (a batched decode step) it costs ~3.8× one row here, while the weight
//! stream, the real cost of a decode step, is the same. This kernel loads a weight row once and
//! multiplies it with up to 8 input rows from registers, 64 int8 products per `vpdpbusd`.

use super::gemv::by_weight_rows;
use half::f16;
use rayon::prelude::*;

/// Values per Q8_0 block (one scale each).
pub const BLOCK: usize = 32;
/// Bytes per 512-bit register: two blocks. Rows are zero-padded to a multiple of it.
const CHUNK: usize = 64;
/// Scales converted per 256-bit load: the blocks of 8 chunks.
const SCALES_PER_LOAD: usize = 16;
/// Input rows multiplied per load of a weight chunk.
const MAX_GROUP: usize = 8;

/// Whether this CPU has the instructions the kernel needs.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// ggml's `quantize_row_q8_0` on one block: (scale d = max|v| / 127, round(v / d)).
fn quantize_block(v: &[f32], q: &mut [i8]) -> f16 {
    let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &x) in q.iter_mut().zip(v) {
        *q = (x * id).round() as i8;
    }
    f16::from_f32(d)
}

/// A weight `[n, k]` in Q8_0, laid out for the kernel: int8 rows padded with zeros to a
/// multiple of 64 values, and each row's block scales padded with zeros to a multiple of 16.
#[derive(Debug)]
pub struct Q8Weight {
    n: usize,
    k: usize,
    /// Padded row length in values (a multiple of [`CHUNK`]).
    row: usize,
    /// Scales per row (a multiple of [`SCALES_PER_LOAD`]).
    scale_row: usize,
    values: Vec<i8>,
    scales: Vec<f16>,
}

impl Q8Weight {
    /// Quantizes `w` ([n, k] row-major, `k` a multiple of [`BLOCK`]).
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        assert!(
            k.is_multiple_of(BLOCK) && w.len() == n * k,
            "Q8_0 needs rows of whole blocks"
        );
        let row = k.next_multiple_of(CHUNK);
        let scale_row = (row / BLOCK).next_multiple_of(SCALES_PER_LOAD);
        let mut values = vec![0i8; n * row];
        let mut scales = vec![f16::ZERO; n * scale_row];
        values
            .par_chunks_mut(row)
            .zip(scales.par_chunks_mut(scale_row))
            .zip(w.par_chunks(k))
            .for_each(|((q, d), w)| {
                for ((q, d), v) in q.chunks_mut(BLOCK).zip(d.iter_mut()).zip(w.chunks(BLOCK)) {
                    *d = quantize_block(v, q);
                }
            });
        Self {
            n,
            k,
            row,
            scale_row,
            values,
            scales,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.n
    }

    /// `x`: [m, k] row-major → `x Wᵀ`: [m, n] row-major. Needs [`available`].
    pub fn matmul_wt(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert!(available(), "the Q8_0 kernel needs AVX-512 VNNI");
        assert_eq!(x.len(), m * self.k);
        let input = QuantizedRows::new(x, m, self.k, self.row);
        by_weight_rows(m, self.n, |j, y| {
            let values = &self.values[j * self.row..(j + 1) * self.row];
            let scales = &self.scales[j * self.scale_row..(j + 1) * self.scale_row];
            let mut i = 0;
            while i < m {
                let r = (m - i).min(MAX_GROUP);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `available()` was checked above; every slice holds whole padded rows.
                unsafe {
                    let (x, s, y) = (input.values(i), input.scales(i), &mut y[i..i + r]);
                    match r {
                        8 => avx512::dot::<8>(x, s, values, scales, y),
                        7 => avx512::dot::<7>(x, s, values, scales, y),
                        6 => avx512::dot::<6>(x, s, values, scales, y),
                        5 => avx512::dot::<5>(x, s, values, scales, y),
                        4 => avx512::dot::<4>(x, s, values, scales, y),
                        3 => avx512::dot::<3>(x, s, values, scales, y),
                        2 => avx512::dot::<2>(x, s, values, scales, y),
                        _ => avx512::dot::<1>(x, s, values, scales, y),
                    }
                }
                i += r;
            }
        })
    }
}

/// The input rows in Q8_0, as the kernel reads them: values offset by +128 into u8 (what
/// `vpdpbusd` multiplies; the offset is taken back out with the weight's block sums), and each
/// chunk's two block scales spread over the 16 lanes of its products.
struct QuantizedRows {
    row: usize,
    values: Vec<u8>,
    /// Per row: `row / 64` chunks × 16 lanes.
    lane_scales: Vec<f32>,
}

impl QuantizedRows {
    fn new(x: &[f32], m: usize, k: usize, row: usize) -> Self {
        let lanes = row / CHUNK * 16;
        let mut values = vec![128u8; m * row];
        let mut lane_scales = vec![0f32; m * lanes];
        let mut q = [0i8; BLOCK];
        for ((x, u), s) in x
            .chunks(k)
            .zip(values.chunks_mut(row))
            .zip(lane_scales.chunks_mut(lanes))
        {
            for ((x, u), s) in x.chunks(BLOCK).zip(u.chunks_mut(BLOCK)).zip(s.chunks_mut(8)) {
                let d = quantize_block(x, &mut q).to_f32();
                s.fill(d);
                for (u, &q) in u.iter_mut().zip(&q) {
                    *u = (q as i16 + 128) as u8;
                }
            }
        }
        Self {
            row,
            values,
            lane_scales,
        }
    }

    /// Rows from `i` on.
    fn values(&self, i: usize) -> &[u8] {
        &self.values[i * self.row..]
    }

    fn scales(&self, i: usize) -> &[f32] {
        &self.lane_scales[i * self.row / CHUNK * 16..]
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{CHUNK, SCALES_PER_LOAD};
    use half::f16;
    use std::arch::x86_64::*;

    /// `y[r] = Σ_b dx_rb · dw_b · Σ_{i∈b} xq_ri · wq_i` for `R` input rows and one weight row.
    /// Per chunk of 64 values: one `vpdpbusd` per input row, started from −128 × the weight's
    /// 4-value sums so the +128 offset of the inputs cancels exactly in integers; then the
    /// 16 integer lanes are scaled by their blocks' dx·dw and accumulated in f32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot<const R: usize>(x: &[u8], x_scales: &[f32], w: &[i8], w_scales: &[f16], y: &mut [f32]) {
        let row = w.len();
        let chunks = row / CHUNK;
        let stride = chunks * 16;
        assert!(x.len() >= R * row && x_scales.len() >= R * stride && y.len() >= R);
        assert!(w_scales.len() >= chunks * 2);
        let (xp, sp, wp) = (x.as_ptr(), x_scales.as_ptr(), w.as_ptr());
        let ones = _mm512_set1_epi8(1);
        // Lanes 0-7 take the chunk's first block scale, lanes 8-15 its second.
        let pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut acc = [_mm512_setzero_ps(); R];
        for g in 0..chunks.div_ceil(SCALES_PER_LOAD / 2) {
            let s = _mm512_cvtph_ps(_mm256_loadu_si256(
                w_scales.as_ptr().add(g * SCALES_PER_LOAD) as *const __m256i
            ));
            for cc in 0..(chunks - g * SCALES_PER_LOAD / 2).min(SCALES_PER_LOAD / 2) {
                let c = g * SCALES_PER_LOAD / 2 + cc;
                let wv = _mm512_loadu_si512(wp.add(c * CHUNK) as *const __m512i);
                let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, wv);
                let start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sums, 7));
                let dw = _mm512_permutexvar_ps(_mm512_add_epi32(pair, _mm512_set1_epi32(2 * cc as i32)), s);
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_si512(xp.add(r * row + c * CHUNK) as *const __m512i);
                    let dots = _mm512_dpbusd_epi32(start, xv, wv);
                    let scale = _mm512_mul_ps(dw, _mm512_loadu_ps(sp.add(r * stride + c * 16)));
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), scale, *a);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            y[r] = _mm512_reduce_add_ps(*a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// Same quantization as candle's Q8_0 `QMatMul`, so the products agree up to float
    /// summation order.
    #[test]
    fn matches_candle_q8_0() -> candle_core::Result<()> {
        if !available() {
            eprintln!("no AVX-512 VNNI here: the Q8_0 kernel is not used, nothing to test");
            return Ok(());
        }
        // Rows of 1..3 chunks (partial scale loads, a half chunk of padding), groups of 8 and
        // fewer, several weight-row tasks.
        for (m, k, n) in [(1, 1024, 70), (3, 96, 5), (10, 160, 33), (17, 2048, 65), (48, 32, 40)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0 + (i % 5) as f32 * 0.01)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 9.0 + (i % 3) as f32 * 0.02)
                .collect();
            let q = Q8Weight::quantize(&w, n, k);
            let ours = q.matmul_wt(&x, m);
            // A row's result does not depend on the rows stepped with it (batched = alone).
            let last = q.matmul_wt(&x[(m - 1) * k..], 1);
            assert_eq!(last, ours[(m - 1) * n..], "m{m} k{k} n{n}: last row alone");
            let wt = Tensor::from_vec(w, (n, k), &Device::Cpu)?;
            let candle = QMatMul::from_qtensor(QTensor::quantize(&wt, GgmlDType::Q8_0)?)?;
            let want = candle.forward(&Tensor::from_vec(x, (m, k), &Device::Cpu)?)?;
            let want = want.flatten_all()?.to_vec1::<f32>()?;
            for (i, (got, want)) in ours.iter().zip(&want).enumerate() {
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "m{m} k{k} n{n} at {i}: {got} vs candle {want}"
                );
            }
        }
        Ok(())
    }
}
