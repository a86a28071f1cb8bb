use std::cmp::Reverse;
use std::collections::BinaryHeap;

use gpt2_simd::Isa;
use rand::Rng;

use crate::SamplingParams;

/// The tokens that survive the warpers, with their warped logits (higher first).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    /// `(token id, warped logit)`, sorted by logit, highest first.
    pub tokens: Vec<(u32, f32)>,
}

impl Candidates {
    /// Applies HF's warpers in HF's order: temperature, then top-k, then top-p.
    ///
    /// Only the survivors of top-k are sorted, so the full vocabulary is never sorted when top-k
    /// is on; with top-k off, top-p sorts the finite logits.
    pub fn from_logits(logits: &[f32], params: &SamplingParams) -> Self {
        let mut tokens = survivors(Isa::active(), logits, params.temperature, params.top_k);
        // A temperature so small that logit / temperature overflows f32 leaves infinities, and
        // softmax would compute ∞ − ∞ = NaN. Such a temperature is the limit towards 0, which is
        // greedy: the tokens with the highest logit share the probability.
        if tokens.iter().any(|&(_, w)| !w.is_finite()) {
            let highest = tokens
                .iter()
                .map(|&(id, _)| logits[id as usize])
                .fold(f32::NEG_INFINITY, f32::max);
            tokens.retain(|&(id, _)| logits[id as usize] == highest);
            tokens.iter_mut().for_each(|token| token.1 = 0.0);
        }
        sort_descending(&mut tokens);
        if params.top_p < 1.0 {
            keep_top_p(&mut tokens, params.top_p);
        }
        Self { tokens }
    }

