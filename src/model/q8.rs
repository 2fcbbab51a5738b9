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
    let d = amax(v) / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    round_block(v, id, q);
    f16::from_f32(d).to_f32()
}

/// `max |v|` over a multiple of 8 values.
#[inline(always)]
fn amax(v: &[f32]) -> f32 {
    // Eight running maxima, not one: `max` is exact in any order, and independent lanes
    // vectorize where one chain of `max` would run serially.
    let mut lanes = [0f32; 8];
    for c in v.chunks_exact(8) {
        for (m, x) in lanes.iter_mut().zip(c) {
            *m = m.max(x.abs());
        }
    }
    lanes.iter().fold(0f32, |m, &x| m.max(x))
}

/// `q = round(v · id)` for one block, returning `Σ q`.
#[inline(always)]
fn round_block(v: &[f32], id: f32, q: &mut [i8]) -> i32 {
    let mut sum = 0;
    for (q, &x) in q.iter_mut().zip(v) {
        *q = (x * id).round() as i8;
        sum += *q as i32;
    }
    sum
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
    Tiles(tiles::Tiles),
}

impl Q8Weight {
    /// Quantizes `w` ([n, k] row-major), into VNNI tiles where the CPU has them and `n` fills
    /// whole tiles. `None` when `k` is not a multiple of [`BLOCK`].
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        let tiles = tiles::vnni() && n.is_multiple_of(tiles::TILE_ROWS);
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
                layout: Layout::Tiles(tiles::Tiles::pack(&rows, n)),
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

/// Weights in tiles of 16 rows and their kernels: Q8_0 and Q4_K (for `model::q4k`: the same
/// tiles, weights as nibbles, inputs quantized per 256 values) on AVX-512 VNNI's `vpdpbusd`, and
/// Q4_K on AVX2 alone. Q8_0 has no AVX2 tile kernel: AVX2's `vpmaddubsw` saturates its 16-bit
/// pair sums for full-range bytes on both sides, which the row kernel's sign trick avoids, while
/// Q4_K's nibbles (0..15) keep even eight of its pair sums exact in 16 bits.
#[cfg(target_arch = "x86_64")]
pub(super) mod tiles {
    use super::{amax, round_block, Q8Rows, BLOCK};
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
    /// The same for the AVX2 Q4_K kernel (four accumulators a row, in 16 registers and on the
    /// stack): 3, 4 and 5 measured alike at 10 rows; 5 makes the fewest passes over a tile.
    const GROUP_AVX2: usize = 5;
    /// Weight rows of a tile per AVX2 vector of i32 sums: the kernel takes a tile in two halves.
    const HALF: usize = TILE_ROWS / 2;
    /// Rows from which one `vpdpbusd` chain per row keeps the unit busy.
    const ONE_CHAIN_FROM: usize = 5;
    /// Blocks per Q4_K super-block.
    pub const SUPER_BLOCKS: usize = 8;
    /// Values per Q4_K super-block, and per input scale in the Q4_K kernel.
    const SUPER_BLOCK: usize = SUPER_BLOCKS * BLOCK;

    /// Whether this CPU has AVX-512 F/BW/VNNI and F16C: both formats on `vpdpbusd`.
    pub fn vnni() -> bool {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("f16c")
            && std::is_x86_feature_detected!("avx512vnni")
    }

