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
//!
//! The inner kernel computes a register tile of input rows × weight rows (4 × 2 in AVX2's 16
//! registers, 6 × 4 in AVX-512's 32), so each loaded vector feeds several FMAs: on a Zen 4 this
//! took 10 rows against bf16 weights from 3.5× to 2.2× the cost of one row. A product sums its
//! lanes in the same order whatever tile it lands in, so a row's result does not depend on the
//! batch around it.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Rows of `x` up to which the decoder's convs take the kernel; longer steps go to gemm convs.
pub const MAX_ROWS: usize = 16;

/// Rows up to which a talker or code-predictor step or prefill takes the kernel (projections
/// and attention). On a Zen 4 (`cargo bench --bench kernels`) it beat gemm over widened bf16
/// tiles 3.6× at 33 rows and 1.5× at 96, where gemm's cost barely depends on the row count.
pub const PROJECTION_ROWS: usize = 128;

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
pub fn matmul_wt<W: WeightElem + simd::Load>(x: &[f32], m: usize, k: usize, w: &[W], n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    by_weight_blocks(m, n, |j0, rows, out| {
        // SAFETY: `out` reaches this task's columns j0..j0 + rows of every row, its alone.
        unsafe { dot_block(x, m, k, &w[j0 * k..(j0 + rows) * k], rows, out) }
    })
}

/// `[m, n]` row-major from `dot(j, y)`, which writes weight row `j`'s products with all `m`
/// input rows into `y`.
pub(crate) fn by_weight_rows(m: usize, n: usize, dot: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    by_weight_blocks(m, n, |j0, rows, out| {
        let mut y = vec![0f32; m];
        for c in 0..rows {
            dot(j0 + c, &mut y);
            for (r, &v) in y.iter().enumerate() {
                // SAFETY: (r, c) lies in this task's columns of the [m, n] output.
                unsafe { out.write(r, c, v) };
            }
        }
    })
}

/// Where a task writes its products: column `c` of its block is column `first + c` of an
/// output whose rows are `row_stride` apart.
#[derive(Clone, Copy)]
pub(crate) struct Columns {
    first: *mut f32,
    row_stride: usize,
}

impl Columns {
    /// # Safety
    /// (`r`, `c`) must lie inside the output and in the writer's own columns.
    #[inline(always)]
    unsafe fn write(self, r: usize, c: usize, v: f32) {
        *self.first.add(r * self.row_stride + c) = v;
    }
}

