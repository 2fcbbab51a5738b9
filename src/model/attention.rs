//! Grouped-query attention of a few new rows per sequence against that sequence's KV cache, on
//! CPU, reading the cache buffers in place.
//!
//! Hand-written because a decode step attends one row per sequence: through candle ops that is
//! about ten tensor ops per sequence and layer (views, a copy of the value history, two gemm calls
//! whose setup outweighs their arithmetic), and the code predictor's 15 steps of a batch of 10
//! make ~750 such attentions per frame. Here each (sequence, key/value head) pair is one task.

use super::gemv::{dot_rows, SendPtr};
use rayon::prelude::*;

/// Positions per page of a host KV cache. A cache grows a page at a time and nothing it holds
/// ever moves: growing by doubling copied every cached position into a new buffer and faulted
/// that buffer in, all in one step (10 sequences of the full-size talker: two steps of 0.8 s
/// among steps of 0.15 s in 150 frames).
pub const PAGE: usize = 16;

/// One page of one layer's host cache: the keys of [`PAGE`] positions of every key/value head,
/// then their values (`[2][kv_heads][PAGE][head_dim]`). Shared: the full pages of a voice's
/// prompt prefix belong to every sequence started from it (`KvCache::copy_prefix`), and no
/// sequence writes a page it shares (its appends land past the prefix).
pub type Page = std::sync::Arc<[f32]>;

/// Where `position`'s key and value for key/value head `head` sit in page `position / PAGE`.
pub fn page_slot(kv_heads: usize, head_dim: usize, head: usize, position: usize) -> (usize, usize) {
    let key = (head * PAGE + position % PAGE) * head_dim;
    (key, key + kv_heads * PAGE * head_dim)
}

/// One sequence's cache for one layer, and where its new rows sit in the stacked batch.
pub struct CachedRows<'a> {
    /// The cache's pages, the new rows already stored.
    pub pages: &'a [Page],
    /// Positions cached before this step's rows.
    pub past: usize,
    /// New rows (queries) of this sequence.
    pub rows: usize,
}

/// Head layout of the attention.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Causal softmax attention for the stacked queries `q` ([N, heads, head_dim], the rows of `seqs`
/// in order): query row t of a sequence sees its cached positions and its new rows up to t.
/// Query head h reads key/value head h / (heads / kv_heads), as `repeat_kv`. Returns
/// [N, heads · head_dim]. Scores are `(q·k) · scale`, softmax as candle's (max-subtracted `exp`,
/// divided by the sum).
pub fn attend(q: &[f32], seqs: &[CachedRows], shape: Heads, scale: f32) -> Vec<f32> {
    let Heads {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    let rep = heads / kv_heads;
    let n: usize = seqs.iter().map(|s| s.rows).sum();
    assert_eq!(q.len(), n * heads * hd, "queries [N, heads, head_dim]");
    let mut first_row = Vec::with_capacity(seqs.len());
    let mut row = 0;
    for s in seqs {
        assert!(
            s.pages.iter().all(|p| p.len() == 2 * kv_heads * PAGE * hd),
            "pages of [2, kv_heads, PAGE, head_dim]"
        );
        assert!(
            s.past + s.rows <= s.pages.len() * PAGE,
            "the new rows are stored in the cache"
        );
        first_row.push(row);
        row += s.rows;
    }
    let mut out = vec![0f32; n * heads * hd];
    let out_ptr = SendPtr(out.as_mut_ptr());
    // Head-major: a worker takes one key/value head of every sequence in turn, so the pages of
    // a voice prefix that sequences share can come from memory once for all of them and then
    // from its L2 (with the bench's one shared page, within noise of sequence-major).
    (0..seqs.len() * kv_heads).into_par_iter().for_each(|task| {
        let (seq, g) = (task % seqs.len(), task / seqs.len());
        let s = &seqs[seq];
        let kv = KvHead {
            pages: s.pages,
            head: g,
            kv_heads,
            head_dim: hd,
        };
        let total = s.past + s.rows;
        // scores[u·rep + r]: query head g·rep + r against position u.
        let mut scores = vec![0f32; total * rep];
        let mut acc = vec![0f32; rep * hd];
        for t in 0..s.rows {
            let r0 = first_row[seq] + t;
            let queries = &q[(r0 * heads + g * rep) * hd..][..rep * hd];
            let seen = s.past + t + 1;
            #[cfg(target_arch = "x86_64")]
            let done = simd::heads(queries, &kv, seen, scale, &mut scores, &mut acc);
            #[cfg(not(target_arch = "x86_64"))]
            let done = false;
            if !done {
                attend_heads(queries, &kv, seen, scale, &mut scores, &mut acc);
            }
            // SAFETY: task (seq, g) alone writes heads g·rep..(g+1)·rep of its own rows.
            unsafe {
                let dst = out_ptr.get().add((r0 * heads + g * rep) * hd);
                std::ptr::copy_nonoverlapping(acc.as_ptr(), dst, rep * hd);
            }
        }
    });
    out
}

/// Key/value head `head` of a sequence's cache.
struct KvHead<'a> {
    pages: &'a [Page],
    head: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl KvHead<'_> {
    /// Position u's key and value.
    #[inline(always)]
    fn at(&self, u: usize) -> (&[f32], &[f32]) {
        let (page, hd) = (&self.pages[u / PAGE], self.head_dim);
        let (key, value) = page_slot(self.kv_heads, hd, self.head, u);
        (&page[key..key + hd], &page[value..value + hd])
    }
}

