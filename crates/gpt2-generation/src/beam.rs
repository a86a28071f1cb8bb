//! HF transformers' beam search (the vectorised `_beam_search` of transformers 5), one step at a
//! time, for one request, with length_penalty 1.0 and `early_stopping=True`.
//!
//! Scores are kept in f32 and combined in the same order as HF, so that hypotheses rank the same.

use gpt2_simd::Isa;

use crate::logprob::{log_normaliser, log_softmax_into};
use crate::ngram::{ban_repeated_ngrams, banned_ngram_tokens};
use crate::sampling::block_max;
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
    /// Reused buffer for one beam's processed log-probabilities (when a processor is on).
    row_scores: Vec<f32>,
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
            row_scores: Vec::new(),
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

        // The 2·num_beams best accumulated log-probabilities of every (beam, token), flattened
        // beam-major, ranked as they are computed: the num_beams × vocab scores are never stored.
        let keep = 2 * num_beams;
        let mut best = TopK::new(keep);
        let mut row_scores = std::mem::take(&mut self.row_scores);
        for beam in 0..num_beams {
            let row = if rows == 1 { 0 } else { beam.min(rows - 1) };
            let row_logits = &logits[row * vocab..(row + 1) * vocab];
            let sequence = &self.running[beam];
            let (prompt, generated) = sequence.split_at(self.prompt_len.min(sequence.len()));
            let beam_score = self.running_scores[beam];
            let base = beam * vocab;
            if self.processing.is_off() {
                let banned = banned_ngram_tokens(sequence, self.params.no_repeat_ngram_size);
                if let Some(normaliser) = log_normaliser(row_logits) {
                    rank_row(
                        Isa::active(),
                        row_logits,
                        normaliser,
                        beam_score,
                        &banned,
                        base,
                        &mut best,
                    );
                    continue;
                }
                // No finite logit: every log-probability is −∞, as `log_softmax_into` writes.
            }
            if num_beams == 1 && !self.processing.is_off() {
                // HF runs one beam as greedy search, whose processors see the raw logits; the
                // ranking is then that of the processed logits.
                let mut processed = row_logits.to_vec();
                self.processing
                    .apply_before_ngram(&mut processed, prompt, generated);
                log_softmax_into(&processed, &mut row_scores);
            } else {
                log_softmax_into(row_logits, &mut row_scores);
                self.processing
                    .apply_before_ngram(&mut row_scores, prompt, generated);
            }
            ban_repeated_ngrams(&mut row_scores, sequence, self.params.no_repeat_ngram_size);
            self.processing
                .apply_after_ngram(&mut row_scores, generated.len(), self.eos_token_id);
            for (token, &lp) in row_scores.iter().enumerate() {
                best.push(base + token, lp + beam_score);
            }
        }
        self.row_scores = row_scores;

        let candidates: Vec<Candidate> = best
            .into_sorted()
            .into_iter()
            .map(|(flat, log_prob)| {
                let token = (flat % vocab) as u32;
                Candidate {
                    log_prob,
                    beam: flat / vocab,
                    token,
                    hits_stop: cur_len + 1 >= self.max_length || Some(token) == self.eos_token_id,
                }
            })
            .collect();

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
pub(crate) fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut best = TopK::new(k);
    for (i, &v) in values.iter().enumerate() {
        best.push(i, v);
    }
    best.into_sorted().into_iter().map(|(i, _)| i).collect()
}

/// The `k` largest of values pushed in increasing index order, ties going to the lower index
/// and NaN ranking lowest: [`top_indices`] without the values stored.
///
/// It keeps the `k` best seen so far: `k` is at most 2·num_beams while a beam step ranks
/// num_beams·vocab scores, so nearly every value is rejected by a single comparison.
#[derive(Debug)]
pub(crate) struct TopK {
    k: usize,
    /// `(index, value)` of the best so far, unordered.
    best: Vec<(usize, f32)>,
    /// Where the worst of `best` is, once it holds `k`.
    worst: usize,
}

/// The value a [`TopK`] ranks by: NaN as −∞.
fn key(value: f32) -> f32 {
    if value.is_nan() {
        f32::NEG_INFINITY
    } else {
        value
    }
}

/// Ranking order, best first: greater key, then lower index.
fn order(a: &(usize, f32), b: &(usize, f32)) -> std::cmp::Ordering {
    key(b.1).total_cmp(&key(a.1)).then(a.0.cmp(&b.0))
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        Self {
            k,
            best: Vec::with_capacity(k),
            worst: 0,
        }
    }

    /// The value a later push must beat to enter, once `k` values were pushed: only one whose
    /// key is greater (by `total_cmp`) does, and every such value is also `>=` it.
    #[inline]
    pub(crate) fn threshold(&self) -> Option<f32> {
        (self.best.len() == self.k).then(|| {
            self.best
                .get(self.worst)
                .map_or(f32::INFINITY, |b| key(b.1))
        })
    }

    /// Offers `value` at `index`, greater than every index pushed before.
    #[inline]
    pub(crate) fn push(&mut self, index: usize, value: f32) {
        if self.best.len() < self.k {
            self.best.push((index, value));
            if self.best.len() == self.k {
                self.find_worst();
            }
        } else if self.k > 0
            // A later index only wins with a strictly greater value (ties go to the lower index).
            && key(value).total_cmp(&key(self.best[self.worst].1)) == std::cmp::Ordering::Greater
        {
            self.best[self.worst] = (index, value);
            self.find_worst();
        }
    }

    fn find_worst(&mut self) {
        let best = &self.best;
        self.worst = (0..best.len())
            .max_by(|&x, &y| order(&best[x], &best[y]))
            .unwrap_or(0);
    }

    /// `(index, value)` of the best, best first.
    pub(crate) fn into_sorted(mut self) -> Vec<(usize, f32)> {
        self.best.sort_unstable_by(order);
        self.best
    }
}

