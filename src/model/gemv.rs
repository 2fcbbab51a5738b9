//! `y = x Wᵀ` on CPU for the rows of a decode step (1 row per sequence), against a weight
//! stored in f32 or in bfloat16.
//!
//! Hand-written because a decode step is nothing but streaming the weights once, and the gemm
//! crate behind candle's CPU matmul reaches only ~21 GB/s on these skinny shapes here
//! (1 × 1024 by 1024 × 3072 in 0.53 ms), and candle cannot multiply f32 activations with bf16
//! weights without widening the whole weight first. Each weight row is loaded once and
//! multiplied with every input row (a batch of sequences costs little more than one), rows
//! split across threads. bf16 weights (the release's storage) are widened in registers: the
//! products are exactly those of the f32-upcast weights, at half the memory traffic.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Rows of `x` the kernel takes; more rows go to the general matmul, where gemm is efficient.
pub const MAX_ROWS: usize = 16;

/// Weight floats widened per task of [`matmul_wt_widened`]: 256 KiB, within L2.
const WIDENED_TILE_FLOATS: usize = 64 * 1024;

/// Output rows (weight rows) per parallel task.
const ROWS_PER_TASK: usize = 32;

/// Weight element types the kernel reads.
pub trait WeightElem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
}

impl WeightElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
}

impl WeightElem for half::bf16 {
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// `x`: [m, k] row-major, `w`: [n, k] row-major; returns `x Wᵀ`: [m, n] row-major.
pub fn matmul_wt<W: WeightElem + avx2::Load>(x: &[f32], m: usize, k: usize, w: &[W], n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    by_weight_rows(m, n, |j, y| dot_rows(x, k, &w[j * k..(j + 1) * k], y))
}

/// `[m, n]` row-major from `dot(j, y)`, which writes weight row `j`'s products with all `m`
/// input rows into `y`. Tasks own whole blocks of weight rows, so a weight row is streamed
/// from memory once whatever `m` is.
pub(crate) fn by_weight_rows(m: usize, n: usize, dot: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    // yt[j·m + i] = dot(x_i, w_j)
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, out)| {
            for (jj, y) in out.chunks_mut(m).enumerate() {
                dot(task * ROWS_PER_TASK + jj, y);
            }
        });
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            y[i * n + j] = yt[j * m + i];
        }
    }
    y
}

