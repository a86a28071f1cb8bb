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
        let warp = |l: f32| {
            if params.temperature != 1.0 {
                l / params.temperature
            } else {
                l
            }
        };
        let finite = |l: &f32| *l != f32::NEG_INFINITY && !l.is_nan();
        let threshold = if params.top_k > 0 {
            kth_largest(
                logits.iter().copied().filter(finite).map(warp),
                params.top_k,
            )
        } else {
            None
        };
        let mut tokens: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| finite(l))
            .map(|(id, &l)| (id as u32, warp(l)))
            .filter(|&(_, w)| threshold.is_none_or(|t| w >= t))
            .collect();
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

/// The k-th highest of `values` (duplicates counted), `None` when there are at most `k` values:
/// the threshold of HF's `TopKLogitsWarper`, which removes every logit below it (so ties at the
/// k-th value all stay). One pass keeping the k highest seen so far; nothing is sorted.
fn kth_largest(values: impl Iterator<Item = f32>, k: usize) -> Option<f32> {
    let mut best: Vec<f32> = Vec::with_capacity(k);
    let mut lowest = (0, f32::INFINITY);
    let mut more_than_k = false;
    for v in values {
        if best.len() < k {
            best.push(v);
            if best.len() == k {
                lowest = lowest_of(&best);
            }
        } else {
            more_than_k = true;
            if v > lowest.1 {
                best[lowest.0] = v;
                lowest = lowest_of(&best);
            }
        }
    }
    more_than_k.then_some(lowest.1)
}

fn lowest_of(values: &[f32]) -> (usize, f32) {
    values
        .iter()
        .copied()
        .enumerate()
        .fold(
            (0, f32::INFINITY),
            |low, (i, v)| if v < low.1 { (i, v) } else { low },
        )
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

/// The index of the highest logit, the first one on ties (torch's `argmax`).
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (id, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((id, l));
        }
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

    fn ids(c: &Candidates) -> Vec<u32> {
        let mut ids: Vec<u32> = c.tokens.iter().map(|t| t.0).collect();
        ids.sort_unstable();
        ids
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
    }
}
