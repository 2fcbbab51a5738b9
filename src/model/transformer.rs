//! The Qwen3-style decoder shared by the talker and the code predictor: pre-norm layers with
//! q/k RMSNorm over the head dimension, grouped-query attention, rotate-half RoPE and a SiLU
//! gated MLP.
//!
//! The talker's multimodal RoPE receives identical position ids on its three sections for a
//! text/codec sequence, so it is exactly this rotate-half RoPE (PORTING-NOTES).
//!
//! Batch state is explicit: `forward` takes the stacked input rows of several sequences and one
//! `KvCache` per sequence. Weight matmuls run once over all rows; attention runs per sequence
//! against its own cache, so sequences of different lengths need no padding.

use super::activation;
use super::attention::{self, page_slot, CachedRows, Heads, Page, PAGE};
use super::gemv;
use super::linear::{Linear, WeightFormat};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// Sizes of one decoder stack.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub attention_bias: bool,
}

/// RMSNorm computed as the package does (f32 mean of squares, then scale by the weight).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    /// The weight on the host, for the CPU step path (empty on an accelerator).
    host_weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        let host_weight = match weight.device().is_cpu() {
            true => weight.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            false => Vec::new(),
        };
        Ok(Self {
            weight,
            host_weight,
            eps: eps as f32,
        })
    }

    /// Normalizes each `weight`-wide row of `src` into `dst` ([`activation::rms_norm`]).
    fn forward_host(&self, src: &[f32], dst: &mut [f32]) {
        activation::rms_norm(src, &self.host_weight, self.eps, dst)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

/// Keys and values of one sequence for every layer, appended in place: on CPU in pages
/// ([`attention::PAGE`]) that never move, on an accelerator in buffers that grow by doubling.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
}

#[derive(Debug, Clone)]
struct LayerKv {
    kv_heads: usize,
    head_dim: usize,
    len: usize,
    store: KvStore,
}

#[derive(Debug, Clone)]
enum KvStore {
    /// On CPU: the pages the step path writes and the attention kernel reads in place.
    Host(Vec<Page>),
    /// On an accelerator: keys and values, [kv_heads, capacity, head_dim] each.
    Device { k: Tensor, v: Tensor },
}

impl LayerKv {
    /// An empty cache; on an accelerator with room for `capacity` positions.
    fn new(kv_heads: usize, head_dim: usize, capacity: usize, device: &Device, dtype: DType) -> Result<Self> {
        let store = if device.is_cpu() {
            KvStore::Host(Vec::new())
        } else {
            // Two allocations: clones of one tensor would share the storage `slice_set` writes.
            let buffer = || Tensor::zeros((kv_heads, capacity, head_dim), dtype, device);
            KvStore::Device {
                k: buffer()?,
                v: buffer()?,
            }
        };
        Ok(Self {
            kv_heads,
            head_dim,
            len: 0,
            store,
        })
    }

    /// Floats in one host page.
    fn page_len(&self) -> usize {
        2 * self.kv_heads * PAGE * self.head_dim
    }

