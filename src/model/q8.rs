//! Q8_0 projections: `y = x Wᵀ` where `W` is quantized at load in ggml's Q8_0 (blocks of 32
//! int8 values with an f16 scale, the same rounding) and each row of `x` is quantized to Q8_0 per
//! call, as ggml's reference `vec_dot_q8_0_q8_0` does; only the order of the float sums differs.
//!
//! Hand-written because candle 0.11's Q8_0 kernels pay for a batched decode step's rows nearly
//! one by one: without AVX-512 VNNI it computes each (input row, weight row) dot product on its
//! own (`vec_dot_q8_0_q8_0`), and with it its repacked tiles take 4 input rows per pass and
//! quantize activations per 256 values (Q8K). Here a weight block is loaded once for several
//! input rows held in registers:
//! - AVX2: one weight row at a time against up to 8 input rows, ggml's sign trick with
//!   `vpmaddubsw`;
//! - AVX-512 VNNI: weights repacked at load into tiles of 16 rows, so one `vpdpbusd` gives 4
//!   products for 16 outputs at once (the layout of candle's and ggml's repacked kernels), up to
//!   12 input rows per pass. On a Zen 4 it beat candle's kernel end to end at 1 and 10 rows
//!   (README, "Measured").

use super::gemv::by_weight_rows;
use half::f16;
use rayon::prelude::*;

/// Values per Q8_0 block (one scale each).
pub const BLOCK: usize = 32;
/// Input rows multiplied per load of a weight row (AVX2 kernel).
const MAX_GROUP: usize = 8;

/// Whether these kernels serve this CPU (AVX2 and FMA; tiles where AVX-512 VNNI is present too).
pub fn preferred() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
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
    // Eight running maxima, not one: `max` is exact in any order, and independent lanes
    // vectorize where one chain of `max` would run serially.
    let mut lanes = [0f32; 8];
    for c in v.chunks_exact(8) {
        for (m, x) in lanes.iter_mut().zip(c) {
            *m = m.max(x.abs());
        }
    }
    let amax = lanes.iter().fold(0f32, |m, &x| m.max(x));
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
    layout: Layout,
}

#[derive(Debug, Clone)]
enum Layout {
    /// Row-major blocks, for the AVX2 (and portable) kernel.
    Rows(Q8Rows),
    /// Tiles of 16 weight rows, for the AVX-512 VNNI kernel.
    #[cfg(target_arch = "x86_64")]
    Tiles(vnni::Tiles),
}

impl Q8Weight {
    /// Quantizes `w` ([n, k] row-major), into VNNI tiles where the CPU has them and `n` fills
    /// whole tiles. `None` when `k` is not a multiple of [`BLOCK`].
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        let tiles = vnni::available() && n.is_multiple_of(vnni::TILE_ROWS);
        #[cfg(not(target_arch = "x86_64"))]
        let tiles = false;
        Self::quantize_into(w, n, k, tiles)
    }

    fn quantize_into(w: &[f32], n: usize, k: usize, tiles: bool) -> Option<Self> {
        if !k.is_multiple_of(BLOCK) || w.len() != n * k {
            return None;
        }
        let rows = Q8Rows::quantize(w, k);
        #[cfg(target_arch = "x86_64")]
        if tiles {
            return Some(Self {
                n,
                layout: Layout::Tiles(vnni::Tiles::pack(&rows, n)),
            });
        }
        debug_assert!(!tiles, "tiles need x86_64");
        Some(Self {
            n,
            layout: Layout::Rows(rows),
        })
    }

    pub fn out_dim(&self) -> usize {
        self.n
    }

    /// `x`: [m, k] row-major → `x Wᵀ`: [m, n] row-major. A row's result does not depend on the
    /// rows beside it.
    ///
    /// Any number of rows: at 48 rows (a prefill) the AVX2 kernel beat f32 gemm on dequantized
    /// weight tiles by 1.2–1.4× on an AVX2 Zen CPU, alternated in one session.
    pub fn matmul_wt(&self, x: &[f32], m: usize) -> Vec<f32> {
        match &self.layout {
            Layout::Rows(rows) => {
                let k = rows.k;
                assert_eq!(x.len(), m * k, "input rows of {k} values");
                let input = Q8Rows::quantize(x, k);
                by_weight_rows(m, self.n, |j, y| {
                    let (w, w_scales) = rows.rows_from(j);
                    let (w, w_scales) = (&w[..k], &w_scales[..k / BLOCK]);
                    for (g, y) in y.chunks_mut(MAX_GROUP).enumerate() {
                        let (xq, xs) = input.rows_from(g * MAX_GROUP);
                        dot_group(xq, xs, w, w_scales, y);
                    }
                })
            }
            #[cfg(target_arch = "x86_64")]
            Layout::Tiles(tiles) => {
                let k = tiles.k;
                assert_eq!(x.len(), m * k, "input rows of {k} values");
                tiles.matmul_wt(x, m, self.n)
            }
        }
    }
}

