//! HF transformers' beam search (the vectorised `_beam_search` of transformers 5), one step at a
//! time, for one request, with length_penalty 1.0 and `early_stopping=True`.
//!
//! Scores are kept in f32 and combined in the same order as HF, so that hypotheses rank the same.

use crate::logprob::log_softmax;
use crate::ngram::ban_repeated_ngrams;
use crate::{BeamParams, LogitsProcessing, Step};

/// HF's stand-in for "impossible": added to scores of candidates that must not be chosen.
const IMPOSSIBLE: f32 = -1.0e9;

/// A finished (or placeholder) hypothesis.
#[derive(Debug, Clone)]
struct Finished {
    score: f32,
    tokens: Vec<u32>,
    is_finished: bool,
}

/// One of the `2 · num_beams` best continuations of a step.
#[derive(Debug, Clone)]
struct Candidate {
    log_prob: f32,
    beam: usize,
    token: u32,
    hits_stop: bool,
}

/// The state of one beam search.
#[derive(Debug, Clone)]
pub struct BeamSearch {
    params: BeamParams,
    prompt_len: usize,
    max_length: usize,
    eos_token_id: Option<u32>,
    /// Processors applied to each beam's log-probabilities (all off by default).
    processing: LogitsProcessing,
    /// Running hypotheses (prompt included), always `num_beams` of them.
    running: Vec<Vec<u32>>,
    running_scores: Vec<f32>,
    /// The best `num_beams` finished hypotheses, best first (placeholders at −1e9).
    finished: Vec<Finished>,
    done: bool,
    /// Reused buffer for the step's num_beams × vocab scores.
    scores: Vec<f32>,
}

impl BeamSearch {
    /// Starts a search from `prompt`; `max_length` counts the prompt.
    pub fn new(
        prompt: &[u32],
        params: BeamParams,
        max_length: usize,
        eos_token_id: Option<u32>,
    ) -> Self {
        let num_beams = params.num_beams.max(1);
        let mut running_scores = vec![IMPOSSIBLE; num_beams];
        running_scores[0] = 0.0;
        Self {
            params: BeamParams {
                num_beams,
                ..params
            },
            prompt_len: prompt.len(),
            max_length,
            eos_token_id,
            processing: LogitsProcessing::default(),
            running: vec![prompt.to_vec(); num_beams],
            running_scores,
            finished: (0..num_beams)
                .map(|_| Finished {
                    score: IMPOSSIBLE,
                    tokens: prompt.to_vec(),
                    is_finished: false,
                })
                .collect(),
            done: prompt.len() >= max_length,
            scores: Vec::new(),
        }
    }

    /// Applies `processing` to each beam's log-probabilities before they are ranked (HF's
    /// beam search runs its logits processors on the log-softmax, as here).
    pub fn with_processing(mut self, processing: LogitsProcessing) -> Self {
        self.processing = processing;
        self
    }

