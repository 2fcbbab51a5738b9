//! CPU f32 kernels of the decoder's convs, on plain row-major `[C, T]` slices: fused SnakeBeta,
//! causal conv as per-tap gemms straight over the padded input (no im2col, no transposes), and
//! the transposed conv as one gemm plus an overlap-add. Work is split over the rayon pool by
//! time tiles (and output-channel blocks when a step is short), each tile a single-threaded gemm.
//!
//! Short steps (a streamed frame or two, at most [`gemv::MAX_ROWS`] time rows over the whole
//! batch) are bound by reading the weights, which gemm does at poor bandwidth on such skinny
//! shapes: they go through the row kernel instead, every state's rows in one product so each
//! weight is read once per step. The weights are laid out once for both paths.

use crate::model::gemv::{self, SendPtr};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Output floats per conv task (all output channels × a time tile): 512 KiB, within L2.
const TILE_FLOATS: usize = 128 * 1024;

/// sin²(x) within 4e-7 (a few ulp of 1; tested on [−200, 200]). sin² has period π, so x is
/// reduced by the nearest multiple of π (three-part Cody–Waite with 12-bit parts, exact for
/// |x| < 4096·π) into [−π/2, π/2] and a degree-11 odd polynomial does the rest. Written
/// branch-free so the row loops vectorize.
#[inline(always)]
#[allow(clippy::excessive_precision)] // the parts of π are spelled with the digits that name them exactly
fn sin_sq(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer.
    const INV_PI: f32 = std::f32::consts::FRAC_1_PI;
    const PI_A: f32 = f32::from_bits(0x4049_0000); // 3.140625
    const PI_B: f32 = f32::from_bits(0x3a7d_a000); // 9.675026e-4
    const PI_C: f32 = f32::from_bits(0x3422_2000); // 1.5099067e-7
    const PI_D: f32 = f32::from_bits(0x2cb4_611a); // 5.126688e-12
    let q = (x * INV_PI + MAGIC) - MAGIC;
    let r = x - q * PI_A;
    let r = r - q * PI_B;
    let r = r - q * PI_C;
    let r = r - q * PI_D;
    let r2 = r * r;
    // Taylor to r¹¹: the error is below r¹³/13! ≤ 6e-8 on [−π/2, π/2].
    let p = 2.505_210_8e-8f32;
    let p = p * r2 - 2.755_731_9e-6;
    let p = p * r2 + 1.984_127e-4;
    let p = p * r2 - 8.333_333e-3;
    let p = p * r2 + 1.666_666_7e-1;
    let s = r - r * r2 * p;
    s * s
}

simd_twins! {
    /// `out[t] = x[t] + inv_beta · sin²(alpha · x[t])`
    fn snake_row(x: &[f32], out: &mut [f32], alpha: f32, inv_beta: f32) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v + inv_beta * sin_sq(alpha * v);
        }
    }
}

/// SnakeBeta of `x` [C, t] into `out`, whose rows are `out_stride` long with the result in
/// columns `out_offset..out_offset + t` (so it can land right after a carried context).
pub fn snake(
    x: &[f32],
    t: usize,
    alpha: &[f32],
    inv_beta: &[f32],
    out: &mut [f32],
    out_stride: usize,
    out_offset: usize,
) {
    if t == 0 {
        return;
    }
    out.par_chunks_mut(out_stride)
        .zip(x.par_chunks(t))
        .zip(alpha.par_iter().zip(inv_beta))
        .with_min_len(8)
        .for_each(|((o, x), (&a, &ib))| snake_row(x, &mut o[out_offset..out_offset + t], a, ib));
}

/// A causal conv's weights.
#[derive(Clone, Debug)]
pub struct ConvWeights {
    /// [c_out][kernel][c_in]: tap k is a [c_out, c_in] matrix with row stride `kernel · c_in`.
    pub taps: Vec<f32>,
    pub bias: Vec<f32>,
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub dilation: usize,
}

impl ConvWeights {
    /// From a conv1d weight [c_out, c_in, kernel] (row-major) and its bias.
    pub fn new(weight: &[f32], bias: Vec<f32>, c_out: usize, c_in: usize, kernel: usize, dilation: usize) -> Self {
        let mut taps = vec![0f32; weight.len()];
        for o in 0..c_out {
            for i in 0..c_in {
                for k in 0..kernel {
                    taps[(o * kernel + k) * c_in + i] = weight[(o * c_in + i) * kernel + k];
                }
            }
        }
        Self {
            taps,
            bias,
            c_in,
            c_out,
            kernel,
            dilation,
        }
    }

