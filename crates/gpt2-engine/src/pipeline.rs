use std::path::{Path, PathBuf};

use candle_core::Device;
use gpt2_generation::GenerationParams;
use gpt2_model::{Gpt2Model, KvFormat, WeightFormat};
use gpt2_schema::{GenerationRequest, Limits};
use gpt2_tokenizer::Gpt2Tokenizer;

use std::collections::VecDeque;

use crate::events::{Collector, EventBuilder, GenerationEvent, PromptToken, SequenceOutput};
use crate::{Decoding, EngineError};

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

    /// [`Pipeline::from_source`] with the weights in `format`: a directory's tensors are
    /// converted as they are read (bf16), so the f32 weights never all sit in memory and startup
    /// skips a pass over them.
    pub fn from_source_with_format(
        source: &ModelSource,
        format: WeightFormat,
    ) -> Result<Self, EngineError> {
        match source {
            ModelSource::Directory(dir) => {
                let model = Gpt2Model::load_with_weight_format(dir, &Device::Cpu, format)?;
                let tokenizer = Gpt2Tokenizer::from_model_dir(dir)?;
                Ok(Self {
                    model,
                    tokenizer,
                    limits: Limits::default(),
                    source: source.clone(),
                })
            }
            ModelSource::Demo => Self::from_source(source)?.with_weight_format(format),
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
    /// as `should_stop` answers true (it is polled between decode steps). Built on
    /// [`Pipeline::stream`]: the texts are its [`crate::SequenceEnd`] texts.
    pub fn run(
        &self,
        request: &GenerationRequest,
        mut should_stop: impl FnMut() -> bool,
    ) -> Result<GenerationOutput, EngineError> {
        let mut stream = self.stream(request)?;
        let mut collector = Collector::new(request.num_return_sequences());
        loop {
            if should_stop() {
                return Err(EngineError::Cancelled);
            }
            match stream.next() {
                None => break,
                Some(Err(e)) => return Err(e),
                Some(Ok(event)) => collector.push(event),
            }
        }
        Ok(collector.finish(stream.prompt_tokens()))
    }

    /// Answers a request as a stream of events: each generated token of each sequence, and each
    /// sequence's end with its whole string (beam search, which knows its winners only at the
    /// end, yields the ends alone). The prompt is tokenized and the length limits checked here,
    /// so an invalid request fails before any event; the prefill runs at the first `next`, and
    /// each later `next` runs at most one decode step. Dropping the stream stops the work.
    ///
    /// ```
    /// use gpt2_engine::{GenerationEvent, GenerationRequest, Mode, Pipeline};
    ///
    /// let pipeline = Pipeline::demo();
    /// let request = GenerationRequest::builder("Hello").mode(Mode::Greedy).max_length(8).build()?;
    /// let mut streamed = String::new();
    /// for event in pipeline.stream(&request)? {
    ///     match event? {
    ///         GenerationEvent::Token(token) if token.index == 0 => streamed.push_str(&token.text),
    ///         GenerationEvent::End(end) if end.index == 0 => assert_eq!(end.text, format!("Hello{streamed}")),
    ///         _ => {}
    ///     }
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stream(&self, request: &GenerationRequest) -> Result<GenerationStream<'_>, EngineError> {
        let (prompt, params) = self.prepare(request)?;
        let shape = crate::prepare::answer_shape(&self.tokenizer, request, &params)?;
        Ok(GenerationStream {
            pipeline: self,
            prompt_tokens: prompt.len(),
            score_prompt: request.prompt_logprobs(),
            state: StreamState::Prepared(prompt, params),
            builder: EventBuilder::new(&self.tokenizer, shape, request.num_return_sequences()),
            ready: VecDeque::new(),
        })
    }

    /// Tokenizes the prompt and checks the limits that need it: the prompt's ids and the
    /// generation parameters, or the field error.
    pub fn prepare(
        &self,
        request: &GenerationRequest,
    ) -> Result<(Vec<u32>, GenerationParams), EngineError> {
        crate::prepare::prepare_request(&self.tokenizer, self.model.config(), request)
    }
}

/// A request's answer and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    /// One string per returned sequence: the prompt (unless `return_full_text` is off) followed
    /// by its continuation.
    pub texts: Vec<String>,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated, summed over the returned sequences.
    pub generated_tokens: usize,
    /// Each returned sequence's end and tokens, in order (for detailed answers).
    pub sequences: Vec<SequenceOutput>,
    /// The prompt's tokens with their log-probabilities, when the request asked for them.
    pub prompt: Option<Vec<PromptToken>>,
}

/// A request's events, from [`Pipeline::stream`].
pub struct GenerationStream<'p> {
    pipeline: &'p Pipeline,
    prompt_tokens: usize,
    score_prompt: bool,
    state: StreamState,
    builder: EventBuilder<'p>,
    ready: VecDeque<GenerationEvent>,
}

enum StreamState {
    Prepared(Vec<u32>, GenerationParams),
    Running(Box<Decoding>),
    Done,
}

impl GenerationStream<'_> {
    /// Tokens in the prompt.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Runs the prefill or one decode step, queueing its events.
    fn advance(&mut self) -> Result<(), EngineError> {
        let model = self.pipeline.model();
        let mut events = Vec::new();
        let mut decoding = match std::mem::replace(&mut self.state, StreamState::Done) {
            StreamState::Prepared(prompt, params) => {
                let mut decoding = Box::new(Decoding::start_scoring(
                    model,
                    &prompt,
                    params,
                    self.score_prompt,
                )?);
                if let Some(scores) = decoding.take_prompt_scores() {
                    self.builder.on_prompt(&prompt, &scores, &mut events)?;
                }
                decoding
            }
            StreamState::Running(mut decoding) => {
                decoding.step(model)?;
                decoding
            }
            StreamState::Done => return Ok(()),
        };
        let stopped = self.builder.on_emitted(decoding.emitted(), &mut events)?;
        decoding.end_sequences(&stopped)?;
        if decoding.is_done() {
            let eos = decoding.eos_token_id();
            self.builder
                .on_outputs(decoding.into_outputs(), eos, &mut events)?;
        } else {
            self.state = StreamState::Running(decoding);
        }
        self.ready.extend(events);
        Ok(())
    }
}

impl Iterator for GenerationStream<'_> {
    type Item = Result<GenerationEvent, EngineError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(Ok(event));
            }
            if matches!(self.state, StreamState::Done) {
                return None;
            }
            if let Err(e) = self.advance() {
                return Some(Err(e));
            }
        }
    }
}
