use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::cache::{KvBuffer, KvElement};
use crate::kernels;
use crate::quantized::{self, Q8Matrix};
use crate::weights::NamedTensors;
use crate::{Activation, Gpt2Config, KvCache, KvFormat, ModelError};

/// How the weights of the linear layers are stored and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// 32-bit floats, as in the checkpoint: exact.
    #[default]
    F32,
    /// ggml's q8_0: 8-bit weights in blocks of 32 with an f16 scale (about 3.8× fewer bytes to
    /// stream per step); activations are quantized per block too. Logits drift slightly.
    Q8_0,
}

impl std::str::FromStr for WeightFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            other => Err(format!(
                "unknown weight format {other:?} (expected f32 or q8_0)"
            )),
        }
    }
}

/// Which positions of the input get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last position of each sequence: what generation needs.
    Last,
    /// Every position (parity tests, scoring).
    All,
}

/// How a linear layer's weight is stored.
#[derive(Debug, Clone)]
enum Weight {
    /// f32, `(out, in)`, in huge-page-backed memory for the decode kernel.
    Dense(Tensor),
    /// ggml's q8_0 scheme (blocks of 32 int8 with an f16-rounded scale), `(out, in)`.
    Q8(std::sync::Arc<Q8Matrix>),
}

/// A dense layer: GPT-2's `Conv1D` (whose checkpoint layout is `(in, out)`) or the LM head. The
/// weight is kept `(out, in)`, so that each output's weights are contiguous.
#[derive(Debug, Clone)]
struct Conv1D {
    weight: Weight,
    bias: Tensor,
}

impl Conv1D {
    fn load(
        weights: &mut NamedTensors,
        prefix: &str,
        n_in: usize,
        n_out: usize,
    ) -> Result<Self, ModelError> {
        let weight_t = weights.take_huge(&format!("{prefix}.weight"), &[n_in, n_out], true)?;
        Ok(Self {
            weight: Weight::Dense(weight_t),
            bias: weights.take(&format!("{prefix}.bias"), &[n_out])?,
        })
    }

    /// `xs`: `(rows, in)` → `(rows, out)`.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => linear(xs, w, &self.bias),
            Weight::Q8(q) => quantized::q8_linear(xs, q, &self.bias),
        }
    }

    /// `xs`: `(rows, in)` → `(rows, out)`, with arithmetic per row that does not depend on the
    /// other rows (the streaming decode kernels).
    fn forward_step(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => linear_step(xs, w, &self.bias),
            Weight::Q8(q) => quantized::q8_linear(xs, q, &self.bias),
        }
    }

    /// The weight as f32, `(out, in)`.
    fn weight_t(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Q8(q) => Tensor::from_vec(q.dequantize(), q.shape(), &Device::Cpu),
        }
    }

    /// The weight in the checkpoint's `(in, out)` layout.
    fn weight(&self) -> candle_core::Result<Tensor> {
        self.weight_t()?.t()?.contiguous()
    }

    /// Stores the weight as q8_0, when its input width is a whole number of q8_0 blocks.
    fn quantize_q8(&mut self) -> candle_core::Result<bool> {
        let Weight::Dense(w) = &self.weight else {
            return Ok(false);
        };
        let (n, k) = w.dims2()?;
        if k % quantized::BLOCK != 0 {
            return Ok(false);
        }
        // Quantize straight from the tensor's buffer: a copy of every matrix would cost startup
        // time and a transient half-gigabyte of page faults.
        let quantized = {
            let (storage, layout) = w.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((s, e))) => {
                    Q8Matrix::quantize(&data[s..e], n, k)
                }
                _ => Q8Matrix::quantize(&w.flatten_all()?.to_vec1::<f32>()?, n, k),
            }
        };
        self.weight = Weight::Q8(std::sync::Arc::new(quantized));
        Ok(true)
    }
}

/// `xs · wᵀ + bias` for `xs`: `(rows, in)`, `w`: `(out, in)`. Decode-shaped inputs (a few rows)
/// go to the streaming kernel, larger ones to gemm.
fn linear(xs: &Tensor, w: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    linear_with(xs, w, bias, kernels::MAX_ROWS)
}