    /// Left context the conv reads.
    pub fn context(&self) -> usize {
        (self.kernel - 1) * self.dilation
    }

    /// `out` [c_out, t] = bias (+ `residual` [c_out, t]) + conv of `input` [c_in, context + t]
    /// (the carried context, then the new samples).
    pub fn forward(&self, input: &[f32], t: usize, residual: Option<&[f32]>, out: &mut [f32]) {
        let width = self.context() + t;
        debug_assert_eq!(input.len(), self.c_in * width);
        debug_assert_eq!(out.len(), self.c_out * t);
        if t == 0 {
            return;
        }
        let threads = rayon::current_num_threads().max(1);
        // About 512 KiB of output per tile (all output channels), so it stays in L2.
        let tile_target = (TILE_FLOATS / self.c_out).clamp(64, 4096);
        let time_tiles = t.div_ceil(tile_target);
        // Short steps: split the output channels too, so every thread has work.
        let row_blocks = if time_tiles >= 2 * threads {
            1
        } else {
            (2 * threads).div_ceil(time_tiles).min(self.c_out.div_ceil(16)).max(1)
        };
        let rows_per_block = self.c_out.div_ceil(row_blocks);
        let tile = t.div_ceil(time_tiles);
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..row_blocks * time_tiles).into_par_iter().for_each(|task| {
            let (rb, tt) = (task / time_tiles, task % time_tiles);
            let r0 = rb * rows_per_block;
            let rows = rows_per_block.min(self.c_out.saturating_sub(r0));
            let t0 = tt * tile;
            let cols = tile.min(t - t0);
            if rows == 0 || cols == 0 {
                return;
            }
            let out = out_ptr.get();
            // SAFETY: task (rb, tt) alone writes rows r0.., columns t0.. of `out`.
            unsafe {
                for r in r0..r0 + rows {
                    let dst = std::slice::from_raw_parts_mut(out.add(r * t + t0), cols);
                    match residual {
                        Some(res) => {
                            for (d, &x) in dst.iter_mut().zip(&res[r * t + t0..r * t + t0 + cols]) {
                                *d = x + self.bias[r];
                            }
                        }
                        None => dst.fill(self.bias[r]),
                    }
                }
                let row_stride = (self.kernel * self.c_in) as isize;
                for k in 0..self.kernel {
                    // dst[time, c_out] += input[c_in, time + k·d]ᵀ · tap_k[c_out, c_in]ᵀ
                    gemm(
                        cols,
                        rows,
                        self.c_in,
                        out.add(r0 * t + t0),
                        t as isize,
                        1,
                        true,
                        input.as_ptr().add(t0 + k * self.dilation),
                        width as isize,
                        1,
                        self.taps.as_ptr().add((r0 * self.kernel + k) * self.c_in),
                        row_stride,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
        });
    }

    /// [`forward`](Self::forward) for a batch of short steps, as one row-kernel product: `inputs`
    /// [B, c_in, context + t] → `out` [B, c_out, t] (+ `residual` [B, c_out, t]). The im2col rows
    /// `[(tap, c_in)]` of all B·t outputs meet the weights as they are stored, [c_out, kernel·c_in].
    pub fn forward_rows(&self, inputs: &[f32], b: usize, t: usize, residual: Option<&[f32]>, out: &mut [f32]) {
        let (c_in, c_out) = (self.c_in, self.c_out);
        let width = self.context() + t;
        let row_len = self.kernel * c_in;
        debug_assert_eq!(inputs.len(), b * c_in * width);
        debug_assert_eq!(out.len(), b * c_out * t);
        let mut rows = vec![0f32; b * t * row_len];
        for (input, rows) in inputs.chunks(c_in * width).zip(rows.chunks_mut(t * row_len)) {
            for (i, channel) in input.chunks(width).enumerate() {
                for (time, row) in rows.chunks_mut(row_len).enumerate() {
                    for k in 0..self.kernel {
                        row[k * c_in + i] = channel[time + k * self.dilation];
                    }
                }
            }
        }
        let y = gemv::matmul_wt(&rows, b * t, row_len, &self.taps, c_out);
        for (r, out) in out.chunks_mut(c_out * t).enumerate() {
            for (o, out) in out.chunks_mut(t).enumerate() {
                for (time, v) in out.iter_mut().enumerate() {
                    let res = residual.map_or(0.0, |res| res[(r * c_out + o) * t + time]);
                    *v = y[(r * t + time) * c_out + o] + self.bias[o] + res;
                }
            }
        }
    }
}

/// A transposed conv's weights, [c_out · pieces · stride, c_in] (the kernel zero-padded to a
/// whole number of strides): row `(o, s)` holds what one input contributes to output channel
/// `o`, `s` samples after its first.
#[derive(Clone, Copy, Debug)]
pub struct ConvTransposeWeights<'a> {
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub c_in: usize,
    pub c_out: usize,
    pub stride: usize,
    pub pieces: usize,
}

impl ConvTransposeWeights<'_> {
    /// Samples each output channel carries to the next step.
    pub fn overlap(&self) -> usize {
        (self.pieces - 1) * self.stride
    }

