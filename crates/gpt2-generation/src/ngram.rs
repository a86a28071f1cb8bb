/// Tokens that would complete an n-gram of size `n` already present in `sequence`, as HF's
/// `NoRepeatNGramLogitsProcessor` computes them (the whole sequence counts, prompt included).
pub fn banned_ngram_tokens(sequence: &[u32], n: usize) -> Vec<u32> {
    if n == 0 || sequence.len() + 1 < n {
        return Vec::new();
    }
    let prefix = &sequence[sequence.len() + 1 - n..];
    let mut banned: Vec<u32> = sequence
        .windows(n)
        .filter(|window| &window[..n - 1] == prefix)
        .map(|window| window[n - 1])
        .collect();
    banned.sort_unstable();
    banned.dedup();
    banned
}

/// Sets the score of every banned token to −∞.
pub fn ban_repeated_ngrams(scores: &mut [f32], sequence: &[u32], n: usize) {
    for token in banned_ngram_tokens(sequence, n) {
        if let Some(score) = scores.get_mut(token as usize) {
            *score = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_the_tokens_that_followed_the_current_prefix() {
        // bigrams: (1,2) (2,3) (3,1) (1,4) (4,1); the last token is 1 → 2 and 4 are banned.
        assert_eq!(banned_ngram_tokens(&[1, 2, 3, 1, 4, 1], 2), vec![2, 4]);
        // trigrams ending in prefix (4,1): none yet.
        assert_eq!(
            banned_ngram_tokens(&[1, 2, 3, 1, 4, 1], 3),
            Vec::<u32>::new()
        );
        assert_eq!(banned_ngram_tokens(&[7, 8, 9, 7, 8], 3), vec![9]);
        // unigrams: every token seen.
        assert_eq!(banned_ngram_tokens(&[5, 3, 5], 1), vec![3, 5]);
        // too short to hold an n-gram, or disabled.
        assert!(banned_ngram_tokens(&[1], 3).is_empty());
        assert!(banned_ngram_tokens(&[1, 1, 1], 0).is_empty());
    }

    #[test]
    fn banned_scores_become_negative_infinity() {
        let mut scores = vec![0.5; 6];
        ban_repeated_ngrams(&mut scores, &[1, 2, 3, 1], 2);
        assert_eq!(scores[2], f32::NEG_INFINITY);
        assert!(scores.iter().filter(|s| s.is_finite()).count() == 5);
    }
}
