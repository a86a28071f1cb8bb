//! GPT-2's causal self-attention: the `c_attn` projection into queries, keys and values, the
//! KV cache writes, attention through the cache (the causal prefill kernel per (row, head) for a
//! prefill, the decode kernel per (row, head) for a step), and the `c_proj` output projection.

use candle_core::Tensor;
use rayon::prelude::*;

use half::f16;

use crate::cache::{HeadBuffers, KvBuffer, KvElement};
use crate::kernels::attention::{attend, attend_sharing};
use crate::kernels::causal_attention::attend_causal;
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

    /// `xs`: `(batch, new, n_embd)`, continuing the positions held by `cache`'s layer `layer`,
    /// where this step's keys and values are written.
    ///
    /// Each query attends through the cache to its own position: the causal mask is the length
    /// it reads, so no `(new, past + new)` score matrix is built (with candle's matmuls, at 512
    /// tokens those were 12 MB per layer, written and read four times: the scale, the mask, the
    /// softmax and the product; a 512-token bf16 prefill went from 1.02 to 0.62 s on the 2-vCPU
    /// EPYC). A query's arithmetic is the same whatever chunk it is prefilled in.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        cache: &mut KvCache,
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let (batch, new, n_embd) = xs.dims3()?;
        let qkv = self.c_attn.forward(&xs.reshape((batch * new, n_embd))?)?;
        let ys = self.attend_prefill(&qkv, batch, new, cache, layer)?;
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
        let qkv = self.c_attn.forward_step(xs)?;
        let ys = self.attend_step(&qkv, caches, layer)?;
        self.c_proj.forward_step(&ys)
    }

    /// [`Self::forward_step`] for the first `step_rows` rows of `xs` (over `caches`) and
    /// [`Self::forward`] for each chunk after them (`chunk_lens[i]` rows of one sequence
    /// continuing `chunk_caches[i]`), with each projection over all rows at once.
    pub(crate) fn forward_split(
        &self,
        xs: &Tensor,
        (step_rows, caches): (usize, &mut [&mut KvCache]),
        (chunk_lens, chunk_caches): (&[usize], &mut [&mut KvCache]),
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let qkv = self.c_attn.forward_split(xs, step_rows)?;
        let mut parts = Vec::with_capacity(1 + chunk_lens.len());
        if step_rows > 0 {
            parts.push(self.attend_step(&qkv.narrow(0, 0, step_rows)?, caches, layer)?);
        }
        let mut first = step_rows;
        for (&new, cache) in chunk_lens.iter().zip(chunk_caches.iter_mut()) {
            parts.push(self.attend_prefill(&qkv.narrow(0, first, new)?, 1, new, cache, layer)?);
            first += new;
        }
        self.c_proj
            .forward_split(&Tensor::cat(&parts, 0)?, step_rows)
    }

    /// A prefill's attention from its `(batch · new, 3·n_embd)` projection: writes the keys and
    /// values, returns `(batch · new, n_embd)`.
    fn attend_prefill(
        &self,
        qkv: &Tensor,
        batch: usize,
        new: usize,
        cache: &mut KvCache,
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        // Read in place: a copy of a 512-token projection is 4.7 MB of fresh pages per layer.
        let out = in_place(qkv, |qkv| {
            self.write_cache(qkv, batch, new, cache, layer);
            Ok(self.prefill_attention(qkv, batch, new, cache, layer))
        })?;
        Tensor::from_vec(
            out,
            (batch * new, self.n_head * self.head_dim),
            qkv.device(),
        )
    }

    /// A decode step's attention from its `(rows, 3·n_embd)` projection, rows grouped by cache:
    /// writes the keys and values, returns `(rows, n_embd)`.
    fn attend_step(
        &self,
        qkv: &Tensor,
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let n_embd = self.n_head * self.head_dim;
        let mut out = vec![0.0f32; qkv.dim(0)? * n_embd];
        // Read in place: a copy of a 48-row projection was 0.6 ms of a 16-client f32 step.
        in_place(qkv, |qkv| self.attend_caches(qkv, caches, layer, &mut out))?;
        Tensor::from_vec(out, (qkv.dim(0)?, n_embd), qkv.device())
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

    /// Query `t` of each row attends to the cached positions up to its own, `past + t`, where
    /// `past` is what the cache held before this step: `qkv` is `(batch · new, 3·n_embd)`, the
    /// result `(batch · new, n_embd)`. One task per (row, head).
    fn prefill_attention(
        &self,
        qkv: &[f32],
        batch: usize,
        new: usize,
        cache: &KvCache,
        layer: usize,
    ) -> Vec<f32> {
        match cache.buffers(layer) {
            (KvBuffer::F32(k), KvBuffer::F32(v)) => {
                self.prefill_heads(qkv, batch, new, cache, k, v)
            }
            (KvBuffer::F16(k), KvBuffer::F16(v)) => {
                self.prefill_heads(qkv, batch, new, cache, k, v)
            }
            _ => unreachable!("a cache's buffers share its format"),
        }
    }

    fn prefill_heads<T: KvElement>(
        &self,
        qkv: &[f32],
        batch: usize,
        new: usize,
        cache: &KvCache,
        keys: &[T],
        values: &[T],
    ) -> Vec<f32> {
        let (d, n_head) = (self.head_dim, self.n_head);
        let n_embd = n_head * d;
        let (past, scale) = (cache.seq_len(), self.scale as f32);
        // Each task writes its head's columns of every row, through pieces split off the output.
        let mut out = vec![0.0f32; batch * new * n_embd];
        let mut parts: Vec<Vec<&mut [f32]>> = (0..batch * n_head)
            .map(|_| Vec::with_capacity(new))
            .collect();
        for (b, rows) in out.chunks_mut(new * n_embd).enumerate() {
            for row in rows.chunks_mut(n_embd) {
                for (h, piece) in row.chunks_mut(d).enumerate() {
                    parts[b * n_head + h].push(piece);
                }
            }
        }
        parts
            .into_par_iter()
            .enumerate()
            .for_each(|(task, pieces)| {
                let (b, h) = (task / n_head, task % n_head);
                let mut q = Vec::with_capacity(new * d);
                for t in 0..new {
                    q.extend_from_slice(&qkv[(b * new + t) * 3 * n_embd + h * d..][..d]);
                }
                let base = cache.offset(b, h, 0);
                let span = (past + new) * d;
                let mut head = vec![0.0f32; new * d];
                attend_causal(
                    &q,
                    &keys[base..base + span],
                    &values[base..base + span],
                    d,
                    past,
                    scale,
                    &mut head,
                );
                for (piece, values) in pieces.into_iter().zip(head.chunks_exact(d)) {
                    piece.copy_from_slice(values);
                }
            });
        out
    }

    /// One query per row attends to every cached position of its row, this step's key and value
    /// written first: `qkv` is the step's `(rows, 3·n_embd)` projection, its rows grouped by
    /// cache in order; `out` is `(rows, n_embd)`. Every cache's (row, head) pairs run in one
    /// parallel pass (one pass per cache cost a 16-client step 192 fork-joins, each over 36
    /// short tasks) when the caches share a format, else one pass per cache.
    fn attend_caches(
        &self,
        qkv: &[f32],
        caches: &mut [&mut KvCache],
        layer: usize,
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        let mut first = 0;
        let steps: Vec<StepOf> = caches
            .iter()
            .map(|cache| {
                let step = StepOf::new(cache, first);
                first += step.rows;
                step
            })
            .collect();
        if let Some(heads) = layer_heads::<f32>(caches, layer) {
            self.attend_rows(qkv, &steps, heads, out);
        } else if let Some(heads) = layer_heads::<f16>(caches, layer) {
            self.attend_rows(qkv, &steps, heads, out);
        } else if caches.len() > 1 {
            // Caches of both formats: one pass per cache (one cache is always one format).
            let n_embd = self.n_head * self.head_dim;
            let mut first = 0;
            for cache in caches.iter_mut() {
                let count = cache.rows();
                self.attend_caches(
                    &qkv[first * 3 * n_embd..(first + count) * 3 * n_embd],
                    &mut [&mut **cache],
                    layer,
                    &mut out[first * n_embd..(first + count) * n_embd],
                )?;
                first += count;
            }
        } else {
            candle_core::bail!("a KV cache's rows are out of its buffers' range");
        }
        Ok(())
    }

    /// Every (row, head) of a decode step, in parallel: each task stores its head's key and
    /// value of this step at the row's new position, then attends over the row's positions.
    /// `qkv` is the step's `(rows, 3·n_embd)` projection and `out` is `(rows, n_embd)`; the rows
    /// of cache `i` (`steps[i]`, `heads[i]`: its `(row, head)` buffers in order) follow those of
    /// the caches before it.
    ///
    /// Written by the tasks, the new positions cost little: stored in a serial loop before the
    /// pass (4,608 cold cache lines per layer for 48 rows), they took 2.0 ms of a 71 ms
    /// 16-client f32 step with the pool's other thread idle.
    ///
    /// When some cache's rows share most of their positions (beams, which a fork leaves sharing
    /// all but their last few), each (cache, head) is one task over all its rows
    /// ([`attend_sharing`]): the shared positions come from memory once, for the first row, and
    /// from cache for the others. The bits are those of each row alone. 124M, 5 beams, q8_0:
    /// beams shared 90% of their positions on average, and the step's attention went from 87–101
    /// to 61–62 ms per request (`gpt2 bench`, 2-vCPU EPYC); `decode_attention_throughput` has
    /// both ways side by side. Otherwise one task per (row, head): for 16 caches of 3 sequences
    /// sharing only a 5-token prompt, the tasks per cache were 5% slower.
    fn attend_rows<T: KvElement>(
        &self,
        qkv: &[f32],
        steps: &[StepOf],
        heads: Vec<Vec<HeadBuffers<T>>>,
        out: &mut [f32],
    ) {
        let (d, n_head) = (self.head_dim, self.n_head);
        let n_embd = n_head * d;
        let scale = self.scale as f32;
        // Stores row `row`'s key and value of head `h` at `position`.
        let store =
            |row: usize, h: usize, position: usize, (keys, values): &mut (&mut [T], &mut [T])| {
                let projection = &qkv[row * 3 * n_embd..(row + 1) * 3 * n_embd];
                let at = position * d..(position + 1) * d;
                T::store_from_f32(&mut keys[at.clone()], &projection[n_embd + h * d..][..d]);
                T::store_from_f32(&mut values[at], &projection[2 * n_embd + h * d..][..d]);
            };
        let query = |row: usize, h: usize| &qkv[row * 3 * n_embd + h * d..][..d];
        let sharing = steps
            .iter()
            .any(|step| step.rows > 1 && 2 * step.shared > step.position);
        if !sharing {
            // One task per (row, head), in the order of `out`'s heads.
            let mut tasks = Vec::with_capacity(out.len() / d);
            for (step, heads) in steps.iter().zip(heads) {
                for (task, history) in heads.into_iter().enumerate() {
                    tasks.push((
                        step.first + task / n_head,
                        task % n_head,
                        step.position,
                        history,
                    ));
                }
            }
            tasks
                .into_par_iter()
                .zip(out.par_chunks_mut(d))
                .with_min_len(4)
                .for_each(|((row, h, position, mut history), head_out)| {
                    store(row, h, position, &mut history);
                    let (keys, values) = history;
                    let len = (position + 1) * d;
                    attend(query(row, h), &keys[..len], &values[..len], scale, head_out);
                });
            return;
        }
        // One task per (cache, head), over the cache's rows in order.
        let mut tasks = Vec::with_capacity(steps.len() * n_head);
        for (step, heads) in steps.iter().zip(heads) {
            let mut by_head: Vec<Vec<_>> = (0..n_head).map(|_| Vec::new()).collect();
            for (task, history) in heads.into_iter().enumerate() {
                by_head[task % n_head].push(history);
            }
            tasks.extend(
                by_head
                    .into_iter()
                    .enumerate()
                    .map(|(h, rows)| (step, h, rows)),
            );
        }
        let heads: Vec<Vec<f32>> = tasks
            .into_par_iter()
            .map(|(step, h, mut rows)| {
                for (b, history) in rows.iter_mut().enumerate() {
                    store(step.first + b, h, step.position, history);
                }
                let len = (step.position + 1) * d;
                let queries: Vec<&[f32]> =
                    (0..rows.len()).map(|b| query(step.first + b, h)).collect();
                let histories: Vec<(&[T], &[T])> = rows
                    .iter()
                    .map(|(keys, values)| (&keys[..len], &values[..len]))
                    .collect();
                let mut head = vec![0.0f32; rows.len() * d];
                attend_sharing(&queries, &histories, step.shared, scale, &mut head);
                head
            })
            .collect();
        let mut heads = heads.into_iter();
        for step in steps {
            for h in 0..n_head {
                let Some(head) = heads.next() else { return };
                for (b, head) in head.chunks(d).enumerate() {
                    out[(step.first + b) * n_embd + h * d..][..d].copy_from_slice(head);
                }
            }
        }
    }
}