/// The `rep` query heads sharing `kv` (`queries`: [rep, head_dim]), each attending to its first
/// `seen` positions, into `acc` ([rep, head_dim]); `scores` holds at least `seen · rep`.
fn attend_heads(queries: &[f32], kv: &KvHead, seen: usize, scale: f32, scores: &mut [f32], acc: &mut [f32]) {
    let hd = kv.head_dim;
    let rep = queries.len() / hd;
    // scores[u·rep + r]: query head r against position u.
    for u in 0..seen {
        dot_rows(queries, hd, kv.at(u).0, &mut scores[u * rep..(u + 1) * rep]);
    }
    acc.fill(0.0);
    for r in 0..rep {
        let max = (0..seen)
            .map(|u| scores[u * rep + r] * scale)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for u in 0..seen {
            let e = (scores[u * rep + r] * scale - max).exp();
            scores[u * rep + r] = e;
            sum += e;
        }
        let o = &mut acc[r * hd..(r + 1) * hd];
        for u in 0..seen {
            axpy(scores[u * rep + r] / sum, kv.at(u).1, o);
        }
    }
}

/// `o += a · v`.
fn axpy(a: f32, v: &[f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected above.
        unsafe { axpy_avx2(a, v, o) };
        return;
    }
    for (o, v) in o.iter_mut().zip(v) {
        *o += a * v;
    }
}

/// The same loop, compiled for AVX2 + FMA so it runs 8 lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(a: f32, v: &[f32], o: &mut [f32]) {
    for (o, v) in o.iter_mut().zip(v) {
        *o = a.mul_add(*v, *o);
    }
}

