use candle_core::Tensor;
use gpt2_generation::{token_logprob, top_logprobs, Emitted, GenerationParams, Generator};
use gpt2_model::{Gpt2Model, KvCache, LogitsFor, ModelError};

use crate::EngineError;

/// A token's log-probability and its most likely alternatives `(id, log-probability)`.
pub type TokenScore = (f32, Vec<(u32, f32)>);

/// One request's sequences on their way through the model: its generator, its KV cache, and the
/// tokens its next decode step feeds. Many of them can share one decode step
/// ([`Gpt2Model::forward_step`]), which is how the engine batches requests.
#[derive(Debug)]
pub struct Decoding {
    generator: Generator,
    cache: KvCache,
    pending: Vec<u32>,
    /// `(logprob, top alternatives)` of every prompt token but the first, when asked for.
    prompt_scores: Option<Vec<TokenScore>>,
}

impl Decoding {
    /// Prefills `prompt` once and forks its cache into the request's sequences or beams.
    pub fn start(
        model: &Gpt2Model,
        prompt: &[u32],
        params: GenerationParams,
    ) -> Result<Self, EngineError> {
        Self::start_scoring(model, prompt, params, false)
    }

    /// [`Decoding::start`] that, when `score_prompt` is set, also computes the log-probability
    /// of every prompt token after the first (and its `params.top_logprobs` alternatives), for
    /// [`Decoding::take_prompt_scores`]. The prefill then computes logits at every prompt
    /// position instead of the last: `prompt × vocab` floats, once.
    pub fn start_scoring(
        model: &Gpt2Model,
        prompt: &[u32],
        params: GenerationParams,
        score_prompt: bool,
    ) -> Result<Self, EngineError> {
        let max_length = params.max_length;
        let top_n = params.top_logprobs;
        let vocab = model.config().vocab_size;
        let generator = Generator::new(prompt, params, vocab)?;
        let mut cache = model.new_cache_with_capacity(max_length);
        let prompt_tensor = Tensor::from_slice(prompt, (1, prompt.len()), model.device())
            .map_err(ModelError::from)?;
        let which = if score_prompt {
            LogitsFor::All
        } else {
            LogitsFor::Last
        };
        let logits = model
            .forward(&prompt_tensor, &mut cache, which)?
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(ModelError::from)?;
        let (prompt_scores, last) = if score_prompt {
            let rows: Vec<&[f32]> = logits.chunks_exact(vocab).collect();
            let scores = prompt
                .iter()
                .skip(1)
                .zip(&rows)
                .map(|(&token, row)| (token_logprob(row, token), top_logprobs(row, top_n)))
                .collect();
            let last = logits.len().saturating_sub(vocab);
            (Some(scores), &logits[last..])
        } else {
            (None, &logits[..])
        };
        let mut decoding = Self {
            generator,
            cache,
            pending: Vec::new(),
            prompt_scores,
        };
        decoding.advance(last)?;
        Ok(decoding)
    }

    /// The prompt's scores computed by [`Decoding::start_scoring`] (once; `None` afterwards or
    /// when not asked for): `(logprob, top alternatives)` of every prompt token but the first.
    pub fn take_prompt_scores(&mut self) -> Option<Vec<TokenScore>> {
        self.prompt_scores.take()
    }

    /// Ends returned sequences before generation would (see [`Generator::end_sequences`]): their
    /// rows leave the next decode step and the KV cache.
    pub fn end_sequences(&mut self, indices: &[usize]) -> Result<(), EngineError> {
        if let Some(kept) = self.generator.end_sequences(indices) {
            self.pending = kept
                .iter()
                .filter_map(|&row| self.pending.get(row as usize).copied())
                .collect();
            if !self.pending.is_empty() {
                self.cache.reorder(&kept)?;
            }
        }
        Ok(())
    }

    /// Whether generation is over.
    pub fn is_done(&self) -> bool {
        self.pending.is_empty()
    }

    /// The tokens the next decode step feeds, one per live sequence.
    pub fn pending_tokens(&self) -> &[u32] {
        &self.pending
    }

    /// The tokens the last prefill or step chose, one per returned sequence that ran (none in
    /// beam search until [`Decoding::into_outputs`]).
    pub fn emitted(&self) -> &[Emitted] {
        self.generator.emitted()
    }

    /// The end-of-sequence token generation stops at.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.generator.eos_token_id()
    }

    /// The cache the next decode step extends.
    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    /// Takes the logits of the last step (one row per pending token) and prepares the next.
    pub fn advance(&mut self, logits: &[f32]) -> Result<(), EngineError> {
        match self.generator.advance(logits)? {
            Some(step) => {
                self.cache.reorder(&step.parent_rows)?;
                self.pending = step.tokens;
            }
            None => self.pending.clear(),
        }
        Ok(())
    }

    /// The generated ids of each returned sequence (prompt excluded, a final EOS included).
    pub fn into_outputs(self) -> Vec<Vec<u32>> {
        self.generator.into_outputs()
    }
}

/// Generates from `prompt` token ids: prefills the prompt once, forks its KV cache into the
/// request's sequences or beams, and runs one decode step at a time until `params` says stop.
/// Returns the generated ids of each returned sequence (prompt excluded, a final EOS included).
///
/// `should_stop` is polled between steps; when it answers true, generation ends with
/// [`EngineError::Cancelled`].
pub fn generate_ids(
    model: &Gpt2Model,
    prompt: &[u32],
    params: GenerationParams,
    mut should_stop: impl FnMut() -> bool,
) -> Result<Vec<Vec<u32>>, EngineError> {
    let mut decoding = Decoding::start(model, prompt, params)?;
    while !decoding.is_done() {
        if should_stop() {
            return Err(EngineError::Cancelled);
        }
        decoding.step(model)?;
    }
    Ok(decoding.into_outputs())
}

impl Decoding {
    /// Runs one decode step of this request alone (the worker batches requests instead).
    pub fn step(&mut self, model: &Gpt2Model) -> Result<(), EngineError> {
        let tokens = self.pending.clone();
        let logits = model.forward_step(&tokens, &mut [&mut self.cache])?;
        self.advance(&logits)
    }
}
