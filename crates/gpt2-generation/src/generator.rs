use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::beam::BeamSearch;
use crate::logprob::{token_logprob, top_logprobs};
use crate::sampling::{argmax, Candidates};
use crate::{GenerationError, GenerationParams, Strategy};

/// What the model must run next, from a [`Generator`] or a [`crate::BeamSearch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Row `i` of the next batch continues row `parent_rows[i]` of the batch the last logits
    /// came from (forks and reorders the KV cache; after the prefill, every parent is row 0).
    pub parent_rows: Vec<u32>,
    /// The token fed to row `i`.
    pub tokens: Vec<u32>,
}

/// Why a returned sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// It reached `max_length`.
    Length,
    /// It produced the end-of-sequence token (included as its last token).
    Eos,
}

impl FinishReason {
    /// How the sequence `generated` (prompt excluded) ended, given the end-of-sequence token.
    pub fn of(generated: &[u32], eos_token_id: Option<u32>) -> Self {
        match (generated.last(), eos_token_id) {
            (Some(last), Some(eos)) if *last == eos => FinishReason::Eos,
            _ => FinishReason::Length,
        }
    }
}

/// A token chosen for one returned sequence by the last [`Generator::advance`].
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    /// The returned sequence it extends (`0..num_return_sequences`).
    pub index: usize,
    /// The token.
    pub token: u32,
    /// Its log-probability under the model's distribution (log-softmax of the raw logits).
    pub logprob: f32,
    /// `Some` when this token ends the sequence.
    pub finished: Option<FinishReason>,
    /// The [`GenerationParams::top_logprobs`] most likely tokens at this position with their
    /// log-probabilities (as `logprob`), most likely first; empty when none were asked for.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// The sampling stream of returned sequence `index` under `seed`: the same on every machine,
/// whatever else runs beside it.
pub fn sequence_rng(seed: u64, index: usize) -> ChaCha20Rng {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    rng
}

/// One sequence of a greedy or sampled request.
#[derive(Debug, Clone)]
struct Sequence {
    generated: Vec<u32>,
    finished: bool,
    rng: Option<ChaCha20Rng>,
}

#[derive(Debug, Clone)]
enum State {
    /// Greedy and sampling: independent sequences, finished ones leave the batch.
    Independent {
        sequences: Vec<Sequence>,
        /// `rows[i]` is the sequence that row `i` of the last logits belongs to.
        rows: Vec<usize>,
    },
    Beam(BeamSearch),
}

/// One request's generation as a state machine: give it the logits of the rows it asked for,
/// it answers with the next rows to run, until it is done. It never touches a model, so an engine
/// can batch its rows with other requests' rows.
///
/// ```
/// use gpt2_generation::{GenerationParams, Generator, Strategy};
///
/// let params = GenerationParams {
///     strategy: Strategy::Greedy,
///     max_length: 4,
///     num_return_sequences: 1,
///     eos_token_id: None,
///     seed: None,
///     processing: Default::default(),
///     top_logprobs: 0,
/// };
/// let mut generator = Generator::new(&[7, 8], params, 3).unwrap();
/// // A "model" that always prefers token 2.
/// let mut logits = vec![0.0, 0.5, 1.0];
/// while let Some(step) = generator.advance(&logits).unwrap() {
///     logits = step.tokens.iter().flat_map(|_| [0.0, 0.5, 1.0]).collect();
/// }
/// assert_eq!(generator.into_outputs(), vec![vec![2, 2]]);
/// ```
#[derive(Debug, Clone)]
pub struct Generator {
    params: GenerationParams,
    prompt_len: usize,
    /// The prompt, kept only when a processor needs it (the repetition penalty).
    prompt: Vec<u32>,
    vocab_size: usize,
    state: State,
    /// Returned sequences ended by the caller ([`Generator::end_sequences`]).
    ended_by_caller: Vec<bool>,
    /// Reused buffer for a processed row of logits.
    scratch: Vec<f32>,
    /// What the last `advance` chose, per returned sequence (empty in beam search, whose
    /// sequences are only known at the end).
    emitted: Vec<Emitted>,
}

