use candle_core::Tensor;
use gpt2_generation::{token_logprob, top_logprobs, Emitted, GenerationParams, Generator};
use gpt2_model::{Gpt2Model, KvCache, LogitsFor, ModelError, PromptChunk};

use crate::EngineError;

/// A prompt on its way into a KV cache, one chunk at a time, so that an engine can run decode
/// steps of other requests between the chunks of a long prompt.
#[derive(Debug)]
pub struct Prefill {
    generator: Generator,
    cache: KvCache,
    prompt: Vec<u32>,
    /// Most prompt tokens per chunk.
    chunk_tokens: usize,
    /// Prompt tokens already in the cache.
    done: usize,
    score_prompt: bool,
    top_n: usize,
    scores: Vec<TokenScore>,
    last_logits: Vec<f32>,
}

impl Prefill {
    /// Plans the prefill of `prompt` in chunks of `chunk_tokens` (at least 1; `usize::MAX` runs
    /// it in one piece). Every prefill kernel computes a position's values from that position and
    /// the ones before it only, so chunks of any size give exactly the one-shot prefill's bits
    /// (`chunked_prefill_is_bit_identical_to_one_shot`). Checks the parameters (through
    /// [`Generator::new`]) before any work.
    pub fn new(
        model: &Gpt2Model,
        prompt: &[u32],
        params: GenerationParams,
        score_prompt: bool,
        chunk_tokens: usize,
    ) -> Result<Self, EngineError> {
        let max_length = params.max_length;
        let top_n = params.top_logprobs;
        let generator = Generator::new(prompt, params, model.config().vocab_size)?;
        Ok(Self {
            generator,
            cache: model.new_cache_with_capacity(max_length),
            prompt: prompt.to_vec(),
            chunk_tokens: chunk_tokens.max(1),
            done: 0,
            score_prompt,
            top_n,
            scores: Vec::new(),
            last_logits: Vec::new(),
        })
    }

    /// The prompt being prefilled.
    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// Tokens the next [`Prefill::run_chunk`] runs (0 when done).
    pub fn next_chunk_tokens(&self) -> usize {
        self.chunk_tokens.min(self.remaining_tokens())
    }

    /// Sets the most prompt tokens of the chunks still to run (at least 1): an engine can take
    /// longer chunks while nothing else is decoding. The answer does not change.
    pub fn set_chunk_tokens(&mut self, chunk_tokens: usize) {
        self.chunk_tokens = chunk_tokens.max(1);
    }

    /// Prompt tokens not yet in the cache.
    pub fn remaining_tokens(&self) -> usize {
        self.prompt.len() - self.done
    }

    /// Whether every chunk has run.
    pub fn is_done(&self) -> bool {
        self.remaining_tokens() == 0
    }

    /// Runs the next chunk through the model.
    pub fn run_chunk(&mut self, model: &Gpt2Model) -> Result<(), EngineError> {
        let Some((tokens, which)) = self.chunk_input(model)? else {
            return Ok(());
        };
        let logits = model.forward(&tokens, &mut self.cache, which)?;
        Ok(self.take_chunk_logits(model, &logits)?)
    }

