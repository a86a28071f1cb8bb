use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::beam::BeamSearch;
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
    vocab_size: usize,
    state: State,
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
                State::Beam(BeamSearch::new(
                    prompt,
                    beam,
                    params.max_length,
                    params.eos_token_id,
                ))
            }
        };
        Ok(Self {
            params,
            prompt_len: prompt.len(),
            vocab_size,
            state,
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
                let first_step = cur_len == self.prompt_len;
                // After the prefill all sequences share row 0; process its distribution once.
                let shared = match (&strategy, first_step) {
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
                    let token = match &strategy {
                        Strategy::Greedy => argmax(row_logits),
                        Strategy::Sample(p) => {
                            let rng = sequence.rng.as_mut().ok_or(GenerationError::Internal)?;
                            match &shared {
                                Some(candidates) => candidates.draw(rng),
                                None => Candidates::from_logits(row_logits, p).draw(rng),
                            }
                        }
                        Strategy::Beam(_) => return Err(GenerationError::Internal),
                    };
                    let Some(token) = token else {
                        return Err(GenerationError::NoCandidate);
                    };
                    sequence.generated.push(token);
                    if Some(token) == eos || cur_len + 1 >= max_length {
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