    /// A copy of the first `len` positions (on an accelerator in buffers of `capacity`).
    fn copy_prefix(&self, len: usize, capacity: usize) -> Result<Self> {
        let store = match &self.store {
            // Full pages are shared (never written again: appends land past `len`); a partly
            // filled last page is copied, as its rest will be written.
            KvStore::Host(pages) => KvStore::Host(
                pages[..len.div_ceil(PAGE)]
                    .iter()
                    .enumerate()
                    .map(|(i, page)| match (i + 1) * PAGE <= len {
                        true => page.clone(),
                        false => Page::from(&page[..]),
                    })
                    .collect(),
            ),
            KvStore::Device { k, v } => {
                let copy = Self::new(self.kv_heads, self.head_dim, capacity, k.device(), k.dtype())?;
                let KvStore::Device { k: ck, v: cv } = &copy.store else {
                    unreachable!("a copy is made where its original lives");
                };
                ck.slice_set(&k.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                cv.slice_set(&v.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                copy.store
            }
        };
        Ok(Self {
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            len,
            store,
        })
    }

    /// Room for `n` more positions: new host pages, or a doubled accelerator buffer.
    fn reserve(&mut self, n: usize) -> Result<()> {
        let page_len = self.page_len();
        match &mut self.store {
            KvStore::Host(pages) => {
                while pages.len() * PAGE < self.len + n {
                    // Straight into the shared allocation (a Vec would be copied into it).
                    pages.push(std::iter::repeat_n(0.0, page_len).collect());
                }
            }
            KvStore::Device { k, .. } => {
                if self.len + n > k.dim(1)? {
                    *self = self.copy_prefix(self.len, (self.len + n).next_power_of_two())?;
                }
            }
        }
        Ok(())
    }

    /// Stores `n` new positions after the cached ones: `k` and `v` hold them as [n, kv_heads,
    /// head_dim] on the host.
    fn append_host(&mut self, k: &[f32], v: &[f32], n: usize) -> Result<()> {
        self.reserve(n)?;
        let (hd, heads, len) = (self.head_dim, self.kv_heads, self.len);
        let KvStore::Host(pages) = &mut self.store else {
            candle_core::bail!("host rows for a cache on an accelerator");
        };
        for t in 0..n {
            // Unshared (see `copy_prefix`), so this never copies.
            let page = std::sync::Arc::make_mut(&mut pages[(len + t) / PAGE]);
            for g in 0..heads {
                let from = (t * heads + g) * hd;
                let (key, value) = page_slot(heads, hd, g, len + t);
                page[key..key + hd].copy_from_slice(&k[from..from + hd]);
                page[value..value + hd].copy_from_slice(&v[from..from + hd]);
            }
        }
        self.len += n;
        Ok(())
    }

    /// Stores `k`, `v` ([n, kv_heads, head_dim] tensors) after the cached positions.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        if matches!(self.store, KvStore::Host(_)) {
            let host = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            return self.append_host(&host(k)?, &host(v)?, k.dim(0)?);
        }
        let n = k.dim(0)?;
        self.reserve(n)?;
        let KvStore::Device { k: ck, v: cv } = &self.store else {
            unreachable!("checked above");
        };
        ck.slice_set(&k.transpose(0, 1)?.contiguous()?, 1, self.len)?;
        cv.slice_set(&v.transpose(0, 1)?.contiguous()?, 1, self.len)?;
        self.len += n;
        Ok(())
    }

    /// The whole history as tensors, [kv_heads, len, head_dim] each.
    fn history(&self) -> Result<(Tensor, Tensor)> {
        match &self.store {
            KvStore::Host(pages) => {
                let (hd, heads, len) = (self.head_dim, self.kv_heads, self.len);
                // Keys (`values` false) or values of every head, position by position.
                let gather = |values: bool| {
                    let rows: Vec<f32> = (0..heads)
                        .flat_map(|g| (0..len).map(move |u| (g, u)))
                        .flat_map(|(g, u)| {
                            let (key, value) = page_slot(heads, hd, g, u);
                            let at = if values { value } else { key };
                            pages[u / PAGE][at..at + hd].iter().copied()
                        })
                        .collect();
                    Tensor::from_vec(rows, (heads, len, hd), &Device::Cpu)
                };
                Ok((gather(false)?, gather(true)?))
            }
            KvStore::Device { k, v } => Ok((k.narrow(1, 0, self.len)?, v.narrow(1, 0, self.len)?)),
        }
    }

    /// The host pages, for the attention kernel.
    fn host(&self) -> Result<&[Page]> {
        match &self.store {
            KvStore::Host(pages) => Ok(pages),
            KvStore::Device { .. } => candle_core::bail!("the attention kernel runs on CPU"),
        }
    }

