//! The GPT-2 forward pass on candle, f32 on CPU.
//!
//! Reads HF's `config.json`, loads weights from every checkpoint layout seen in the wild
//! (`model.safetensors`, sharded safetensors, `pytorch_model.bin`; `transformer.`-prefixed or bare
//! names), and runs a batch of sequences with a KV cache: prefill a prompt, then one token per
//! step. It knows nothing of sampling or text.
//!
//! f32 throughout by default (equal to HF to ~1e-6); [`Gpt2Model::with_weight_format`] stores the
//! linear layers as q8_0 or bf16 ([`Gpt2Model::load_with_weight_format`] converts to bf16 while
//! loading) and [`Gpt2Model::with_kv_format`] stores new KV caches as f16, each trading a small
//! logit drift for speed or memory.
//!
//! ```
//! use candle_core::Tensor;
//! use gpt2_model::{Gpt2Model, LogitsFor};
//!
//! let model = Gpt2Model::demo(); // tiny, random weights, real GPT-2 vocabulary
//! let mut cache = model.new_cache();
//! let prompt = Tensor::new(&[[15496u32, 11, 995]], model.device()).unwrap();
//! let logits = model.forward(&prompt, &mut cache, LogitsFor::Last).unwrap();
//! assert_eq!(logits.dims(), &[1, 1, 50257]);
//! let next = Tensor::new(&[[0u32]], model.device()).unwrap();
//! let logits = model.forward(&next, &mut cache, LogitsFor::Last).unwrap();
//! assert_eq!(cache.seq_len(), 4);
//! # let _ = logits;
//! ```

mod attention;
mod cache;
mod config;
mod demo;
mod kernels;
mod layers;
mod linear;
mod memory;
mod model;
mod weights;

/// The tensor library of this crate's public signatures ([`Gpt2Model::forward`] takes and
/// returns its `Tensor`s), re-exported so that callers use the same version.
pub use candle_core;
pub use gpt2_simd::{Isa, IsaError, ISA_ENV};

pub use cache::{KvCache, KvFormat};
pub use config::{Activation, Gpt2Config};
pub use demo::{demo_config, DEMO_WEIGHTS_SEED};
pub use linear::WeightFormat;
pub use memory::{return_freed_memory_to_os, trim_freed_memory};
pub use model::{Gpt2Model, LogitsFor, PromptChunk};
pub use weights::WeightFiles;

/// Errors of loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is malformed or asks for something this crate does not implement.
    #[error("invalid model config: {0}")]
    Config(String),
    /// A model directory has no weight file.
    #[error(
        "no weights in {0}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )]
    MissingWeights(String),
    /// A weight file could not be parsed.
    #[error("cannot load weights from {path}: {reason}")]
    Weights { path: String, reason: String },
    /// The checkpoint lacks a tensor the model needs.
    #[error("tensor {name} is missing from {origin}")]
    MissingTensor { name: String, origin: String },
    /// A tensor has the wrong shape for the config.
    #[error("tensor {name} has shape {found:?}, expected {expected:?} from config.json")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A tensor could not be converted to f32.
    #[error("tensor {name}: {reason}")]
    Tensor { name: String, reason: String },
    /// The sequence would run past the position table.
    #[error("sequence of {length} tokens exceeds the model's n_positions ({n_positions})")]
    SequenceTooLong { length: usize, n_positions: usize },
    /// The caller passed inconsistent inputs.
    #[error("invalid model input: {0}")]
    Input(String),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}
