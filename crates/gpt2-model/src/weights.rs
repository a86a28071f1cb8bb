use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::kernels::bf16::{self, Bf16Matrix};
use crate::linear::WeightFormat;
use crate::ModelError;

/// The weight files of a checkpoint, in the order they are looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFiles {
    /// `model.safetensors`.
    Safetensors(PathBuf),
    /// The shards that `model.safetensors.index.json` names.
    ShardedSafetensors(Vec<PathBuf>),
    /// `pytorch_model.bin` (a torch pickle, zip or legacy format).
    PytorchBin(PathBuf),
}

impl WeightFiles {
    /// Finds the weights of a model directory.
    pub fn find(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(Self::Safetensors(single));
        }
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            return Ok(Self::ShardedSafetensors(shards_of_index(&index)?));
        }
        let bin = dir.join("pytorch_model.bin");
        if bin.is_file() {
            return Ok(Self::PytorchBin(bin));
        }
        Err(ModelError::MissingWeights(dir.display().to_string()))
    }
}

fn shards_of_index(index: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let bad_index = |reason: String| ModelError::Weights {
        path: index.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::Io {
        path: index.display().to_string(),
        source: e,
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad_index(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad_index("no \"weight_map\" object".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = Vec::new();
    for file in map.values() {
        let file = file
            .as_str()
            .ok_or_else(|| bad_index("a weight_map value is not a file name".into()))?;
        let path = dir.join(file);
        if !shards.contains(&path) {
            shards.push(path);
        }
    }
    for shard in &shards {
        if !shard.is_file() {
            return Err(bad_index(format!("shard {} is missing", shard.display())));
        }
    }
    Ok(shards)
}

/// A checkpoint's tensors under GPT-2's bare names (`wte.weight`, `h.0.attn.c_attn.weight`,
/// `lm_head.weight`), handed out one at a time as f32.
///
/// Safetensors files stay memory-mapped and each tensor is converted straight from the mapping
/// into its final buffer, after which its pages of the mapping are released: loading never holds
/// a second copy of the weights, so peak memory stays close to the model's own size.
pub(crate) struct NamedTensors {
    source: Source,
    origin: String,
    /// The storage the model asks for: [`WeightFormat::Bf16`] makes the linear layers take their
    /// weights with [`NamedTensors::take_bf16`], converted one tensor at a time.
    format: WeightFormat,
}

/// A tensor of a mapped safetensors file.
struct MappedTensor {
    file: usize,
    /// Its name in the file (which may carry the `transformer.` prefix).
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte range in the file.
    bytes: std::ops::Range<usize>,
}

enum Source {
    Mapped {
        files: Vec<(PathBuf, memmap2::Mmap)>,
        /// Canonical name → where the tensor lies, from each file's header (parsed once).
        index: HashMap<String, MappedTensor>,
    },
    Loaded(HashMap<String, Tensor>),
}

/// Buffers that some checkpoints carry and that the forward pass rebuilds itself.
fn is_ignored_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
}

/// `transformer.h.0.ln_1.weight` (save_pretrained) and `h.0.ln_1.weight` (the original
/// openai-community/gpt2 files) name the same tensor.
fn canonical_name(name: &str) -> &str {
    name.strip_prefix("transformer.").unwrap_or(name)
}

fn to_f32(view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>, String> {
    use safetensors::Dtype;
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => return Err(format!("unsupported dtype {other:?}")),
    })
}

/// Tells the kernel the pages under `bytes` (part of a read-only file mapping) are no longer
/// needed, so they leave the process's resident memory; reading them again would fault them back.
fn release_mapped(bytes: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        let page = 4096;
        let start = (bytes.as_ptr() as usize).div_ceil(page) * page;
        let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
        if end > start {
            // SAFETY: the range lies inside a live private read-only file mapping; DONTNEED only
            // drops its resident pages, which the file backs.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
}

impl NamedTensors {
    pub(crate) fn load(files: &WeightFiles, device: &Device) -> Result<Self, ModelError> {
        match files {
            WeightFiles::Safetensors(path) => {
                Self::map(std::slice::from_ref(path), path.display().to_string())
            }
            WeightFiles::ShardedSafetensors(paths) => {
                let origin = paths
                    .first()
                    .and_then(|p| p.parent())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                Self::map(paths, origin)
            }
            WeightFiles::PytorchBin(path) => {
                let pairs =
                    candle_core::pickle::read_all(path).map_err(|e| ModelError::Weights {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
                let mut tensors = HashMap::new();
                for (name, tensor) in pairs {
                    if is_ignored_buffer(&name) {
                        continue;
                    }
                    let tensor = tensor
                        .to_dtype(DType::F32)
                        .and_then(|t| t.to_device(device))
                        .map_err(|e| ModelError::Tensor {
                            name: name.clone(),
                            reason: e.to_string(),
                        })?;
                    tensors.insert(canonical_name(&name).to_string(), tensor);
                }
                Ok(Self {
                    source: Source::Loaded(tensors),
                    origin: path.display().to_string(),
                    format: WeightFormat::F32,
                })
            }
        }
    }

    fn map(paths: &[PathBuf], origin: String) -> Result<Self, ModelError> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (file_index, path) in paths.iter().enumerate() {
            let bad_file = |reason: String| ModelError::Weights {
                path: path.display().to_string(),
                reason,
            };
            let file = std::fs::File::open(path).map_err(|e| ModelError::Io {
                path: path.display().to_string(),
                source: e,
            })?;
            // SAFETY: the file is only read; a checkpoint modified while it loads is the caller's
            // problem, as with every mmap-based loader (candle, safetensors, HF).
            let mapped =
                unsafe { memmap2::Mmap::map(&file) }.map_err(|e| bad_file(e.to_string()))?;
            let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mapped)
                .map_err(|e| bad_file(e.to_string()))?;
            // The data section follows the 8-byte length and the header; `read_metadata` checked
            // that the offsets tile it exactly.
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                if !is_ignored_buffer(&name) {
                    let (start, end) = info.data_offsets;
                    let tensor = MappedTensor {
                        file: file_index,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        bytes: data_start + start..data_start + end,
                        name: name.clone(),
                    };
                    index.insert(canonical_name(&name).to_string(), tensor);
                }
            }
            files.push((path.clone(), mapped));
        }
        Ok(Self {
            source: Source::Mapped { files, index },
            origin,
            format: WeightFormat::F32,
        })
    }

    pub(crate) fn from_map(tensors: HashMap<String, Tensor>, origin: &str) -> Self {
        Self {
            source: Source::Loaded(tensors),
            origin: origin.to_string(),
            format: WeightFormat::F32,
        }
    }

    /// Asks the layers to take their weights in `format` as they load.
    pub(crate) fn with_format(mut self, format: WeightFormat) -> Self {
        self.format = format;
        self
    }

    /// The storage the model asked for.
    pub(crate) fn format(&self) -> WeightFormat {
        self.format
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Mapped { index, .. } => index.contains_key(name),
            Source::Loaded(tensors) => tensors.contains_key(name),
        }
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingTensor {
            name: name.to_string(),
            origin: self.origin.clone(),
        }
    }

    fn check_shape(name: &str, found: &[usize], shape: &[usize]) -> Result<(), ModelError> {
        if found != shape {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    /// Takes the tensor `name`, checking that its shape is `shape`.
    pub(crate) fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        self.take_with(
            name,
            shape,
            |data, shape| Tensor::from_vec(data.to_vec(), shape, &Device::Cpu),
            Ok,
        )
    }

    /// Takes the 2-D tensor `name` of shape `shape` into huge-page-backed memory, transposed
    /// when asked (see [`crate::memory`]).
    pub(crate) fn take_huge(
        &mut self,
        name: &str,
        shape: &[usize],
        transpose: bool,
    ) -> Result<Tensor, ModelError> {
        self.take_with(
            name,
            shape,
            |data, shape| crate::memory::huge_page_tensor(data, shape[0], shape[1], transpose),
            |tensor| crate::memory::to_huge_pages(&tensor, transpose),
        )
    }

    /// Takes the checkpoint's `(in, out)` matrix `name` (of shape `shape`) into f32 panels for
    /// the GEMM, straight from the mapping.
    pub(crate) fn take_panels(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<crate::kernels::panel_f32::PanelMatrix, ModelError> {
        use crate::kernels::panel_f32::PanelMatrix;
        let (n_in, n_out) = (shape[0], shape[1]);
        self.take_built(name, shape, |data| {
            PanelMatrix::from_in_out(data, n_in, n_out)
        })
    }

    /// [`Self::take_panels`] for an `(out, in)` matrix (the token embeddings, an untied LM head).
    pub(crate) fn take_panels_out_in(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<crate::kernels::panel_f32::PanelMatrix, ModelError> {
        use crate::kernels::panel_f32::PanelMatrix;
        let (n_out, n_in) = (shape[0], shape[1]);
        self.take_built(name, shape, |data| {
            PanelMatrix::from_out_in(data, n_out, n_in)
        })
    }

    /// Takes the 2-D tensor `name` of shape `shape` (even columns for [`bf16::Source::OutIn`],
    /// even rows for [`bf16::Source::InOut`]) packed as bf16, converting from the mapping without
    /// an f32 copy of the whole model.
    pub(crate) fn take_bf16(
        &mut self,
        name: &str,
        shape: &[usize],
        layout: bf16::Source,
    ) -> Result<Bf16Matrix, ModelError> {
        let (n, k) = match layout {
            bf16::Source::OutIn => (shape[0], shape[1]),
            bf16::Source::InOut => (shape[1], shape[0]),
        };
        self.take_built(name, shape, |data| Bf16Matrix::pack(data, n, k, layout))
    }

    /// Takes the tensor `name` of shape `shape` through `build`, which reads its f32 values
    /// row-major: straight from the mapping, or from a copy of a tensor loaded otherwise.
    fn take_built<T>(
        &mut self,
        name: &str,
        shape: &[usize],
        build: impl Fn(&[f32]) -> T,
    ) -> Result<T, ModelError> {
        self.take_with(
            name,
            shape,
            |data, _| Ok(build(data)),
            |tensor| Ok(build(&tensor.flatten_all()?.to_vec1::<f32>()?)),
        )
    }

    /// Takes the checkpoint's `(in, out)` matrix `name` (of shape `shape`) quantized as q8_0 in
    /// the `(out, in)` layout, converting from the mapping one matrix at a time: the f32 weights
    /// never all sit in memory, and no huge-page f32 copy is made only to be quantized.
    pub(crate) fn take_q8(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<crate::kernels::q8_0::Q8Matrix, ModelError> {
        use crate::kernels::q8_0::Q8Matrix;
        let (n_in, n_out) = (shape[0], shape[1]);
        let quantize_transposed = |data: &[f32]| {
            let mut out_in = vec![0.0f32; data.len()];
            crate::memory::transpose_into(data, n_in, n_out, &mut out_in);
            Q8Matrix::quantize(&out_in, n_out, n_in)
        };
        self.take_built(name, shape, quantize_transposed)
    }

    fn take_with<T>(
        &mut self,
        name: &str,
        shape: &[usize],
        from_data: impl FnOnce(&[f32], &[usize]) -> candle_core::Result<T>,
        from_tensor: impl FnOnce(Tensor) -> candle_core::Result<T>,
    ) -> Result<T, ModelError> {
        let tensor_error = |e: candle_core::Error| ModelError::Tensor {
            name: name.to_string(),
            reason: e.to_string(),
        };
        match &mut self.source {
            Source::Loaded(tensors) => {
                let Some(tensor) = tensors.remove(name) else {
                    return Err(self.missing(name));
                };
                Self::check_shape(name, tensor.dims(), shape)?;
                from_tensor(tensor).map_err(tensor_error)
            }
            Source::Mapped { files, index } => {
                let Some(tensor) = index.remove(name) else {
                    return Err(self.missing(name));
                };
                let (path, mapped) = &files[tensor.file];
                let bad_file = |reason: String| ModelError::Weights {
                    path: path.display().to_string(),
                    reason: format!("tensor {}: {reason}", tensor.name),
                };
                let bytes = mapped
                    .get(tensor.bytes.clone())
                    .ok_or_else(|| bad_file("data past the end of the file".into()))?;
                let view = safetensors::tensor::TensorView::new(tensor.dtype, tensor.shape, bytes)
                    .map_err(|e| bad_file(e.to_string()))?;
                Self::check_shape(name, view.shape(), shape)?;
                let data = to_f32(&view).map_err(bad_file)?;
                release_mapped(view.data());
                from_data(&data, shape).map_err(tensor_error)
            }
        }
    }
}
