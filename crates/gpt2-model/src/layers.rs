//! The pre-norm transformer block and its parts other than attention: layer norm and the MLP.
//! Each has `load` (from a checkpoint's named tensors), `forward` (a prefill: `(batch, new,
//! n_embd)`) and `forward_step` (a decode step: `(rows, n_embd)`, through the streaming kernels).

use candle_core::Tensor;

use crate::attention::Attention;
use crate::kernels::{self, activation, Epilogue};
use crate::linear::Conv1D;
use crate::weights::NamedTensors;
use crate::{Activation, Gpt2Config, KvCache, ModelError};

#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub(crate) fn load(
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

    pub(crate) fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        use candle_core::{CpuStorage::F32, Storage::Cpu};
        let xs = xs.contiguous()?;
        let out = {
            let (storage, layout) = xs.storage_and_layout();
            let (weight, weight_layout) = self.weight.storage_and_layout();
            let (bias, bias_layout) = self.bias.storage_and_layout();
            match (
                (&*storage, layout.contiguous_offsets()),
                (&*weight, weight_layout.contiguous_offsets()),
                (&*bias, bias_layout.contiguous_offsets()),
            ) {
                (
                    (Cpu(F32(data)), Some((start, end))),
                    (Cpu(F32(weight)), Some((w_start, w_end))),
                    (Cpu(F32(bias)), Some((b_start, b_end))),
                ) if xs.dims().last() == Some(&(w_end - w_start))
                    && w_end - w_start == b_end - b_start =>
                {
                    Some(kernels::layer_norm::layer_norm(
                        &data[start..end],
                        &weight[w_start..w_end],
                        &bias[b_start..b_end],
                        self.eps,
                    ))
                }
                _ => None,
            }
        };
        match out {
            Some(out) => Tensor::from_vec(out, xs.shape(), xs.device()),
            None => candle_nn::ops::layer_norm(&xs, &self.weight, &self.bias, self.eps),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    pub(crate) c_fc: Conv1D,
    pub(crate) c_proj: Conv1D,
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

    /// `xs`: `(rows, n_embd)`, through the decode kernel; GPT-2's own activation in the up
    /// projection's kernel.
    fn forward_step(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = match self.activation {
            Activation::GeluTanh => self.c_fc.forward_step_then(xs, Epilogue::GeluTanh)?,
            _ => self.activate(self.c_fc.forward_step(xs)?)?,
        };
        self.c_proj.forward_step(&hidden)
    }

    /// `xs`: `(rows, n_embd)`, the first `step_rows` a decode step's and the rest a prefill's.
    fn forward_split(&self, xs: &Tensor, step_rows: usize) -> candle_core::Result<Tensor> {
        let hidden = self.c_fc.forward_split(xs, step_rows)?;
        self.c_proj
            .forward_split(&self.activate(hidden)?, step_rows)
    }

    fn activate(&self, hidden: Tensor) -> candle_core::Result<Tensor> {
        Ok(match self.activation {
            Activation::GeluTanh => activation::gelu_tanh_owned(hidden)?,
            Activation::GeluErf => hidden.gelu_erf()?,
            Activation::QuickGelu => (&hidden * candle_nn::ops::sigmoid(&(&hidden * 1.702)?)?)?,
            Activation::Relu => hidden.relu()?,
            Activation::Silu => candle_nn::ops::silu(&hidden)?,
            Activation::Tanh => hidden.tanh()?,
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub(crate) ln_1: LayerNorm,
    pub(crate) attn: Attention,
    pub(crate) ln_2: LayerNorm,
    pub(crate) mlp: Mlp,
}

impl Block {
    pub(crate) fn load(
        weights: &mut NamedTensors,
        idx: usize,
        cfg: &Gpt2Config,
    ) -> Result<Self, ModelError> {
        let prefix = format!("h.{idx}");
        Ok(Self {
            ln_1: LayerNorm::load(weights, &format!("{prefix}.ln_1"), cfg)?,
            attn: Attention::load(weights, &format!("{prefix}.attn"), idx, cfg)?,
            ln_2: LayerNorm::load(weights, &format!("{prefix}.ln_2"), cfg)?,
            mlp: Mlp::load(weights, &format!("{prefix}.mlp"), cfg)?,
        })
    }

    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        cache: &mut KvCache,
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let xs = (xs + self.attn.forward(&self.ln_1.forward(xs)?, cache, layer)?)?;
        &xs + self.mlp.forward(&self.ln_2.forward(&xs)?)?
    }

    /// A decode step's rows and one-sequence prefill chunks' together, `xs`: `(step rows +
    /// chunk lengths, n_embd)`, the step's first, then each chunk's (`chunk_lens` rows,
    /// continuing `chunk_caches`): each row gets the bits of its separate call, and each weight
    /// matrix is read once for all where their kernels are the same (every format but a dense
    /// LM head's).
    pub(crate) fn forward_split(
        &self,
        xs: &Tensor,
        caches: &mut [&mut KvCache],
        chunk_caches: &mut [&mut KvCache],
        chunk_lens: &[usize],
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let step_rows = caches.iter().map(|c| c.rows()).sum();
        let attended = self.attn.forward_split(
            &self.ln_1.forward(xs)?,
            (step_rows, caches),
            (chunk_lens, chunk_caches),
            layer,
        )?;
        let xs = (xs + attended)?;
        &xs + self
            .mlp
            .forward_split(&self.ln_2.forward(&xs)?, step_rows)?
    }

    /// One decode step, `xs`: `(rows, n_embd)`.
    pub(crate) fn forward_step(
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