/// `x Wᵀ` for many rows (a prefill) against a weight kept in a narrower type: the weight is
/// widened to f32 a tile of rows at a time, each tile multiplied by all of `x` with gemm while it
/// sits in L2. Widening the whole weight first would cost a full f32 copy per call, and the
/// row kernel is compute-bound here (it reloads `x` for every weight row).
pub fn matmul_wt_widened<W: WeightElem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    let tile_rows = (WIDENED_TILE_FLOATS / k).clamp(1, n);
    let mut y = vec![0f32; m * n];
    let out = SendPtr(y.as_mut_ptr());
    (0..n.div_ceil(tile_rows)).into_par_iter().for_each(|tile| {
        let j0 = tile * tile_rows;
        let rows = tile_rows.min(n - j0);
        WIDENED.with_borrow_mut(|widened| {
            widened.clear();
            widened.extend(w[j0 * k..(j0 + rows) * k].iter().map(|v| v.to_f32()));
            // SAFETY: `y` is [m, n] row-major and this task writes only its columns j0..j0+rows;
            // `x` is [m, k] and `widened` [rows, k], read as its transpose [k, rows].
            unsafe {
                gemm(
                    m,
                    rows,
                    k,
                    out.get().add(j0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    widened.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
    });
    y
}

thread_local! {
    /// A tile of widened weights per worker thread, reused: a fresh allocation of this size is
    /// a fresh mapping from the kernel, paid in page faults on every tile.
    static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A raw pointer shared by parallel tasks that write disjoint regions of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) T);
// SAFETY: users write disjoint regions and only read shared inputs.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T: Copy> SendPtr<T> {
    /// A method (not a field read) so closures capture the whole `Sync` wrapper.
    pub(crate) fn get(&self) -> T {
        self.0
    }
}

/// `y[i] = dot(x_i, row)` for every row `x_i` of `x` ([m, k]).
pub(crate) fn dot_rows<W: WeightElem + avx2::Load>(x: &[f32], k: usize, row: &[W], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        let mut i = 0;
        while i < y.len() {
            let r = (y.len() - i).min(4);
            // SAFETY: the features were detected above; slices are in bounds by construction.
            unsafe {
                match r {
                    4 => avx2::dot::<4, W>(&x[i * k..], k, row, &mut y[i..]),
                    3 => avx2::dot::<3, W>(&x[i * k..], k, row, &mut y[i..]),
                    2 => avx2::dot::<2, W>(&x[i * k..], k, row, &mut y[i..]),
                    _ => avx2::dot::<1, W>(&x[i * k..], k, row, &mut y[i..]),
                }
            }
            i += r;
        }
        return;
    }
    for (i, out) in y.iter_mut().enumerate() {
        *out = x[i * k..(i + 1) * k].iter().zip(row).map(|(a, b)| a * b.to_f32()).sum();
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::WeightElem;
    use std::arch::x86_64::*;

    /// Eight weights widened to f32 lanes.
    pub trait Load: WeightElem {
        /// # Safety
        /// `p` must point at 8 readable elements; AVX2 must be available.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Load for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }

    impl Load for half::bf16 {
        /// bf16 is the high half of an f32: widen to 32 bits and shift into place (exact).
        #[inline(always)]
        unsafe fn load8(p: *const half::bf16) -> __m256 {
            let raw = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
        }
    }

    /// The sum of the 8 lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// `y[r] = dot(x[r·k..], row)` for `R` consecutive rows of `x`, two 8-wide FMA chains
    /// per row so the loads, not the FMA latency, bound the loop.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot<const R: usize, W: Load>(x: &[f32], k: usize, row: &[W], y: &mut [f32]) {
        assert!(x.len() >= R * k && row.len() >= k && y.len() >= R);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let xp = x.as_ptr();
        let wp = row.as_ptr();
        let mut c = 0;
        while c + 16 <= k {
            let w0 = W::load8(wp.add(c));
            let w1 = W::load8(wp.add(c + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let base = xp.add(r * k + c);
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(base), w0, a[0]);
                a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(base.add(8)), w1, a[1]);
            }
            c += 16;
        }
        for (r, a) in acc.iter().enumerate() {
            let mut total = hsum(_mm256_add_ps(a[0], a[1]));
            for t in c..k {
                total += *xp.add(r * k + t) * (*wp.add(t)).to_f32();
            }
            y[r] = total;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_product() {
        // Sizes that exercise the 16-wide loop, its remainder, row groups of 4/3/2/1, a partial
        // last task, and (widened gemm) several tiles with a partial last one.
        for (m, k, n) in [(1, 1024, 70), (3, 37, 5), (7, 160, 33), (16, 48, 65), (40, 1000, 131)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 9.0).collect();
            let y = matmul_wt(&x, m, k, &w, n);
            let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let yb = matmul_wt(&x, m, k, &wb, n);
            let yw: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            assert_eq!(yb, matmul_wt(&x, m, k, &yw, n), "bf16 weights = their f32 widening");
            let yg = matmul_wt_widened(&x, m, k, &wb, n);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                    let got = y[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "m{m} k{k} n{n} [{i},{j}]: {got} vs {want}"
                    );
                    let (kernel, widened) = (yb[i * n + j] as f64, yg[i * n + j] as f64);
                    assert!(
                        (kernel - widened).abs() <= 1e-4 * (1.0 + kernel.abs()),
                        "widened gemm m{m} k{k} n{n} [{i},{j}]: {widened} vs {kernel}"
                    );
                }
            }
        }
    }
}

/// Without x86-64 the kernel is the portable loop; the bound is kept so callers are the same.
#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    pub trait Load: super::WeightElem {}
    impl<T: super::WeightElem> Load for T {}
}
