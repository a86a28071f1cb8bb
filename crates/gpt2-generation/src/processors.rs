//! Logits processors that run before the strategy chooses: the controls users add on top of the
//! contract (repetition penalty, OpenAI's presence and frequency penalties, logit bias, a minimum
//! number of new tokens). Off by default, and a no-op when off, so that a request without them
//! gets exactly the scores it got before they existed.
//!
//! Order (each processor sees the previous one's output): logit bias → repetition penalty →
//! presence and frequency penalties → (no-repeat-n-gram, beam search only) → minimum new tokens.
//! HF applies repetition penalty before no-repeat-n-gram and the minimum length after both;
//! OpenAI's logit bias and penalties have no HF counterpart, and vLLM applies them to the raw
//! logits as here. Greedy and sampling process the raw logits, beam search their log-softmax
//! (as HF's `_beam_search` does).

/// The processors' settings; [`LogitsProcessing::default`] turns every one off.
#[derive(Debug, Clone, PartialEq)]
pub struct LogitsProcessing {
    /// HF's `repetition_penalty`: every token already in the sequence (prompt included) has its
    /// score divided by this when positive, multiplied by it when negative. 1.0 is off; must be
    /// positive.
    pub repetition_penalty: f32,
    /// OpenAI's `presence_penalty`: subtracted once from the score of every token generated so
    /// far (the prompt does not count). 0 is off.
    pub presence_penalty: f32,
    /// OpenAI's `frequency_penalty`: subtracted from a token's score once per time it was
    /// generated so far. 0 is off.
    pub frequency_penalty: f32,
    /// OpenAI's `logit_bias`: `(token, bias)` pairs added to the scores; −100 in practice bans a
    /// token, +100 forces it.
    pub logit_bias: Vec<(u32, f32)>,
    /// The end-of-sequence token cannot be chosen before this many tokens were generated
    /// (HF's `min_new_tokens`). 0 is off.
    pub min_new_tokens: usize,
}

impl Default for LogitsProcessing {
    /// Every processor off.
    fn default() -> Self {
        Self {
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            min_new_tokens: 0,
        }
    }
}

impl LogitsProcessing {
    /// Whether every processor is off (the scores pass through untouched).
    pub fn is_off(&self) -> bool {
        *self == Self::default()
    }

    /// Whether the repetition penalty needs the prompt's tokens.
    pub(crate) fn needs_prompt(&self) -> bool {
        self.repetition_penalty != 1.0
    }