    fn bytes(&self) -> usize {
        match &self.store {
            KvStore::Host(pages) => pages.len() * self.page_len() * std::mem::size_of::<f32>(),
            KvStore::Device { k, .. } => 2 * k.elem_count() * k.dtype().size_in_bytes(),
        }
    }
}

impl KvCache {
    /// Positions stored so far (the next row's RoPE position).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the buffers (capacity, not length), pages shared with other caches included.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum()
    }

    /// A copy of the first `len` positions: on an accelerator in buffers of its own (a clone
    /// would share buffers that appends write in place); on the host sharing the full pages,
    /// which no cache writes again.
    pub fn copy_prefix(&self, len: usize) -> Result<KvCache> {
        let capacity = len.max(64).next_power_of_two();
        let layers = self
            .layers
            .iter()
            .map(|l| l.copy_prefix(len, capacity))
            .collect::<Result<_>>()?;
        Ok(KvCache { layers })
    }

    /// Forgets every position, keeping the buffers (the code predictor's per-frame cache).
    pub fn clear(&mut self) {
        for layer in &mut self.layers {
            layer.len = 0;
        }
    }

    /// Layer `i` for rows of `x`'s device and dtype, created when this is its first use (on an
    /// accelerator with room for `n` first positions).
    fn layer(
        &mut self,
        i: usize,
        kv_heads: usize,
        head_dim: usize,
        n: usize,
        x: (&Device, DType),
    ) -> Result<&mut LayerKv> {
        if self.layers.len() <= i {
            let capacity = n.max(64).next_power_of_two();
            self.layers.push(LayerKv::new(kv_heads, head_dim, capacity, x.0, x.1)?);
        }
        Ok(&mut self.layers[i])
    }
}

/// Rotate-half RoPE tables for arbitrary positions, computed in f32 as transformers does.
#[derive(Debug, Clone)]
pub struct Rope {
    /// [1, head_dim / 2]
    inv_freq: Tensor,
    inv_freq_host: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, device: &Device) -> Result<Self> {
        let inv: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / (theta as f32).powf(i as f32 / head_dim as f32))
            .collect();
        Ok(Self {
            inv_freq: Tensor::from_slice(&inv, (1, inv.len()), device)?,
            inv_freq_host: inv,
        })
    }

    /// cos, sin as [rows, head_dim / 2] on the host: the same f32 products and `cos`/`sin` as
    /// [`Rope::tables`].
    fn host_tables(&self, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let freqs = positions
            .iter()
            .flat_map(|&p| self.inv_freq_host.iter().map(move |&f| p as f32 * f));
        freqs.map(|f| (f.cos(), f.sin())).unzip()
    }

    /// cos, sin of shape [rows, 1, head_dim / 2] for the given positions.
    fn tables(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (positions.len(), 1), self.inv_freq.device())?;
        let freqs = pos.matmul(&self.inv_freq)?.unsqueeze(1)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }
}