/// [`linear`] for decode steps: the streaming kernel whatever the number of rows, so that a row's
/// result never depends on how many other rows share the step.
fn linear_step(xs: &Tensor, w: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    linear_with(xs, w, bias, usize::MAX)
}

fn linear_with(
    xs: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    kernel_rows: usize,
) -> candle_core::Result<Tensor> {
    let rows = xs.dim(0)?;
    if rows <= kernel_rows && matches!(xs.device(), Device::Cpu) && xs.dtype() == DType::F32 {
        xs.contiguous()?
            .apply_op3_no_bwd(w, bias, &kernels::SmallRowsMatmul)
    } else {
        xs.matmul(&w.t()?)?.broadcast_add(bias)
    }
}

#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(
        weights: &mut NamedTensors,
        prefix: &str,
        cfg: &Gpt2Config,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            weight: weights.take(&format!("{prefix}.weight"), &[cfg.n_embd])?,
            bias: weights.take(&format!("{prefix}.bias"), &[cfg.n_embd])?,
            eps: cfg.layer_norm_epsilon as f32,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    n_head: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn load(
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
    fn forward(
        &self,
        xs: &Tensor,
        cache: &mut KvCache,
        layer: usize,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (batch, new, n_embd) = xs.dims3()?;
        let past = cache.seq_len;
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
                cached_keys_and_values(cache, layer, batch, past + new, xs.device())?
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
    fn forward_step(
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
            let count = cache.rows;
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
        let d = self.head_dim;
        let past = cache.seq_len;
        for b in 0..batch {
            for t in 0..new {
                let row = &qkv[(b * new + t) * 3 * n_embd..(b * new + t + 1) * 3 * n_embd];
                for h in 0..self.n_head {
                    let at = cache.offset(b, h, past + t);
                    let entry = &mut cache.layers[layer];
                    entry
                        .k
                        .write(at, &row[n_embd + h * d..n_embd + (h + 1) * d]);
                    entry
                        .v
                        .write(at, &row[2 * n_embd + h * d..2 * n_embd + (h + 1) * d]);
                }
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
        let positions = cache.seq_len + 1;
        let mut out = vec![0.0f32; batch * n_embd];
        let entry = &cache.layers[layer];
        match (&entry.k, &entry.v) {
            (KvBuffer::F32(k), KvBuffer::F32(v)) => {
                attend_rows(qkv, cache, k, v, n_embd, scale, positions, &mut out)
            }
            (KvBuffer::F16(k), KvBuffer::F16(v)) => {
                attend_rows(qkv, cache, k, v, n_embd, scale, positions, &mut out)
            }
            _ => unreachable!("a cache's buffers share its format"),
        }
        out
    }
}

/// Every (row, head) of a decode step, in parallel: `out` is `(rows, n_embd)`.
#[allow(clippy::too_many_arguments)]
fn attend_rows<T: KvElement>(
    qkv: &[f32],
    cache: &KvCache,
    keys: &[T],
    values: &[T],
    n_embd: usize,
    scale: f32,
    positions: usize,
    out: &mut [f32],
) {
    let (d, n_head) = (cache.head_dim, cache.n_head);
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

/// One head of one query over its cached keys and values, adding the result to `out`.
fn attend<T: KvElement>(q: &[f32], keys: &[T], values: &[T], scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the feature this function is compiled for.
        return unsafe { attend_avx512(q, keys, values, scale, out) };
    }
    attend_body(q, keys, values, scale, out)
}

/// [`attend_body`] with AVX-512 intrinsics for head sizes that are whole vectors (GPT-2's 64):
/// the query and the output stay in registers, and four keys are scored at a time so that their
/// dependent adds overlap. Fused multiply-adds make it differ from the portable path in the last
/// bits, the same for every row of a batch.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512<T: KvElement>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    const MAX_VECTORS: usize = 8;
    let d = q.len();
    let vectors = d / 16;
    if !d.is_multiple_of(16) || vectors > MAX_VECTORS {
        return attend_body(q, keys, values, scale, out);
    }
    let positions = keys.len() / d;
    let mut query = [_mm512_setzero_ps(); MAX_VECTORS];
    for (c, v) in query.iter_mut().take(vectors).enumerate() {
        *v = _mm512_loadu_ps(q.as_ptr().add(c * 16));
    }
    // Sixteen cached values as f32: a plain load, or a conversion from f16.
    let load = |from: &[T], at: usize| {
        if std::mem::size_of::<T>() == 2 {
            _mm512_cvtph_ps(_mm256_loadu_si256(from.as_ptr().add(at) as *const __m256i))
        } else {
            _mm512_loadu_ps(from.as_ptr().add(at) as *const f32)
        }
    };
    let key = |p: usize, c: usize| load(keys, p * d + c * 16);
    let mut scores = vec![0.0f32; positions];
    let mut p = 0;
    while p + 4 <= positions {
        let mut acc = [_mm512_setzero_ps(); 4];
        for (c, q) in query.iter().take(vectors).enumerate() {
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(*q, key(p + i, c), *acc);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            scores[p + i] = _mm512_reduce_add_ps(*acc) * scale;
        }
        p += 4;
    }
    for (p, score) in scores.iter_mut().enumerate().skip(p) {
        let mut acc = _mm512_setzero_ps();
        for (c, q) in query.iter().take(vectors).enumerate() {
            acc = _mm512_fmadd_ps(*q, key(p, c), acc);
        }
        *score = _mm512_reduce_add_ps(acc) * scale;
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0f32;
    for score in &mut scores {
        *score = crate::activation::exp(*score - max);
        total += *score;
    }
    let mut acc = [_mm512_setzero_ps(); MAX_VECTORS];
    for (c, acc) in acc.iter_mut().take(vectors).enumerate() {
        *acc = _mm512_loadu_ps(out.as_ptr().add(c * 16));
    }
    for (p, score) in scores.iter().enumerate() {
        let weight = _mm512_set1_ps(score / total);
        for (c, acc) in acc.iter_mut().take(vectors).enumerate() {
            *acc = _mm512_fmadd_ps(weight, load(values, p * d + c * 16), *acc);
        }
    }
    for (c, acc) in acc.iter().take(vectors).enumerate() {
        _mm512_storeu_ps(out.as_mut_ptr().add(c * 16), *acc);
    }
}

#[inline(always)]
fn attend_body<T: KvElement>(q: &[f32], keys: &[T], values: &[T], scale: f32, out: &mut [f32]) {
    let d = q.len();
    // Plain loops rather than iterator adapters: those are separate functions that LLVM may not
    // inline, and then they run without the caller's vector width.
    let mut scores = vec![0.0f32; keys.len() / d];
    for (score, key) in scores.iter_mut().zip(keys.chunks_exact(d)) {
        *score = dot(q, key) * scale;
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0f32;
    for score in &mut scores {
        *score = crate::activation::exp(*score - max);
        total += *score;
    }
    for (score, value) in scores.iter().zip(values.chunks_exact(d)) {
        let weight = score / total;
        for (o, v) in out.iter_mut().zip(value) {
            *o += weight * v.to_f32();
        }
    }
}

/// `x · y` over lane-wise partial sums, which LLVM vectorises without reassociating floats.
#[inline(always)]
fn dot<T: KvElement>(x: &[f32], y: &[T]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0.0f32; LANES];
    let (xc, yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let mut tail = 0.0f32;
    for (a, b) in xc.remainder().iter().zip(yc.remainder()) {
        tail += a * b.to_f32();
    }
    for (xs, ys) in xc.zip(yc) {
        for l in 0..LANES {
            acc[l] += xs[l] * ys[l].to_f32();
        }
    }
    let mut sum = 0.0f32;
    for a in acc {
        sum += a;
    }
    sum + tail
}

/// The first `positions` keys and values of a layer as `(batch, n_head, positions, head_dim)`.
fn cached_keys_and_values(
    cache: &KvCache,
    layer: usize,
    batch: usize,
    positions: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let d = cache.head_dim;
    let gather = |buffer: &KvBuffer| {
        let mut data = Vec::with_capacity(batch * cache.n_head * positions * d);
        for b in 0..batch {
            for h in 0..cache.n_head {
                buffer.read_into(cache.offset(b, h, 0), positions * d, &mut data);
            }
        }
        Tensor::from_vec(data, (batch, cache.n_head, positions, d), device)
    };
    let entry = &cache.layers[layer];
    Ok((gather(&entry.k)?, gather(&entry.v)?))
}

#[derive(Debug, Clone)]
struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
    activation: Activation,
}

impl Mlp {
    fn load(
        weights: &mut NamedTensors,
        prefix: &str,
        cfg: &Gpt2Config,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            c_fc: Conv1D::load(weights, &format!("{prefix}.c_fc"), cfg.n_embd, cfg.n_inner)?,
            c_proj: Conv1D::load(
                weights,
                &format!("{prefix}.c_proj"),
                cfg.n_inner,
                cfg.n_embd,
            )?,
            activation: cfg.activation,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, new, n_embd) = xs.dims3()?;
        let hidden = self.c_fc.forward(&xs.reshape((batch * new, n_embd))?)?;
        self.c_proj
            .forward(&self.activate(hidden)?)?
            .reshape((batch, new, n_embd))
    }

    /// `xs`: `(rows, n_embd)`, through the decode kernel.
    fn forward_step(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = self.c_fc.forward_step(xs)?;
        self.c_proj.forward_step(&self.activate(hidden)?)
    }

    fn activate(&self, hidden: Tensor) -> candle_core::Result<Tensor> {
        Ok(match self.activation {
            Activation::GeluTanh => crate::activation::gelu_tanh(&hidden)?,
            Activation::GeluErf => hidden.gelu_erf()?,
            Activation::QuickGelu => (&hidden * candle_nn::ops::sigmoid(&(&hidden * 1.702)?)?)?,
            Activation::Relu => hidden.relu()?,
            Activation::Silu => candle_nn::ops::silu(&hidden)?,
            Activation::Tanh => hidden.tanh()?,
        })
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn load(weights: &mut NamedTensors, idx: usize, cfg: &Gpt2Config) -> Result<Self, ModelError> {
        let prefix = format!("h.{idx}");
        Ok(Self {
            ln_1: LayerNorm::load(weights, &format!("{prefix}.ln_1"), cfg)?,
            attn: Attention::load(weights, &format!("{prefix}.attn"), idx, cfg)?,
            ln_2: LayerNorm::load(weights, &format!("{prefix}.ln_2"), cfg)?,
            mlp: Mlp::load(weights, &format!("{prefix}.mlp"), cfg)?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        cache: &mut KvCache,
        layer: usize,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let xs = (xs
            + self
                .attn
                .forward(&self.ln_1.forward(xs)?, cache, layer, mask)?)?;
        &xs + self.mlp.forward(&self.ln_2.forward(&xs)?)?
    }

    /// One decode step, `xs`: `(rows, n_embd)`.
    fn forward_step(
        &self,
        xs: &Tensor,
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let attended = self
            .attn
            .forward_step(&self.ln_1.forward(xs)?, caches, layer)?;
        let xs = (xs + attended)?;
        &xs + self.mlp.forward_step(&self.ln_2.forward(&xs)?)?
    }
}

/// GPT-2: token and position embeddings, `n_layer` pre-norm transformer blocks, a final layer
/// norm and the LM head.
#[derive(Debug, Clone)]
pub struct Gpt2Model {
    config: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// `(vocab, n_embd)` with a zero bias; the same tensor as `wte` when the embeddings are tied
    /// and the weights are f32.
    lm_head: Conv1D,
    weight_format: WeightFormat,
    kv_format: KvFormat,
    device: Device,
}

impl Gpt2Model {
    pub(crate) fn from_named_tensors(
        config: Gpt2Config,
        mut weights: NamedTensors,
        device: &Device,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let cfg = &config;
        let wte = weights.take_huge("wte.weight", &[cfg.vocab_size, cfg.n_embd], false)?;
        let wpe = weights.take("wpe.weight", &[cfg.n_positions, cfg.n_embd])?;
        let blocks = (0..cfg.n_layer)
            .map(|idx| Block::load(&mut weights, idx, cfg))
            .collect::<Result<Vec<_>, _>>()?;
        let ln_f = LayerNorm::load(&mut weights, "ln_f", cfg)?;
        let lm_head = if cfg.tie_word_embeddings {
            wte.clone()
        } else {
            weights.take_huge("lm_head.weight", &[cfg.vocab_size, cfg.n_embd], false)?
        };
        let lm_head_bias =
            Tensor::zeros(cfg.vocab_size, DType::F32, device).map_err(ModelError::from_candle)?;
        if cfg.tie_word_embeddings && weights.contains("lm_head.weight") {
            tracing::debug!("lm_head.weight ignored: tie_word_embeddings shares wte");
        }
        Ok(Self {
            config,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head: Conv1D {
                weight: Weight::Dense(lm_head),
                bias: lm_head_bias,
            },
            weight_format: WeightFormat::F32,
            kv_format: KvFormat::F32,
            device: device.clone(),
        })
    }

    /// Converts the linear layers and the LM head to `format`. q8_0 applies to layers whose
    /// input width is a multiple of 32 (all of GPT-2's); others stay f32. Embeddings and layer
    /// norms stay f32.
    pub fn with_weight_format(mut self, format: WeightFormat) -> Result<Self, ModelError> {
        if format == WeightFormat::Q8_0 {
            let mut layers: Vec<&mut Conv1D> = Vec::new();
            for block in &mut self.blocks {
                layers.push(&mut block.attn.c_attn);
                layers.push(&mut block.attn.c_proj);
                layers.push(&mut block.mlp.c_fc);
                layers.push(&mut block.mlp.c_proj);
            }
            layers.push(&mut self.lm_head);
            for layer in layers {
                layer.quantize_q8().map_err(ModelError::from_candle)?;
            }
        }
        self.weight_format = format;
        Ok(self)
    }

    /// Makes [`Self::new_cache`] and [`Self::new_cache_with_capacity`] store keys and values
    /// as `format`. f16 halves the caches' memory; every cached value is rounded to f16.
    pub fn with_kv_format(mut self, format: KvFormat) -> Self {
        self.kv_format = format;
        self
    }

    /// How new caches store keys and values.
    pub fn kv_format(&self) -> KvFormat {
        self.kv_format
    }

    /// How the linear layers' weights are stored.
    pub fn weight_format(&self) -> WeightFormat {
        self.weight_format
    }

    /// The model's configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for this model, growing as sequences do.
    pub fn new_cache(&self) -> KvCache {
        self.new_cache_with_capacity(64)
    }

    /// An empty cache with room for `positions` positions per sequence (at most `n_positions`),
    /// so that decoding up to that length never reallocates.
    pub fn new_cache_with_capacity(&self, positions: usize) -> KvCache {
        let c = &self.config;
        KvCache::new(
            c.n_layer,
            c.n_head,
            c.head_dim(),
            positions.clamp(1, c.n_positions),
            self.kv_format,
        )
    }

    /// Runs `tokens` (`(batch, new)`, u32) after what `cache` already holds, appends their keys
    /// and values to `cache`, and returns logits `(batch, positions, vocab)`, where positions is
    /// 1 for [`LogitsFor::Last`] and `new` for [`LogitsFor::All`].
    ///
    /// Every sequence of the batch continues from the same past length.
    pub fn forward(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
        logits_for: LogitsFor,
    ) -> Result<Tensor, ModelError> {
        let (batch, new) = tokens.dims2().map_err(ModelError::from_candle)?;
        if new == 0 || batch == 0 {
            return Err(ModelError::Input("no tokens to run".into()));
        }
        if cache.layers.len() != self.blocks.len()
            || cache.n_head != self.config.n_head
            || cache.head_dim != self.config.head_dim()
        {
            return Err(ModelError::Input(format!(
                "cache shaped for {} layers of {} heads, model has {} of {}",
                cache.layers.len(),
                cache.n_head,
                self.blocks.len(),
                self.config.n_head
            )));
        }
        if cache.seq_len > 0 && cache.batch_size() != Some(batch) {
            return Err(ModelError::Input(format!(
                "cache holds {:?} sequences, input has {batch}",
                cache.batch_size()
            )));
        }
        let past = cache.seq_len;
        if past + new > self.config.n_positions {
            return Err(ModelError::SequenceTooLong {
                length: past + new,
                n_positions: self.config.n_positions,
            });
        }
        let max_id = tokens
            .flatten_all()
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_scalar::<u32>())
            .map_err(ModelError::from_candle)?;
        if max_id as usize >= self.config.vocab_size {
            return Err(ModelError::Input(format!(
                "token id {max_id} is outside the vocabulary (size {})",
                self.config.vocab_size
            )));
        }
        let logits = self
            .forward_unchecked(tokens, cache, logits_for)
            .map_err(ModelError::from_candle)?;
        cache.seq_len = past + new;
        Ok(logits)
    }

    fn forward_unchecked(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
        logits_for: LogitsFor,
    ) -> candle_core::Result<Tensor> {
        let (batch, new) = tokens.dims2()?;
        let n_embd = self.config.n_embd;
        let past = cache.seq_len;
        let token_embeddings = self
            .wte
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((batch, new, n_embd))?;
        let position_embeddings = self.wpe.narrow(0, past, new)?;
        let mut xs = token_embeddings.broadcast_add(&position_embeddings)?;
        let mask = if new > 1 {
            Some(causal_mask(past, new, &self.device)?)
        } else {
            None
        };
        cache.prepare(batch, past + new);
        for (layer, block) in self.blocks.iter().enumerate() {
            xs = block.forward(&xs, cache, layer, mask.as_ref())?;
        }
        let xs = match logits_for {
            LogitsFor::Last => xs.narrow(1, new - 1, 1)?,
            LogitsFor::All => xs,
        };
        let positions = xs.dim(1)?;
        let xs = self
            .ln_f
            .forward(&xs)?
            .reshape((batch * positions, n_embd))?;
        self.lm_head
            .forward(&xs)?
            .reshape((batch, positions, self.config.vocab_size))
    }

    /// One decode step for the sequences of several caches at once (continuous batching): cache
    /// `i` holds `caches[i].batch_size()` sequences, all of one length, and `tokens` gives one
    /// token per sequence, grouped by cache in order. Returns the logits, `tokens.len()` rows of
    /// `vocab_size`, row-major.
    ///
    /// Each row's arithmetic is the same whatever else shares the step, so a sequence's logits
    /// do not depend on its batch neighbours.
    pub fn forward_step(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<f32>, ModelError> {
        let rows: usize = caches.iter().map(|c| c.rows).sum();
        if rows != tokens.len() || tokens.is_empty() {
            return Err(ModelError::Input(format!(
                "{} tokens for {rows} cached sequences",
                tokens.len()
            )));
        }
        let c = &self.config;
        let mut positions = Vec::with_capacity(rows);
        for cache in caches.iter() {
            if cache.layers.len() != c.n_layer
                || cache.n_head != c.n_head
                || cache.head_dim != c.head_dim()
            {
                return Err(ModelError::Input(
                    "a cache was made for another model".into(),
                ));
            }
            if cache.seq_len == 0 {
                return Err(ModelError::Input(
                    "decode steps continue a prefilled cache".into(),
                ));
            }
            if cache.seq_len + 1 > c.n_positions {
                return Err(ModelError::SequenceTooLong {
                    length: cache.seq_len + 1,
                    n_positions: c.n_positions,
                });
            }
            positions.extend(std::iter::repeat_n(cache.seq_len as u32, cache.rows));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary (size {})",
                c.vocab_size
            )));
        }
        let logits = self
            .forward_step_unchecked(tokens, &positions, caches)
            .map_err(ModelError::from_candle)?;
        for cache in caches.iter_mut() {
            cache.seq_len += 1;
        }
        Ok(logits)
    }

    fn forward_step_unchecked(
        &self,
        tokens: &[u32],
        positions: &[u32],
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Vec<f32>> {
        let device = &self.device;
        let tokens = Tensor::from_slice(tokens, tokens.len(), device)?;
        let positions = Tensor::from_slice(positions, positions.len(), device)?;
        let mut xs =
            (self.wte.index_select(&tokens, 0)? + self.wpe.index_select(&positions, 0)?)?;
        for cache in caches.iter_mut() {
            let (rows, length) = (cache.rows, cache.seq_len + 1);
            cache.prepare(rows, length);
        }
        for (layer, block) in self.blocks.iter().enumerate() {
            xs = block.forward_step(&xs, caches, layer)?;
        }
        let xs = self.ln_f.forward(&xs)?;
        self.lm_head
            .forward_step(&xs)?
            .flatten_all()?
            .to_vec1::<f32>()
    }

    /// The weight tensors under HF's bare names, for writing a checkpoint.
    pub fn named_weights(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut named = vec![
            ("wte.weight".to_string(), self.wte.clone()),
            ("wpe.weight".to_string(), self.wpe.clone()),
        ];
        for (idx, block) in self.blocks.iter().enumerate() {
            let p = format!("h.{idx}");
            let pairs = [
                ("ln_1.weight", block.ln_1.weight.clone()),
                ("ln_1.bias", block.ln_1.bias.clone()),
                ("attn.c_attn.weight", block.attn.c_attn.weight()?),
                ("attn.c_attn.bias", block.attn.c_attn.bias.clone()),
                ("attn.c_proj.weight", block.attn.c_proj.weight()?),
                ("attn.c_proj.bias", block.attn.c_proj.bias.clone()),
                ("ln_2.weight", block.ln_2.weight.clone()),
                ("ln_2.bias", block.ln_2.bias.clone()),
                ("mlp.c_fc.weight", block.mlp.c_fc.weight()?),
                ("mlp.c_fc.bias", block.mlp.c_fc.bias.clone()),
                ("mlp.c_proj.weight", block.mlp.c_proj.weight()?),
                ("mlp.c_proj.bias", block.mlp.c_proj.bias.clone()),
            ];
            named.extend(pairs.into_iter().map(|(n, t)| (format!("{p}.{n}"), t)));
        }
        named.push(("ln_f.weight".to_string(), self.ln_f.weight.clone()));
        named.push(("ln_f.bias".to_string(), self.ln_f.bias.clone()));
        if !self.config.tie_word_embeddings {
            named.push(("lm_head.weight".to_string(), self.lm_head.weight_t()?));
        }
        Ok(named)
    }
}

/// `(new, past + new)`: 0 where query `i` may attend key `j` (`j ≤ past + i`), −∞ elsewhere.
fn causal_mask(past: usize, new: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = past + new;
    let mask: Vec<f32> = (0..new)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (new, total), device)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn values(seed: &mut u32, count: usize) -> Vec<f32> {
        (0..count)
            .map(|_| {
                *seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (*seed >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    /// Softmax attention in f64 over f32 inputs.
    fn reference(q: &[f32], keys: &[f32], values: &[f32], scale: f32) -> Vec<f32> {
        let d = q.len();
        let scores: Vec<f64> = keys
            .chunks(d)
            .map(|k| {
                q.iter()
                    .zip(k)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum::<f64>()
            })
            .map(|s| s * f64::from(scale))
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        (0..d)
            .map(|i| {
                weights
                    .iter()
                    .zip(values.chunks(d))
                    .map(|(w, v)| w / total * f64::from(v[i]))
                    .sum::<f64>() as f32
            })
            .collect()
    }

    #[test]
    fn attention_kernels_match_a_reference_for_every_head_size_and_cache_format() {
        let mut seed = 5u32;
        for (d, positions) in [
            (64, 1),
            (64, 7),
            (64, 100),
            (16, 9),
            (128, 33),
            (8, 5),
            (24, 6),
        ] {
            let q = values(&mut seed, d);
            let keys = values(&mut seed, d * positions);
            let vals = values(&mut seed, d * positions);
            let scale = 1.0 / (d as f32).sqrt();
            let want = reference(&q, &keys, &vals, scale);
            let mut got = vec![0.0f32; d];
            attend(&q, &keys, &vals, scale, &mut got);
            let mut portable = vec![0.0f32; d];
            attend_body(&q, &keys, &vals, scale, &mut portable);
            for i in 0..d {
                assert!(
                    (got[i] - want[i]).abs() < 1e-5,
                    "f32 d={d} n={positions} [{i}]"
                );
                assert!((portable[i] - want[i]).abs() < 1e-5, "portable d={d} [{i}]");
            }
            // f16 caches: the same result up to the caches' rounding.
            let keys16: Vec<f16> = keys.iter().map(|&v| f16::from_f32(v)).collect();
            let vals16: Vec<f16> = vals.iter().map(|&v| f16::from_f32(v)).collect();
            let rounded = |v: &[f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
            let want16 = reference(&q, &rounded(&keys16), &rounded(&vals16), scale);
            let mut got16 = vec![0.0f32; d];
            attend(&q, &keys16, &vals16, scale, &mut got16);
            for i in 0..d {
                assert!(
                    (got16[i] - want16[i]).abs() < 1e-5,
                    "f16 d={d} n={positions} [{i}]"
                );
            }
        }
    }
}