/// `[m, n]` row-major from `block(j0, rows, out)`, which writes the products of weight rows
/// `j0..j0 + rows` with all `m` input rows into columns `j0..` through `out`. Tasks own whole
/// blocks of weight rows, so a weight row is streamed from memory once whatever `m` is, and
/// write their columns in place (a transposing copy after the products cost ~5 % of a
/// 10-row f32 step).
fn by_weight_blocks(m: usize, n: usize, block: impl Fn(usize, usize, Columns) + Sync) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if y.is_empty() {
        return y;
    }
    let first = SendPtr(y.as_mut_ptr());
    (0..n.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(|task| {
        let j0 = task * ROWS_PER_TASK;
        let columns = Columns {
            // SAFETY: j0 < n and m ≥ 1: inside the [m, n] output.
            first: unsafe { first.get().add(j0) },
            row_stride: n,
        };
        block(j0, ROWS_PER_TASK.min(n - j0), columns)
    });
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
pub(crate) fn dot_rows<W: WeightElem + simd::Load>(x: &[f32], k: usize, row: &[W], y: &mut [f32]) {
    let out = Columns {
        first: y.as_mut_ptr(),
        row_stride: 1,
    };
    // SAFETY: `out` reaches y[0..m], borrowed mutably here.
    unsafe { dot_block(x, y.len(), k, row, 1, out) }
}

/// `out(r, c) = dot(x_r, w_c)` for the `m` rows of `x` ([m, k]) and the `cols` rows of `w`.
///
/// # Safety
/// `out` must reach those `m` × `cols` places, and nobody else may use them meanwhile.
unsafe fn dot_block<W: WeightElem + simd::Load>(x: &[f32], m: usize, k: usize, w: &[W], cols: usize, out: Columns) {
    assert!(x.len() >= m * k && w.len() >= cols * k);
    #[cfg(target_arch = "x86_64")]
    {
        // Each path runs only where its features were detected; the slices were checked to
        // hold the rows the kernel reads, and the caller vouches for `out`.
        if std::is_x86_feature_detected!("avx512f") {
            return simd::block_avx512(x.as_ptr(), m, k, w.as_ptr(), cols, out);
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return simd::block_avx2(x.as_ptr(), m, k, w.as_ptr(), cols, out);
        }
    }
    for c in 0..cols {
        let wc = &w[c * k..(c + 1) * k];
        for r in 0..m {
            let y = x[r * k..(r + 1) * k].iter().zip(wc).map(|(a, b)| a * b.to_f32()).sum();
            out.write(r, c, y);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use super::{Columns, WeightElem};
    use std::arch::x86_64::*;

    /// An f32 vector register and the operations the tile kernel needs.
    pub trait Vector: Copy {
        const LANES: usize;
        unsafe fn zero() -> Self;
        unsafe fn load(p: *const f32) -> Self;
        unsafe fn fmadd(a: Self, b: Self, acc: Self) -> Self;
        unsafe fn sum(self) -> f32;
    }

    impl Vector for __m256 {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn fmadd(a: Self, b: Self, acc: Self) -> Self {
            _mm256_fmadd_ps(a, b, acc)
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            hsum(self)
        }
    }

    impl Vector for __m512 {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn fmadd(a: Self, b: Self, acc: Self) -> Self {
            _mm512_fmadd_ps(a, b, acc)
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            _mm512_reduce_add_ps(self)
        }
    }

    /// Weights widened to a vector of f32 lanes.
    pub trait Widen<V: Vector>: WeightElem {
        /// # Safety
        /// `p` must point at `V::LANES` readable elements; the vector's features must be on.
        unsafe fn widen(p: *const Self) -> V;
    }

    impl<V: Vector> Widen<V> for f32 {
        #[inline(always)]
        unsafe fn widen(p: *const f32) -> V {
            V::load(p)
        }
    }

    // bf16 is the high half of an f32: widen to 32 bits and shift into place (exact).
    impl Widen<__m256> for half::bf16 {
        #[inline(always)]
        unsafe fn widen(p: *const half::bf16) -> __m256 {
            let raw = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
        }
    }

    impl Widen<__m512> for half::bf16 {
        #[inline(always)]
        unsafe fn widen(p: *const half::bf16) -> __m512 {
            let raw = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
        }
    }

    /// Weight types the kernel reads at either vector width.
    pub trait Load: Widen<__m256> + Widen<__m512> {}
    impl<W: Widen<__m256> + Widen<__m512>> Load for W {}

    /// The sum of the 8 lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// `out(r, c) = dot(x_r, w_c)` for `R` rows of `x` (from `x`, stride `k`) and `C` rows
    /// of `w` (from `w`, stride `k`): `R·C` accumulators, `R + C` loads per `R·C` FMAs. With
    /// `prefetch`, each step also prefetches the same columns of the next `C` weight rows (the
    /// next tile, which lies right after these rows; past the weight's end the hint is
    /// harmless): with several input rows a tile's compute outlasts what the hardware prefetcher
    /// fetches ahead.
    #[inline(always)]
    unsafe fn tile<V: Vector, W: Widen<V>, const R: usize, const C: usize>(
        x: *const f32,
        k: usize,
        w: *const W,
        out: Columns,
        prefetch: bool,
    ) {
        let mut acc = [[V::zero(); C]; R];
        let mut t = 0;
        while t + V::LANES <= k {
            if prefetch {
                for c in 0..C {
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((C + c) * k + t) as *const i8);
                }
            }
            let mut wv = [V::zero(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = W::widen(w.add(c * k + t));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = V::load(x.add(r * k + t));
                for (c, a) in a.iter_mut().enumerate() {
                    *a = V::fmadd(xv, wv[c], *a);
                }
            }
            t += V::LANES;
        }
        for (r, a) in acc.iter().enumerate() {
            for (c, a) in a.iter().enumerate() {
                let mut total = a.sum();
                for u in t..k {
                    total += *x.add(r * k + u) * (*w.add(c * k + u)).to_f32();
                }
                out.write(r, c, total);
            }
        }
    }

    /// Input rows from which a wide tile prefetches the next one. f32 batch-10 steps of the
    /// full-size checkpoint (bf16 weights, AVX-512, 2-core Zen 4), alternated step by step in
    /// one process, 20 each: 353 → 289 ms a step; batch 4 247 → 184 ms; 24 full-size layers of
    /// bf16 weights alone, min of 6: 10 rows 1.21–1.33× faster, 4 rows 1.33–1.41×; the AVX2
    /// tiles on the same CPU 1.44× and 1.55× (not measured on an AVX2-only CPU). Below, one and
    /// two rows stream at the memory's rate without it.
    const PREFETCH_FROM: usize = 3;

    /// [`tile`]s over all `m` rows of `x` and the `n` rows of `w`: groups of up to
    /// `R` (≤ 6) input rows against groups of `C` weight rows (single rows for the remainder),
    /// from `WIDE_FROM` input rows on; below that the weight rows go one at a time.
    #[inline(always)]
    unsafe fn block<V: Vector, W: Widen<V>, const C: usize, const R: usize, const WIDE_FROM: usize>(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const W,
        n: usize,
        out: Columns,
    ) {
        let mut c0 = 0;
        while c0 < n {
            let full = m >= WIDE_FROM && n - c0 >= C;
            let wc = w.add(c0 * k);
            let mut r0 = 0;
            while r0 < m {
                let xr = x.add(r0 * k);
                let or = Columns {
                    first: out.first.add(r0 * out.row_stride + c0),
                    row_stride: out.row_stride,
                };
                let rows = (m - r0).min(R);
                // The first pass over a tile's weights brings them in; later passes (more
                // input rows) find them in L1.
                let prefetch = full && r0 == 0 && m >= PREFETCH_FROM;
                match (rows, full) {
                    (6, true) => tile::<V, W, 6, C>(xr, k, wc, or, prefetch),
                    (5, true) => tile::<V, W, 5, C>(xr, k, wc, or, prefetch),
                    (6, false) => tile::<V, W, 6, 1>(xr, k, wc, or, prefetch),
                    (5, false) => tile::<V, W, 5, 1>(xr, k, wc, or, prefetch),
                    (4, true) => tile::<V, W, 4, C>(xr, k, wc, or, prefetch),
                    (3, true) => tile::<V, W, 3, C>(xr, k, wc, or, prefetch),
                    (2, true) => tile::<V, W, 2, C>(xr, k, wc, or, prefetch),
                    (1, true) => tile::<V, W, 1, C>(xr, k, wc, or, prefetch),
                    (4, false) => tile::<V, W, 4, 1>(xr, k, wc, or, prefetch),
                    (3, false) => tile::<V, W, 3, 1>(xr, k, wc, or, prefetch),
                    (2, false) => tile::<V, W, 2, 1>(xr, k, wc, or, prefetch),
                    _ => tile::<V, W, 1, 1>(xr, k, wc, or, prefetch),
                }
                r0 += rows;
            }
            c0 += if full { C } else { 1 };
        }
    }

    /// Below 3 input rows the weight rows go one at a time: interleaving four rows' streams
    /// made a one-row decode step 1.5× slower end to end on a Zen 4 (koe bench f32, steady 4.6
    /// against 6.7 frames/s), though a lone kernel loop timed faster; a 16-lane chain per row
    /// still streams a row faster than memory delivers it.
    ///
    /// # Safety
    /// AVX-512F must be available; `x` holds `m` rows of `k`, `w` `n` rows of `k`, `out` the
    /// `m` × `n` places written.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn block_avx512<W: Load>(x: *const f32, m: usize, k: usize, w: *const W, n: usize, out: Columns) {
        block::<__m512, W, 4, 6, 3>(x, m, k, w, n, out)
    }

    /// Two weight rows at every row count: with one 8-lane FMA chain a lone row would be bound
    /// by the FMA latency (one vector of weights per ~5 cycles), so a one-row step runs two chains.
    /// Not measured on an AVX2-only CPU since the tiles were introduced.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `x` holds `m` rows of `k`, `w` `n` rows of `k`, `out` the
    /// `m` × `n` places written.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block_avx2<W: Load>(x: *const f32, m: usize, k: usize, w: *const W, n: usize, out: Columns) {
        block::<__m256, W, 2, 4, 1>(x, m, k, w, n, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes that exercise the vector loop, its remainder, every tile height, a partial last
    /// task, and (widened gemm) several tiles with a partial last one.
    const SIZES: [(usize, usize, usize); 7] = [
        (1, 1024, 70),
        (2, 24, 9),
        (3, 37, 5),
        (5, 40, 6),
        (7, 160, 33),
        (16, 48, 65),
        (40, 1000, 131),
    ];

    /// `x` [m, k] and `w` [n, k] with small exact values.
    fn inputs(m: usize, k: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let x = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
        let w = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 9.0).collect();
        (x, w)
    }

    fn assert_near(got: f32, want: f64, what: &str) {
        let got = got as f64;
        assert!(
            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
            "{what}: {got} vs {want}"
        );
    }

    /// The AVX2 tiles, which this CPU may not choose by itself (it prefers AVX-512): against
    /// the plain product, and a row alone against the same row in the batch.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_tiles_match_a_plain_product() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        fn avx2<W: simd::Load>(x: &[f32], m: usize, k: usize, w: &[W], n: usize) -> Vec<f32> {
            by_weight_blocks(m, n, |j0, rows, out| {
                let w = &w[j0 * k..(j0 + rows) * k];
                // SAFETY: AVX2 and FMA were detected; `x` holds m rows, `w` the block's rows,
                // `out` the task's columns.
                unsafe { simd::block_avx2(x.as_ptr(), m, k, w.as_ptr(), rows, out) }
            })
        }
        for (m, k, n) in SIZES {
            let (x, w) = inputs(m, k, n);
            let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let (y, yb) = (avx2(&x, m, k, &w, n), avx2(&x, m, k, &wb, n));
            for i in 0..m {
                let alone = avx2(&x[i * k..(i + 1) * k], 1, k, &w, n);
                assert_eq!(
                    alone,
                    y[i * n..(i + 1) * n],
                    "m{m} k{k} n{n}: row {i} alone = in the batch"
                );
                for j in 0..n {
                    let want: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                    assert_near(y[i * n + j], want, &format!("avx2 f32 m{m} k{k} n{n} [{i},{j}]"));
                    let want: f64 = (0..k).map(|t| x[i * k + t] as f64 * wb[j * k + t].to_f64()).sum();
                    assert_near(yb[i * n + j], want, &format!("avx2 bf16 m{m} k{k} n{n} [{i},{j}]"));
                }
            }
        }
    }

    #[test]
    fn matches_a_plain_product() {
        for (m, k, n) in SIZES {
            let (x, w) = inputs(m, k, n);
            let y = matmul_wt(&x, m, k, &w, n);
            let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let yb = matmul_wt(&x, m, k, &wb, n);
            let yw: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            assert_eq!(yb, matmul_wt(&x, m, k, &yw, n), "bf16 weights = their f32 widening");
            let yg = matmul_wt_widened(&x, m, k, &wb, n);
            for i in 0..m {
                let alone = matmul_wt(&x[i * k..(i + 1) * k], 1, k, &w, n);
                assert_eq!(
                    alone,
                    y[i * n..(i + 1) * n],
                    "m{m} k{k} n{n}: row {i} alone = in the batch"
                );
            }
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                    assert_near(y[i * n + j], want, &format!("m{m} k{k} n{n} [{i},{j}]"));
                    let what = format!("widened gemm m{m} k{k} n{n} [{i},{j}]");
                    assert_near(yg[i * n + j], yb[i * n + j] as f64, &what);
                }
            }
        }
    }
}

/// Without x86-64 the kernel is the portable loop; the bound is kept so callers are the same.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) mod simd {
    pub trait Load: super::WeightElem {}
    impl<T: super::WeightElem> Load for T {}
}