#[derive(Debug, Clone)]
struct Attention {
    /// q_proj, k_proj and v_proj stacked: [N, (heads + 2·kv_heads)·head_dim] out.
    qkv_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

#[derive(Debug, Clone)]
struct Mlp {
    /// gate_proj and up_proj stacked: [N, 2·intermediate] out.
    gate_up_proj: Linear,
    intermediate: usize,
    down_proj: Linear,
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// The stacked layers and the final norm.
#[derive(Debug, Clone)]
pub struct Decoder {
    layers: Vec<Layer>,
    norm: RmsNorm,
    rope: Rope,
    cfg: DecoderConfig,
}

/// The rows of one sequence inside a stacked batch: `rows` consecutive input rows, its cache.
pub struct SeqRows<'a> {
    pub rows: usize,
    pub cache: &'a mut KvCache,
}

/// Outputs of a decoder pass over stacked rows.
pub struct DecoderOutput {
    /// Final-norm hidden states, [N, hidden].
    pub hidden: Tensor,
    /// Each layer's output (before the final norm), when asked for.
    pub layers: Vec<Tensor>,
}

impl Decoder {
    /// `vb` points at the module holding `layers.*` and `norm`.
    pub fn load(vb: VarBuilder, cfg: &DecoderConfig, format: WeightFormat) -> Result<Self> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let vb = vb.pp(format!("layers.{i}"));
            let at = vb.pp("self_attn");
            let mlp = vb.pp("mlp");
            let b = cfg.attention_bias;
            layers.push(Layer {
                input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
                self_attn: Attention {
                    qkv_proj: Linear::load_stacked(
                        &[
                            (at.pp("q_proj"), cfg.num_heads * hd),
                            (at.pp("k_proj"), cfg.num_kv_heads * hd),
                            (at.pp("v_proj"), cfg.num_kv_heads * hd),
                        ],
                        h,
                        b,
                        format,
                    )?,
                    o_proj: Linear::load(at.pp("o_proj"), cfg.num_heads * hd, h, b, format)?,
                    q_norm: RmsNorm::load(at.pp("q_norm"), hd, cfg.rms_norm_eps)?,
                    k_norm: RmsNorm::load(at.pp("k_norm"), hd, cfg.rms_norm_eps)?,
                    num_heads: cfg.num_heads,
                    num_kv_heads: cfg.num_kv_heads,
                    head_dim: hd,
                },
                post_attention_layernorm: RmsNorm::load(vb.pp("post_attention_layernorm"), h, cfg.rms_norm_eps)?,
                mlp: Mlp {
                    gate_up_proj: Linear::load_stacked(
                        &[
                            (mlp.pp("gate_proj"), cfg.intermediate_size),
                            (mlp.pp("up_proj"), cfg.intermediate_size),
                        ],
                        h,
                        false,
                        format,
                    )?,
                    intermediate: cfg.intermediate_size,
                    down_proj: Linear::load(mlp.pp("down_proj"), cfg.intermediate_size, h, false, format)?,
                },
            });
        }
        Ok(Self {
            layers,
            norm: RmsNorm::load(vb.pp("norm"), h, cfg.rms_norm_eps)?,
            rope: Rope::new(hd, cfg.rope_theta, vb.device())?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// Runs every layer over `x` ([N, hidden], the rows of `seqs` stacked in order). Each
    /// sequence's rows take the positions after what its cache holds, and are appended to it.
    pub fn forward(&self, x: &Tensor, seqs: &mut [SeqRows], keep_layers: bool) -> Result<DecoderOutput> {
        let mut positions = Vec::with_capacity(x.dim(0)?);
        for s in seqs.iter() {
            let start = s.cache.len() as u32;
            positions.extend(start..start + s.rows as u32);
        }
        let few_rows = seqs.iter().all(|s| s.rows <= gemv::PROJECTION_ROWS);
        if few_rows && x.device().is_cpu() && x.dtype() == DType::F32 {
            return self.forward_host(x, &positions, seqs, keep_layers);
        }
        let (cos, sin) = self.rope.tables(&positions)?;
        let mut x = x.clone();
        let mut layers = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x)?;
            let attn = layer.self_attn.forward(&h, &cos, &sin, i, seqs)?;
            x = (x + attn)?;
            let h = layer.post_attention_layernorm.forward(&x)?;
            x = (x + layer.mlp.forward(&h)?)?;
            if keep_layers {
                layers.push(x.clone());
            }
        }
        Ok(DecoderOutput {
            hidden: self.norm.forward(&x)?,
            layers,
        })
    }
}