    /// Whether this CPU runs Q4_K tiles: with [`vnni`], or on AVX2 and FMA.
    pub fn q4k() -> bool {
        vnni() || (std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"))
    }

    /// `[n, k]` as tiles of 16 rows, block by block (32 values of each row), in one of two
    /// formats ([`TileScales`]).
    #[derive(Debug, Clone)]
    pub struct Tiles {
        pub k: usize,
        values: Lines,
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
        /// the low nibbles and 2p+1 in the high ones (values 0..15, as stored). `scales`: per
        /// block the 16 rows' 6-bit scales; `mins`: per super-block the rows' 6-bit mins by pairs
        /// of blocks (`[pair 4][row 16][2]`, widened to the i16 pairs `vpdpwssd` takes);
        /// `d_dmin`: per super-block the rows' `d` then `dmin` (`[2][row 16]`). A row's value is
        /// `d·scale·q − dmin·min`, exactly candle's dequantization.
        Q4K {
            scales: Vec<u8>,
            mins: Vec<u8>,
            d_dmin: Vec<f32>,
        },
    }

    impl Tiles {
        pub(super) fn pack(rows: &Q8Rows, n: usize) -> Self {
            let k = rows.k;
            let blocks = k / BLOCK;
            let mut values = Lines::zeroed(n * k);
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
            let mut values = Lines::zeroed(n * k / 2);
            let mut scales = vec![0u8; n * blocks];
            let mut mins = vec![0u8; n * blocks];
            let mut d_dmin = vec![0f32; n * supers * 2];
            for j in 0..n {
                let (tile, r) = (j / TILE_ROWS, j % TILE_ROWS);
                for s in 0..supers {
                    let q = block(j, s);
                    let at = (tile * supers + s) * 2 * TILE_ROWS;
                    (d_dmin[at + r], d_dmin[at + TILE_ROWS + r]) = (q.d, q.dmin);
                    for (sub, (&scale, &min)) in q.scales.iter().zip(&q.mins).enumerate() {
                        let b = s * SUPER_BLOCKS + sub;
                        scales[(tile * blocks + b) * TILE_ROWS + r] = scale;
                        let pair = (tile * supers + s) * SUPER_BLOCKS / 2 + sub / 2;
                        mins[(pair * TILE_ROWS + r) * 2 + sub % 2] = min;
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
                scales: TileScales::Q4K { scales, mins, d_dmin },
            }
        }

        /// `x Wᵀ`: [m, n] row-major for the `m` rows of `x` ([m, k]). Tasks own a few whole
        /// tiles and write their 16 columns of every output row.
        pub fn matmul_wt(&self, x: &[f32], m: usize, n: usize) -> Vec<f32> {
            self.matmul_wt_on(x, m, n, vnni())
        }

        /// [`Self::matmul_wt`] on the VNNI kernels, or with `vnni` false on the AVX2 one (Q8_0
        /// tiles are packed only with VNNI; Q4_K tiles also without, see [`q4k`]): the tests
        /// run both on a VNNI CPU.
        pub(super) fn matmul_wt_on(&self, x: &[f32], m: usize, n: usize, vnni: bool) -> Vec<f32> {
            let blocks = self.k / BLOCK;
            // Groups of at most `group` rows, as even as possible (16 rows on VNNI: 8 + 8).
            let group = if vnni { GROUP } else { GROUP_AVX2 };
            let per_group = m.div_ceil(m.div_ceil(group));
            let format = match self.scales {
                TileScales::Q8(_) => InputFormat::Q8,
                TileScales::Q4K { .. } => InputFormat::Q8K,
            };
            let input = Input::quantize(x, self.k, per_group, format, vnni);
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
                        // SAFETY: AVX-512 F/BW/VNNI were detected, or AVX2 and FMA for Q4_K
                        // tiles (`q4k`, checked before packing them); `weights` holds `blocks`
                        // blocks of this tile, the group holds `rows` input rows in the tile's
                        // format, and this task alone writes columns tile·16.. of `y` ([m, n]).
                        unsafe {
                            let (x, y) = (input.group(r0, rows), out.get().add(r0 * n + tile * TILE_ROWS));
                            match vnni {
                                true => tile_dot_rows(rows, weights, blocks, x, y, n),
                                false => q4k_rows_avx2(rows, weights, blocks, x, y, n),
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
                TileScales::Q4K { scales, mins, d_dmin } => {
                    let supers = blocks / SUPER_BLOCKS;
                    let per_tile = supers * 2 * TILE_ROWS;
                    TileRef::Q4K(Q4kTile {
                        values: &self.values[at * TILE_BLOCK / 2..(at + blocks) * TILE_BLOCK / 2],
                        scales: &scales[at * TILE_ROWS..(at + blocks) * TILE_ROWS],
                        mins: &mins[at * TILE_ROWS..(at + blocks) * TILE_ROWS],
                        d_dmin: &d_dmin[tile * per_tile..(tile + 1) * per_tile],
                    })
                }
            }
        }
    }

    /// Bytes in whole 64-byte cache lines from a line boundary, as the tiles' values: every
    /// 64-byte load of the kernels then reads one line, where from a plain `Vec<u8>` (16 bytes
    /// past a line from the allocator) it straddled two. Hand-written: a line type and a view
    /// of it as bytes are all it takes.
    #[derive(Debug, Clone)]
    struct Lines(Vec<Line>);

    #[derive(Debug, Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([u8; 64]);

    impl Lines {
        fn zeroed(bytes: usize) -> Self {
            assert!(bytes.is_multiple_of(64), "whole lines");
            Self(vec![Line([0; 64]); bytes / 64])
        }
    }

    impl std::ops::Deref for Lines {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            // SAFETY: `Line` is 64 bytes without padding; the lines are contiguous.
            unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u8, self.0.len() * 64) }
        }
    }

    impl std::ops::DerefMut for Lines {
        fn deref_mut(&mut self) -> &mut [u8] {
            // SAFETY: as `deref`, and every byte pattern is a valid `Line`.
            unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u8, self.0.len() * 64) }
        }
    }

