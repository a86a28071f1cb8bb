//! GPT-2's causal self-attention: the `c_attn` projection into queries, keys and values, the
//! KV cache writes, attention (candle's batched matmuls for a prefill, the decode kernel per
//! (row, head) for a step), and the `c_proj` output projection.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::cache::{KvBuffer, KvElement};
use crate::kernels::attention::attend;
use crate::linear::Conv1D;
use crate::weights::NamedTensors;
use crate::{Gpt2Config, KvCache, ModelError};

#[derive(Debug, Clone)]
pub(crate) struct Attention {
    pub(crate) c_attn: Conv1D,
    pub(crate) c_proj: Conv1D,
    n_head: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    pub(crate) fn load(
        weights: &mut NamedTensors,
        prefix: &str,
        layer_idx: usize,
        cfg: &Gpt2Config,
    ) -> Result<Self, ModelError> {
        let mut scale = 1.0;
        if cfg.scale_attn_weights {
            scale /= (cfg.head_dim() as f64).sqrt();
        }
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer_idx + 1) as f64;
        }
        Ok(Self {
            c_attn: Conv1D::load(
                weights,
                &format!("{prefix}.c_attn"),
                cfg.n_embd,
                3 * cfg.n_embd,
            )?,
            c_proj: Conv1D::load(weights, &format!("{prefix}.c_proj"), cfg.n_embd, cfg.n_embd)?,
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            scale,
        })
    }

    /// `xs`: `(batch, new, n_embd)`, continuing the `past` positions held by `cache`'s layer
    /// `layer`, where this step's keys and values are written.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        cache: &mut KvCache,
        layer: usize,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (batch, new, n_embd) = xs.dims3()?;
        let past = cache.seq_len();
        let qkv = self.c_attn.forward(&xs.reshape((batch * new, n_embd))?)?;
        let qkv_data = qkv.flatten_all()?.to_vec1::<f32>()?;
        self.write_cache(&qkv_data, batch, new, cache, layer);
        let ys = if new == 1 {
            let out = self.decode_attention(&qkv_data, batch, cache, layer);
            Tensor::from_vec(out, (batch, n_embd), xs.device())?
        } else {
            let qkv = qkv
                .reshape((batch, new, 3, self.n_head, self.head_dim))?
                .permute((2, 0, 3, 1, 4))?;
            let q = qkv.get(0)?.contiguous()?;
            let (k, v) = if past == 0 {
                (qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?)
            } else {
                let shape = (batch, self.n_head, past + new, self.head_dim);
                let (k, v) = cache.gather(layer, past + new);
                (
                    Tensor::from_vec(k, shape, xs.device())?,
                    Tensor::from_vec(v, shape, xs.device())?,
                )
            };
            let scores = (q.matmul(&k.t()?)? * self.scale)?;
            let scores = match mask {
                Some(mask) => scores.broadcast_add(mask)?,
                None => scores,
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((batch * new, n_embd))?
        };
        self.c_proj.forward(&ys)?.reshape((batch, new, n_embd))
    }

    /// One decode step for the rows of several caches: `xs` is `(rows, n_embd)`, its rows grouped
    /// by cache in order, each cache at its own length.
    pub(crate) fn forward_step(
        &self,
        xs: &Tensor,
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let (rows, n_embd) = xs.dims2()?;
        let qkv = self
            .c_attn
            .forward_step(xs)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(rows * n_embd);
        let mut first = 0;
        for cache in caches.iter_mut() {
            let count = cache.rows();
            let part = &qkv[first * 3 * n_embd..(first + count) * 3 * n_embd];
            self.write_cache(part, count, 1, cache, layer);
            out.extend(self.decode_attention(part, count, cache, layer));
            first += count;
        }
        self.c_proj
            .forward_step(&Tensor::from_vec(out, (rows, n_embd), xs.device())?)
    }

    /// Copies this step's keys and values from the `(rows, 3·n_embd)` projection into the cache.
    fn write_cache(
        &self,
        qkv: &[f32],
        batch: usize,
        new: usize,
        cache: &mut KvCache,
        layer: usize,
    ) {
        let n_embd = self.n_head * self.head_dim;
        let past = cache.seq_len();
        for b in 0..batch {
            for t in 0..new {
                let row = &qkv[(b * new + t) * 3 * n_embd..(b * new + t + 1) * 3 * n_embd];
                let (keys, values) = (&row[n_embd..2 * n_embd], &row[2 * n_embd..]);
                cache.store(layer, b, past + t, keys, values);
            }
        }
    }

    /// One query per row attends to every cached position of its row: `(rows, n_embd)`.
    fn decode_attention(
        &self,
        qkv: &[f32],
        batch: usize,
        cache: &KvCache,
        layer: usize,
    ) -> Vec<f32> {
        let n_embd = self.n_head * self.head_dim;
        let scale = self.scale as f32;
        let positions = cache.seq_len() + 1;
        let mut out = vec![0.0f32; batch * n_embd];
        match cache.buffers(layer) {
            (KvBuffer::F32(k), KvBuffer::F32(v)) => {
                self.attend_rows(qkv, cache, k, v, scale, positions, &mut out)
            }
            (KvBuffer::F16(k), KvBuffer::F16(v)) => {
                self.attend_rows(qkv, cache, k, v, scale, positions, &mut out)
            }
            _ => unreachable!("a cache's buffers share its format"),
        }
        out
    }

    /// Every (row, head) of a decode step, in parallel: `qkv` is the step's `(rows, 3·n_embd)`
    /// projection, `out` is `(rows, n_embd)`.
    #[allow(clippy::too_many_arguments)]
    fn attend_rows<T: KvElement>(
        &self,
        qkv: &[f32],
        cache: &KvCache,
        keys: &[T],
        values: &[T],
        scale: f32,
        positions: usize,
        out: &mut [f32],
    ) {
        let (d, n_head) = (self.head_dim, self.n_head);
        let n_embd = n_head * d;
        out.par_chunks_mut(d)
            .with_min_len(4)
            .enumerate()
            .for_each(|(task, head_out)| {
                let (b, h) = (task / n_head, task % n_head);
                let q = &qkv[b * 3 * n_embd + h * d..b * 3 * n_embd + (h + 1) * d];
                let base = cache.offset(b, h, 0);
                attend(
                    q,
                    &keys[base..base + positions * d],
                    &values[base..base + positions * d],
                    scale,
                    head_out,
                );
            });
    }
}