/// The same computation on AVX-512 registers for head dims of 128 (the release's), 64 and 32
/// (the parity fixtures'):
/// a query head and its output stay in registers while the keys and values stream by, where
/// the portable path makes a call per position for the dot products and another for each
/// weighted value row (~13 % of a batch-10 step on a Zen 4).
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::KvHead;
    use crate::model::activation;
    use std::arch::x86_64::*;

    /// `attend_heads` where it applies; false (nothing written) elsewhere.
    pub fn heads(queries: &[f32], kv: &KvHead, seen: usize, scale: f32, scores: &mut [f32], acc: &mut [f32]) -> bool {
        if !std::is_x86_feature_detected!("avx512f") {
            return false;
        }
        // Two query heads a pass where their number is even (the release's 16 query heads on 8
        // key/value heads), one at a time otherwise.
        let pairs = queries.len().is_multiple_of(2 * kv.head_dim);
        // SAFETY: AVX-512 F was detected; `heads_v` checks the slice lengths.
        unsafe {
            match (kv.head_dim, pairs) {
                (128, true) => heads_v::<8, 2>(queries, kv, seen, scale, scores, acc),
                (128, false) => heads_v::<8, 1>(queries, kv, seen, scale, scores, acc),
                (64, true) => heads_v::<4, 2>(queries, kv, seen, scale, scores, acc),
                (64, false) => heads_v::<4, 1>(queries, kv, seen, scale, scores, acc),
                (32, true) => heads_v::<2, 2>(queries, kv, seen, scale, scores, acc),
                (32, false) => heads_v::<2, 1>(queries, kv, seen, scale, scores, acc),
                _ => return false,
            }
        }
        true
    }

    /// Positions ahead whose keys the key pass prefetches; each position's value is prefetched
    /// as its key is read, both into L2 (`T2`). 10 sequences by 28 layers of the release's
    /// shape, 2-core Zen 4, variants alternated 10× in one process, min of two rounds: 80
    /// positions 7.7 and 7.8 ms against 10.5 and 10.4 without prefetching, 500 positions 45.1
    /// and 48.5 against 64.6 and 63.9. Into L1 (`T0`) no gain (11.5 and 65–67 ms), and keys
    /// ahead without the values little.
    const AHEAD: usize = 8;

    /// Prefetches a key or value row into L2.
    #[inline(always)]
    fn prefetch_l2(row: &[f32]) {
        for line in row.chunks(16) {
            // SAFETY: a prefetch has no effect on memory and `line` is in bounds anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T2>(line.as_ptr() as *const i8) };
        }
    }

    /// `V` vectors of 16 per head, `P` query heads per pass over the keys and values, which
    /// they share: each key and value is loaded once for all `P`. At batch 10 the talker's
    /// caches stream from memory (275 MB a step at 120 positions, 1.15 GB at 500): 10 sequences
    /// by 28 layers of the release's shape, min of 15, 2-core Xeon, against one head a pass
    /// (alternated, 3 each): 120 positions 15.9–17.2 ms against 16.5–18.3, 500 positions
    /// 59.0–64.6 ms against 69.1–72.5; results bit-identical. Per head as the portable
    /// path: each score is the dot product in two interleaved chains, scaled; softmax with the
    /// max of the scaled scores, `exp` (16 lanes wide here), the sum in order, weights e / sum;
    /// the output accumulates `weight · value` with FMA position by position.
    #[target_feature(enable = "avx512f")]
    unsafe fn heads_v<const V: usize, const P: usize>(
        queries: &[f32],
        kv: &KvHead,
        seen: usize,
        scale: f32,
        scores: &mut [f32],
        acc: &mut [f32],
    ) {
        let hd = 16 * V;
        assert!(kv.head_dim == hd);
        assert!(scores.len() >= P * seen && acc.len() == queries.len() && queries.len().is_multiple_of(P * hd));
        for (query, out) in queries.chunks_exact(P * hd).zip(acc.chunks_exact_mut(P * hd)) {
            let q: [[__m512; V]; P] =
                std::array::from_fn(|h| std::array::from_fn(|v| _mm512_loadu_ps(query.as_ptr().add(h * hd + 16 * v))));
            for u in 0..seen {
                if u + AHEAD < seen {
                    prefetch_l2(kv.at(u + AHEAD).0);
                }
                // `at` checks the bounds: the loads below read its `hd` values.
                let (key, value) = kv.at(u);
                prefetch_l2(value);
                let key = key.as_ptr();
                let k: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(key.add(16 * v)));
                for (h, q) in q.iter().enumerate() {
                    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                    for v in (0..V).step_by(2) {
                        a0 = _mm512_fmadd_ps(q[v], k[v], a0);
                        a1 = _mm512_fmadd_ps(q[v + 1], k[v + 1], a1);
                    }
                    scores[h * seen + u] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * scale;
                }
            }
            let mut sums = [0f32; P];
            for (h, sum) in sums.iter_mut().enumerate() {
                let s = &mut scores[h * seen..(h + 1) * seen];
                let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                s.iter_mut().for_each(|x| *x -= max);
                activation::exp_in_place(s);
                *sum = s.iter().sum();
            }
            let mut o = [[_mm512_setzero_ps(); V]; P];
            for u in 0..seen {
                let value = kv.at(u).1.as_ptr();
                let w: [__m512; P] = std::array::from_fn(|h| _mm512_set1_ps(scores[h * seen + u] / sums[h]));
                for v in 0..V {
                    let x = _mm512_loadu_ps(value.add(16 * v));
                    for (o, w) in o.iter_mut().zip(&w) {
                        o[v] = _mm512_fmadd_ps(*w, x, o[v]);
                    }
                }
            }
            for (h, o) in o.iter().enumerate() {
                for (v, o) in o.iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add(h * hd + 16 * v), *o);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook computation in f64: softmax((q·k)·scale) · V over the visible positions,
    /// with keys and values as [kv_heads, positions, head_dim].
    fn reference(q: &[f32], (k, v): (&[f32], &[f32]), past: usize, rows: usize, shape: Heads, scale: f32) -> Vec<f64> {
        let Heads {
            heads,
            kv_heads,
            head_dim: hd,
        } = shape;
        let (rep, total) = (heads / kv_heads, past + rows);
        let mut out = vec![0f64; rows * heads * hd];
        for t in 0..rows {
            for h in 0..heads {
                let g = h / rep;
                let qh = &q[(t * heads + h) * hd..][..hd];
                let seen = past + t + 1;
                let s: Vec<f64> = (0..seen)
                    .map(|u| {
                        let kr = &k[(g * total + u) * hd..][..hd];
                        qh.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale as f64
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (u, w) in e.iter().enumerate() {
                    for d in 0..hd {
                        out[(t * heads + h) * hd + d] += w / sum * v[(g * total + u) * hd + d] as f64;
                    }
                }
            }
        }
        out
    }

    /// `k` and `v` ([kv_heads, positions, head_dim]) in pages, the last one partly filled
    /// (the rest of it NaN: read, it would show).
    fn paged(k: &[f32], v: &[f32], kv_heads: usize, hd: usize) -> Vec<Page> {
        let total = k.len() / (kv_heads * hd);
        (0..total.div_ceil(PAGE))
            .map(|p| {
                let mut page = vec![f32::NAN; 2 * kv_heads * PAGE * hd];
                for g in 0..kv_heads {
                    for u in p * PAGE..total.min((p + 1) * PAGE) {
                        let from = (g * total + u) * hd;
                        let (key, value) = page_slot(kv_heads, hd, g, u);
                        page[key..key + hd].copy_from_slice(&k[from..from + hd]);
                        page[value..value + hd].copy_from_slice(&v[from..from + hd]);
                    }
                }
                page.into()
            })
            .collect()
    }

    /// Head dims of 20 (the portable path) and 32, 64 and 128 (AVX-512 where present), with
    /// query heads in pairs on a key/value head (as the release) and three on one (one at a
    /// time).
    #[test]
    fn matches_the_textbook_computation() {
        for (heads, kv_heads) in [(4, 2), (3, 1)] {
            for head_dim in [20, 32, 64, 128] {
                matches_at(Heads {
                    heads,
                    kv_heads,
                    head_dim,
                });
            }
        }
    }

    fn matches_at(shape: Heads) {
        let (hd, kv_heads) = (shape.head_dim, shape.kv_heads);
        let val = |i: usize, a: usize, b: usize| ((i * a % b) as f32 - (b / 2) as f32) / b as f32;
        // Two sequences stepped together: one decoding a row after 20 cached (on its second
        // page), one taking 3 rows after 14 (the causal part within the step, across a page
        // boundary).
        let specs = [(20usize, 1usize), (14, 3)];
        let caches: Vec<(Vec<f32>, Vec<f32>)> = specs
            .iter()
            .enumerate()
            .map(|(i, &(past, rows))| {
                let len = kv_heads * (past + rows) * hd;
                (
                    (0..len).map(|j| val(j + i, 7, 13)).collect(),
                    (0..len).map(|j| val(j + i, 5, 11)).collect(),
                )
            })
            .collect();
        let pages: Vec<Vec<Page>> = caches.iter().map(|(k, v)| paged(k, v, kv_heads, hd)).collect();
        let n: usize = specs.iter().map(|s| s.1).sum();
        let q: Vec<f32> = (0..n * shape.heads * hd).map(|j| val(j, 3, 17)).collect();
        let seqs: Vec<CachedRows> = specs
            .iter()
            .zip(&pages)
            .map(|(&(past, rows), pages)| CachedRows { pages, past, rows })
            .collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let got = attend(&q, &seqs, shape, scale);
        let width = shape.heads * hd;
        let mut row = 0;
        for (&(past, rows), (k, v)) in specs.iter().zip(&caches) {
            let want = reference(&q[row * width..(row + rows) * width], (k, v), past, rows, shape, scale);
            for (i, w) in want.iter().enumerate() {
                let g = got[row * width + i] as f64;
                assert!((g - w).abs() <= 1e-5, "row {row} element {i}: {g} vs {w}");
            }
            row += rows;
        }
    }
}