/// The decoder's CPU path for decode steps and short prefills (every sequence at most
/// [`gemv::PROJECTION_ROWS`] rows): the same arithmetic as the tensor path, on host buffers.
/// Hand-written because a decode step's norms, RoPE, cache appends and activations are ~20
/// candle ops per layer on a few rows each, whose dispatch, allocation and single-threaded
/// stretches between the parallel matmuls took ~20 % of a batch-10 step on a 2-core Zen 4.
impl Decoder {
    fn forward_host(
        &self,
        x: &Tensor,
        positions: &[u32],
        seqs: &mut [SeqRows],
        keep_layers: bool,
    ) -> Result<DecoderOutput> {
        let (n, width) = x.dims2()?;
        let (cos, sin) = self.rope.host_tables(positions);
        let mut x = x.flatten_all()?.to_vec1::<f32>()?;
        let mut normed = vec![0f32; x.len()];
        let mut layers = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            layer.input_layernorm.forward_host(&x, &mut normed);
            let attn = layer.self_attn.forward_host(&normed, n, (&cos, &sin), i, seqs)?;
            activation::add_assign(&mut x, &attn);
            layer.post_attention_layernorm.forward_host(&x, &mut normed);
            activation::add_assign(&mut x, &layer.mlp.forward_host(&normed, n)?);
            if keep_layers {
                layers.push(Tensor::from_slice(&x, (n, width), &Device::Cpu)?);
            }
        }
        self.norm.forward_host(&x, &mut normed);
        Ok(DecoderOutput {
            hidden: Tensor::from_vec(normed, (n, width), &Device::Cpu)?,
            layers,
        })
    }
}

impl Mlp {
    /// [`Mlp::forward`] on `n` host rows.
    fn forward_host(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let gate_up = self.gate_up_proj.forward_host(x, n)?;
        let mut act = vec![0f32; n * self.intermediate];
        activation::silu_mul(&gate_up, self.intermediate, &mut act);
        self.down_proj.forward_host(&act, n)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(x)?;
        let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, self.intermediate)?)?;
        self.down_proj
            .forward(&(gate * gate_up.narrow(1, self.intermediate, self.intermediate)?)?)
    }
}

