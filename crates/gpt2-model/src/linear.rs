//! Linear layers: GPT-2's `Conv1D` and the LM head, with their weights in any storage format,
//! and the kernel each format runs.

use candle_core::{DType, Device, Tensor};

use crate::kernels::bf16::{self, Bf16Matrix};
use crate::kernels::gemm_f32::PrefillGemm;
use crate::kernels::matmul_f32::SmallRowsMatmul;
use crate::kernels::panel_f32::PanelMatrix;
use crate::kernels::q8_0::{self, Q8Matrix};
use crate::kernels::{held_linear, held_linear_values, Epilogue};
use crate::weights::NamedTensors;
use crate::ModelError;

/// How the weights of the linear layers are stored and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// 32-bit floats, as in the checkpoint: exact.
    #[default]
    F32,
    /// ggml's q8_0: 8-bit weights in blocks of 32 with an f16 scale (about 3.8× fewer bytes to
    /// stream per step); activations are quantized per block too. Logits drift slightly.
    Q8_0,
    /// bfloat16 weights (half the bytes of f32), multiplied with f32 accumulation; activations
    /// are rounded to bf16 before each matmul. Logits drift less than with q8_0. Token
    /// embeddings are stored in bf16 too (shared with the tied LM head).
    Bf16,
}

impl std::str::FromStr for WeightFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown weight format {other:?} (expected f32, bf16 or q8_0)"
            )),
        }
    }
}

/// How a linear layer's weight is stored.
#[derive(Debug, Clone)]
enum Weight {
    /// f32, `(out, in)`, in huge-page-backed memory: an LM head loaded for conversion to q8_0
    /// or bf16 that stays f32 (an input width that is not a whole number of q8_0 blocks, or odd).
    Dense(Tensor),
    /// f32 in the GEMM's panels: the blocks' layers and the f32 LM head (tied or not), whose
    /// decode steps and prefill chunks run the same kernel.
    Panels(std::sync::Arc<PanelMatrix>),
    /// ggml's q8_0 scheme (blocks of 32 int8 with an f16-rounded scale), `(out, in)`.
    Q8(std::sync::Arc<Q8Matrix>),
    /// bf16, `(out, in)`, packed for the bf16 kernels.
    Bf16(std::sync::Arc<Bf16Matrix>),
}

/// A dense layer: GPT-2's `Conv1D` (whose checkpoint layout is `(in, out)`) or the LM head. The
/// weight is kept in the layout its format's kernel reads (see `Weight`).
#[derive(Debug, Clone)]
pub(crate) struct Conv1D {
    weight: Weight,
    pub(crate) bias: Tensor,
}

impl Conv1D {
    pub(crate) fn load(
        weights: &mut NamedTensors,
        prefix: &str,
        n_in: usize,
        n_out: usize,
    ) -> Result<Self, ModelError> {
        let name = format!("{prefix}.weight");
        let weight = if weights.format() == WeightFormat::Bf16 && n_in.is_multiple_of(2) {
            // Straight from the checkpoint's `(in, out)` layout into the packed bf16 one.
            Weight::Bf16(std::sync::Arc::new(weights.take_bf16(
                &name,
                &[n_in, n_out],
                bf16::Source::InOut,
            )?))
        } else if weights.format() == WeightFormat::Q8_0 && n_in.is_multiple_of(q8_0::BLOCK) {
            // Quantized from the checkpoint one matrix at a time (no f32 copy kept).
            Weight::Q8(std::sync::Arc::new(weights.take_q8(&name, &[n_in, n_out])?))
        } else {
            Weight::Panels(std::sync::Arc::new(
                weights.take_panels(&name, &[n_in, n_out])?,
            ))
        };
        Ok(Self {
            weight,
            bias: weights.take(&format!("{prefix}.bias"), &[n_out])?,
        })
    }

