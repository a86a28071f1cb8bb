//! Text generation with a GPT-2 checkpoint, behind the "GPT-2 API" request contract.
//!
//! [`Pipeline`] owns a model and its tokenizer. [`Pipeline::stream`] answers a validated
//! [`GenerationRequest`] token by token; [`Pipeline::generate`] collects that stream into one
//! string per returned sequence, each the prompt followed by its continuation — exactly what the
//! HTTP service answers, so the CLI, the service and library users cannot disagree. [`Engine`]
//! runs a pipeline on its own thread and batches concurrent requests, with the same two calls in
//! async form ([`Engine::stream`], [`Engine::generate`]).
//!
//! ```
//! use gpt2_engine::{GenerationEvent, GenerationRequest, Mode, Pipeline};
//!
//! // `Pipeline::load("path/to/gpt2")?` for a real checkpoint; the demo model needs no download.
//! let pipeline = Pipeline::demo();
//! // The builder validates as the JSON contract does: defaults for what it leaves out.
//! let request = GenerationRequest::builder("Hello, my name is")
//!     .mode(Mode::Greedy)
//!     .max_length(12)
//!     .build()?;
//!
//! let texts = pipeline.generate(&request)?;
//! assert_eq!(texts.len(), 3); // num_return_sequences defaults to 3
//! assert!(texts[0].starts_with("Hello, my name is"));
//!
//! // The same answer, token by token.
//! for event in pipeline.stream(&request)? {
//!     match event? {
//!         GenerationEvent::Token(token) if token.index == 0 => print!("{}", token.text),
//!         GenerationEvent::Token(_) => {} // the other sequences' tokens, interleaved
//!         GenerationEvent::End(end) => assert_eq!(end.text, texts[end.index]),
//!         GenerationEvent::Prompt(_) => {} // only with `prompt_logprobs`
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod chunk_sizer;
mod events;
mod pipeline;
mod prepare;
mod run;
mod scheduler;
mod stop;
mod worker;

pub use events::{
    FinishReason, GenerationEvent, PromptToken, SequenceEnd, SequenceOutput, TokenEvent, TopLogprob,
};
/// The crates behind this one's public types ([`Pipeline::model`], [`Pipeline::tokenizer`], the
/// errors), re-exported so that callers name them at the same versions.
pub use {gpt2_generation, gpt2_model, gpt2_schema, gpt2_tokenizer};

pub use gpt2_generation::{GenerationParams, Strategy};
pub use gpt2_model::{
    return_freed_memory_to_os, trim_freed_memory, Isa, IsaError, KvFormat, WeightFormat, ISA_ENV,
};
pub use gpt2_schema::{
    GenerationRequest, GenerationRequestBuilder, GenerationResponse, Limits, Mode, RequestError,
};
pub use pipeline::{GenerationOutput, GenerationStream, ModelSource, Pipeline, DEFAULT_MODEL_DIR};
pub use run::{generate_ids, Decoding, Prefill, TokenScore};
pub use worker::{
    Completed, Engine, EngineConfig, EngineStats, EngineStream, StreamTimings, SubmitError,
};

/// Errors of loading a pipeline or serving a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is invalid (the user's fault: a 4xx).
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The model could not be loaded or run.
    #[error(transparent)]
    Model(#[from] gpt2_model::ModelError),
    /// A decode step shared with other requests failed; each of them gets the same error.
    #[error("decode step failed: {0}")]
    DecodeStep(#[source] std::sync::Arc<gpt2_model::ModelError>),
    /// The tokenizer could not be loaded or run.
    #[error(transparent)]
    Tokenizer(#[from] gpt2_tokenizer::TokenizerError),
    /// The generation state machine refused its input.
    #[error(transparent)]
    Generation(#[from] gpt2_generation::GenerationError),
    /// The caller gave up (its client went away, or its stop callback answered true) and
    /// generation stopped early.
    #[error("generation cancelled")]
    Cancelled,
    /// The request's deadline passed before it finished; generation stopped.
    #[error("the request's deadline passed before generation finished")]
    DeadlineExceeded,
}
