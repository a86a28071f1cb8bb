use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

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
/// `lm_head.weight`), converted to f32.
pub(crate) struct NamedTensors {
    tensors: HashMap<String, Tensor>,
    origin: String,
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

impl NamedTensors {
    pub(crate) fn load(files: &WeightFiles, device: &Device) -> Result<Self, ModelError> {
        let mut tensors = HashMap::new();
        let origin;
        let mut insert = |name: &str, tensor: Tensor| -> Result<(), ModelError> {
            if is_ignored_buffer(name) {
                return Ok(());
            }
            let tensor = tensor
                .to_dtype(DType::F32)
                .and_then(|t| t.to_device(device))
                .map_err(|e| ModelError::Tensor {
                    name: name.to_string(),
                    reason: e.to_string(),
                })?;
            tensors.insert(canonical_name(name).to_string(), tensor);
            Ok(())
        };
        match files {
            WeightFiles::Safetensors(path) => {
                origin = path.display().to_string();
                load_safetensors(std::slice::from_ref(path), &mut insert)?;
            }
            WeightFiles::ShardedSafetensors(paths) => {
                origin = paths
                    .first()
                    .and_then(|p| p.parent())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                load_safetensors(paths, &mut insert)?;
            }
            WeightFiles::PytorchBin(path) => {
                origin = path.display().to_string();
                let pairs =
                    candle_core::pickle::read_all(path).map_err(|e| ModelError::Weights {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
                for (name, tensor) in pairs {
                    insert(&name, tensor)?;
                }
            }
        }
        Ok(Self { tensors, origin })
    }

    pub(crate) fn from_map(tensors: HashMap<String, Tensor>, origin: &str) -> Self {
        Self {
            tensors,
            origin: origin.to_string(),
        }
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes the tensor `name`, checking that its shape is `shape`.
    pub(crate) fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let tensor = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                origin: self.origin.clone(),
            })?;
        if tensor.dims() != shape {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: tensor.dims().to_vec(),
            });
        }
        Ok(tensor)
    }
}

fn load_safetensors(
    paths: &[PathBuf],
    insert: &mut impl FnMut(&str, Tensor) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    for path in paths {
        let bad_file = |reason: String| ModelError::Weights {
            path: path.display().to_string(),
            reason,
        };
        // SAFETY: the file is only read; a checkpoint modified while it loads is the caller's
        // problem, as with every mmap-based loader (candle, safetensors, HF).
        let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
            .map_err(|e| bad_file(e.to_string()))?;
        for (name, _) in mapped.tensors() {
            let tensor = mapped
                .load(&name, &Device::Cpu)
                .map_err(|e| bad_file(format!("tensor {name}: {e}")))?;
            insert(&name, tensor)?;
        }
    }
    Ok(())
}