    /// Runs the next chunk of each of `prefills` in one pass with a decode step of other
    /// requests' `tokens` over `caches` ([`Gpt2Model::forward_mixed`]; no token and no cache:
    /// the chunks alone); returns the step's logits. Each gets the bits of its separate call.
    /// After a failed pass no cache moved.
    pub fn run_chunks_beside(
        prefills: &mut [&mut Prefill],
        model: &Gpt2Model,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<f32>, ModelError> {
        let mut inputs = Vec::with_capacity(prefills.len());
        for prefill in prefills.iter() {
            inputs.push(prefill.chunk_input(model)?);
        }
        let (step, logits) = {
            let mut chunks: Vec<PromptChunk<'_>> = prefills
                .iter_mut()
                .zip(&inputs)
                .filter_map(|(prefill, input)| {
                    input.as_ref().map(|(tokens, which)| PromptChunk {
                        tokens,
                        cache: &mut prefill.cache,
                        logits_for: *which,
                    })
                })
                .collect();
            if chunks.is_empty() {
                return match tokens.is_empty() {
                    true => Ok(Vec::new()),
                    false => model.forward_step(tokens, caches),
                };
            }
            model.forward_mixed((tokens, caches), &mut chunks)?
        };
        let mut logits = logits.iter();
        for (prefill, input) in prefills.iter_mut().zip(&inputs) {
            // Only the prefills that ran a chunk have logits, in order.
            if let Some(logits) = input.as_ref().and_then(|_| logits.next()) {
                prefill.take_chunk_logits(model, logits)?;
            }
        }
        Ok(step)
    }

    /// The next chunk's `(1, len)` tokens and the logits it needs; `None` when done.
    fn chunk_input(&self, model: &Gpt2Model) -> Result<Option<(Tensor, LogitsFor)>, ModelError> {
        let len = self.next_chunk_tokens();
        if len == 0 {
            return Ok(None);
        }
        let chunk = &self.prompt[self.done..self.done + len];
        let tokens = Tensor::from_slice(chunk, (1, len), model.device())?;
        let which = if self.score_prompt {
            LogitsFor::All
        } else if len == self.remaining_tokens() {
            LogitsFor::Last
        } else {
            LogitsFor::None
        };
        Ok(Some((tokens, which)))
    }

    /// Records a chunk's logits (`(1, positions, vocab)`) once it ran.
    fn take_chunk_logits(&mut self, model: &Gpt2Model, logits: &Tensor) -> Result<(), ModelError> {
        let len = self.next_chunk_tokens();
        let last_chunk = len == self.remaining_tokens();
        let vocab = model.config().vocab_size;
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
        if self.score_prompt {
            // Row j holds the distribution of the token after position done + j.
            for (j, row) in logits.chunks_exact(vocab).enumerate() {
                if let Some(&next) = self.prompt.get(self.done + j + 1) {
                    self.scores
                        .push((token_logprob(row, next), top_logprobs(row, self.top_n)));
                }
            }
        }
        if last_chunk {
            let last = logits.len().saturating_sub(vocab);
            self.last_logits.clear();
            self.last_logits.extend_from_slice(&logits[last..]);
        }
        self.done += len;
        Ok(())
    }

    /// The decoding that continues the prefilled prompt: its first tokens are chosen from the
    /// prompt's last logits. Runs any chunk left first.
    pub fn finish(mut self) -> Result<Decoding, EngineError> {
        if !self.is_done() {
            return Err(EngineError::Model(ModelError::Input(
                "the prefill has chunks left to run".into(),
            )));
        }
        let mut decoding = Decoding {
            generator: self.generator,
            cache: self.cache,
            pending: Vec::new(),
            prompt_scores: self.score_prompt.then(|| std::mem::take(&mut self.scores)),
        };
        decoding.advance(&self.last_logits)?;
        Ok(decoding)
    }
}

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
        let mut prefill = Prefill::new(model, prompt, params, score_prompt, usize::MAX)?;
        while !prefill.is_done() {
            prefill.run_chunk(model)?;
        }
        prefill.finish()
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

#[cfg(test)]
mod tests {
    use super::*;
    use gpt2_generation::Strategy;

    #[test]
    fn chunks_cover_the_prompt_at_the_size_asked_for_then() {
        let model = Gpt2Model::demo();
        let prompt: Vec<u32> = (0..100u32).collect();
        let params = GenerationParams {
            strategy: Strategy::Greedy,
            max_length: 110,
            num_return_sequences: 1,
            eos_token_id: None,
            seed: None,
            processing: Default::default(),
            top_logprobs: 0,
        };
        let mut prefill = Prefill::new(&model, &prompt, params, false, 40).unwrap();
        let mut sizes = Vec::new();
        while !prefill.is_done() {
            sizes.push(prefill.next_chunk_tokens());
            prefill.run_chunk(&model).unwrap();
            if sizes.len() == 1 {
                prefill.set_chunk_tokens(7);
            }
            if sizes.len() == 2 {
                prefill.set_chunk_tokens(usize::MAX);
            }
        }
        assert_eq!(sizes, [40, 7, 53]);
        assert_eq!(prefill.next_chunk_tokens(), 0);
        assert_eq!(prefill.cache.seq_len(), 100);
        assert_eq!(prefill.last_logits.len(), model.config().vocab_size);
    }

    #[test]
    fn chunked_prefill_is_bit_identical_to_one_shot() {
        let model = Gpt2Model::demo();
        let prompt: Vec<u32> = (0..400u32).map(|i| (i * 7919 + 13) % 50_000).collect();
        for len in [97, 161, 200, 257, 300, 400] {
            let prompt = &prompt[..len];
            let params = GenerationParams {
                strategy: Strategy::Greedy,
                max_length: len + 8,
                num_return_sequences: 1,
                eos_token_id: None,
                seed: None,
                processing: Default::default(),
                top_logprobs: 2,
            };
            let one_shot = || {
                let mut prefill =
                    Prefill::new(&model, prompt, params.clone(), true, usize::MAX).unwrap();
                prefill.run_chunk(&model).unwrap();
                prefill
            };
            let reference = one_shot();
            for chunk in [1, 16, 64, 100, 128, 192] {
                let mut chunked =
                    Prefill::new(&model, prompt, params.clone(), true, chunk).unwrap();
                while !chunked.is_done() {
                    chunked.run_chunk(&model).unwrap();
                }
                // Not assert_eq!: a failure would print 50,257 logits.
                assert!(
                    chunked.last_logits == reference.last_logits,
                    "{len} by {chunk}: logits differ"
                );
                assert!(
                    chunked.scores == reference.scores,
                    "{len} by {chunk}: scores differ"
                );
                assert_eq!(chunked.cache.seq_len(), len);
            }
        }
    }
}