/// Offers `best` the scores of one beam, `(logit − max − log_sum) + beam_score` at `base +
/// token` (−∞ for a `banned` token, sorted), computed as `log_softmax_into` and the processors'
/// path compute them, so that the ranking is the same bit for bit.
///
/// A block of 16 logits is offered, one value at a time, only when the score of its highest
/// logit could enter `best`, so most of the row costs one vector maximum per 16 logits instead of
/// computing, storing and re-reading 5 × 50,257 scores. With the normaliser's vectorized maximum
/// (`log_normaliser`), a 5-beam step's `BeamSearch::advance` went from 1.1–1.9 ms to 0.3–0.6
/// ms (50,257-token rows, 2-vCPU EPYC, interleaved runs).
fn rank_row(
    isa: Isa,
    logits: &[f32],
    normaliser: (f32, f64),
    beam_score: f32,
    banned: &[u32],
    base: usize,
    best: &mut TopK,
) {
    match isa {
        // SAFETY: the CPU has the features this function is compiled for.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx if isa.is_supported() => unsafe {
            rank_row_avx512(logits, normaliser, beam_score, banned, base, best)
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.is_supported() => unsafe {
            rank_row_avx2(logits, normaliser, beam_score, banned, base, best)
        },
        _ => rank_row_body(logits, normaliser, beam_score, banned, base, best),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
fn rank_row_avx512(
    logits: &[f32],
    normaliser: (f32, f64),
    beam_score: f32,
    banned: &[u32],
    base: usize,
    best: &mut TopK,
) {
    rank_row_body(logits, normaliser, beam_score, banned, base, best)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn rank_row_avx2(
    logits: &[f32],
    normaliser: (f32, f64),
    beam_score: f32,
    banned: &[u32],
    base: usize,
    best: &mut TopK,
) {
    rank_row_body(logits, normaliser, beam_score, banned, base, best)
}

#[inline(always)]
fn rank_row_body(
    logits: &[f32],
    (max, log_sum): (f32, f64),
    beam_score: f32,
    banned: &[u32],
    base: usize,
    best: &mut TopK,
) {
    const LANES: usize = 16;
    let max = f64::from(max);
    let score = |l: f32| (f64::from(l) - max - log_sum) as f32 + beam_score;
    let offer = |best: &mut TopK, token: usize, value: f32| {
        let value = if banned.binary_search(&(token as u32)).is_ok() {
            f32::NEG_INFINITY + beam_score
        } else {
            value
        };
        best.push(base + token, value);
    };
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        // The score only grows with the logit (every operation rounds monotonically), so the
        // block's best score is that of its highest logit (NaN, whose score ranks lowest, is
        // skipped by the maximum, which is never NaN, and neither is its score).
        if best
            .threshold()
            .is_some_and(|threshold| score(block_max(chunk)) < threshold)
        {
            continue;
        }
        for (lane, &l) in chunk.iter().enumerate() {
            offer(best, c * LANES + lane, score(l));
        }
    }
    let first = logits.len() - tail.len();
    for (lane, &l) in tail.iter().enumerate() {
        offer(best, first + lane, score(l));
    }
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
    fn ranking_rows_as_computed_matches_ranking_the_stored_scores_on_every_instruction_set() {
        let vocab = 50_257;
        let mut seed = 5u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed >> 8
        };
        // Coarse values, so that scores tie within and across beams; a few −∞, NaN and ±0.
        let rows: Vec<Vec<f32>> = (0..3)
            .map(|_| {
                (0..vocab)
                    .map(|i| match i % 9_973 {
                        7 => f32::NEG_INFINITY,
                        11 => f32::NAN,
                        13 => -0.0,
                        _ => (next() % 64) as f32 / 4.0 - 4.0,
                    })
                    .collect()
            })
            .collect();
        let beam_scores = [0.0f32, -1.25, IMPOSSIBLE];
        let banned: Vec<u32> = (0..vocab as u32).filter(|t| t % 997 == 3).collect();
        for k in [1, 6, 10, 40] {
            let mut stored = Vec::new();
            for (row, &beam_score) in rows.iter().zip(&beam_scores) {
                let mut log_probs = crate::logprob::log_softmax(row);
                for &t in &banned {
                    log_probs[t as usize] = f32::NEG_INFINITY;
                }
                stored.extend(log_probs.iter().map(|lp| lp + beam_score));
            }
            let want = top_indices(&stored, k);
            for isa in Isa::available() {
                let mut best = TopK::new(k);
                for (beam, (row, &beam_score)) in rows.iter().zip(&beam_scores).enumerate() {
                    let normaliser = log_normaliser(row).unwrap();
                    rank_row(
                        isa,
                        row,
                        normaliser,
                        beam_score,
                        &banned,
                        beam * vocab,
                        &mut best,
                    );
                }
                let got = best.into_sorted();
                assert_eq!(
                    got.iter().map(|b| b.0).collect::<Vec<_>>(),
                    want,
                    "{isa} k={k}"
                );
                for (index, value) in got {
                    assert_eq!(value.to_bits(), stored[index].to_bits(), "{isa} k={k}");
                }
            }
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