    /// `x` [c_in, n] → `out` [c_out, n · stride] (with bias), `tail` [c_out, overlap] the carried
    /// overlap on entry (no bias) and the new one on return.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32], tail: &mut [f32]) {
        let span = self.pieces * self.stride;
        let row = self.c_out * span;
        let overlap = self.overlap();
        let emitted = n * self.stride;
        debug_assert_eq!(out.len(), self.c_out * emitted);
        debug_assert_eq!(tail.len(), self.c_out * overlap);
        // cols[t, (c_out, span)] = x[c_in, t]ᵀ · weightᵀ
        let mut cols = vec![0f32; n * row];
        if n > 0 {
            let threads = rayon::current_num_threads();
            let parallelism = if threads > 1 {
                Parallelism::Rayon(threads)
            } else {
                Parallelism::None
            };
            // SAFETY: the strides describe `x` [c_in, n], `weight` [row, c_in], `cols` [n, row].
            unsafe {
                gemm(
                    n,
                    row,
                    self.c_in,
                    cols.as_mut_ptr(),
                    1,
                    row as isize,
                    false,
                    x.as_ptr(),
                    n as isize,
                    1,
                    self.weight.as_ptr(),
                    self.c_in as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        }
        self.overlap_add(&cols, n, out, tail);
    }

    /// [`forward`](Self::forward) for a batch of short steps, as one row-kernel product: `rows`
    /// [B·n, c_in] (input t of batch row r at row r·n + t) → `out` [B, c_out, n · stride],
    /// `tail` [B, c_out, overlap].
    pub fn forward_rows(&self, rows: &[f32], b: usize, n: usize, out: &mut [f32], tail: &mut [f32]) {
        let row = self.c_out * self.pieces * self.stride;
        let cols = gemv::matmul_wt(rows, b * n, self.c_in, self.weight, row);
        let (emitted, overlap) = (self.c_out * n * self.stride, self.c_out * self.overlap());
        for (r, cols) in cols.chunks(n * row).enumerate() {
            let tail = &mut tail[r * overlap..(r + 1) * overlap];
            self.overlap_add(cols, n, &mut out[r * emitted..(r + 1) * emitted], tail);
        }
    }

    /// Adds each input's `cols` row [(c_out, span)] into `out` [c_out, n · stride] at its
    /// place, through the carried `tail`, plus the bias; the new tail is what spills over.
    fn overlap_add(&self, cols: &[f32], n: usize, out: &mut [f32], tail: &mut [f32]) {
        let span = self.pieces * self.stride;
        let row = self.c_out * span;
        let overlap = self.overlap();
        let emitted = n * self.stride;
        let tail_ptr = SendPtr(tail.as_mut_ptr());
        out.par_chunks_mut(emitted.max(1))
            .enumerate()
            .with_min_len(4)
            .for_each(|(c, out_row)| {
                // SAFETY: row c of the tail belongs to this task alone.
                let tail_row = unsafe { std::slice::from_raw_parts_mut(tail_ptr.get().add(c * overlap), overlap) };
                let mut acc = vec![0f32; emitted + overlap];
                acc[..overlap].copy_from_slice(&tail_row[..overlap]);
                for t in 0..n {
                    let piece = &cols[t * row + c * span..t * row + (c + 1) * span];
                    for (a, &v) in acc[t * self.stride..t * self.stride + span].iter_mut().zip(piece) {
                        *a += v;
                    }
                }
                let bias = self.bias[c];
                for (o, &a) in out_row[..emitted].iter_mut().zip(&acc) {
                    *o = a + bias;
                }
                tail_row[..overlap].copy_from_slice(&acc[emitted..]);
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [−1, 1).
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what} [{i}]: {g} vs {w}");
        }
    }

    /// The row-kernel conv of a batch equals the per-tap gemm conv of each row.
    #[test]
    fn conv_rows_match_gemm() {
        for (c_in, c_out, kernel, dilation) in [(7, 5, 3, 2), (19, 11, 7, 3), (3, 1, 1, 1), (33, 17, 7, 1)] {
            let weight = values(c_out * c_in * kernel, c_in);
            let conv = ConvWeights::new(&weight, values(c_out, 1), c_out, c_in, kernel, dilation);
            for b in 1..=3 {
                for t in 1..=5 {
                    let width = conv.context() + t;
                    let inputs = values(b * c_in * width, b + t);
                    let residual = values(b * c_out * t, 3 * t);
                    for res in [None, Some(&residual[..])] {
                        let mut rows = vec![0f32; b * c_out * t];
                        conv.forward_rows(&inputs, b, t, res, &mut rows);
                        let mut each = vec![0f32; b * c_out * t];
                        for (r, out) in each.chunks_mut(c_out * t).enumerate() {
                            let res = res.map(|res| &res[r * c_out * t..(r + 1) * c_out * t]);
                            conv.forward(&inputs[r * c_in * width..(r + 1) * c_in * width], t, res, out);
                        }
                        let what = format!("c_in {c_in} c_out {c_out} k {kernel} d {dilation} b {b} t {t}");
                        assert_close(&rows, &each, &what);
                    }
                }
            }
        }
    }

    /// The row-kernel transposed conv of a batch equals the gemm one of each row, tails included.
    #[test]
    fn transposed_conv_rows_match_gemm() {
        for (c_in, c_out, stride, pieces) in [(5, 3, 3, 2), (13, 7, 2, 1), (9, 4, 4, 3)] {
            let (weight, bias) = (values(c_out * pieces * stride * c_in, c_out), values(c_out, 2));
            let conv = ConvTransposeWeights {
                weight: &weight,
                bias: &bias,
                c_in,
                c_out,
                stride,
                pieces,
            };
            let (overlap, emitted) = (c_out * conv.overlap(), c_out * stride);
            for b in 1..=3 {
                for n in 1..=5 {
                    let x = values(b * c_in * n, b * n);
                    let tail = values(b * overlap, n);
                    // Rows [B·n, c_in] of x [B, c_in, n].
                    let mut rows = vec![0f32; b * n * c_in];
                    for r in 0..b {
                        for i in 0..c_in {
                            for t in 0..n {
                                rows[(r * n + t) * c_in + i] = x[(r * c_in + i) * n + t];
                            }
                        }
                    }
                    let (mut out_rows, mut tail_rows) = (vec![0f32; b * emitted * n], tail.clone());
                    conv.forward_rows(&rows, b, n, &mut out_rows, &mut tail_rows);
                    let (mut out_each, mut tail_each) = (vec![0f32; b * emitted * n], tail.clone());
                    for r in 0..b {
                        conv.forward(
                            &x[r * c_in * n..(r + 1) * c_in * n],
                            n,
                            &mut out_each[r * emitted * n..(r + 1) * emitted * n],
                            &mut tail_each[r * overlap..(r + 1) * overlap],
                        );
                    }
                    let what = format!("c_in {c_in} c_out {c_out} stride {stride} pieces {pieces} b {b} n {n}");
                    assert_close(&out_rows, &out_each, &what);
                    assert_close(&tail_rows, &tail_each, &what);
                }
            }
        }
    }

    #[test]
    fn sin_sq_matches_f64() {
        let mut worst = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-3;
            let exact = (x as f64).sin().powi(2);
            worst = worst.max((sin_sq(x) as f64 - exact).abs());
        }
        assert!(worst < 5e-7, "worst abs error {worst}");
    }
}
