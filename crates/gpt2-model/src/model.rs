use candle_core::{DType, Device, Tensor};

use crate::weights::NamedTensors;
use crate::{kernels, memory};
use crate::{Activation, Gpt2Config, KvCache, ModelError};

/// Which positions of the input get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last position of each sequence: what generation needs.
    Last,
    /// Every position (parity tests, scoring).
    All,
}

/// A dense layer from GPT-2's `Conv1D`. The checkpoint stores `(in, out)`; it is kept transposed,
/// `(out, in)`, so that each output's weights are contiguous for the decode kernel.
#[derive(Debug, Clone)]
struct Conv1D {
    weight_t: Tensor,
    bias: Tensor,
}

impl Conv1D {
    fn load(
        weights: &mut NamedTensors,
        prefix: &str,
        n_in: usize,
        n_out: usize,
    ) -> Result<Self, ModelError> {
        let name = format!("{prefix}.weight");
        let weight = weights.take(&name, &[n_in, n_out])?;
        let weight_t = memory::to_huge_pages(&weight, true).map_err(|e| ModelError::Tensor {
            name,
            reason: e.to_string(),
        })?;
        Ok(Self {
            weight_t,
            bias: weights.take(&format!("{prefix}.bias"), &[n_out])?,
        })
    }

    /// `xs`: `(rows, in)` → `(rows, out)`.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        linear(xs, &self.weight_t, &self.bias)
    }

    /// The weight in the checkpoint's `(in, out)` layout.
    fn weight(&self) -> candle_core::Result<Tensor> {
        self.weight_t.t()?.contiguous()
    }
}

/// `xs · wᵀ + bias` for `xs`: `(rows, in)`, `w`: `(out, in)`. Decode-shaped inputs (a few rows)
/// go to the streaming kernel, larger ones to gemm.
fn linear(xs: &Tensor, w: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let rows = xs.dim(0)?;
    if rows <= kernels::MAX_ROWS && matches!(xs.device(), Device::Cpu) && xs.dtype() == DType::F32 {
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

    /// `xs`: `(batch, new, n_embd)`; `cache` holds `(batch, n_head, past, head_dim)` keys and values.
    fn forward(
        &self,
        xs: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (batch, new, n_embd) = xs.dims3()?;
        let qkv = self
            .c_attn
            .forward(&xs.reshape((batch * new, n_embd))?)?
            .reshape((batch, new, 3, self.n_head, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let (k, v) = match cache.take() {
            Some((past_k, past_v)) => (
                Tensor::cat(&[&past_k, &k], 2)?,
                Tensor::cat(&[&past_v, &v], 2)?,
            ),
            None => (k, v),
        };
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ys = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch * new, n_embd))?;
        *cache = Some((k, v));
        self.c_proj.forward(&ys)?.reshape((batch, new, n_embd))
    }
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
        let hidden = match self.activation {
            Activation::GeluTanh => hidden.gelu()?,
            Activation::GeluErf => hidden.gelu_erf()?,
            Activation::QuickGelu => (&hidden * candle_nn::ops::sigmoid(&(&hidden * 1.702)?)?)?,
            Activation::Relu => hidden.relu()?,
            Activation::Silu => candle_nn::ops::silu(&hidden)?,
            Activation::Tanh => hidden.tanh()?,
        };
        self.c_proj.forward(&hidden)?.reshape((batch, new, n_embd))
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
        cache: &mut Option<(Tensor, Tensor)>,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let xs = (xs + self.attn.forward(&self.ln_1.forward(xs)?, cache, mask)?)?;
        &xs + self.mlp.forward(&self.ln_2.forward(&xs)?)?
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
    /// `(vocab, n_embd)`; the same tensor as `wte` when the embeddings are tied.
    lm_head: Tensor,
    /// Zeros: GPT-2's LM head has no bias, the decode kernel takes one.
    lm_head_bias: Tensor,
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
        let huge = |name: &str, t: Tensor| {
            memory::to_huge_pages(&t, false).map_err(|e| ModelError::Tensor {
                name: name.to_string(),
                reason: e.to_string(),
            })
        };
        let wte = huge(
            "wte.weight",
            weights.take("wte.weight", &[cfg.vocab_size, cfg.n_embd])?,
        )?;
        let wpe = weights.take("wpe.weight", &[cfg.n_positions, cfg.n_embd])?;
        let blocks = (0..cfg.n_layer)
            .map(|idx| Block::load(&mut weights, idx, cfg))
            .collect::<Result<Vec<_>, _>>()?;
        let ln_f = LayerNorm::load(&mut weights, "ln_f", cfg)?;
        let lm_head = if cfg.tie_word_embeddings {
            wte.clone()
        } else {
            huge(
                "lm_head.weight",
                weights.take("lm_head.weight", &[cfg.vocab_size, cfg.n_embd])?,
            )?
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
            lm_head,
            lm_head_bias,
            device: device.clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.n_layer)
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
        if cache.layers.len() != self.blocks.len() {
            return Err(ModelError::Input(format!(
                "cache has {} layers, model has {}",
                cache.layers.len(),
                self.blocks.len()
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
        for (block, layer_cache) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            xs = block.forward(&xs, layer_cache, mask.as_ref())?;
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
        linear(&xs, &self.lm_head, &self.lm_head_bias)?.reshape((
            batch,
            positions,
            self.config.vocab_size,
        ))
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
            named.push(("lm_head.weight".to_string(), self.lm_head.clone()));
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
