use crate::LogitsProcessing;

/// The knobs of the sampling warpers, applied in HF's order: temperature → top-k → top-p.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits; 1.0 leaves them unchanged. Must be positive.
    pub temperature: f32,
    /// Keeps the `top_k` highest logits (ties at the k-th value included); 0 disables it.
    pub top_k: usize,
    /// Keeps the smallest set of most likely tokens whose probability reaches `top_p`
    /// (at least one token); 1.0 disables it. Must be in (0, 1].
    pub top_p: f32,
}

impl Default for SamplingParams {
    /// Plain sampling from the model's distribution.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

/// The knobs of beam search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeamParams {
    /// Number of hypotheses kept at each step (at least 1).
    pub num_beams: usize,
    /// Bans any token that would repeat an n-gram of this size already in the sequence
    /// (prompt included); 0 disables it.
    pub no_repeat_ngram_size: usize,
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    /// The most likely token (the first one on ties, as torch's argmax).
    Greedy,
    /// A draw from the warped distribution.
    Sample(SamplingParams),
    /// HF's beam search with length_penalty 1.0 and early stopping.
    Beam(BeamParams),
}

/// Everything that decides one request's output, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// How tokens are chosen.
    pub strategy: Strategy,
    /// Total length, prompt included, at which generation stops (HF's `max_length`).
    pub max_length: usize,
    /// How many sequences to return.
    pub num_return_sequences: usize,
    /// The token that ends a sequence, if any.
    pub eos_token_id: Option<u32>,
    /// Seed of the sampling streams; `None` draws fresh entropy.
    pub seed: Option<u64>,
    /// Logits processors applied before the strategy chooses (all off by default).
    pub processing: LogitsProcessing,
    /// How many of the most likely alternatives each [`crate::Emitted`] token reports with its
    /// log-probability (0: none).
    pub top_logprobs: usize,
}

impl GenerationParams {
    /// The rows a request runs in each decode step: its beams, or its sampled sequences; greedy
    /// runs one (its returned sequences are copies).
    pub fn decode_rows(&self) -> usize {
        match self.strategy {
            Strategy::Greedy => 1,
            Strategy::Sample(_) => self.num_return_sequences,
            Strategy::Beam(beam) => beam.num_beams,
        }
    }
}