/// Runs `f` on the f32 values of a projection on the CPU, read where they are (after making the
/// tensor contiguous if it is not).
fn in_place<R>(
    qkv: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let qkv = qkv.contiguous()?;
    let (storage, layout) = qkv.storage_and_layout();
    let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        candle_core::bail!("attention needs an f32 projection on the CPU");
    };
    f(&data[start..end])
}

/// What a decode step attends over in one cache: its first row among the step's, how many rows
/// it has, the position this step writes, and how many leading positions all its rows share.
struct StepOf {
    first: usize,
    rows: usize,
    position: usize,
    shared: usize,
}

impl StepOf {
    /// `cache`'s, its rows following `first` rows of the caches before it.
    fn new(cache: &KvCache, first: usize) -> Self {
        Self {
            first,
            rows: cache.rows(),
            position: cache.seq_len(),
            shared: cache.shared_prefix(),
        }
    }
}

/// Every cache's `(row, head)` buffers of `layer` when all of them hold `T`.
fn layer_heads<'a, T: KvElement>(
    caches: &'a mut [&mut KvCache],
    layer: usize,
) -> Option<Vec<Vec<HeadBuffers<'a, T>>>> {
    caches
        .iter_mut()
        .map(|cache| cache.heads_mut::<T>(layer))
        .collect()
}
