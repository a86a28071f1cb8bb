use std::path::{Path, PathBuf};

use candle_core::Device;
use gpt2_generation::GenerationParams;
use gpt2_model::{Gpt2Model, KvFormat, WeightFormat};
use gpt2_schema::{GenerationRequest, Limits, RequestError};
use gpt2_tokenizer::Gpt2Tokenizer;

use crate::{run::generate_ids, EngineError};

/// Where SageMaker puts a model; the default model directory when it exists.
pub const DEFAULT_MODEL_DIR: &str = "/opt/ml/model";

/// Which model a pipeline runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A model directory (`config.json`, weights, optionally a tokenizer).
    Directory(PathBuf),
    /// The built-in demo model: random weights, real vocabulary. Its text is noise.
    Demo,
}

impl ModelSource {
    /// `explicit` when given, else [`DEFAULT_MODEL_DIR`] when it exists, else the demo model.
    pub fn resolve(explicit: Option<&Path>) -> Self {
        match explicit {
            Some(dir) => Self::Directory(dir.to_path_buf()),
            None if Path::new(DEFAULT_MODEL_DIR).is_dir() => {
                Self::Directory(DEFAULT_MODEL_DIR.into())
            }
            None => Self::Demo,
        }
    }
}

/// A model, its tokenizer and the request limits: everything needed to answer a request.
#[derive(Debug, Clone)]
pub struct Pipeline {
    model: Gpt2Model,
    tokenizer: Gpt2Tokenizer,
    limits: Limits,
    source: ModelSource,
}

impl Pipeline {
    /// Loads a model directory: its `config.json`, its weights, and its tokenizer (or the
    /// embedded GPT-2 tokenizer when it has none).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, EngineError> {
        let dir = dir.as_ref();
        let model = Gpt2Model::load(dir, &Device::Cpu)?;
        let tokenizer = Gpt2Tokenizer::from_model_dir(dir)?;
        Ok(Self {
            model,
            tokenizer,
            limits: Limits::default(),
            source: ModelSource::Directory(dir.to_path_buf()),
        })
    }

    /// The demo model with the embedded GPT-2 tokenizer.
    pub fn demo() -> Self {
        Self {
            model: Gpt2Model::demo(),
            tokenizer: Gpt2Tokenizer::embedded().expect("the embedded tokenizer is valid"),
            limits: Limits::default(),
            source: ModelSource::Demo,
        }
    }

    /// Loads what [`ModelSource::resolve`] picks; logs a warning when that is the demo model.
    pub fn from_source(source: &ModelSource) -> Result<Self, EngineError> {
        match source {
            ModelSource::Directory(dir) => Self::load(dir),
            ModelSource::Demo => {
                tracing::warn!(
                    "no model directory given and {DEFAULT_MODEL_DIR} does not exist: using the DEMO model \
                     (random weights, its text is noise, not GPT-2); pass --model <DIR> for a real checkpoint"
                );
                Ok(Self::demo())
            }
        }
    }

    /// Stores the model's linear layers in `format` (q8_0 streams about 3.8× fewer bytes per
    /// decode step, at the cost of a small logit drift: see docs/performance.md).
    pub fn with_weight_format(mut self, format: WeightFormat) -> Result<Self, EngineError> {
        self.model = self.model.with_weight_format(format)?;
        Ok(self)
    }

    /// Stores the keys and values of new caches as `format` (f16 halves the KV memory of every
    /// running sequence, at a small logit drift: see docs/performance.md).
    pub fn with_kv_format(mut self, format: KvFormat) -> Self {
        self.model = self.model.with_kv_format(format);
        self
    }

    /// Replaces the per-request limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The per-request limits requests are validated against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Which model this is.
    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    /// The model.
    pub fn model(&self) -> &Gpt2Model {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Gpt2Tokenizer {
        &self.tokenizer
    }

    /// Parses, validates and answers a JSON request body.
    pub fn generate_json(&self, body: &[u8]) -> Result<Vec<String>, EngineError> {
        let request = GenerationRequest::from_json(body, &self.limits)?;
        self.generate(&request)
    }

    /// Answers a request: `num_return_sequences` strings, each the prompt followed by its
    /// continuation (special tokens skipped).
    pub fn generate(&self, request: &GenerationRequest) -> Result<Vec<String>, EngineError> {
        Ok(self.run(request, || false)?.texts)
    }

    /// [`Pipeline::generate`] with token counts, stopping with [`EngineError::Cancelled`] as soon
    /// as `should_stop` answers true (it is polled between decode steps).
    pub fn run(
        &self,
        request: &GenerationRequest,
        should_stop: impl FnMut() -> bool,
    ) -> Result<GenerationOutput, EngineError> {
        let (prompt, params) = self.prepare(request)?;
        let outputs = generate_ids(&self.model, &prompt, params, should_stop)?;
        self.finish(request, prompt.len(), &outputs)
    }

    /// Tokenizes the prompt and checks the limits that need it: the prompt's ids and the
    /// generation parameters, or the field error.
    pub fn prepare(
        &self,
        request: &GenerationRequest,
    ) -> Result<(Vec<u32>, GenerationParams), EngineError> {
        let prompt = self.tokenizer.encode(&request.input)?;
        let config = self.model.config();
        if prompt.is_empty() {
            return Err(RequestError::InvalidField {
                field: "input",
                reason: "encodes to no tokens".into(),
            }
            .into());
        }
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= config.vocab_size) {
            return Err(RequestError::InvalidField {
                field: "input",
                reason: format!(
                    "encodes to token {bad}, outside this model's vocabulary of {}",
                    config.vocab_size
                ),
            }
            .into());
        }
        let params = request.to_params(prompt.len(), config.n_positions, config.eos_token_id)?;
        Ok((prompt, params))
    }

    /// Turns generated ids into the response texts: the input followed by each continuation.
    pub fn finish(
        &self,
        request: &GenerationRequest,
        prompt_tokens: usize,
        outputs: &[Vec<u32>],
    ) -> Result<GenerationOutput, EngineError> {
        let texts = outputs
            .iter()
            .map(|generated| {
                Ok(format!(
                    "{}{}",
                    request.input,
                    self.tokenizer.decode(generated)?
                ))
            })
            .collect::<Result<Vec<String>, EngineError>>()?;
        Ok(GenerationOutput {
            texts,
            prompt_tokens,
            generated_tokens: outputs.iter().map(Vec::len).sum(),
        })
    }
}

/// A request's answer and what it cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationOutput {
    /// One string per returned sequence: the prompt followed by its continuation.
    pub texts: Vec<String>,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated, summed over the returned sequences.
    pub generated_tokens: usize,
}