    /// Whether the search has ended.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Takes the logits of every running beam (`num_beams` rows of `vocab` values; a single row
    /// is accepted for the first step, when every beam holds the prompt). Returns the next step,
    /// or `None` when the search has ended.
    pub fn advance(&mut self, logits: &[f32], vocab: usize) -> Option<Step> {
        if self.done || vocab == 0 {
            self.done = true;
            return None;
        }
        let num_beams = self.params.num_beams;
        let rows = logits.len() / vocab;
        let cur_len = self.running[0].len();

        // Accumulated log-probabilities of every (beam, token), flattened beam-major, in a buffer
        // kept between steps.
        let mut scores = std::mem::take(&mut self.scores);
        scores.clear();
        for beam in 0..num_beams {
            let row = if rows == 1 { 0 } else { beam.min(rows - 1) };
            let row_logits = &logits[row * vocab..(row + 1) * vocab];
            let sequence = &self.running[beam];
            let (prompt, generated) = sequence.split_at(self.prompt_len.min(sequence.len()));
            let mut log_probs = if num_beams == 1 && !self.processing.is_off() {
                // HF runs one beam as greedy search, whose processors see the raw logits; the
                // ranking is then that of the processed logits.
                let mut processed = row_logits.to_vec();
                self.processing
                    .apply_before_ngram(&mut processed, prompt, generated);
                log_softmax(&processed)
            } else {
                let mut log_probs = log_softmax(row_logits);
                self.processing
                    .apply_before_ngram(&mut log_probs, prompt, generated);
                log_probs
            };
            ban_repeated_ngrams(&mut log_probs, sequence, self.params.no_repeat_ngram_size);
            self.processing
                .apply_after_ngram(&mut log_probs, generated.len(), self.eos_token_id);
            let beam_score = self.running_scores[beam];
            scores.extend(log_probs.iter().map(|lp| lp + beam_score));
        }

        let keep = 2 * num_beams;
        let candidates: Vec<Candidate> = top_indices(&scores, keep)
            .into_iter()
            .map(|flat| {
                let token = (flat % vocab) as u32;
                Candidate {
                    log_prob: scores[flat],
                    beam: flat / vocab,
                    token,
                    hits_stop: cur_len + 1 >= self.max_length || Some(token) == self.eos_token_id,
                }
            })
            .collect();
        self.scores = scores;

        // Next running beams: the best candidates that did not stop.
        let running_log_probs: Vec<f32> = candidates
            .iter()
            .map(|c| c.log_prob + if c.hits_stop { IMPOSSIBLE } else { 0.0 })
            .collect();
        let next_running = top_indices(&running_log_probs, num_beams);

        // Finished hypotheses: merge the best-ranked candidates that stopped with those found so far.
        let generated_len = (cur_len + 1 - self.prompt_len) as f32;
        let all_finished = self.finished.iter().all(|f| f.is_finished);
        let mut merged: Vec<Finished> = self.finished.clone();
        for (rank, candidate) in candidates.iter().enumerate() {
            let just_finished = candidate.hits_stop && rank < num_beams;
            let mut score = candidate.log_prob / generated_len;
            if all_finished {
                score += IMPOSSIBLE;
            }
            if !just_finished {
                score += IMPOSSIBLE;
            }
            let mut tokens = self.running[candidate.beam].clone();
            tokens.push(candidate.token);
            merged.push(Finished {
                score,
                tokens,
                is_finished: just_finished,
            });
        }
        let merged_scores: Vec<f32> = merged.iter().map(|f| f.score).collect();
        self.finished = top_indices(&merged_scores, num_beams)
            .into_iter()
            .map(|i| merged[i].clone())
            .collect();

        let step = Step {
            // After the prefill there is one row: every beam holds the prompt, and the
            // placeholder beams HF runs as rows of their own all continue that one row.
            parent_rows: next_running
                .iter()
                .map(|&i| {
                    if rows == 1 {
                        0
                    } else {
                        candidates[i].beam as u32
                    }
                })
                .collect(),
            tokens: next_running.iter().map(|&i| candidates[i].token).collect(),
        };
        self.running = next_running
            .iter()
            .map(|&i| {
                let mut tokens = self.running[candidates[i].beam].clone();
                tokens.push(candidates[i].token);
                tokens
            })
            .collect();
        self.running_scores = next_running.iter().map(|&i| running_log_probs[i]).collect();

        let every_slot_finished = self.finished.iter().all(|f| f.is_finished);
        let every_candidate_stopped = candidates.iter().all(|c| c.hits_stop);
        if every_slot_finished || every_candidate_stopped {
            self.done = true;
            return None;
        }
        Some(step)
    }

    /// The `n` best hypotheses, best first, prompt included (EOS included where one ended it).
    pub fn best(&self, n: usize) -> Vec<Vec<u32>> {
        self.finished
            .iter()
            .take(n)
            .map(|f| f.tokens.clone())
            .collect()
    }
}