    /// `xs`: `(rows, in)` → `(rows, out)`.
    pub(crate) fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => linear(xs, w, &self.bias),
            Weight::Panels(p) => held_linear(xs, &**p, &self.bias, Epilogue::Plain),
            Weight::Q8(q) => held_linear(xs, &**q, &self.bias, Epilogue::Plain),
            Weight::Bf16(m) => held_linear(xs, &**m, &self.bias, Epilogue::Plain),
        }
    }

    /// `xs`: `(rows, in)` → `(rows, out)`, with arithmetic per row that does not depend on the
    /// other rows (the streaming decode kernels).
    pub(crate) fn forward_step(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_step_then(xs, Epilogue::Plain)
    }

    /// [`Self::forward_step`], then `epilogue` on every output: in the q8_0 and bf16 kernels'
    /// own tasks, on each tile they have just computed, where a separate pass over the outputs
    /// ran on one thread (GELU after a 3-row up projection, 124M: 94 µs of a 5 ms q8_0 step).
    pub(crate) fn forward_step_then(
        &self,
        xs: &Tensor,
        epilogue: Epilogue,
    ) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => {
                let ys = linear_step(xs, w, &self.bias)?;
                match epilogue {
                    Epilogue::Plain => Ok(ys),
                    Epilogue::GeluTanh => crate::kernels::activation::gelu_tanh_owned(ys),
                }
            }
            Weight::Panels(p) => held_linear(xs, &**p, &self.bias, epilogue),
            Weight::Q8(q) => held_linear(xs, &**q, &self.bias, epilogue),
            Weight::Bf16(m) => held_linear(xs, &**m, &self.bias, epilogue),
        }
    }

    /// [`Self::forward_step`]'s values, `(rows, out)` row-major, straight from the kernel that
    /// computes them (a decode step's logits).
    pub(crate) fn forward_step_values(&self, xs: &Tensor) -> candle_core::Result<Vec<f32>> {
        match &self.weight {
            Weight::Dense(w) => linear_step(xs, w, &self.bias)?.flatten_all()?.to_vec1(),
            Weight::Panels(p) => held_linear_values(xs, &**p, &self.bias),
            Weight::Q8(q) => held_linear_values(xs, &**q, &self.bias),
            Weight::Bf16(m) => held_linear_values(xs, &**m, &self.bias),
        }
    }

    /// `xs`: `(rows, in)` → `(rows, out)`, the first `step_rows` rows as [`Self::forward_step`]
    /// computes them and the rest as [`Self::forward`] does, in one pass over the weight where
    /// both use the same kernel (every format but the dense LM head's) and in two back to back
    /// otherwise.
    pub(crate) fn forward_split(
        &self,
        xs: &Tensor,
        step_rows: usize,
    ) -> candle_core::Result<Tensor> {
        let rows = xs.dim(0)?;
        match &self.weight {
            Weight::Dense(_) if step_rows == 0 => self.forward(xs),
            Weight::Dense(_) if step_rows >= rows => self.forward_step(xs),
            Weight::Dense(_) => Tensor::cat(
                &[
                    self.forward_step(&xs.narrow(0, 0, step_rows)?)?,
                    self.forward(&xs.narrow(0, step_rows, rows - step_rows)?)?,
                ],
                0,
            ),
            Weight::Panels(_) | Weight::Q8(_) | Weight::Bf16(_) => self.forward_step(xs),
        }
    }

    /// The weight as f32, `(out, in)`.
    pub(crate) fn weight_t(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Panels(p) => Tensor::from_vec(p.to_out_in(), p.shape(), &Device::Cpu),
            Weight::Q8(q) => Tensor::from_vec(q.dequantize(), q.shape(), &Device::Cpu),
            Weight::Bf16(m) => Tensor::from_vec(m.dequantize(), m.shape(), &Device::Cpu),
        }
    }

    /// The weight in the checkpoint's `(in, out)` layout.
    pub(crate) fn weight(&self) -> candle_core::Result<Tensor> {
        self.weight_t()?.t()?.contiguous()
    }

    /// Stores the weight as q8_0, when its input width is a whole number of q8_0 blocks.
    pub(crate) fn quantize_q8(&mut self) -> candle_core::Result<bool> {
        if let Weight::Panels(p) = &self.weight {
            let (n, k) = p.shape();
            if k % q8_0::BLOCK != 0 {
                return Ok(false);
            }
            let quantized = Q8Matrix::quantize(&p.to_out_in(), n, k);
            self.weight = Weight::Q8(std::sync::Arc::new(quantized));
            return Ok(true);
        }
        let Weight::Dense(w) = &self.weight else {
            return Ok(false);
        };
        let (n, k) = w.dims2()?;
        if k % q8_0::BLOCK != 0 {
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

impl Conv1D {
    /// Stores the weight as bf16, when its input width is even.
    pub(crate) fn store_bf16(&mut self) -> candle_core::Result<bool> {
        let packed = match &self.weight {
            Weight::Dense(w) => dense_bf16(w)?,
            Weight::Panels(p) => {
                let (n, k) = p.shape();
                k.is_multiple_of(2)
                    .then(|| Bf16Matrix::pack(&p.to_out_in(), n, k, bf16::Source::OutIn))
            }
            _ => return Ok(false),
        };
        let packed = match packed {
            Some(packed) => packed,
            None => return Ok(false),
        };
        self.weight = Weight::Bf16(std::sync::Arc::new(packed));
        Ok(true)
    }

    /// A layer over existing f32 panels, e.g. the LM head tied to `wte`.
    pub(crate) fn panels(weight: std::sync::Arc<PanelMatrix>, bias: Tensor) -> Self {
        Self {
            weight: Weight::Panels(weight),
            bias,
        }
    }

    /// A layer over an existing bf16 weight, e.g. the LM head tied to `wte`.
    pub(crate) fn bf16(weight: std::sync::Arc<Bf16Matrix>, bias: Tensor) -> Self {
        Self {
            weight: Weight::Bf16(weight),
            bias,
        }
    }
}

/// An f32 `(out, in)` tensor packed as bf16 straight from its buffer, or `None` when its input
/// width is odd.
pub(crate) fn dense_bf16(w: &Tensor) -> candle_core::Result<Option<Bf16Matrix>> {
    let (n, k) = w.dims2()?;
    if !k.is_multiple_of(2) {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    Ok(Some(match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((s, e))) => {
            Bf16Matrix::pack(&data[s..e], n, k, bf16::Source::OutIn)
        }
        _ => Bf16Matrix::pack(
            &w.flatten_all()?.to_vec1::<f32>()?,
            n,
            k,
            bf16::Source::OutIn,
        ),
    }))
}

/// `xs · wᵀ + bias` for `xs`: `(rows, in)`, `w`: `(out, in)`, for a prefill of a dense LM head:
/// our GEMM, packing the weights at each call, whose rows never depend on the rows beside them.
fn linear(xs: &Tensor, w: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if matches!(xs.device(), Device::Cpu) && xs.dtype() == DType::F32 {
        xs.contiguous()?.apply_op3_no_bwd(w, bias, &PrefillGemm)
    } else {
        xs.matmul(&w.t()?)?.broadcast_add(bias)
    }
}

/// [`linear`] for decode steps: the streaming kernel, which reads the `(out, in)` weights as they
/// are, whatever the number of rows, so that a row's result never depends on how many other rows
/// share the step.
fn linear_step(xs: &Tensor, w: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if matches!(xs.device(), Device::Cpu) && xs.dtype() == DType::F32 {
        xs.contiguous()?.apply_op3_no_bwd(w, bias, &SmallRowsMatmul)
    } else {
        xs.matmul(&w.t()?)?.broadcast_add(bias)
    }
}

impl Conv1D {
    /// A dense layer over an existing `(out, in)` weight, e.g. the LM head tied to `wte`.
    pub(crate) fn dense(weight_t: Tensor, bias: Tensor) -> Self {
        Self {
            weight: Weight::Dense(weight_t),
            bias,
        }
    }
}
