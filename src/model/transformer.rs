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

use super::attention::{self, CachedRows, Heads};
use super::gemv;
use super::linear::{Linear, WeightFormat};
use candle_core::{DType, Device, Module, Result, Storage, Tensor};
use candle_nn::VarBuilder;

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
    eps: f32,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps: eps as f32,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

/// Keys and values of one sequence for every layer, in buffers that grow by doubling so a
/// decode step appends in place instead of re-concatenating the whole history.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
}

#[derive(Debug, Clone)]
struct LayerKv {
    /// [kv_heads, capacity, head_dim]
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl KvCache {
    /// Positions stored so far (the next row's RoPE position).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the buffers (capacity, not length).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| 2 * l.k.elem_count() * l.k.dtype().size_in_bytes())
            .sum()
    }

    /// A copy of the first `len` positions with buffers of its own (a clone would share them,
    /// and `append` writes in place).
    pub fn copy_prefix(&self, len: usize) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let (kv_heads, _, head_dim) = l.k.dims3()?;
                let cap = len.max(64).next_power_of_two();
                let copy = |t: &Tensor| -> Result<Tensor> {
                    let buffer = Tensor::zeros((kv_heads, cap, head_dim), t.dtype(), t.device())?;
                    buffer.slice_set(&t.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                    Ok(buffer)
                };
                Ok(LayerKv {
                    k: copy(&l.k)?,
                    v: copy(&l.v)?,
                    len,
                })
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { layers })
    }

    /// Forgets every position, keeping the buffers (the code predictor's per-frame cache).
    pub fn clear(&mut self) {
        for layer in &mut self.layers {
            layer.len = 0;
        }
    }

    /// Appends `k`, `v` ([kv_heads, n, head_dim]) to layer `i`.
    fn append(&mut self, i: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let (kv_heads, n, head_dim) = k.dims3()?;
        if self.layers.len() <= i {
            let cap = (n.max(64)).next_power_of_two();
            // Two allocations: clones of one tensor would share the storage `slice_set` writes.
            let buffer = || Tensor::zeros((kv_heads, cap, head_dim), k.dtype(), k.device());
            self.layers.push(LayerKv {
                k: buffer()?,
                v: buffer()?,
                len: 0,
            });
        }
        let layer = &mut self.layers[i];
        let cap = layer.k.dim(1)?;
        if layer.len + n > cap {
            let new_cap = (layer.len + n).next_power_of_two();
            let grow = |old: &Tensor| -> Result<Tensor> {
                let t = Tensor::zeros((kv_heads, new_cap, head_dim), old.dtype(), old.device())?;
                t.slice_set(&old.narrow(1, 0, layer.len)?.contiguous()?, 1, 0)?;
                Ok(t)
            };
            layer.k = grow(&layer.k)?;
            layer.v = grow(&layer.v)?;
        }
        layer.k.slice_set(&k.contiguous()?, 1, layer.len)?;
        layer.v.slice_set(&v.contiguous()?, 1, layer.len)?;
        layer.len += n;
        Ok(())
    }

    /// Views of layer `i`'s whole history, [kv_heads, len, head_dim] each.
    fn history(&self, i: usize) -> Result<(Tensor, Tensor)> {
        let layer = &self.layers[i];
        Ok((layer.k.narrow(1, 0, layer.len)?, layer.v.narrow(1, 0, layer.len)?))
    }
}

/// Rotate-half RoPE tables for arbitrary positions, computed in f32 as transformers does.
#[derive(Debug, Clone)]
pub struct Rope {
    /// [1, head_dim / 2]
    inv_freq: Tensor,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, device: &Device) -> Result<Self> {
        let inv: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / (theta as f32).powf(i as f32 / head_dim as f32))
            .collect();
        let n = inv.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv, (1, n), device)?,
        })
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

impl Mlp {
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
            pasts.push(s.cache.layers.get(layer).map_or(0, |l| l.len));
            let k_new = k.narrow(0, start, s.rows)?.transpose(0, 1)?;
            let v_new = v.narrow(0, start, s.rows)?.transpose(0, 1)?;
            s.cache.append(layer, &k_new, &v_new)?;
            start += s.rows;
        }
        let few_rows = seqs.iter().all(|s| s.rows <= gemv::PROJECTION_ROWS);
        let o = if few_rows && x.device().is_cpu() && x.dtype() == DType::F32 {
            self.attend_cpu(&q, layer, seqs, &pasts, scale as f32)?
        } else {
            self.attend_ops(&q, layer, seqs, &pasts, scale)?
        };
        self.o_proj.forward(&o)
    }

    /// Decode steps and prefills up to [`gemv::PROJECTION_ROWS`] on CPU: the attention kernel,
    /// reading each cache in place.
    fn attend_cpu(&self, q: &Tensor, layer: usize, seqs: &[SeqRows], pasts: &[usize], scale: f32) -> Result<Tensor> {
        let n = q.dim(0)?;
        let q = q.contiguous()?;
        let (q_storage, q_layout) = q.storage_and_layout();
        let q_all = cpu_f32(&q_storage)?;
        let q_rows = &q_all[q_layout.start_offset()..q_layout.start_offset() + q.elem_count()];
        let mut buffers = Vec::with_capacity(seqs.len());
        for s in seqs {
            let l = &s.cache.layers[layer];
            buffers.push((l.k.storage_and_layout().0, l.v.storage_and_layout().0, l.k.dim(1)?));
        }
        let mut cached = Vec::with_capacity(seqs.len());
        for ((s, &past), (k, v, capacity)) in seqs.iter().zip(pasts).zip(&buffers) {
            cached.push(CachedRows {
                keys: cpu_f32(k)?,
                values: cpu_f32(v)?,
                capacity: *capacity,
                past,
                rows: s.rows,
            });
        }
        let shape = Heads {
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        };
        let out = attention::attend(q_rows, &cached, shape, scale);
        Tensor::from_vec(out, (n, self.num_heads * self.head_dim), &Device::Cpu)
    }

    /// Any device, any row count: candle ops per sequence.
    fn attend_ops(&self, q: &Tensor, layer: usize, seqs: &[SeqRows], pasts: &[usize], scale: f64) -> Result<Tensor> {
        let (hd, nh, nkv) = (self.head_dim, self.num_heads, self.num_kv_heads);
        let rep = nh / nkv;
        let mut outs = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for (s, &past) in seqs.iter().zip(pasts) {
            let rows = s.rows;
            let (k_all, v_all) = s.cache.history(layer)?;
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

/// The f32 data of a CPU storage.
fn cpu_f32(storage: &Storage) -> Result<&[f32]> {
    match storage {
        Storage::Cpu(c) => c.as_slice::<f32>(),
        _ => candle_core::bail!("the attention kernel runs on CPU"),
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