impl Attention {
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, layer: usize, seqs: &mut [SeqRows]) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (hd, nh, nkv) = (self.head_dim, self.num_heads, self.num_kv_heads);
        // [N, heads, 1, head_dim]: one rope "batch" per row, each with its own position.
        let qkv = self.qkv_proj.forward(x)?;
        let q = self
            .q_norm
            .forward(&qkv.narrow(1, 0, nh * hd)?.reshape((n, nh, 1, hd))?)?;
        let k = self
            .k_norm
            .forward(&qkv.narrow(1, nh * hd, nkv * hd)?.reshape((n, nkv, 1, hd))?)?;
        let v = qkv.narrow(1, (nh + nkv) * hd, nkv * hd)?.reshape((n, nkv, hd))?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?.squeeze(2)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?.squeeze(2)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut pasts = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for s in seqs.iter_mut() {
            let cache = s.cache.layer(layer, nkv, hd, s.rows, (x.device(), x.dtype()))?;
            pasts.push(cache.len);
            cache.append(&k.narrow(0, start, s.rows)?, &v.narrow(0, start, s.rows)?)?;
            start += s.rows;
        }
        self.o_proj.forward(&self.attend_ops(&q, layer, seqs, &pasts, scale)?)
    }

    /// [`Attention::forward`] on `n` host rows (the rows of `seqs` in order) whose RoPE tables
    /// are `cos_sin` ([n, head_dim / 2] each): q/k norm and RoPE per head, the new keys and
    /// values appended to each cache, then the attention kernel and `o_proj`.
    fn forward_host(
        &self,
        x: &[f32],
        n: usize,
        cos_sin: (&[f32], &[f32]),
        layer: usize,
        seqs: &mut [SeqRows],
    ) -> Result<Vec<f32>> {
        let (hd, nh, nkv) = (self.head_dim, self.num_heads, self.num_kv_heads);
        let qkv = self.qkv_proj.forward_host(x, n)?;
        let width = (nh + 2 * nkv) * hd;
        let mut q = vec![0f32; n * nh * hd];
        // Each sequence's queries, its rows of `qkv`, and their RoPE tables.
        let mut tasks = Vec::with_capacity(seqs.len());
        let (mut q_rest, mut start, half) = (&mut q[..], 0, hd / 2);
        for s in seqs.iter_mut() {
            let (q_seq, rest) = std::mem::take(&mut q_rest).split_at_mut(s.rows * nh * hd);
            q_rest = rest;
            let rows = start..start + s.rows;
            let tables = (
                &cos_sin.0[rows.start * half..rows.end * half],
                &cos_sin.1[rows.start * half..rows.end * half],
            );
            tasks.push((s, q_seq, &qkv[rows.start * width..rows.end * width], tables));
            start = rows.end;
        }
        // Sequences in parallel: per-row work between two kernels that ran serially took ~9 %
        // of a batch-10 q4_k step.
        let pasts = tasks
            .into_par_iter()
            .map(|(s, q_seq, qkv, tables)| self.store_rows(s, layer, qkv, q_seq, tables))
            .collect::<Result<Vec<usize>>>()?;
        let out = self.attend_host(&q, layer, seqs, &pasts)?;
        self.o_proj.forward_host(&out, n)
    }

    /// One sequence's new rows (`qkv`, [rows, (heads + 2·kv_heads)·head_dim]): q/k norm and
    /// RoPE per head (`cos_sin` the rows' tables), queries into `q` ([rows, heads, head_dim]),
    /// keys and values appended to the sequence's cache for `layer`. Returns the positions
    /// cached before.
    fn store_rows(
        &self,
        s: &mut SeqRows,
        layer: usize,
        qkv: &[f32],
        q: &mut [f32],
        cos_sin: (&[f32], &[f32]),
    ) -> Result<usize> {
        let (hd, nh, nkv) = (self.head_dim, self.num_heads, self.num_kv_heads);
        let (width, half) = ((nh + 2 * nkv) * hd, hd / 2);
        let (mut k, mut v) = (vec![0f32; s.rows * nkv * hd], vec![0f32; s.rows * nkv * hd]);
        for (r, row) in qkv.chunks_exact(width).enumerate() {
            let (cos, sin) = (
                &cos_sin.0[r * half..(r + 1) * half],
                &cos_sin.1[r * half..(r + 1) * half],
            );
            let q_row = &mut q[r * nh * hd..(r + 1) * nh * hd];
            self.q_norm.forward_host(&row[..nh * hd], q_row);
            let k_row = &mut k[r * nkv * hd..(r + 1) * nkv * hd];
            self.k_norm.forward_host(&row[nh * hd..(nh + nkv) * hd], k_row);
            activation::rope(q_row, cos, sin);
            activation::rope(k_row, cos, sin);
            v[r * nkv * hd..(r + 1) * nkv * hd].copy_from_slice(&row[(nh + nkv) * hd..]);
        }
        let cache = s.cache.layer(layer, nkv, hd, s.rows, (&Device::Cpu, DType::F32))?;
        let past = cache.len;
        cache.append_host(&k, &v, s.rows)?;
        Ok(past)
    }

    /// The attention kernel over host queries ([N, heads, head_dim]), reading each cache in
    /// place.
    fn attend_host(&self, q: &[f32], layer: usize, seqs: &[SeqRows], pasts: &[usize]) -> Result<Vec<f32>> {
        let mut cached = Vec::with_capacity(seqs.len());
        for (s, &past) in seqs.iter().zip(pasts) {
            let l = &s.cache.layers[layer];
            cached.push(CachedRows {
                pages: l.host()?,
                past,
                rows: s.rows,
            });
        }
        let shape = Heads {
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        Ok(attention::attend(q, &cached, shape, scale as f32))
    }

    /// Candle ops per sequence (any device; on CPU prefills over [`gemv::PROJECTION_ROWS`]).
    fn attend_ops(&self, q: &Tensor, layer: usize, seqs: &[SeqRows], pasts: &[usize], scale: f64) -> Result<Tensor> {
        let (hd, nh, nkv) = (self.head_dim, self.num_heads, self.num_kv_heads);
        let rep = nh / nkv;
        let mut outs = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for (s, &past) in seqs.iter().zip(pasts) {
            let rows = s.rows;
            let (k_all, v_all) = s.cache.layers[layer].history()?;
            // Query heads h = g·rep + r share key/value head g (repeat_kv): group them so one
            // batched matmul per kv head covers its `rep` query heads without copying keys.
            let q_seq = q
                .narrow(0, start, rows)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((nkv, rep * rows, hd))?;
            let mut att = (q_seq.matmul(&k_all.t()?)? * scale)?;
            if rows > 1 {
                att = att.broadcast_add(&causal_mask(rep, rows, past, att.dtype(), q.device())?)?;
            }
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let o = att.matmul(&v_all.contiguous()?)?; // [kv, rep*rows, hd]
            let o = o.reshape((nh, rows, hd))?.transpose(0, 1)?.reshape((rows, nh * hd))?;
            outs.push(o);
            start += rows;
        }
        if outs.len() == 1 {
            Ok(outs.pop().unwrap())
        } else {
            Tensor::cat(&outs, 0)
        }
    }
}