    /// Checks the ranges the processors rely on.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err("repetition_penalty must be a positive number".into());
        }
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            return Err("presence_penalty and frequency_penalty must be finite".into());
        }
        if self.logit_bias.iter().any(|(_, bias)| !bias.is_finite()) {
            return Err("logit_bias values must be finite".into());
        }
        Ok(())
    }

    /// Processes one row of `scores` for a sequence made of `prompt` then `generated`, before the
    /// no-repeat-n-gram ban (beam search bans n-grams between the two halves, as HF does).
    ///
    /// `prompt` may be empty when [`LogitsProcessing::needs_prompt`] is false.
    pub(crate) fn apply_before_ngram(&self, scores: &mut [f32], prompt: &[u32], generated: &[u32]) {
        for &(token, bias) in &self.logit_bias {
            if let Some(score) = scores.get_mut(token as usize) {
                *score += bias;
            }
        }
        if self.repetition_penalty != 1.0 {
            let penalty = self.repetition_penalty;
            let mut seen = vec![false; scores.len()];
            for &token in prompt.iter().chain(generated) {
                let Some(flag) = seen.get_mut(token as usize) else {
                    continue;
                };
                if std::mem::replace(flag, true) {
                    continue;
                }
                let score = &mut scores[token as usize];
                *score = if *score < 0.0 {
                    *score * penalty
                } else {
                    *score / penalty
                };
            }
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            let mut counts: Vec<(u32, u32)> = Vec::with_capacity(generated.len());
            let mut sorted = generated.to_vec();
            sorted.sort_unstable();
            for token in sorted {
                match counts.last_mut() {
                    Some((last, count)) if *last == token => *count += 1,
                    _ => counts.push((token, 1)),
                }
            }
            for (token, count) in counts {
                if let Some(score) = scores.get_mut(token as usize) {
                    *score -= self.presence_penalty + self.frequency_penalty * count as f32;
                }
            }
        }
    }

    /// Processes one row after the no-repeat-n-gram ban: bans `eos_token_id` while fewer than
    /// `min_new_tokens` tokens were generated.
    pub(crate) fn apply_after_ngram(
        &self,
        scores: &mut [f32],
        generated_len: usize,
        eos_token_id: Option<u32>,
    ) {
        if generated_len < self.min_new_tokens {
            if let Some(score) = eos_token_id.and_then(|eos| scores.get_mut(eos as usize)) {
                *score = f32::NEG_INFINITY;
            }
        }
    }

    /// Both halves, for greedy and sampling (which have no n-gram ban).
    pub(crate) fn apply(
        &self,
        scores: &mut [f32],
        prompt: &[u32],
        generated: &[u32],
        eos_token_id: Option<u32>,
    ) {
        self.apply_before_ngram(scores, prompt, generated);
        self.apply_after_ngram(scores, generated.len(), eos_token_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_leaves_the_scores_untouched() {
        let mut scores = vec![1.0, -2.0, 0.5];
        LogitsProcessing::default().apply(&mut scores, &[0, 1], &[1, 2], Some(2));
        assert_eq!(scores, [1.0, -2.0, 0.5]);
        assert!(LogitsProcessing::default().is_off());
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_scores_once_per_token() {
        let processing = LogitsProcessing {
            repetition_penalty: 2.0,
            ..LogitsProcessing::default()
        };
        let mut scores = vec![4.0, -2.0, 1.0, 3.0];
        // Token 0 appears three times and is penalised once, as HF's gather/scatter does.
        processing.apply(&mut scores, &[0, 1, 0], &[0], None);
        assert_eq!(scores, [2.0, -4.0, 1.0, 3.0]);
    }

    #[test]
    fn presence_and_frequency_count_generated_tokens_only() {
        let processing = LogitsProcessing {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..LogitsProcessing::default()
        };
        let mut scores = vec![0.0; 4];
        processing.apply(&mut scores, &[3, 3], &[1, 2, 1], None);
        assert_eq!(scores, [0.0, -1.0, -0.75, 0.0]);
    }

    #[test]
    fn logit_bias_adds_and_min_new_tokens_bans_eos_until_reached() {
        let processing = LogitsProcessing {
            logit_bias: vec![(1, 100.0), (9, 5.0)],
            min_new_tokens: 2,
            ..LogitsProcessing::default()
        };
        let mut scores = vec![0.0; 3];
        processing.apply(&mut scores, &[], &[1], Some(2));
        assert_eq!(scores, [0.0, 100.0, f32::NEG_INFINITY]);
        let mut scores = vec![0.0; 3];
        processing.apply(&mut scores, &[], &[1, 1], Some(2));
        assert_eq!(scores, [0.0, 100.0, 0.0]);
    }

    #[test]
    fn validation_refuses_what_the_processors_cannot_compute_with() {
        let bad = |processing: LogitsProcessing| processing.validate().is_err();
        assert!(bad(LogitsProcessing {
            repetition_penalty: 0.0,
            ..LogitsProcessing::default()
        }));
        assert!(bad(LogitsProcessing {
            frequency_penalty: f32::NAN,
            ..LogitsProcessing::default()
        }));
        assert!(bad(LogitsProcessing {
            logit_bias: vec![(0, f32::INFINITY)],
            ..LogitsProcessing::default()
        }));
        assert!(LogitsProcessing::default().validate().is_ok());
    }
}