/// Indices of the `k` largest values, largest first; ties go to the lower index (torch's
/// `topk` makes no promise there). NaN ranks lowest.
///
/// One pass that keeps the `k` best seen so far: `k` is at most 2·num_beams while `values` holds
/// num_beams·vocab scores, so nearly every value is rejected by a single comparison.
pub(crate) fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    let key = |i: usize| {
        let v = values[i];
        if v.is_nan() {
            f32::NEG_INFINITY
        } else {
            v
        }
    };
    let order = |a: &usize, b: &usize| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
    let worst_of = |best: &[usize]| {
        (0..best.len())
            .max_by(|&x, &y| order(&best[x], &best[y]))
            .unwrap_or(0)
    };
    let mut best: Vec<usize> = (0..k).collect();
    let mut worst = worst_of(&best);
    let mut threshold = key(best[worst]);
    for i in k..values.len() {
        // A later index only wins with a strictly greater value (ties go to the lower index).
        if key(i).total_cmp(&threshold) == std::cmp::Ordering::Greater {
            best[worst] = i;
            worst = worst_of(&best);
            threshold = key(best[worst]);
        }
    }
    best.sort_unstable_by(order);
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(num_beams: usize) -> BeamParams {
        BeamParams {
            num_beams,
            no_repeat_ngram_size: 0,
        }
    }

    #[test]
    fn top_indices_orders_by_value_then_index() {
        assert_eq!(top_indices(&[1.0, 3.0, 3.0, 2.0], 3), vec![1, 2, 3]);
        assert_eq!(top_indices(&[1.0, f32::NAN, 0.0], 2), vec![0, 2]);
        assert_eq!(top_indices(&[1.0], 5), vec![0]);
        assert_eq!(top_indices(&[0.0, 5.0, 5.0, 5.0, 1.0], 2), vec![1, 2]);
        assert_eq!(top_indices(&[-0.0, 0.0], 1), vec![1]);
        // Against a full sort on a longer input with many ties.
        let values: Vec<f32> = (0..500).map(|i| ((i * 7919) % 97) as f32 / 4.0).collect();
        let mut sorted: Vec<usize> = (0..values.len()).collect();
        sorted.sort_by(|a, b| values[*b].total_cmp(&values[*a]).then(a.cmp(b)));
        for k in [1, 3, 10, 32] {
            assert_eq!(top_indices(&values, k), sorted[..k].to_vec());
        }
    }

    #[test]
    fn single_beam_follows_the_argmax_until_max_length() {
        // Vocabulary of 3; the model always prefers token 2 (no EOS).
        let mut search = BeamSearch::new(&[0], params(1), 4, None);
        let logits = [0.0, 1.0, 2.0];
        let mut steps = 0;
        while let Some(step) = search.advance(&logits, 3) {
            assert_eq!(step.tokens, vec![2]);
            steps += 1;
        }
        assert_eq!(steps, 2);
        assert_eq!(search.best(1), vec![vec![0, 2, 2, 2]]);
    }

    #[test]
    fn eos_finishes_hypotheses_and_early_stopping_ends_the_search() {
        // EOS (token 0) is the best token at every step: both beams finish at once.
        let mut search = BeamSearch::new(&[5], params(2), 10, Some(0));
        let logits = [3.0, 1.0, 0.5, 0.0, 0.0, 0.0];
        let step = search.advance(&logits, 6);
        // Rank 0 is EOS from beam 0 (finished); rank 1 (token 1) continues.
        let step = step.expect("one beam still runs");
        assert_eq!(step.tokens[0], 1);
        let next = search.advance(&[logits, logits].concat(), 6);
        assert!(
            next.is_none(),
            "two finished hypotheses end a 2-beam search"
        );
        let best = search.best(2);
        assert_eq!(best[0], vec![5, 0]);
        assert_eq!(best[1].len(), 3);
        assert_eq!(best[1][2], 0);
    }
}