    /// The probability of each surviving token (softmax of the warped logits), in `tokens` order.
    pub fn probabilities(&self) -> Vec<f64> {
        let Some(&(_, max)) = self.tokens.first() else {
            return Vec::new();
        };
        let weights: Vec<f64> = self
            .tokens
            .iter()
            .map(|&(_, l)| f64::from(l - max).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        weights.into_iter().map(|w| w / total).collect()
    }

    /// Draws one token with the surviving probabilities; `None` if nothing survived.
    pub fn draw(&self, rng: &mut impl Rng) -> Option<u32> {
        let &(first, max) = self.tokens.first()?;
        let weights: Vec<f64> = self
            .tokens
            .iter()
            .map(|&(_, l)| f64::from(l - max).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut target = rng.random::<f64>() * total;
        for (&(id, _), weight) in self.tokens.iter().zip(&weights) {
            if target < *weight {
                return Some(id);
            }
            target -= weight;
        }
        // Rounding left the target just past the last weight: take the last token with mass.
        Some(
            self.tokens
                .iter()
                .zip(&weights)
                .rev()
                .find(|(_, w)| **w > 0.0)
                .map_or(first, |(&(id, _), _)| id),
        )
    }
}

fn sort_descending(tokens: &mut [(u32, f32)]) {
    tokens.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
}

/// `(id, logit / temperature)` of the finite logits that survive top-k (all of them when
/// `top_k` is 0), in id order, with the body compiled for `isa` (every level gives the same
/// values).
fn survivors(isa: Isa, logits: &[f32], temperature: f32, top_k: usize) -> Vec<(u32, f32)> {
    match isa {
        // SAFETY: the CPU has the features this function is compiled for.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx if isa.is_supported() => unsafe {
            survivors_avx512(logits, temperature, top_k)
        },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.is_supported() => unsafe { survivors_avx2(logits, temperature, top_k) },
        _ => survivors_body(logits, temperature, top_k),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
fn survivors_avx512(logits: &[f32], temperature: f32, top_k: usize) -> Vec<(u32, f32)> {
    survivors_body(logits, temperature, top_k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn survivors_avx2(logits: &[f32], temperature: f32, top_k: usize) -> Vec<(u32, f32)> {
    survivors_body(logits, temperature, top_k)
}

/// Both passes over the vocabulary (the k-th highest warped logit, then the tokens at or above
/// it) look at 16 logits at a time: warping by a positive temperature never changes the order,
/// so the warped maximum of a block (one vector maximum, one division) says whether any of its
/// logits could count, and only such a block is looked at one logit at a time. With the heap of
/// [`KthLargest`], `Candidates::from_logits` (top-k 50 of 50,257) went from 100–150 µs to 40–65
/// µs (2-vCPU EPYC, interleaved runs).
#[inline(always)]
fn survivors_body(logits: &[f32], temperature: f32, top_k: usize) -> Vec<(u32, f32)> {
    const LANES: usize = 16;
    let warp = |l: f32| {
        if temperature != 1.0 {
            l / temperature
        } else {
            l
        }
    };
    let finite = |l: f32| l != f32::NEG_INFINITY && !l.is_nan();
    let chunks = logits.chunks_exact(LANES);
    let tail_start = logits.len() - chunks.remainder().len();
    let threshold = if top_k > 0 {
        let mut kth = KthLargest::new(top_k);
        for chunk in chunks.clone() {
            // Once k values were pushed and one more was seen, a value that does not exceed the
            // lowest kept changes nothing.
            if let Some(lowest) = kth.lowest().filter(|_| kth.more_than_k) {
                // Neither side is NaN: `block_max` skips NaN.
                if warp(block_max(chunk)) <= lowest {
                    continue;
                }
            }
            for &l in chunk {
                if finite(l) {
                    kth.push(warp(l));
                }
            }
        }
        for &l in &logits[tail_start..] {
            if finite(l) {
                kth.push(warp(l));
            }
        }
        kth.threshold()
    } else {
        None
    };
    let mut tokens = Vec::with_capacity(top_k.clamp(1, logits.len().max(1))); // top_k ≤ 2^32 - 1
    for (c, chunk) in chunks.enumerate() {
        if threshold.is_some_and(|t| warp(block_max(chunk)) < t) {
            continue;
        }
        for (lane, &l) in chunk.iter().enumerate() {
            let w = warp(l);
            if finite(l) && threshold.is_none_or(|t| w >= t) {
                tokens.push(((c * LANES + lane) as u32, w));
            }
        }
    }
    for (id, &l) in logits.iter().enumerate().skip(tail_start) {
        let w = warp(l);
        if finite(l) && threshold.is_none_or(|t| w >= t) {
            tokens.push((id as u32, w));
        }
    }
    tokens
}

/// The highest of a block of 16 `values`, NaN ignored (`−∞` when all are NaN), as a tree of
/// lane-wise maxima that compiles to a few vector instructions (a `fold` runs one value at a
/// time: `max` ignoring NaN is not reassociated by the compiler).
#[inline(always)]
pub(crate) fn block_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    for (lane, &v) in lanes.iter_mut().zip(values) {
        *lane = lane.max(v);
    }
    let mut width = 8;
    while width > 0 {
        for i in 0..width {
            lanes[i] = lanes[i].max(lanes[i + width]);
        }
        width /= 2;
    }
    lanes[0]
}

/// The highest of `values`, NaN ignored (`−∞` when all are NaN), in 16 lane-wise maxima.
#[inline(always)]
pub(crate) fn row_max(values: &[f32]) -> f32 {
    let chunks = values.chunks_exact(16);
    let tail = chunks.remainder();
    let mut lanes = [f32::NEG_INFINITY; 16];
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    tail.iter().fold(block_max(&lanes), |m, &v| m.max(v))
}

/// The k-th highest of the values pushed (duplicates counted): the threshold of HF's
/// `TopKLogitsWarper`, which removes every logit below it (so ties at the k-th value all stay).
/// It keeps the k highest seen so far in a min-heap; nothing is sorted. (Rescanning the k kept
/// values for the lowest after each replacement was half of a 50,257-logit top-50 warp.)
struct KthLargest {
    k: usize,
    /// The k highest so far, lowest on top (total order: −0.0 below 0.0, which `>` and `>=`
    /// treat alike, so no answer depends on which zero is kept).
    best: BinaryHeap<Reverse<Total>>,
    more_than_k: bool,
}

/// An f32 ordered by `total_cmp`.
#[derive(Clone, Copy, PartialEq)]
struct Total(f32);

impl Eq for Total {}

impl PartialOrd for Total {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Total {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl KthLargest {
    fn new(k: usize) -> Self {
        Self {
            k,
            // `top_k` may be up to 2^32 - 1: never reserve more than a vocabulary's worth.
            best: BinaryHeap::with_capacity(k.min(1 << 16)),
            more_than_k: false,
        }
    }

    /// Once `k` values were pushed, the value a later one must exceed to change anything.
    fn lowest(&self) -> Option<f32> {
        if self.best.len() == self.k {
            self.best.peek().map(|lowest| lowest.0 .0)
        } else {
            None
        }
    }

    fn push(&mut self, v: f32) {
        if self.best.len() < self.k {
            self.best.push(Reverse(Total(v)));
        } else {
            self.more_than_k = true;
            if let Some(mut lowest) = self.best.peek_mut() {
                if v > lowest.0 .0 {
                    *lowest = Reverse(Total(v));
                }
            }
        }
    }

    /// The k-th highest, `None` when at most `k` values were pushed.
    fn threshold(&self) -> Option<f32> {
        if self.more_than_k {
            self.lowest()
        } else {
            None
        }
    }
}

/// HF's `TopPLogitsWarper`: walking up from the least likely token, removes tokens while the
/// cumulative probability stays at or below 1 − top_p; the most likely token always stays.
/// `tokens` must be sorted highest first. Computed in f32 like torch's.
fn keep_top_p(tokens: &mut Vec<(u32, f32)>, top_p: f32) {
    let Some(&(_, max)) = tokens.first() else {
        return;
    };
    let exps: Vec<f32> = tokens.iter().map(|&(_, l)| (l - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    let threshold = (1.0 - f64::from(top_p)) as f32;
    let mut cumulative = 0.0f32;
    let mut removed = 0;
    // Ascending order is the reverse of `tokens`; never remove the last (most likely) one.
    for exp in exps.iter().rev().take(tokens.len() - 1) {
        cumulative += exp / total;
        if cumulative <= threshold {
            removed += 1;
        } else {
            break;
        }
    }
    tokens.truncate(tokens.len() - removed);
}

/// The index of the highest logit, the first one on ties (torch's `argmax`); NaN is skipped.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    argmax_with(Isa::active(), logits)
}

/// [`argmax`] with the body compiled for `isa` (every level gives the same answer).
fn argmax_with(isa: Isa, logits: &[f32]) -> Option<u32> {
    match isa {
        // SAFETY: the CPU has the features this function is compiled for.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Amx if isa.is_supported() => unsafe { argmax_avx512(logits) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.is_supported() => unsafe { argmax_avx2(logits) },
        _ => argmax_body(logits),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
fn argmax_avx512(logits: &[f32]) -> Option<u32> {
    argmax_body(logits)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn argmax_avx2(logits: &[f32]) -> Option<u32> {
    argmax_body(logits)
}

/// Blocks of 16 whose maximum does not beat the best so far are skipped after one vector
/// maximum; the others are walked one logit at a time. Walking every logit (a compare, a NaN
/// test and a branch each) took 60–90 µs of a 50,257-logit row, this 15–27 µs (2-vCPU EPYC).
#[inline(always)]
fn argmax_body(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    let consider = |best: &mut Option<(usize, f32)>, id: usize, l: f32| {
        if !l.is_nan() && best.is_none_or(|(_, b)| l > b) {
            *best = Some((id, l));
        }
    };
    let chunks = logits.chunks_exact(16);
    let tail_start = logits.len() - chunks.remainder().len();
    for (c, chunk) in chunks.enumerate() {
        if best.is_some_and(|(_, b)| block_max(chunk) <= b) {
            continue;
        }
        for (lane, &l) in chunk.iter().enumerate() {
            consider(&mut best, c * 16 + lane, l);
        }
    }
    for (id, &l) in logits.iter().enumerate().skip(tail_start) {
        consider(&mut best, id, l);
    }
    best.map(|(id, _)| id as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
        }
    }

    #[test]
    fn the_largest_top_k_a_request_may_give_keeps_every_token_without_reserving_for_it() {
        // A `top_k` of 2^32 - 1 passes validation: reserving room for that many survivors asked
        // the allocator for 34 GB and aborted the server (found by tools/load_fault.py).
        let logits: Vec<f32> = (0..1000).map(|i| (i % 37) as f32 * 0.1).collect();
        for isa in Isa::ALL {
            if !isa.is_supported() {
                continue;
            }
            let kept = survivors(isa, &logits, 0.7, u32::MAX as usize);
            assert_eq!(kept.len(), logits.len(), "{isa}");
            assert!(kept.capacity() <= logits.len(), "{isa}");
        }
        let candidates = Candidates::from_logits(&logits, &params(0.7, u32::MAX as usize, 1.0));
        assert_eq!(candidates.tokens.len(), logits.len());
    }

    fn ids(c: &Candidates) -> Vec<u32> {
        let mut ids: Vec<u32> = c.tokens.iter().map(|t| t.0).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn survivors_match_a_plain_filter_on_every_instruction_set() {
        let mut seed = 3u32;
        // Coarse values (ties at the k-th), −∞ and NaN, and a length that is not a multiple of 16.
        let logits: Vec<f32> = (0..50_257)
            .map(|i| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                match i % 4_999 {
                    5 => f32::NEG_INFINITY,
                    6 => f32::NAN,
                    _ => ((seed >> 8) % 200) as f32 / 8.0 - 12.0,
                }
            })
            .collect();
        for (temperature, top_k) in [(1.0, 50), (0.7, 50), (0.7, 1), (1.3, 0), (1e-38, 5)] {
            let warp = |l: f32| {
                if temperature != 1.0 {
                    l / temperature
                } else {
                    l
                }
            };
            let finite = |l: &f32| *l != f32::NEG_INFINITY && !l.is_nan();
            // The k-th highest by a full sort.
            let mut sorted: Vec<f32> = logits.iter().copied().filter(finite).map(warp).collect();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let threshold = (top_k > 0 && sorted.len() > top_k).then(|| sorted[top_k - 1]);
            let want: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .filter(|(_, l)| finite(l))
                .map(|(id, &l)| (id as u32, warp(l)))
                .filter(|&(_, w)| threshold.is_none_or(|t| w >= t))
                .collect();
            for isa in Isa::available() {
                let got = survivors(isa, &logits, temperature, top_k);
                assert!(
                    got == want,
                    "{isa}, t={temperature}, k={top_k}: survivors differ"
                );
            }
        }
    }

    #[test]
    fn top_k_keeps_ties_at_the_kth_value() {
        let logits = [1.0, 3.0, 2.0, 2.0, 0.5];
        assert_eq!(
            ids(&Candidates::from_logits(&logits, &params(1.0, 2, 1.0))),
            vec![1, 2, 3]
        );
        assert_eq!(
            ids(&Candidates::from_logits(&logits, &params(1.0, 1, 1.0))),
            vec![1]
        );
        assert_eq!(
            ids(&Candidates::from_logits(&logits, &params(1.0, 0, 1.0))).len(),
            5
        );
        assert_eq!(
            ids(&Candidates::from_logits(&logits, &params(1.0, 99, 1.0))).len(),
            5
        );
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p_and_at_least_one() {
        // probabilities 0.5, 0.3, 0.2 (as logits ln p)
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        assert_eq!(
            ids(&Candidates::from_logits(&logits, &params(1.0, 0, 0.5))),
            vec![0]
        );
        assert_eq!(
            ids(&Candidates::from_logits(&logits, &params(1.0, 0, 0.6))),
            vec![0, 1]
        );
        assert_eq!(
            ids(&Candidates::from_logits(&logits, &params(1.0, 0, 0.81))),
            vec![0, 1, 2]
        );
        assert_eq!(
            ids(&Candidates::from_logits(&logits, &params(1.0, 0, 1e-6))),
            vec![0]
        );
    }

    #[test]
    fn a_temperature_that_overflows_the_logits_samples_among_the_highest() {
        let logits = [1.0, 3.0, -2.0, 3.0, 0.5];
        for temperature in [1e-38, 1e-45, f32::MIN_POSITIVE] {
            let candidates = Candidates::from_logits(&logits, &params(temperature, 0, 0.92));
            assert_eq!(ids(&candidates), vec![1, 3], "t = {temperature:e}");
            let probabilities = candidates.probabilities();
            assert!(probabilities.iter().all(|p| p.is_finite() && *p > 0.0));
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
            assert!(matches!(candidates.draw(&mut rng), Some(1 | 3)));
        }
        // Only negative logits: their quotients overflow to −∞ but the highest still wins.
        let negative = [-1.0, -3.0];
        for temperature in [1e-38, 1e-45] {
            let candidates = Candidates::from_logits(&negative, &params(temperature, 0, 1.0));
            let probabilities = candidates.probabilities();
            assert_eq!(candidates.tokens[0].0, 0);
            assert_eq!(
                probabilities[0], 1.0,
                "t = {temperature:e}: {probabilities:?}"
            );
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
            assert_eq!(candidates.draw(&mut rng), Some(0));
        }
    }

    #[test]
    fn temperature_sharpens_before_top_p() {
        let logits = [1.0, 0.0, -1.0];
        let flat = Candidates::from_logits(&logits, &params(1.0, 0, 0.8));
        let sharp = Candidates::from_logits(&logits, &params(0.25, 0, 0.8));
        assert_eq!(ids(&flat), vec![0, 1]);
        assert_eq!(ids(&sharp), vec![0]);
        let probs = Candidates::from_logits(&logits, &params(0.5, 0, 1.0)).probabilities();
        let expected: Vec<f64> = {
            let e: Vec<f64> = [2.0f64, 0.0, -2.0].iter().map(|x| x.exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        };
        for (p, q) in probs.iter().zip(&expected) {
            assert!((p - q).abs() < 1e-6);
        }
    }

    #[test]
    fn draws_follow_the_probabilities_and_skip_removed_tokens() {
        let logits = [0.0, 1.0, f32::NEG_INFINITY, 2.0];
        let candidates = Candidates::from_logits(&logits, &SamplingParams::default());
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let mut counts = [0usize; 4];
        for _ in 0..20_000 {
            counts[candidates.draw(&mut rng).unwrap() as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        let expected_top = (2.0f64).exp() / (1.0 + 1f64.exp() + 2f64.exp());
        let observed_top = counts[3] as f64 / 20_000.0;
        assert!(
            (observed_top - expected_top).abs() < 0.02,
            "{observed_top} vs {expected_top}"
        );
    }

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), Some(1));
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), Some(0));
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), None);
        assert_eq!(argmax(&[f32::NAN, -1.0]), Some(1));
    }

    #[test]
    fn argmax_matches_a_plain_walk_on_every_instruction_set() {
        let walk = |logits: &[f32]| {
            let mut best: Option<(usize, f32)> = None;
            for (id, &l) in logits.iter().enumerate() {
                if !l.is_nan() && best.is_none_or(|(_, b)| l > b) {
                    best = Some((id, l));
                }
            }
            best.map(|(id, _)| id as u32)
        };
        let mut seed = 9u32;
        for len in [0, 1, 15, 16, 17, 100, 50_257] {
            for coarse in [2u32, 50, 1 << 20] {
                let logits: Vec<f32> = (0..len)
                    .map(|i| {
                        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        match i % 37 {
                            3 => f32::NAN,
                            5 => f32::NEG_INFINITY,
                            _ => ((seed >> 8) % coarse) as f32 - (coarse / 2) as f32,
                        }
                    })
                    .collect();
                for isa in Isa::available() {
                    assert_eq!(argmax_with(isa, &logits), walk(&logits), "{isa} {len}");
                }
                let all_nan = vec![f32::NAN; len];
                assert_eq!(argmax(&all_nan), None);
            }
        }
    }

    #[test]
    fn row_and_block_maxima_ignore_nan() {
        let mut values: Vec<f32> = (0..50).map(|i| (i * 37 % 23) as f32).collect();
        values[7] = f32::NAN;
        values[49] = 30.0;
        assert_eq!(row_max(&values), 30.0);
        assert_eq!(block_max(&values[..16]), 21.0);
        assert_eq!(row_max(&[f32::NAN; 20]), f32::NEG_INFINITY);
        assert_eq!(block_max(&[f32::NAN; 16]), f32::NEG_INFINITY);
    }
}