impl Generator {
    /// Prepares to continue `prompt`; the first [`Generator::advance`] takes the logits of the
    /// prompt's last position (one row).
    pub fn new(
        prompt: &[u32],
        params: GenerationParams,
        vocab_size: usize,
    ) -> Result<Self, GenerationError> {
        if prompt.is_empty() {
            return Err(GenerationError::EmptyPrompt);
        }
        if params.max_length <= prompt.len() {
            return Err(GenerationError::NothingToGenerate {
                prompt_len: prompt.len(),
                max_length: params.max_length,
            });
        }
        if params.num_return_sequences == 0 {
            return Err(GenerationError::InvalidParams(
                "num_return_sequences must be at least 1".into(),
            ));
        }
        if vocab_size == 0 {
            return Err(GenerationError::InvalidParams(
                "vocab_size must be positive".into(),
            ));
        }
        params
            .processing
            .validate()
            .map_err(GenerationError::InvalidParams)?;
        let state = match params.strategy {
            Strategy::Greedy => State::Independent {
                // Every greedy sequence would be identical: compute one, copy it at the end.
                sequences: vec![Sequence {
                    generated: Vec::new(),
                    finished: false,
                    rng: None,
                }],
                rows: vec![0],
            },
            Strategy::Sample(sampling) => {
                if !(sampling.temperature > 0.0 && sampling.temperature.is_finite()) {
                    return Err(GenerationError::InvalidParams(
                        "temperature must be positive".into(),
                    ));
                }
                if !(sampling.top_p > 0.0 && sampling.top_p <= 1.0) {
                    return Err(GenerationError::InvalidParams(
                        "top_p must be in (0, 1]".into(),
                    ));
                }
                let seed = params.seed.unwrap_or_else(rand::random);
                State::Independent {
                    sequences: (0..params.num_return_sequences)
                        .map(|index| Sequence {
                            generated: Vec::new(),
                            finished: false,
                            rng: Some(sequence_rng(seed, index)),
                        })
                        .collect(),
                    rows: vec![0],
                }
            }
            Strategy::Beam(beam) => {
                if beam.num_beams == 0 {
                    return Err(GenerationError::InvalidParams(
                        "num_beams must be at least 1".into(),
                    ));
                }
                if params.num_return_sequences > beam.num_beams {
                    return Err(GenerationError::InvalidParams(
                        "num_return_sequences must not exceed num_beams".into(),
                    ));
                }
                State::Beam(
                    BeamSearch::new(prompt, beam, params.max_length, params.eos_token_id)
                        .with_processing(params.processing.clone()),
                )
            }
        };
        let kept_prompt = if params.processing.needs_prompt() {
            prompt.to_vec()
        } else {
            Vec::new()
        };
        Ok(Self {
            ended_by_caller: vec![false; params.num_return_sequences],
            params,
            prompt_len: prompt.len(),
            prompt: kept_prompt,
            vocab_size,
            state,
            emitted: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// Takes the logits (`rows × vocab_size`, row-major) of the rows asked for last; returns the
    /// rows to run next, or `None` when generation is over.
    pub fn advance(&mut self, logits: &[f32]) -> Result<Option<Step>, GenerationError> {
        let vocab = self.vocab_size;
        if !logits.len().is_multiple_of(vocab) || logits.is_empty() {
            return Err(GenerationError::LogitsShape {
                len: logits.len(),
                vocab_size: vocab,
            });
        }
        let row_count = logits.len() / vocab;
        let cur_len = self.prompt_len + self.generated_so_far();
        let max_length = self.params.max_length;
        let eos = self.params.eos_token_id;
        // Greedy computes one sequence and returns it `num_return_sequences` times.
        let copies = match self.params.strategy {
            Strategy::Greedy => self.params.num_return_sequences,
            _ => 1,
        };
        self.emitted.clear();
        match &mut self.state {
            State::Beam(search) => Ok(search.advance(logits, vocab)),
            State::Independent { sequences, rows } => {
                if row_count != rows.len() {
                    return Err(GenerationError::LogitsShape {
                        len: logits.len(),
                        vocab_size: vocab,
                    });
                }
                let strategy = self.params.strategy;
                let processing = &self.params.processing;
                let processed = !processing.is_off();
                let top_n = self.params.top_logprobs;
                let prompt = &self.prompt;
                let scratch = &mut self.scratch;
                let first_step = cur_len == self.prompt_len;
                // The scores the strategy chooses from: the raw row, or its processed copy.
                let process = |scratch: &mut Vec<f32>, raw: &[f32], generated: &[u32]| {
                    scratch.clear();
                    scratch.extend_from_slice(raw);
                    processing.apply(scratch, prompt, generated, eos);
                };
                // After the prefill all sequences share row 0 and have generated nothing, so
                // they share its processed distribution: compute it once.
                let shared = match (&strategy, first_step) {
                    (Strategy::Sample(p), true) if processed => {
                        process(scratch, &logits[..vocab], &[]);
                        Some(Candidates::from_logits(scratch, p))
                    }
                    (Strategy::Sample(p), true) => {
                        Some(Candidates::from_logits(&logits[..vocab], p))
                    }
                    _ => None,
                };
                let mut next_rows = Vec::new();
                let mut step = Step {
                    parent_rows: Vec::new(),
                    tokens: Vec::new(),
                };
                let owners: Vec<(usize, usize)> = if first_step {
                    (0..sequences.len()).map(|s| (0, s)).collect()
                } else {
                    rows.iter().copied().enumerate().collect()
                };
                for (row, seq_index) in owners {
                    let row_logits = &logits[row * vocab..(row + 1) * vocab];
                    let sequence = &mut sequences[seq_index];
                    let scores: &[f32] = if processed && shared.is_none() {
                        process(scratch, row_logits, &sequence.generated);
                        scratch
                    } else {
                        row_logits
                    };
                    let token = match &strategy {
                        Strategy::Greedy => argmax(scores),
                        Strategy::Sample(p) => {
                            let rng = sequence.rng.as_mut().ok_or(GenerationError::Internal)?;
                            match &shared {
                                Some(candidates) => candidates.draw(rng),
                                None => Candidates::from_logits(scores, p).draw(rng),
                            }
                        }
                        Strategy::Beam(_) => return Err(GenerationError::Internal),
                    };
                    let Some(token) = token else {
                        return Err(GenerationError::NoCandidate);
                    };
                    sequence.generated.push(token);
                    let finished = if Some(token) == eos {
                        Some(FinishReason::Eos)
                    } else if cur_len + 1 >= max_length {
                        Some(FinishReason::Length)
                    } else {
                        None
                    };
                    let logprob = token_logprob(row_logits, token);
                    let top = top_logprobs(row_logits, top_n);
                    for copy in 0..copies {
                        let index = seq_index + copy;
                        if self.ended_by_caller.get(index).copied().unwrap_or(true) {
                            continue;
                        }
                        self.emitted.push(Emitted {
                            index,
                            token,
                            logprob,
                            finished,
                            top_logprobs: top.clone(),
                        });
                    }
                    if finished.is_some() {
                        sequence.finished = true;
                    } else {
                        next_rows.push(seq_index);
                        step.parent_rows.push(row as u32);
                        step.tokens.push(token);
                    }
                }
                *rows = next_rows;
                Ok(if step.tokens.is_empty() {
                    None
                } else {
                    Some(step)
                })
            }
        }
    }

    /// Ends the returned sequences `indices` before generation would (a caller's stop condition,
    /// such as a stop string, met by the tokens emitted so far): they emit nothing more, and
    /// [`Generator::into_outputs`] returns what they generated so far.
    ///
    /// Returns the rows of the last [`Step`] that still run, in order, when that changed: the
    /// caller drops the others from its batch (and its KV cache). Beam search ignores this (its
    /// sequences are only known at the end) and returns `None`, as does a call that ends no row.
    pub fn end_sequences(&mut self, indices: &[usize]) -> Option<Vec<u32>> {
        for &index in indices {
            if let Some(ended) = self.ended_by_caller.get_mut(index) {
                *ended = true;
            }
        }
        let copies = self.params.num_return_sequences;
        let ended_by_caller = &self.ended_by_caller;
        let State::Independent { sequences, rows } = &mut self.state else {
            return None;
        };
        // Greedy computes one sequence for every returned copy: it runs while any copy does.
        let shared_by_copies = sequences.len() == 1 && copies > 1;
        let is_ended = |seq: usize| {
            if shared_by_copies {
                ended_by_caller.iter().all(|&e| e)
            } else {
                ended_by_caller.get(seq).copied().unwrap_or(true)
            }
        };
        if !rows.iter().any(|&seq| is_ended(seq)) {
            return None;
        }
        let mut kept = Vec::with_capacity(rows.len());
        let mut kept_sequences = Vec::with_capacity(rows.len());
        for (position, &seq) in rows.iter().enumerate() {
            if is_ended(seq) {
                sequences[seq].finished = true;
            } else {
                kept.push(position as u32);
                kept_sequences.push(seq);
            }
        }
        *rows = kept_sequences;
        Some(kept)
    }

    /// The tokens the last [`Generator::advance`] chose, one per returned sequence that ran
    /// (none in beam search: its sequences are only known at the end, from
    /// [`Generator::into_outputs`]).
    pub fn emitted(&self) -> &[Emitted] {
        &self.emitted
    }

    /// The end-of-sequence token generation stops at.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.params.eos_token_id
    }

    fn generated_so_far(&self) -> usize {
        match &self.state {
            State::Independent { sequences, rows } => {
                rows.first().map_or(0, |&s| sequences[s].generated.len())
            }
            State::Beam(_) => 0,
        }
    }

    /// The generated tokens of each returned sequence (prompt excluded; a final EOS included),
    /// `num_return_sequences` of them. Beam hypotheses come best first.
    pub fn into_outputs(self) -> Vec<Vec<u32>> {
        let n = self.params.num_return_sequences;
        match self.state {
            State::Independent { sequences, .. } => {
                if sequences.len() == 1 && n > 1 {
                    vec![sequences[0].generated.clone(); n]
                } else {
                    sequences.into_iter().map(|s| s.generated).collect()
                }
            }
            State::Beam(search) => search
                .best(n)
                .into_iter()
                .map(|tokens| tokens[self.prompt_len.min(tokens.len())..].to_vec())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BeamParams, LogitsProcessing, SamplingParams};

    fn params(strategy: Strategy, n: usize) -> GenerationParams {
        GenerationParams {
            strategy,
            max_length: 5,
            num_return_sequences: n,
            eos_token_id: Some(0),
            seed: Some(3),
            processing: LogitsProcessing::default(),
            top_logprobs: 0,
        }
    }

    /// Runs a generator against a fixed "model" (every row gets `logits`), collecting what it
    /// emitted step by step.
    fn run(mut generator: Generator, logits: &[f32]) -> (Vec<Vec<Emitted>>, Vec<Vec<u32>>) {
        let mut steps = Vec::new();
        let mut rows = 1;
        loop {
            let next = generator.advance(&logits.repeat(rows)).unwrap();
            steps.push(generator.emitted().to_vec());
            match next {
                Some(step) => rows = step.tokens.len(),
                None => break,
            }
        }
        (steps, generator.into_outputs())
    }

    #[test]
    fn greedy_emits_each_token_for_every_returned_sequence_and_ends_them_at_max_length() {
        let logits = [0.0, 0.5, 2.0, 1.0];
        let (steps, outputs) = run(
            Generator::new(&[9, 9], params(Strategy::Greedy, 3), 4).unwrap(),
            &logits,
        );
        assert_eq!(outputs, vec![vec![2, 2, 2]; 3]);
        assert_eq!(steps.len(), 3);
        for (step, emitted) in steps.iter().enumerate() {
            assert_eq!(
                emitted.iter().map(|e| e.index).collect::<Vec<_>>(),
                vec![0, 1, 2]
            );
            for e in emitted {
                assert_eq!(e.token, 2);
                assert_eq!(e.logprob, token_logprob(&logits, 2));
                let last = step == 2;
                assert_eq!(e.finished, last.then_some(FinishReason::Length));
            }
        }
    }

    #[test]
    fn sampled_sequences_end_on_eos_with_their_own_reason() {
        // Token 0 (EOS) and token 1 are equally likely: some sequences end early.
        let sampling = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let logits = [1.0, 1.0, f32::NEG_INFINITY];
        let generator = Generator::new(&[5], params(Strategy::Sample(sampling), 4), 3).unwrap();
        let (steps, outputs) = run(generator, &logits);
        let mut streamed = vec![Vec::new(); 4];
        let mut reasons = vec![None; 4];
        for e in steps.iter().flatten() {
            assert!(
                reasons[e.index].is_none(),
                "nothing follows a sequence's end"
            );
            streamed[e.index].push(e.token);
            reasons[e.index] = e.finished;
            assert!((e.logprob - 0.5f32.ln()).abs() < 1e-6);
        }
        assert_eq!(streamed, outputs, "the emitted tokens are the outputs");
        for (output, reason) in outputs.iter().zip(&reasons) {
            assert_eq!(*reason, Some(FinishReason::of(output, Some(0))));
        }
    }

    #[test]
    fn processors_change_the_choice_but_logprobs_stay_the_model_s() {
        let logits = [0.0, 2.0, 1.9, 1.0];
        let mut p = params(Strategy::Greedy, 1);
        p.eos_token_id = None;
        p.max_length = 3;
        p.top_logprobs = 2;
        let (_, plain) = run(Generator::new(&[1], p.clone(), 4).unwrap(), &logits);
        assert_eq!(plain, vec![vec![1, 1]]);
        // The prompt's token 1 is penalised: 2.0 / 1.1 < 1.9.
        p.processing.repetition_penalty = 1.1;
        let (steps, penalised) = run(Generator::new(&[1], p.clone(), 4).unwrap(), &logits);
        assert_eq!(penalised, vec![vec![2, 1]]);
        let first = &steps[0][0];
        assert_eq!(first.logprob, token_logprob(&logits, 2));
        assert_eq!(
            first.top_logprobs,
            vec![
                (1, token_logprob(&logits, 1)),
                (2, token_logprob(&logits, 2))
            ]
        );
        // A frequency penalty on generated tokens only: the prompt's 1 is free, then 1 repeats
        // less and less.
        p.processing = LogitsProcessing {
            frequency_penalty: 0.15,
            ..LogitsProcessing::default()
        };
        p.max_length = 4;
        let (_, frequency) = run(Generator::new(&[1], p, 4).unwrap(), &logits);
        assert_eq!(frequency, vec![vec![1, 2, 1]]);
    }

    #[test]
    fn ended_sequences_leave_the_batch_and_keep_what_they_generated() {
        let sampling = SamplingParams::default();
        let mut p = params(Strategy::Sample(sampling), 3);
        p.eos_token_id = None;
        p.max_length = 6;
        let mut generator = Generator::new(&[5], p, 3).unwrap();
        let logits = [0.0, 1.0, 0.5];
        let step = generator.advance(&logits).unwrap().unwrap();
        assert_eq!(step.tokens.len(), 3);
        assert_eq!(generator.end_sequences(&[1]), Some(vec![0, 2]));
        assert_eq!(
            generator.end_sequences(&[1]),
            None,
            "already out of the batch"
        );
        let step = generator.advance(&logits.repeat(2)).unwrap().unwrap();
        assert_eq!(step.parent_rows, vec![0, 1]);
        let indices: Vec<usize> = generator.emitted().iter().map(|e| e.index).collect();
        assert_eq!(indices, [0, 2]);
        assert_eq!(generator.end_sequences(&[0, 2]), Some(vec![]));
        let outputs = generator.into_outputs();
        assert_eq!(outputs.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1, 2]);
    }

    #[test]
    fn greedy_copies_run_until_every_copy_is_ended() {
        let mut p = params(Strategy::Greedy, 2);
        p.eos_token_id = None;
        let mut generator = Generator::new(&[5], p, 3).unwrap();
        generator.advance(&[0.0, 1.0, 0.5]).unwrap().unwrap();
        assert_eq!(
            generator.end_sequences(&[0]),
            None,
            "copy 1 still needs the row"
        );
        generator.advance(&[0.0, 1.0, 0.5]).unwrap().unwrap();
        let indices: Vec<usize> = generator.emitted().iter().map(|e| e.index).collect();
        assert_eq!(indices, [1]);
        assert_eq!(generator.end_sequences(&[1]), Some(vec![]));
    }

    #[test]
    fn invalid_processing_is_refused() {
        let mut p = params(Strategy::Greedy, 1);
        p.processing.repetition_penalty = -1.0;
        assert!(matches!(
            Generator::new(&[1], p, 4),
            Err(GenerationError::InvalidParams(_))
        ));
    }

    #[test]
    fn beam_search_emits_nothing_until_its_outputs() {
        let beam = BeamParams {
            num_beams: 2,
            no_repeat_ngram_size: 0,
        };
        let (steps, outputs) = run(
            Generator::new(&[5], params(Strategy::Beam(beam), 2), 4).unwrap(),
            &[0.0, 1.0, 0.5, 0.2],
        );
        assert!(steps.iter().all(Vec::is_empty));
        assert_eq!(outputs.len(), 2);
        assert_eq!(FinishReason::of(&[3, 0], Some(0)), FinishReason::Eos);
        assert_eq!(FinishReason::of(&[3, 1], Some(0)), FinishReason::Length);
        assert_eq!(FinishReason::of(&[], None), FinishReason::Length);
    }
}
