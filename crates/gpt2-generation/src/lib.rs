//! GPT-2 text generation strategies, exactly as HF transformers' `generate()` runs them:
//! greedy, sampling (temperature → top-k → top-p warpers), and beam search with
//! no-repeat-n-gram, length_penalty 1.0 and early stopping.
//!
//! No model, no threads, no I/O: a [`Generator`] is a state machine that takes the logits of the
//! rows it asked for and answers with the next rows to run, so an engine can batch many requests.
//! Sampling draws from one ChaCha20 stream per returned sequence, derived from (seed, index).
//!
//! ```
//! use gpt2_generation::{Candidates, SamplingParams};
//!
//! let logits = [2.0, 1.0, 0.5, -1.0];
//! let params = SamplingParams { temperature: 0.7, top_k: 2, top_p: 0.92 };
//! let candidates = Candidates::from_logits(&logits, &params);
//! assert_eq!(candidates.tokens.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1]);
//! let mut rng = gpt2_generation::sequence_rng(42, 0);
//! let token = candidates.draw(&mut rng).unwrap();
//! assert!(token == 0 || token == 1);
//! ```

mod beam;
mod generator;
mod logprob;
mod ngram;
mod params;
mod processors;
mod sampling;

pub use beam::BeamSearch;
pub use generator::{sequence_rng, Emitted, FinishReason, Generator, Step};
pub use logprob::{token_logprob, top_logprobs};
pub use ngram::{ban_repeated_ngrams, banned_ngram_tokens};
pub use params::{BeamParams, GenerationParams, SamplingParams, Strategy};
pub use processors::LogitsProcessing;
pub use sampling::{argmax, Candidates};
/// The random-number crates of the public API: [`sequence_rng`] returns a
/// [`rand_chacha::ChaCha20Rng`], and [`Candidates::draw`] takes any [`rand::Rng`].
pub use {rand, rand_chacha};

/// Errors of driving a [`Generator`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerationError {
    /// There is no prompt token to continue.
    #[error("the prompt has no tokens")]
    EmptyPrompt,
    /// `max_length` leaves no room after the prompt.
    #[error("max_length ({max_length}) must exceed the prompt's {prompt_len} tokens")]
    NothingToGenerate {
        prompt_len: usize,
        max_length: usize,
    },
    /// A parameter is out of range.
    #[error("invalid generation parameters: {0}")]
    InvalidParams(String),
    /// The logits do not match the rows asked for.
    #[error("got {len} logits, not a whole number of expected rows of {vocab_size}")]
    LogitsShape { len: usize, vocab_size: usize },
    /// Every token was filtered out (all logits NaN or −∞).
    #[error("no token has a finite score")]
    NoCandidate,
    /// A state the generator never enters.
    #[error("internal generator state error")]
    Internal,
}