/// Additive causal mask [rep·rows, past + rows] for `rows` new queries after `past` cached keys,
/// repeated for the `rep` query heads grouped on one key/value head.
fn causal_mask(rep: usize, rows: usize, past: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let total = past + rows;
    let mask: Vec<f32> = (0..rep * rows)
        .flat_map(|i| {
            let t = i % rows;
            (0..total).map(move |j| if j <= past + t { 0.0 } else { f32::NEG_INFINITY })
        })
        .collect();
    Tensor::from_vec(mask, (rep * rows, total), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A random two-layer decoder with the talker's head layout scaled down.
    fn decoder() -> Result<Decoder> {
        let cfg = DecoderConfig {
            hidden_size: 64,
            intermediate_size: 96,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            attention_bias: false,
        };
        let dev = Device::Cpu;
        let mut tensors = HashMap::new();
        let mut put = |name: String, shape: &[usize]| -> Result<()> {
            let t = match shape.len() {
                1 => (Tensor::randn(0f32, 0.1, shape, &dev)? + 1.0)?,
                _ => Tensor::randn(0f32, 0.15, shape, &dev)?,
            };
            tensors.insert(name, t);
            Ok(())
        };
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        for l in 0..cfg.num_layers {
            let p = format!("layers.{l}");
            put(format!("{p}.input_layernorm.weight"), &[h])?;
            put(format!("{p}.post_attention_layernorm.weight"), &[h])?;
            put(format!("{p}.self_attn.q_proj.weight"), &[cfg.num_heads * hd, h])?;
            put(format!("{p}.self_attn.k_proj.weight"), &[cfg.num_kv_heads * hd, h])?;
            put(format!("{p}.self_attn.v_proj.weight"), &[cfg.num_kv_heads * hd, h])?;
            put(format!("{p}.self_attn.o_proj.weight"), &[h, cfg.num_heads * hd])?;
            put(format!("{p}.self_attn.q_norm.weight"), &[hd])?;
            put(format!("{p}.self_attn.k_norm.weight"), &[hd])?;
            put(format!("{p}.mlp.gate_proj.weight"), &[i, h])?;
            put(format!("{p}.mlp.up_proj.weight"), &[i, h])?;
            put(format!("{p}.mlp.down_proj.weight"), &[h, i])?;
        }
        put("norm.weight".into(), &[h])?;
        Decoder::load(
            VarBuilder::from_tensors(tensors, DType::F32, &dev),
            &cfg,
            WeightFormat::Dense,
        )
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
    }

    /// A prefix copy shares the prefix's full pages and copies the partly filled one; steps of
    /// the copy and of the original then write only their own pages: the original's keys and
    /// values stay as they were, and the copy's next step equals one over a fresh prefill.
    #[test]
    fn prefix_copies_share_full_pages_and_write_only_their_own() -> Result<()> {
        let dec = decoder()?;
        let rows = 2 * PAGE + 5;
        let x = Tensor::randn(0f32, 1.0, (rows + 2, 64), &Device::Cpu)?;
        let prefill = |cache: &mut KvCache| -> Result<()> {
            let seq = &mut [SeqRows { rows, cache }];
            dec.forward(&x.narrow(0, 0, rows)?, seq, false).map(|_| ())
        };
        let step = |cache: &mut KvCache, row: usize| -> Result<Tensor> {
            let seq = &mut [SeqRows { rows: 1, cache }];
            Ok(dec.forward(&x.narrow(0, row, 1)?, seq, false)?.hidden)
        };
        let mut original = KvCache::default();
        prefill(&mut original)?;
        let mut copy = original.copy_prefix(rows)?;
        for (a, b) in original.layers.iter().zip(&copy.layers) {
            let (a, b) = (a.host()?, b.host()?);
            let shared: Vec<bool> = a.iter().zip(b).map(|(a, b)| std::sync::Arc::ptr_eq(a, b)).collect();
            assert_eq!(shared, [true, true, false]);
        }
        let kept = original.layers[1].history()?;
        step(&mut original, rows + 1)?;
        let got = step(&mut copy, rows)?;
        let now = original.layers[1].history()?;
        for (kept, now) in [(&kept.0, &now.0), (&kept.1, &now.1)] {
            let now = now.narrow(1, 0, rows)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(kept.flatten_all()?.to_vec1::<f32>()?, now);
        }
        let mut fresh = KvCache::default();
        prefill(&mut fresh)?;
        assert_eq!(max_rel_diff(&got, &step(&mut fresh, rows)?)?, 0.0);
        Ok(())
    }

    /// A prompt longer than `PROJECTION_ROWS` takes the tensor path and fills the host cache;
    /// the same rows in shorter chunks take the host path (appending across pages). Both give
    /// the same hidden states, and the steps after them agree.
    #[test]
    fn host_path_agrees_with_the_tensor_path_and_across_cache_growth() -> Result<()> {
        let dec = decoder()?;
        let rows = gemv::PROJECTION_ROWS + 22;
        let x = Tensor::randn(0f32, 1.0, (rows + 3, 64), &Device::Cpu)?;
        let mut whole = KvCache::default();
        let prompt = x.narrow(0, 0, rows)?;
        let a = dec.forward(
            &prompt,
            &mut [SeqRows {
                rows,
                cache: &mut whole,
            }],
            false,
        )?;
        let mut chunked = KvCache::default();
        let mut parts = Vec::new();
        for (start, len) in [(0, 100), (100, rows - 100)] {
            let seq = &mut [SeqRows {
                rows: len,
                cache: &mut chunked,
            }];
            parts.push(dec.forward(&x.narrow(0, start, len)?, seq, false)?.hidden);
        }
        assert!(max_rel_diff(&Tensor::cat(&parts, 0)?, &a.hidden)? < 1e-5);
        assert_eq!((whole.len(), chunked.len()), (rows, rows));
        for t in rows..rows + 3 {
            let row = x.narrow(0, t, 1)?;
            let a = dec.forward(
                &row,
                &mut [SeqRows {
                    rows: 1,
                    cache: &mut whole,
                }],
                false,
            )?;
            let b = dec.forward(
                &row,
                &mut [SeqRows {
                    rows: 1,
                    cache: &mut chunked,
                }],
                false,
            )?;
            assert!(max_rel_diff(&b.hidden, &a.hidden)? < 1e-5, "step at position {t}");
        }
        Ok(())
    }
}