/// `x` ([m, k]) quantized to Q8_0 and back: the inputs the kernels multiply.
#[cfg(test)]
pub(crate) fn dequantized_q8_0(x: &[f32], k: usize) -> Vec<f32> {
    let q = Q8Rows::quantize(x, k);
    q.values
        .iter()
        .enumerate()
        .map(|(i, &v)| v as f32 * q.scales[i / BLOCK])
        .collect()
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

/// The AVX-512 VNNI kernel and its weight layouts: Q8_0, and Q4_K for `model::q4k` (the same
/// tiles and input quantization, weights as nibbles).
#[cfg(target_arch = "x86_64")]
pub(super) mod vnni {
    use super::{Q8Rows, BLOCK};
    use crate::model::gemv::SendPtr;
    use half::f16;
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// Weight rows per tile: one 512-bit vector of i32 sums.
    pub const TILE_ROWS: usize = 16;
    /// Bytes of one tile's block: 32 values of 16 rows.
    const TILE_BLOCK: usize = BLOCK * TILE_ROWS;
    /// Tiles per parallel task at least (as the f32 kernel's 32 weight rows).
    const TILES_PER_TASK: usize = 2;
    /// Input rows per pass over a tile: 12 accumulators of each kind fit AVX-512's 32 registers.
    const GROUP: usize = 12;
    /// Rows from which one `vpdpbusd` chain per row keeps the unit busy.
    const ONE_CHAIN_FROM: usize = 5;

    pub fn available() -> bool {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("f16c")
            && std::is_x86_feature_detected!("avx512vnni")
    }

    /// `[n, k]` as tiles of 16 rows, block by block (32 values of each row), in one of two
    /// formats ([`TileScales`]).
    #[derive(Debug, Clone)]
    pub struct Tiles {
        pub k: usize,
        values: Vec<u8>,
        scales: TileScales,
    }

    /// How a tile's blocks are stored and scaled.
    #[derive(Debug, Clone)]
    enum TileScales {
        /// Q8_0: per block the 32 values of each row in groups of 4 (`[group 8][row 16][4]`, so
        /// a 64-byte load holds one group of every row), stored as `value + 128` (`vpdpbusd`
        /// multiplies unsigned by signed bytes); here the 16 row scales per block in f16, as
        /// quantized.
        Q8(Vec<f16>),
        /// Q4_K: per block the groups in pairs, `[pair 4][row 16][4]` bytes holding group 2p in
        /// the low nibbles and 2p+1 in the high ones (values 0..15, as stored); here per block
        /// the 16 rows' 6-bit scales then mins (`[2][row 16]` bytes), and per super-block of 8
        /// blocks the rows' `d` then `dmin / 128` (`[2][row 16]` f32), so a row's value is
        /// `d·scale·q − dmin·min`, exactly candle's dequantization.
        Q4K { scales_mins: Vec<u8>, d_dmin: Vec<f32> },
    }

    /// Blocks per Q4_K super-block.
    pub const SUPER_BLOCKS: usize = 8;

    impl Tiles {
        pub(super) fn pack(rows: &Q8Rows, n: usize) -> Self {
            let k = rows.k;
            let blocks = k / BLOCK;
            let mut values = vec![0u8; n * k];
            let mut scales = vec![f16::ZERO; n * blocks];
            for j in 0..n {
                let (tile, r) = (j / TILE_ROWS, j % TILE_ROWS);
                let (w, w_scales) = rows.rows_from(j);
                for b in 0..blocks {
                    let at = (tile * blocks + b) * TILE_BLOCK;
                    for (i, &v) in w[b * BLOCK..(b + 1) * BLOCK].iter().enumerate() {
                        values[at + (i / 4 * TILE_ROWS + r) * 4 + i % 4] = (v as i16 + 128) as u8;
                    }
                    // The scale was rounded to f16 when quantized: this is lossless.
                    scales[(tile * blocks + b) * TILE_ROWS + r] = f16::from_f32(w_scales[b]);
                }
            }
            Self {
                k,
                values,
                scales: TileScales::Q8(scales),
            }
        }

        /// Tiles of `n` rows of `k` values (a multiple of 256) given as Q4_K super-blocks:
        /// `block(j, s)` is row j's super-block s (its `d`, `dmin`, 8 scale/min pairs and the
        /// 256 values 0..15 in order).
        pub fn pack_q4k(n: usize, k: usize, block: impl Fn(usize, usize) -> Q4kBlock) -> Self {
            let blocks = k / BLOCK;
            let supers = blocks / SUPER_BLOCKS;
            let mut values = vec![0u8; n * k / 2];
            let mut scales_mins = vec![0u8; n * blocks * 2];
            let mut d_dmin = vec![0f32; n * supers * 2];
            for j in 0..n {
                let (tile, r) = (j / TILE_ROWS, j % TILE_ROWS);
                for s in 0..supers {
                    let q = block(j, s);
                    let at = (tile * supers + s) * 2 * TILE_ROWS;
                    d_dmin[at + r] = q.d;
                    d_dmin[at + TILE_ROWS + r] = q.dmin / 128.0;
                    for (sub, (&scale, &min)) in q.scales.iter().zip(&q.mins).enumerate() {
                        let b = s * SUPER_BLOCKS + sub;
                        let at = (tile * blocks + b) * 2 * TILE_ROWS;
                        (scales_mins[at + r], scales_mins[at + TILE_ROWS + r]) = (scale, min);
                        let nibbles = &q.values[sub * BLOCK..(sub + 1) * BLOCK];
                        let at = (tile * blocks + b) * TILE_BLOCK / 2;
                        for pair in 0..4 {
                            for i in 0..4 {
                                let (lo, hi) = (nibbles[8 * pair + i], nibbles[8 * pair + 4 + i]);
                                values[at + (pair * TILE_ROWS + r) * 4 + i] = lo | hi << 4;
                            }
                        }
                    }
                }
            }
            Self {
                k,
                values,
                scales: TileScales::Q4K { scales_mins, d_dmin },
            }
        }

        /// `x Wᵀ`: [m, n] row-major for the `m` rows of `x` ([m, k]). Tasks own a few whole
        /// tiles and write their 16 columns of every output row.
        pub fn matmul_wt(&self, x: &[f32], m: usize, n: usize) -> Vec<f32> {
            let blocks = self.k / BLOCK;
            // Groups of at most GROUP rows, as even as possible (16 rows: 8 + 8).
            let per_group = m.div_ceil(m.div_ceil(GROUP));
            let input = Input::quantize(x, self.k, per_group);
            // Every element is written below (the tiles cover all n columns of every row):
            // zeroing first cost ~1 % of a batch-10 step in `memset`.
            assert!(n.is_multiple_of(TILE_ROWS), "whole tiles");
            let mut y = Vec::<f32>::with_capacity(m * n);
            let out = SendPtr(y.as_mut_ptr());
            (0..n / TILE_ROWS)
                .into_par_iter()
                .with_min_len(TILES_PER_TASK)
                .for_each(|tile| {
                    let weights = self.tile(tile);
                    for r0 in (0..m).step_by(per_group) {
                        let rows = per_group.min(m - r0);
                        // SAFETY: AVX-512 F/BW/VNNI were detected before packing; `weights` holds
                        // `blocks` blocks of this tile, the group holds `rows` input rows, and
                        // this task alone writes columns tile·16.. of `y` ([m, n]).
                        unsafe {
                            let (x, y) = (input.group(r0, rows), out.get().add(r0 * n + tile * TILE_ROWS));
                            match weights {
                                TileRef::Q8 { .. } => tile_dot_rows::<false>(rows, weights, blocks, x, y, n),
                                TileRef::Q4K { .. } => tile_dot_rows::<true>(rows, weights, blocks, x, y, n),
                            }
                        }
                    }
                });
            // SAFETY: the tasks above wrote all m·n elements.
            unsafe { y.set_len(m * n) };
            y
        }

        /// Tile `tile`'s part of the weights.
        fn tile(&self, tile: usize) -> TileRef<'_> {
            let blocks = self.k / BLOCK;
            let at = tile * blocks;
            match &self.scales {
                TileScales::Q8(scales) => TileRef::Q8 {
                    values: &self.values[at * TILE_BLOCK..(at + blocks) * TILE_BLOCK],
                    scales: &scales[at * TILE_ROWS..(at + blocks) * TILE_ROWS],
                },
                TileScales::Q4K { scales_mins, d_dmin } => {
                    let supers = blocks / SUPER_BLOCKS;
                    TileRef::Q4K {
                        values: &self.values[at * TILE_BLOCK / 2..(at + blocks) * TILE_BLOCK / 2],
                        scales_mins: &scales_mins[at * 2 * TILE_ROWS..(at + blocks) * 2 * TILE_ROWS],
                        d_dmin: &d_dmin[tile * supers * 2 * TILE_ROWS..(tile + 1) * supers * 2 * TILE_ROWS],
                    }
                }
            }
        }
    }

    /// One Q4_K super-block of one weight row, unpacked.
    pub struct Q4kBlock {
        pub d: f32,
        pub dmin: f32,
        pub scales: [u8; SUPER_BLOCKS],
        pub mins: [u8; SUPER_BLOCKS],
        /// The 256 stored values (0..15).
        pub values: [u8; SUPER_BLOCKS * BLOCK],
    }

    /// One tile's weights ([`TileScales`]).
    #[derive(Clone, Copy)]
    enum TileRef<'a> {
        Q8 {
            values: &'a [u8],
            scales: &'a [f16],
        },
        Q4K {
            values: &'a [u8],
            scales_mins: &'a [u8],
            d_dmin: &'a [f32],
        },
    }

    /// [`tile_dot`] for a group of `rows` (1..=[`GROUP`]) input rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_dot_rows<const Q4: bool>(
        rows: usize,
        w: TileRef,
        blocks: usize,
        x: Group,
        y: *mut f32,
        stride: usize,
    ) {
        match rows {
            12 => tile_dot::<12, Q4>(w, blocks, x, y, stride),
            11 => tile_dot::<11, Q4>(w, blocks, x, y, stride),
            10 => tile_dot::<10, Q4>(w, blocks, x, y, stride),
            9 => tile_dot::<9, Q4>(w, blocks, x, y, stride),
            8 => tile_dot::<8, Q4>(w, blocks, x, y, stride),
            7 => tile_dot::<7, Q4>(w, blocks, x, y, stride),
            6 => tile_dot::<6, Q4>(w, blocks, x, y, stride),
            5 => tile_dot::<5, Q4>(w, blocks, x, y, stride),
            4 => tile_dot::<4, Q4>(w, blocks, x, y, stride),
            3 => tile_dot::<3, Q4>(w, blocks, x, y, stride),
            2 => tile_dot::<2, Q4>(w, blocks, x, y, stride),
            _ => tile_dot::<1, Q4>(w, blocks, x, y, stride),
        }
    }

    /// Input rows in Q8_0, grouped as the kernel takes them: within a group of rows, block by
    /// block, the rows side by side (`[block][row][32]`), so one base pointer and constant
    /// offsets reach every row's values, scale and offset.
    struct Input {
        k: usize,
        values: Vec<i8>,
        /// Per group `[block][row]`.
        scales: Vec<f32>,
        /// `−128 · Σ values` per block, per group `[block][row]`: where each `vpdpbusd` chain
        /// starts, which takes back the `+ 128` of the weights.
        offsets: Vec<i32>,
    }

    /// One group's part of [`Input`].
    struct Group<'a> {
        values: &'a [i8],
        scales: &'a [f32],
        offsets: &'a [i32],
    }

    impl Input {
        /// `x` ([m, k]) in groups of `per_group` rows (the last one maybe fewer).
        fn quantize(x: &[f32], k: usize, per_group: usize) -> Self {
            let m = x.len() / k;
            let mut input = Self {
                k,
                values: vec![0i8; x.len()],
                scales: vec![0f32; m * k / BLOCK],
                offsets: vec![0i32; m * k / BLOCK],
            };
            // SAFETY: `available` (AVX-512 F/BW, F16C) was checked before any tile was packed.
            unsafe { input.fill(x, per_group) };
            input
        }

        /// Fills the groups block by block with [`quantize_block_avx512`].
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        unsafe fn fill(&mut self, x: &[f32], per_group: usize) {
            let (m, blocks) = (x.len() / self.k, self.k / BLOCK);
            for (r, row) in x.chunks_exact(self.k).enumerate() {
                let r0 = r - r % per_group;
                let rows = per_group.min(m - r0);
                for (b, v) in row.chunks_exact(BLOCK).enumerate() {
                    let at = r0 * blocks + b * rows + r % per_group;
                    let q = &mut self.values[at * BLOCK..(at + 1) * BLOCK];
                    (self.scales[at], self.offsets[at]) = quantize_block_avx512(v, q);
                }
            }
        }

        /// The group of `rows` rows from row `r0` on.
        fn group(&self, r0: usize, rows: usize) -> Group<'_> {
            let (at, len) = (r0 * self.k / BLOCK, rows * self.k / BLOCK);
            Group {
                values: &self.values[at * BLOCK..(at + len) * BLOCK],
                scales: &self.scales[at..at + len],
                offsets: &self.offsets[at..at + len],
            }
        }
    }

    /// `quantize_block` on AVX-512 registers, returning the stored scale and `−128 · Σ values`:
    /// the same rounding (`round` is half away from zero: truncation after adding ½ − ulp with
    /// the value's sign, as LLVM lowers it), the scale through F16C's round-to-nearest-even as
    /// `half` does. Written out because the compiled `quantize_block` (a saturating cast and a
    /// software f16 conversion per block) took ~4 % of a batch-10 step.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    pub(super) unsafe fn quantize_block_avx512(v: &[f32], q: &mut [i8]) -> (f32, i32) {
        assert!(v.len() == BLOCK && q.len() == BLOCK);
        let (lo, hi) = (_mm512_loadu_ps(v.as_ptr()), _mm512_loadu_ps(v.as_ptr().add(16)));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let half_down = _mm512_castps_si512(_mm512_set1_ps(0.499_999_97));
        let sign = _mm512_set1_epi32(i32::MIN);
        let round = |x: __m512| {
            let scaled = _mm512_mul_ps(x, _mm512_set1_ps(id));
            // ½ − ulp carrying the sign of `scaled` (integer ops: the float ones need AVX-512 DQ).
            let bias = _mm512_or_si512(half_down, _mm512_and_si512(_mm512_castps_si512(scaled), sign));
            _mm512_cvttps_epi32(_mm512_add_ps(scaled, _mm512_castsi512_ps(bias)))
        };
        let (qlo, qhi) = (round(lo), round(hi));
        _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(qlo));
        _mm_storeu_si128(q.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtepi32_epi8(qhi));
        let stored = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(d))));
        (stored, -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)))
    }

    /// `y[r·stride + jj] = Σ_b dx_rb · dw_jj,b · Σ_{i∈b} xq_ri · wq_jj,i` for `R` input rows and the 16
    /// rows of one tile. Per block and input row: the 4-value groups of x broadcast to all lanes,
    /// `vpdpbusd` chains (two per row, even and odd groups, while there are too few rows to
    /// hide the instruction's latency; one from [`ONE_CHAIN_FROM`] rows, which leaves registers
    /// for up to [`GROUP`] rows), then the integer dot scaled by dw·dx into an f32 accumulator.
    /// Q8_0 (`Q4` false): the chains start from −128·Σx, which takes back the weights' `+ 128`.
    /// Q4_K: the chains start from 0, a 64-byte load holds two groups as nibbles, dw is
    /// `d·scale` and `dmin·min·dx·Σx` is taken off after the scaling (the input's −128·Σx times
    /// the stored `dmin / 128`). The group's rows sit side by side per block ([`Input`]):
    /// constant offsets from one pointer, where a pointer per row spilled registers into ~40
    /// scalar instructions a block (at 10 rows, 24 layers streamed, min of 15 on a Zen 4:
    /// 19.6 ms; the old layout with the prefetch 26.7–27.6 ms, without it 30.5–34.8).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_dot<const R: usize, const Q4: bool>(
        w: TileRef,
        blocks: usize,
        x: Group,
        y: *mut f32,
        stride: usize,
    ) {
        assert!(x.values.len() == R * blocks * BLOCK && x.scales.len() == R * blocks && x.offsets.len() == R * blocks);
        let (values, block_bytes) = match w {
            TileRef::Q8 { values, scales } => {
                assert!(!Q4 && scales.len() == blocks * TILE_ROWS);
                (values, TILE_BLOCK)
            }
            TileRef::Q4K {
                values,
                scales_mins,
                d_dmin,
            } => {
                assert!(Q4 && scales_mins.len() == blocks * 2 * TILE_ROWS);
                assert!(d_dmin.len() == blocks / SUPER_BLOCKS * 2 * TILE_ROWS);
                (values, TILE_BLOCK / 2)
            }
        };
        assert!(values.len() == blocks * block_bytes);
        let wp = values.as_ptr();
        let nibble = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let (xb, sb, ob) = (
                x.values.as_ptr().add(b * R * BLOCK),
                x.scales.as_ptr().add(b * R),
                x.offsets.as_ptr().add(b * R),
            );
            let mut even = [_mm512_setzero_si512(); R];
            let mut odd = [_mm512_setzero_si512(); R];
            if !Q4 {
                for (r, e) in even.iter_mut().enumerate() {
                    *e = _mm512_set1_epi32(*ob.add(r));
                }
            }
            let wb = wp.add(b * block_bytes);
            // Four blocks ahead (a tile's blocks, and the task's next tile, lie one after
            // another): from 4 rows on the hardware prefetcher falls behind a pass's compute, and
            // on a 2-core Xeon it did at 1 and 2 rows too (24 streamed layers, min of 9
            // alternated: 1 row Q4_K 15.8 → 12.9 ms, Q8_0 19.6 → 18.8; 2 rows 19.2 → 16.0,
            // 28.2 → 23.0; 4 and 10 rows unchanged).
            for line in 0..block_bytes / 64 {
                _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(4 * block_bytes + 64 * line) as *const i8);
            }
            for g in 0..4 {
                let (w0, w1) = if Q4 {
                    let v = _mm512_loadu_si512(wb.add(64 * g) as *const _);
                    (
                        _mm512_and_si512(v, nibble),
                        _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble),
                    )
                } else {
                    (
                        _mm512_loadu_si512(wb.add(128 * g) as *const _),
                        _mm512_loadu_si512(wb.add(128 * g + 64) as *const _),
                    )
                };
                for r in 0..R {
                    let xg = xb.add(r * BLOCK + 8 * g);
                    let x0 = _mm512_set1_epi32((xg as *const i32).read_unaligned());
                    let x1 = _mm512_set1_epi32((xg.add(4) as *const i32).read_unaligned());
                    if R < ONE_CHAIN_FROM {
                        even[r] = _mm512_dpbusd_epi32(even[r], w0, x0);
                        odd[r] = _mm512_dpbusd_epi32(odd[r], w1, x1);
                    } else {
                        even[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(even[r], w0, x0), w1, x1);
                    }
                }
            }
            match w {
                TileRef::Q8 { scales, .. } => {
                    let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.as_ptr().add(b * TILE_ROWS) as *const __m256i));
                    for r in 0..R {
                        let dots = _mm512_cvtepi32_ps(_mm512_add_epi32(even[r], odd[r]));
                        acc[r] = _mm512_fmadd_ps(dots, _mm512_mul_ps(dw, _mm512_set1_ps(*sb.add(r))), acc[r]);
                    }
                }
                TileRef::Q4K {
                    scales_mins, d_dmin, ..
                } => {
                    let sm = scales_mins.as_ptr().add(b * 2 * TILE_ROWS);
                    let dd = d_dmin.as_ptr().add(b / SUPER_BLOCKS * 2 * TILE_ROWS);
                    let widen =
                        |p: *const u8| _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i)));
                    let dw = _mm512_mul_ps(_mm512_loadu_ps(dd), widen(sm));
                    let dmin = _mm512_mul_ps(_mm512_loadu_ps(dd.add(TILE_ROWS)), widen(sm.add(TILE_ROWS)));
                    for r in 0..R {
                        let dx = *sb.add(r);
                        let dots = _mm512_cvtepi32_ps(_mm512_add_epi32(even[r], odd[r]));
                        acc[r] = _mm512_fmadd_ps(dots, _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc[r]);
                        acc[r] = _mm512_fmadd_ps(dmin, _mm512_set1_ps(dx * *ob.add(r) as f32), acc[r]);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(y.add(r * stride), *a);
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

    /// The same quantization as candle's Q8_0 `QMatMul`, so the products agree up to float
    /// summation order (and with the portable loop), in both layouts; a row's result does not
    /// depend on the rows beside it.
    #[test]
    fn matches_candle_q8_0() -> candle_core::Result<()> {
        #[cfg(target_arch = "x86_64")]
        let vnni = vnni::available();
        #[cfg(not(target_arch = "x86_64"))]
        let vnni = false;
        let layouts: &[bool] = if vnni { &[false, true] } else { &[false] };
        // One and several blocks, several tasks; AVX2 groups of 8 and fewer, tile groups of 12
        // and fewer (17 rows: 9 + 8; 48: four of 12); tiles need whole tiles of 16 weight rows.
        let shapes = [
            (1, 1024, 70),
            (3, 96, 5),
            (10, 160, 33),
            (1, 1024, 80),
            (10, 160, 48),
            (17, 2048, 64),
            (48, 32, 80),
        ];
        for (m, k, n) in shapes {
            let (x, w) = inputs(m, k, n);
            let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu)?;
            let candle = QMatMul::from_qtensor(QTensor::quantize(&wt, GgmlDType::Q8_0)?)?;
            let want = candle.forward(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?)?;
            let want = want.flatten_all()?.to_vec1::<f32>()?;
            let (input, weights) = (Q8Rows::quantize(&x, k), Q8Rows::quantize(&w, k));
            let whole_tiles = n.is_multiple_of(16);
            let candle_q8k = vnni && whole_tiles;
            for &tiles in layouts {
                if tiles && !whole_tiles {
                    continue;
                }
                let q = Q8Weight::quantize_into(&w, n, k, tiles).expect("whole blocks");
                let ours = q.matmul_wt(&x, m);
                let last = q.matmul_wt(&x[(m - 1) * k..], 1);
                assert_eq!(
                    last,
                    ours[(m - 1) * n..],
                    "m{m} k{k} n{n} tiles {tiles}: last row alone"
                );
                for j in 0..n {
                    let (wq, ws) = weights.rows_from(j);
                    let mut plain = vec![0f32; m];
                    dot_portable(&input.values, &input.scales, &wq[..k], &ws[..k / BLOCK], &mut plain);
                    for i in 0..m {
                        let (got, want) = (ours[i * n + j], want[i * n + j]);
                        // Where `n` fills its tiles, candle on an AVX-512 VNNI CPU quantizes the
                        // input per 256 values (Q8K): another product, compared only elsewhere.
                        assert!(
                            candle_q8k || (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "m{m} k{k} n{n} tiles {tiles} [{i},{j}]: {got} vs candle {want}"
                        );
                        assert!(
                            (got - plain[i]).abs() <= 1e-5 * (1.0 + plain[i].abs()),
                            "m{m} k{k} n{n} tiles {tiles} [{i},{j}]: {got} vs portable {}",
                            plain[i]
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The AVX-512 quantizer stores the same values, scale and sum as `quantize_block`, ties
    /// (x / d = k + ½) and a zero block included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_block_quantizer_matches() {
        if !vnni::available() {
            return;
        }
        let ties: Vec<f32> = (0..BLOCK)
            .map(|i| if i == 0 { 127.0 } else { i as f32 - 16.5 })
            .collect();
        let zeros = vec![0f32; BLOCK];
        let (mixed, _) = inputs(4, BLOCK, 1);
        for v in [&ties[..], &zeros, &mixed[..BLOCK], &mixed[2 * BLOCK..3 * BLOCK]] {
            let (mut want, mut got) = ([0i8; BLOCK], [0i8; BLOCK]);
            let scale = quantize_block(v, &mut want);
            // SAFETY: `available` checked the features.
            let (stored, offset) = unsafe { vnni::quantize_block_avx512(v, &mut got) };
            assert_eq!((got, stored), (want, scale));
            assert_eq!(offset, -128 * want.iter().map(|&q| q as i32).sum::<i32>());
        }
    }

    #[test]
    fn partial_blocks_are_refused() {
        assert!(Q8Weight::quantize(&[0.0; 48], 1, 48).is_none());
    }
}
