//! Q4_K projections on koe's tiles (`q8::tiles`, nibble weights): candle quantizes the weights
//! at load (`QTensor::quantize`, the same values as its own Q4_K matmul), they are unpacked into
//! tiles of 16 rows, and each call quantizes the input rows to Q8_K (256 values a scale, as
//! candle's kernel). The tiles run on AVX-512 VNNI's `vpdpbusd`, or on AVX2's `vpmaddubsw`.
//!
//! Hand-written because a single-sequence step reads every weight once, so its time is the
//! weight bytes over the memory bandwidth: Q4_K holds 4.5 bits a weight against Q8_0's 8.5, but
//! candle 0.11's Q4_K matmul was compute-bound on a 2-core Xeon (13.8 frames/s against 11.6 for
//! koe's Q8_0 tiles, which stream at the bandwidth there); on an AVX2-only Zen 4 (24 layers,
//! `cargo bench --bench kernels` at 6caecf0) the tiles took 0.49× its time at 1 row and 0.60×
//! at 10.

#[cfg(not(target_arch = "x86_64"))]
pub use elsewhere::{available, Q4kWeight};
#[cfg(target_arch = "x86_64")]
pub use tiles::{available, Q4kWeight};

#[cfg(target_arch = "x86_64")]
mod tiles {
    use crate::model::q8::tiles::{self, Q4kBlock, Tiles, SUPER_BLOCKS};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Result, Tensor};
    use half::f16;
    use rayon::prelude::*;

    /// Values per Q4_K super-block.
    pub const SUPER_BLOCK: usize = 256;
    /// Bytes of candle's (ggml's) `block_q4_K`: d, dmin (f16), 12 bytes of packed 6-bit scales and
    /// mins, 128 bytes of nibbles.
    const BLOCK_BYTES: usize = 144;

    /// Whether this CPU runs the tiles (AVX-512 F/BW/VNNI and F16C, or AVX2 and FMA).
    pub fn available() -> bool {
        tiles::q4k()
    }

    /// A weight `[n, k]` quantized to Q4_K at load, as tiles.
    #[derive(Debug, Clone)]
    pub struct Q4kWeight {
        n: usize,
        tiles: Tiles,
    }

    impl Q4kWeight {
        /// Quantizes `w` ([n, k], on CPU) with candle's Q4_K; `None` unless `n` fills whole tiles
        /// of 16 rows and `k` whole super-blocks.
        pub fn quantize(w: &Tensor) -> Result<Option<Self>> {
            let (n, k) = w.dims2()?;
            if !n.is_multiple_of(tiles::TILE_ROWS) || !k.is_multiple_of(SUPER_BLOCK) {
                return Ok(None);
            }
            // A tile's rows at a time, in parallel: rows quantize independently, and candle's
            // Q4_K quantizer (a search for each sub-block's scale and min) runs on one thread,
            // which took a full-size q4_k load to ~20 s on 2 cores (13 s now). Each tile's rows
            // get storage of their own (`force_contiguous`): `QTensor::quantize` reads a view's
            // storage from its start, whatever the view's offset.
            let bytes = (0..n / tiles::TILE_ROWS)
                .into_par_iter()
                .map(|t| {
                    let rows = w
                        .narrow(0, t * tiles::TILE_ROWS, tiles::TILE_ROWS)?
                        .force_contiguous()?;
                    Ok(QTensor::quantize(&rows, GgmlDType::Q4K)?.data()?.into_owned())
                })
                .collect::<Result<Vec<_>>>()?
                .concat();
            let supers = k / SUPER_BLOCK;
            let tiles = Tiles::pack_q4k(n, k, |j, s| {
                let at = (j * supers + s) * BLOCK_BYTES;
                unpack(&bytes[at..at + BLOCK_BYTES])
            });
            Ok(Some(Self { n, tiles }))
        }

        pub fn out_dim(&self) -> usize {
            self.n
        }

        /// `x`: [m, k] row-major → `x Wᵀ`: [m, n] row-major.
        pub fn matmul_wt(&self, x: &[f32], m: usize) -> Vec<f32> {
            assert_eq!(x.len(), m * self.tiles.k, "input rows of {} values", self.tiles.k);
            self.tiles.matmul_wt(x, m, self.n)
        }
    }

    /// One `block_q4_K` as ggml lays it out: `d`, `dmin`, then scales and mins of the 8 sub-blocks
    /// in 6 bits each (sub-blocks 0..4 in the low 6 bits of bytes 0..4 and 4..8, sub-blocks 4..8
    /// in the nibbles of bytes 8..12 with their top 2 bits in the top bits of bytes 0..8), then
    /// the values: byte i of each 32-byte quarter holds sub-block 2q's value i in its low nibble
    /// and sub-block 2q+1's in its high one.
    fn unpack(block: &[u8]) -> Q4kBlock {
        let half = |i: usize| f16::from_le_bytes([block[i], block[i + 1]]).to_f32();
        let packed = &block[4..16];
        let mut out = Q4kBlock {
            d: half(0),
            dmin: half(2),
            scales: [0; SUPER_BLOCKS],
            mins: [0; SUPER_BLOCKS],
            values: [0; SUPER_BLOCK],
        };
        for sub in 0..SUPER_BLOCKS {
            (out.scales[sub], out.mins[sub]) = match sub {
                0..4 => (packed[sub] & 63, packed[sub + 4] & 63),
                _ => (
                    (packed[sub + 4] & 0xf) | (packed[sub - 4] >> 6) << 4,
                    (packed[sub + 4] >> 4) | (packed[sub] >> 6) << 4,
                ),
            };
        }
        for (quarter, nibbles) in block[16..].chunks_exact(32).enumerate() {
            for (i, &byte) in nibbles.iter().enumerate() {
                out.values[64 * quarter + i] = byte & 0xf;
                out.values[64 * quarter + 32 + i] = byte >> 4;
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use candle_core::quantized::QMatMul;
        use candle_core::{Device, Module};

        /// The tiles hold exactly candle's dequantized Q4_K weights and quantize the inputs as
        /// candle's Q8_K: the product equals, to float summation order, the dequantized weights
        /// times candle's Q8_K-dequantized inputs in f64, and candle's own Q4_K matmul; a row's
        /// result does not depend on the rows beside it.
        #[test]
        fn tiles_multiply_candles_q4_k_weights() -> Result<()> {
            if !available() {
                return Ok(());
            }
            // One and several super-blocks, several tasks, input groups of every size: VNNI's 12
            // and fewer (17 rows: 9 + 8), AVX2's 5 and fewer (17 rows: 5 + 5 + 5 + 2).
            for (m, k, n) in [(1, 256, 16), (3, 1024, 48), (4, 512, 32), (10, 512, 64), (17, 768, 32)] {
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 5 % 11) as f32 - 4.0) / 9.0 + (i % 7) as f32 * 0.03 + (i / k) as f32 * 0.01)
                    .collect();
                let wt = Tensor::from_vec(w, (n, k), &Device::Cpu)?;
                let q = Q4kWeight::quantize(&wt)?.expect("whole tiles and super-blocks");
                let deq = QTensor::quantize(&wt, GgmlDType::Q4K)?.dequantize(&Device::Cpu)?;
                let deq = deq.flatten_all()?.to_vec1::<f32>()?;
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0 + (i % 5) as f32 * 0.01)
                    .collect();
                let ours = q.matmul_wt(&x, m);
                assert_eq!(
                    q.matmul_wt(&x[(m - 1) * k..], 1),
                    ours[(m - 1) * n..],
                    "m{m} k{k}: last row alone"
                );
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?;
                let xq = QTensor::quantize(&xt, GgmlDType::Q8K)?.dequantize(&Device::Cpu)?;
                let xq = xq.flatten_all()?.to_vec1::<f32>()?;
                let candle = QMatMul::from_qtensor(QTensor::quantize(&wt, GgmlDType::Q4K)?)?;
                let candle = candle.forward(&xt)?.flatten_all()?.to_vec1::<f32>()?;
                for i in 0..m {
                    for j in 0..n {
                        let (row, wr) = (&xq[i * k..(i + 1) * k], &deq[j * k..(j + 1) * k]);
                        let want: f64 = row.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let size: f64 = row.iter().zip(wr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                        let got = ours[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * size,
                            "m{m} k{k} n{n} [{i},{j}]: {got} vs {want}"
                        );
                        let candle = candle[i * n + j] as f64;
                        assert!(
                            (got - candle).abs() <= 1e-5 * size,
                            "m{m} k{k} n{n} [{i},{j}]: {got} vs candle {candle}"
                        );
                    }
                }
            }
            Ok(())
        }

        #[test]
        fn partial_tiles_and_super_blocks_are_refused() -> Result<()> {
            let w = |n, k| Tensor::zeros((n, k), candle_core::DType::F32, &Device::Cpu);
            assert!(Q4kWeight::quantize(&w(16, 128)?)?.is_none());
            assert!(Q4kWeight::quantize(&w(8, 256)?)?.is_none());
            Ok(())
        }
    }
}

/// Without x86_64 there are no tiles: `quantize` declines every weight, so q4_k stays on
/// candle's `QMatMul` (an uninhabited type keeps `model::linear` free of target checks).
#[cfg(not(target_arch = "x86_64"))]
mod elsewhere {
    use candle_core::{Result, Tensor};

    pub fn available() -> bool {
        false
    }

    #[derive(Debug, Clone)]
    pub enum Q4kWeight {}

    impl Q4kWeight {
        pub fn quantize(_: &Tensor) -> Result<Option<Self>> {
            Ok(None)
        }

        pub fn out_dim(&self) -> usize {
            match *self {}
        }

        pub fn matmul_wt(&self, _: &[f32], _: usize) -> Vec<f32> {
            match *self {}
        }
    }
}