    /// One Q4_K super-block of one weight row, unpacked.
    pub struct Q4kBlock {
        pub d: f32,
        pub dmin: f32,
        pub scales: [u8; SUPER_BLOCKS],
        pub mins: [u8; SUPER_BLOCKS],
        /// The 256 stored values (0..15).
        pub values: [u8; SUPER_BLOCK],
    }

    /// One tile's weights ([`TileScales`]).
    #[derive(Clone, Copy)]
    enum TileRef<'a> {
        Q8 { values: &'a [u8], scales: &'a [f16] },
        Q4K(Q4kTile<'a>),
    }

    /// One Q4_K tile's parts ([`TileScales::Q4K`]).
    #[derive(Clone, Copy)]
    struct Q4kTile<'a> {
        values: &'a [u8],
        scales: &'a [u8],
        mins: &'a [u8],
        d_dmin: &'a [f32],
    }

    impl Q4kTile<'_> {
        /// The tile's super-blocks, after checking that its parts hold `blocks` blocks and the
        /// group `x` as many for `rows` input rows.
        fn super_blocks(&self, blocks: usize, x: &Group, rows: usize) -> usize {
            let supers = blocks / SUPER_BLOCKS;
            assert!(self.values.len() == blocks * TILE_BLOCK / 2);
            assert!(self.scales.len() == blocks * TILE_ROWS && self.mins.len() == blocks * TILE_ROWS);
            assert!(self.d_dmin.len() == supers * 2 * TILE_ROWS);
            assert!(x.scales.len() == rows * supers && x.sums.len() == rows * supers * SUPER_BLOCKS / 2);
            supers
        }
    }

    /// [`tile_dot`] for a group of `rows` (1..=[`GROUP`]) input rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_dot_rows(rows: usize, w: TileRef, blocks: usize, x: Group, y: *mut f32, stride: usize) {
        match rows {
            12 => tile_dot::<12>(w, blocks, x, y, stride),
            11 => tile_dot::<11>(w, blocks, x, y, stride),
            10 => tile_dot::<10>(w, blocks, x, y, stride),
            9 => tile_dot::<9>(w, blocks, x, y, stride),
            8 => tile_dot::<8>(w, blocks, x, y, stride),
            7 => tile_dot::<7>(w, blocks, x, y, stride),
            6 => tile_dot::<6>(w, blocks, x, y, stride),
            5 => tile_dot::<5>(w, blocks, x, y, stride),
            4 => tile_dot::<4>(w, blocks, x, y, stride),
            3 => tile_dot::<3>(w, blocks, x, y, stride),
            2 => tile_dot::<2>(w, blocks, x, y, stride),
            _ => tile_dot::<1>(w, blocks, x, y, stride),
        }
    }

    /// How input rows are quantized for a tile format.
    #[derive(Clone, Copy, PartialEq)]
    enum InputFormat {
        /// Q8_0 (for Q8_0 weights): a scale per block of 32, as ggml's `vec_dot_q8_0_q8_0`.
        Q8,
        /// Q8_K (for Q4_K weights): a scale per 256 values, as candle's and ggml's Q4_K dot
        /// products, so one scale covers a weight super-block.
        Q8K,
    }

    /// Input rows quantized, grouped as the kernel takes them: within a group of rows, block by
    /// block, the rows side by side (`[block][row][32]`), so one base pointer and constant
    /// offsets reach every row's values, scale and sums.
    struct Input {
        k: usize,
        format: InputFormat,
        values: Vec<i8>,
        /// Per group, Q8_0: `[block][row]`; Q8_K: `[super-block][row]`.
        scales: Vec<f32>,
        /// Per group, Q8_0: `−128 · Σ values` per block (`[block][row]`), where each `vpdpbusd`
        /// chain starts, which takes back the `+ 128` of the weights. Q8_K: the blocks' `Σ
        /// values` in pairs (`[super-block][row][pair 4]`, block 2p in the low i16 and 2p+1 in
        /// the high one), which the Q4_K mins multiply.
        sums: Vec<i32>,
    }

    /// One group's part of [`Input`].
    struct Group<'a> {
        values: &'a [i8],
        scales: &'a [f32],
        sums: &'a [i32],
    }

    impl Input {
        /// `x` ([m, k]) in groups of `per_group` rows (the last one maybe fewer).
        /// With `vnni` false only Q8_K, on AVX2.
        fn quantize(x: &[f32], k: usize, per_group: usize, format: InputFormat, vnni: bool) -> Self {
            let m = x.len() / k;
            let mut input = Self {
                k,
                format,
                values: vec![0i8; x.len()],
                scales: vec![0f32; m * k / BLOCK],
                sums: vec![0i32; m * k / BLOCK],
            };
            input.scales.truncate(m * input.scales_per_row());
            input.sums.truncate(m * input.sums_per_row());
            // SAFETY: `vnni` (AVX-512 F/BW, F16C) or `q4k` (AVX2 and FMA, for Q8_K inputs) was
            // checked before any tile was packed.
            unsafe {
                match vnni {
                    true => input.fill_avx512(x, per_group),
                    false => input.fill_avx2(x, per_group),
                }
            }
            input
        }

        fn scales_per_row(&self) -> usize {
            match self.format {
                InputFormat::Q8 => self.k / BLOCK,
                InputFormat::Q8K => self.k / SUPER_BLOCK,
            }
        }

        fn sums_per_row(&self) -> usize {
            match self.format {
                InputFormat::Q8 => self.k / BLOCK,
                InputFormat::Q8K => self.k / BLOCK / 2,
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        unsafe fn fill_avx512(&mut self, x: &[f32], per_group: usize) {
            self.fill::<true>(x, per_group)
        }

        /// Q8_K only, with the portable block code compiled for AVX2 (the same values).
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fill_avx2(&mut self, x: &[f32], per_group: usize) {
            assert!(self.format == InputFormat::Q8K);
            self.fill::<false>(x, per_group)
        }

        /// Fills the groups: per block with [`quantize_block_avx512`], or per 256 values with
        /// [`q8k_scale`] and [`round_block_avx512`] (`AVX512`) or their portable twins.
        #[inline(always)]
        unsafe fn fill<const AVX512: bool>(&mut self, x: &[f32], per_group: usize) {
            let (m, blocks) = (x.len() / self.k, self.k / BLOCK);
            let (scales_per_row, sums_per_row) = (self.scales_per_row(), self.sums_per_row());
            for (r, row) in x.chunks_exact(self.k).enumerate() {
                let r0 = r - r % per_group;
                let rows = per_group.min(m - r0);
                let at_value = |b: usize| (r0 * blocks + b * rows + r % per_group) * BLOCK;
                match self.format {
                    InputFormat::Q8 => {
                        for (b, v) in row.chunks_exact(BLOCK).enumerate() {
                            let q = &mut self.values[at_value(b)..at_value(b) + BLOCK];
                            let at = r0 * scales_per_row + b * rows + r % per_group;
                            (self.scales[at], self.sums[at]) = quantize_block_avx512(v, q);
                        }
                    }
                    InputFormat::Q8K => {
                        for (s, v) in row.chunks_exact(SUPER_BLOCK).enumerate() {
                            let (d, id) = q8k_scale(if AVX512 { amax_avx512(v) } else { amax(v) });
                            self.scales[r0 * scales_per_row + s * rows + r % per_group] = d;
                            let mut pairs = [0u32; SUPER_BLOCKS / 2];
                            for (sub, v) in v.chunks_exact(BLOCK).enumerate() {
                                let at = at_value(s * SUPER_BLOCKS + sub);
                                let q = &mut self.values[at..at + BLOCK];
                                let sum = if AVX512 {
                                    round_block_avx512(v, id, q)
                                } else {
                                    round_block(v, id, q)
                                };
                                // |Σ| ≤ 32 · 127 fits an i16.
                                pairs[sub / 2] |= (sum as i16 as u16 as u32) << (16 * (sub % 2));
                            }
                            let at = r0 * sums_per_row + (s * rows + r % per_group) * SUPER_BLOCKS / 2;
                            for (dst, p) in self.sums[at..at + SUPER_BLOCKS / 2].iter_mut().zip(pairs) {
                                *dst = p as i32;
                            }
                        }
                    }
                }
            }
        }

        /// The group of `rows` rows from row `r0` on.
        fn group(&self, r0: usize, rows: usize) -> Group<'_> {
            let (scales, sums) = (self.scales_per_row(), self.sums_per_row());
            let at = r0 * self.k;
            Group {
                values: &self.values[at..at + rows * self.k],
                scales: &self.scales[r0 * scales..(r0 + rows) * scales],
                sums: &self.sums[r0 * sums..(r0 + rows) * sums],
            }
        }
    }

    /// `max |v|` over a multiple of 16 values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn amax_avx512(v: &[f32]) -> f32 {
        assert!(v.len().is_multiple_of(16));
        let mut m = _mm512_setzero_ps();
        for c in v.chunks_exact(16) {
            m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(c.as_ptr())));
        }
        _mm512_reduce_max_ps(m)
    }

    /// `q = round(v · id)` for one block (`round` half away from zero: truncation after adding
    /// ½ − ulp with the value's sign, as LLVM lowers `f32::round`), returning `Σ q`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn round_block_avx512(v: &[f32], id: f32, q: &mut [i8]) -> i32 {
        assert!(v.len() == BLOCK && q.len() == BLOCK);
        let half_down = _mm512_castps_si512(_mm512_set1_ps(0.499_999_97));
        let sign = _mm512_set1_epi32(i32::MIN);
        let round = |x: __m512| {
            let scaled = _mm512_mul_ps(x, _mm512_set1_ps(id));
            // ½ − ulp carrying the sign of `scaled` (integer ops: the float ones need AVX-512 DQ).
            let bias = _mm512_or_si512(half_down, _mm512_and_si512(_mm512_castps_si512(scaled), sign));
            _mm512_cvttps_epi32(_mm512_add_ps(scaled, _mm512_castsi512_ps(bias)))
        };
        let (lo, hi) = (
            round(_mm512_loadu_ps(v.as_ptr())),
            round(_mm512_loadu_ps(v.as_ptr().add(16))),
        );
        _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(lo));
        _mm_storeu_si128(q.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtepi32_epi8(hi));
        _mm512_reduce_add_epi32(_mm512_add_epi32(lo, hi))
    }

    /// `quantize_block` on AVX-512 registers, returning the stored scale and `−128 · Σ values`:
    /// the same rounding, the scale through F16C's round-to-nearest-even as `half` does.
    /// Written out because the compiled `quantize_block` (a saturating cast and a software f16
    /// conversion per block) took ~4 % of a batch-10 step.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    pub(super) unsafe fn quantize_block_avx512(v: &[f32], q: &mut [i8]) -> (f32, i32) {
        let d = amax_avx512(v) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let sum = round_block_avx512(v, id, q);
        let stored = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(d))));
        (stored, -128 * sum)
    }

    /// The scale `d` and its inverse `id` of 256 input values (`amax` their largest magnitude)
    /// in Q8_K, as candle's `BlockQ8K::from_float` up to the sign: it takes `id = −127 / v_max`
    /// for the value of largest magnitude and `d = 1 / id`, so its values are these
    /// (`round(v · 127 / |v|_max)`) times −sign(v_max), and its scale this one times
    /// −sign(v_max): the same products.
    fn q8k_scale(amax: f32) -> (f32, f32) {
        match amax {
            0.0 => (0.0, 0.0),
            amax => {
                let id = 127.0 / amax;
                (1.0 / id, id)
            }
        }
    }

    /// `y[r·stride + jj] = Σ_i x_ri · w_jj,i` for `R` input rows and the 16 rows of one tile,
    /// in the tile's format.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_dot<const R: usize>(w: TileRef, blocks: usize, x: Group, y: *mut f32, stride: usize) {
        assert!(x.values.len() == R * blocks * BLOCK);
        match w {
            TileRef::Q8 { values, scales } => q8_dot::<R>(values, scales, blocks, x, y, stride),
            TileRef::Q4K(w) => q4k_dot::<R>(w, blocks, x, y, stride),
        }
    }

    /// The integer dot products of one block for `R` input rows and the 16 weight rows of a
    /// tile: per 4-value group of x broadcast to all lanes, `vpdpbusd` chains from `start` (two
    /// per row, even and odd groups, while there are too few rows to hide the instruction's
    /// latency; one from [`ONE_CHAIN_FROM`] rows, which leaves registers for up to [`GROUP`]
    /// rows). `wb` is the block's weights (Q8_0 bytes, or with `NIBBLES` two groups in a
    /// 64-byte load), `xb` the group's rows side by side ([`Input`]): constant offsets from one
    /// pointer, where a pointer per row spilled registers into ~40 scalar instructions a block
    /// (at 10 rows, 24 layers streamed, min of 15 on a Zen 4: 19.6 ms; the old layout with the
    /// prefetch 26.7–27.6 ms, without it 30.5–34.8).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn block_dots<const R: usize, const NIBBLES: bool>(
        wb: *const u8,
        xb: *const i8,
        start: [__m512i; R],
    ) -> [__m512i; R] {
        let block_bytes = if NIBBLES { TILE_BLOCK / 2 } else { TILE_BLOCK };
        // Four blocks ahead (a tile's blocks, and the task's next tile, lie one after another):
        // from 4 rows on the hardware prefetcher falls behind a pass's compute, and on a 2-core
        // Xeon it did at 1 and 2 rows too (24 streamed layers, min of 9 alternated: 1 row Q4_K
        // 15.8 → 12.9 ms, Q8_0 19.6 → 18.8; 2 rows 19.2 → 16.0, 28.2 → 23.0; 4 and 10 rows
        // unchanged).
        for line in 0..block_bytes / 64 {
            _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(4 * block_bytes + 64 * line) as *const i8);
        }
        let nibble = _mm512_set1_epi8(0x0f);
        let mut even = start;
        let mut odd = [_mm512_setzero_si512(); R];
        for g in 0..4 {
            let (w0, w1) = if NIBBLES {
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
        std::array::from_fn(|r| _mm512_add_epi32(even[r], odd[r]))
    }

    /// Q8_0: `Σ_b dx_rb · dw_b · dot_rb`, the chains starting from `−128·Σx` (which takes back
    /// the weights' `+ 128`), each block's integer dots scaled by dw·dx into f32 accumulators.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn q8_dot<const R: usize>(
        values: &[u8],
        scales: &[f16],
        blocks: usize,
        x: Group,
        y: *mut f32,
        stride: usize,
    ) {
        assert!(values.len() == blocks * TILE_BLOCK && scales.len() == blocks * TILE_ROWS);
        assert!(x.scales.len() == R * blocks && x.sums.len() == R * blocks);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let (sb, ob) = (x.scales.as_ptr().add(b * R), x.sums.as_ptr().add(b * R));
            let start = std::array::from_fn(|r| _mm512_set1_epi32(*ob.add(r)));
            let dots = block_dots::<R, false>(
                values.as_ptr().add(b * TILE_BLOCK),
                x.values.as_ptr().add(b * R * BLOCK),
                start,
            );
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.as_ptr().add(b * TILE_ROWS) as *const __m256i));
            for r in 0..R {
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*sb.add(r)));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r]), scale, acc[r]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(y.add(r * stride), *a);
        }
    }

    /// Q4_K against Q8_K inputs: per super-block s, `dx_rs · (d · Σ_b scale_b · dot_rb −
    /// dmin · Σ_b min_b · Σx_rb)`. The blocks' dots are scaled by `d·scale` (one vector for all
    /// rows) into f32 accumulators; the mins term is integer (`vpdpwssd` over pairs of blocks)
    /// once per super-block; `dx` is applied once per super-block. Written this way because with
    /// an input scale per block each block and row took ~8 more vector instructions beside its
    /// 8 `vpdpbusd` (perf of a batch-10 q4_k step: 38 % of the kernel's samples on `vpdpbusd`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn q4k_dot<const R: usize>(w: Q4kTile, blocks: usize, x: Group, y: *mut f32, stride: usize) {
        let supers = w.super_blocks(blocks, &x, R);
        // The rows' sums between super-blocks, side by side: in `y` itself, whose rows lie a
        // multiple of 4 KiB apart for every projection of the model, the R rows share one L1
        // set, and past its 8 ways (a batch of 10) each super-block's loads of them missed.
        let mut sums = Sums([[0f32; TILE_ROWS]; GROUP]);
        for s in 0..supers {
            let d = _mm512_loadu_ps(w.d_dmin.as_ptr().add(s * 2 * TILE_ROWS));
            let dmin = _mm512_loadu_ps(w.d_dmin.as_ptr().add(s * 2 * TILE_ROWS + TILE_ROWS));
            let mut acc = [_mm512_setzero_ps(); R];
            for sub in 0..SUPER_BLOCKS {
                let b = s * SUPER_BLOCKS + sub;
                let dots = block_dots::<R, true>(
                    w.values.as_ptr().add(b * TILE_BLOCK / 2),
                    x.values.as_ptr().add(b * R * BLOCK),
                    [_mm512_setzero_si512(); R],
                );
                let block_scales = _mm_loadu_si128(w.scales.as_ptr().add(b * TILE_ROWS) as *const __m128i);
                let scale = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(block_scales)));
                for r in 0..R {
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r]), scale, acc[r]);
                }
            }
            let pairs: [__m512i; SUPER_BLOCKS / 2] = std::array::from_fn(|p| {
                let at = (s * SUPER_BLOCKS / 2 + p) * 2 * TILE_ROWS;
                _mm512_cvtepu8_epi16(_mm256_loadu_si256(w.mins.as_ptr().add(at) as *const __m256i))
            });
            for (r, a) in acc.iter().enumerate() {
                let (dx, x_sums) = (
                    *x.scales.as_ptr().add(s * R + r),
                    x.sums.as_ptr().add((s * R + r) * SUPER_BLOCKS / 2),
                );
                let mut min_dot = _mm512_setzero_si512();
                for (p, pair) in pairs.iter().enumerate() {
                    min_dot = _mm512_dpwssd_epi32(min_dot, *pair, _mm512_set1_epi32(*x_sums.add(p)));
                }
                let out = sums.0[r].as_mut_ptr();
                let sum = _mm512_fmadd_ps(*a, _mm512_set1_ps(dx), _mm512_loadu_ps(out));
                let sum = _mm512_fnmadd_ps(
                    _mm512_cvtepi32_ps(min_dot),
                    _mm512_mul_ps(dmin, _mm512_set1_ps(dx)),
                    sum,
                );
                _mm512_storeu_ps(out, sum);
            }
        }
        for (r, row) in sums.0[..R].iter().enumerate() {
            _mm512_storeu_ps(y.add(r * stride), _mm512_loadu_ps(row.as_ptr()));
        }
    }

    /// A tile's output rows on one cache line each.
    #[repr(align(64))]
    struct Sums([[f32; TILE_ROWS]; GROUP]);

    /// [`q4k_dot_avx2`] for a group of `rows` (1..=[`GROUP_AVX2`]) input rows.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn q4k_rows_avx2(rows: usize, w: TileRef, blocks: usize, x: Group, y: *mut f32, stride: usize) {
        let TileRef::Q4K(w) = w else {
            unreachable!("Q8_0 tiles are packed only with VNNI")
        };
        match rows {
            5 => q4k_dot_avx2::<5>(w, blocks, x, y, stride),
            4 => q4k_dot_avx2::<4>(w, blocks, x, y, stride),
            3 => q4k_dot_avx2::<3>(w, blocks, x, y, stride),
            2 => q4k_dot_avx2::<2>(w, blocks, x, y, stride),
            _ => q4k_dot_avx2::<1>(w, blocks, x, y, stride),
        }
    }

    /// Q4_K against Q8_K inputs on AVX2, the same sum as [`q4k_dot`], the tile's 16 weight rows
    /// as two vectors of 8. Per 4-value group of x broadcast to all lanes, `vpmaddubsw`
    /// multiplies the nibbles (unsigned) by the inputs (signed) into pair sums of at most
    /// 2 · 15 · 127, so a block's 8 groups add up in 16 bits without saturating (8 · 3810 <
    /// 32767); `vpmaddwd` by the rows' block scales then sums them into 32 bits, and the
    /// super-block's integer sum is scaled by `d · dx` once. The mins term is one `vpmaddwd` per
    /// pair of blocks, as `vpdpwssd` in [`q4k_dot`]. Both halves go through a block in one pass,
    /// each broadcast feeding both: against one half after the other, a 1-row decode step was
    /// 1.16× as fast on a Zen 4 without AVX-512 (10 rows 1.04×, same process, alternating).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn q4k_dot_avx2<const R: usize>(w: Q4kTile, blocks: usize, x: Group, y: *mut f32, stride: usize) {
        let supers = w.super_blocks(blocks, &x, R);
        let nibble = _mm256_set1_epi8(0x0f);
        for r in 0..R {
            _mm256_storeu_ps(y.add(r * stride), _mm256_setzero_ps());
            _mm256_storeu_ps(y.add(r * stride + HALF), _mm256_setzero_ps());
        }
        for s in 0..supers {
            let mut dots = [[_mm256_setzero_si256(); 2]; R];
            for sub in 0..SUPER_BLOCKS {
                let b = s * SUPER_BLOCKS + sub;
                // Four blocks ahead, as `block_dots`.
                for line in 0..TILE_BLOCK / 2 / 64 {
                    let ahead = w.values.as_ptr().wrapping_add((b + 4) * TILE_BLOCK / 2 + 64 * line);
                    _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                }
                // Pair p of the block: 16 rows × 4 bytes, the second half's 8 rows 32 bytes in.
                let wb = w.values.as_ptr().add(b * TILE_BLOCK / 2);
                let xb = x.values.as_ptr().add(b * R * BLOCK);
                let mut pairs = [[_mm256_setzero_si256(); 2]; R];
                for p in 0..4 {
                    let v =
                        [0, HALF * 4].map(|at| _mm256_loadu_si256(wb.add(p * TILE_ROWS * 4 + at) as *const __m256i));
                    let lo = v.map(|v| _mm256_and_si256(v, nibble));
                    let hi = v.map(|v| _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble));
                    for (r, sums) in pairs.iter_mut().enumerate() {
                        let xg = xb.add(r * BLOCK + 8 * p);
                        let x0 = _mm256_set1_epi32((xg as *const i32).read_unaligned());
                        let x1 = _mm256_set1_epi32((xg.add(4) as *const i32).read_unaligned());
                        for h in 0..2 {
                            let both =
                                _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], x0), _mm256_maddubs_epi16(hi[h], x1));
                            sums[h] = _mm256_add_epi16(sums[h], both);
                        }
                    }
                }
                // Each row's scale in both 16-bit lanes of its pair sums, per half.
                let scale = _mm_loadu_si128(w.scales.as_ptr().add(b * TILE_ROWS) as *const __m128i);
                let scales = [
                    _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(scale, scale)),
                    _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(scale, scale)),
                ];
                for (dot, sums) in dots.iter_mut().zip(pairs) {
                    for h in 0..2 {
                        dot[h] = _mm256_add_epi32(dot[h], _mm256_madd_epi16(sums[h], scales[h]));
                    }
                }
            }
            for h in 0..2 {
                let row0 = h * HALF;
                let at = s * 2 * TILE_ROWS + row0;
                let (d, dmin) = (
                    _mm256_loadu_ps(w.d_dmin.as_ptr().add(at)),
                    _mm256_loadu_ps(w.d_dmin.as_ptr().add(at + TILE_ROWS)),
                );
                let min_pairs: [__m256i; SUPER_BLOCKS / 2] = std::array::from_fn(|p| {
                    let at = ((s * SUPER_BLOCKS / 2 + p) * TILE_ROWS + row0) * 2;
                    _mm256_cvtepu8_epi16(_mm_loadu_si128(w.mins.as_ptr().add(at) as *const __m128i))
                });
                for (r, dot) in dots.iter().enumerate() {
                    let (dx, sums) = (
                        _mm256_set1_ps(*x.scales.as_ptr().add(s * R + r)),
                        x.sums.as_ptr().add((s * R + r) * SUPER_BLOCKS / 2),
                    );
                    let mut min_dot = _mm256_setzero_si256();
                    for (p, pair) in min_pairs.iter().enumerate() {
                        min_dot = _mm256_add_epi32(min_dot, _mm256_madd_epi16(*pair, _mm256_set1_epi32(*sums.add(p))));
                    }
                    let out = y.add(r * stride + row0);
                    let sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[h]), _mm256_mul_ps(d, dx), _mm256_loadu_ps(out));
                    let sum = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(min_dot), _mm256_mul_ps(dmin, dx), sum);
                    _mm256_storeu_ps(out, sum);
                }
            }
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
        let vnni = tiles::vnni();
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
        if !tiles::vnni() {
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
            let (stored, offset) = unsafe { tiles::quantize_block_avx512(v, &mut got) };
            assert_eq!((got, stored), (want, scale));
            assert_eq!(offset, -128 * want.iter().map(|&q| q as i32).sum::<i32>());
        }
    }

    /// Both Q4_K kernels (AVX2, and VNNI where the CPU has it) give `Σ_s dx_s · Σ_b (d ·
    /// scale_b · Σ w·x − dmin · min_b · Σ x)` of the packed blocks and the Q8_K-quantized inputs,
    /// in f64, for every group size of either: `q4k`'s tests compare the kernel this CPU runs
    /// with candle, this one also the other.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn q4k_kernels_match_their_definition() {
        if !tiles::q4k() {
            return;
        }
        const SUPER: usize = tiles::SUPER_BLOCKS * BLOCK;
        let (n, k) = (32, 768);
        let block = |j: usize, s: usize| tiles::Q4kBlock {
            d: 0.01 + (j % 5) as f32 * 0.003,
            dmin: 0.02 - (s % 3) as f32 * 0.004,
            scales: std::array::from_fn(|b| ((j * 7 + s * 3 + b * 11) % 64) as u8),
            mins: std::array::from_fn(|b| ((j * 5 + s + b * 13) % 64) as u8),
            values: std::array::from_fn(|i| ((i * 7 + j * 3 + s) % 16) as u8),
        };
        let packed = tiles::Tiles::pack_q4k(n, k, block);
        let kernels: &[bool] = if tiles::vnni() { &[false, true] } else { &[false] };
        for m in [1, 2, 4, 5, 10, 12, 17] {
            let (x, _) = inputs(m, k, 1);
            for &vnni in kernels {
                let got = packed.matmul_wt_on(&x, m, n, vnni);
                for (i, row) in x.chunks_exact(k).enumerate() {
                    for j in 0..n {
                        let (mut want, mut size) = (0f64, 0f64);
                        for (s, v) in row.chunks_exact(SUPER).enumerate() {
                            let amax = amax(v);
                            let (dx, id) = if amax == 0.0 {
                                (0.0, 0.0)
                            } else {
                                (amax / 127.0, 127.0 / amax)
                            };
                            let mut q = [0i8; SUPER];
                            for (v, q) in v.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)) {
                                round_block(v, id, q);
                            }
                            let w = block(j, s);
                            for (b, q) in q.chunks_exact(BLOCK).enumerate() {
                                let values = &w.values[b * BLOCK..(b + 1) * BLOCK];
                                let dot: i32 = values.iter().zip(q).map(|(&w, &x)| w as i32 * x as i32).sum();
                                let sum: i32 = q.iter().map(|&x| x as i32).sum();
                                let scaled = w.d as f64 * w.scales[b] as f64 * dot as f64;
                                let min = w.dmin as f64 * w.mins[b] as f64 * sum as f64;
                                want += dx as f64 * (scaled - min);
                                size += (dx as f64 * scaled).abs() + (dx as f64 * min).abs();
                            }
                        }
                        let got = got[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * size,
                            "m{m} vnni {vnni} [{i},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn partial_blocks_are_refused() {
        assert!(Q8Weight::quantize(&[0.0; 48], 1, 48).is_none());
    }
}
