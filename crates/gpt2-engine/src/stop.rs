//! Stop strings over a stream of text deltas: a stop string may span tokens and may end inside
//! one, and streamed text never shows part of a stop string. Text that could be the start of one
//! is held back until the next deltas prove or disprove it.

/// Matches a sequence's stop strings against its generated text, delta by delta.
#[derive(Debug, Clone)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    /// The generated text so far (cut at the stop string once one is found).
    text: String,
    /// Bytes of `text` already handed out.
    released: usize,
    stopped: bool,
}

/// What one [`StopMatcher::push`] lets out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Released {
    /// Text that is safe to show: it can no longer be part of a stop string.
    pub(crate) text: String,
    /// Whether a stop string was found (the text ends right before it).
    pub(crate) stopped: bool,
}

impl StopMatcher {
    pub(crate) fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            text: String::new(),
            released: 0,
            stopped: false,
        }
    }

    /// Adds the next delta of generated text.
    pub(crate) fn push(&mut self, delta: &str) -> Released {
        if self.stopped {
            return Released {
                text: String::new(),
                stopped: true,
            };
        }
        self.text.push_str(delta);
        // A stop string cannot start in released text: that text was released only once no
        // stop string could start there.
        let found = self
            .stops
            .iter()
            .filter_map(|stop| {
                self.text[self.released..]
                    .find(stop.as_str())
                    .map(|at| self.released + at)
            })
            .min();
        if let Some(at) = found {
            self.text.truncate(at);
            self.stopped = true;
            return Released {
                text: self.release_to(at),
                stopped: true,
            };
        }
        let held = self.longest_stop_prefix_suffix();
        let until = (self.text.len() - held).max(self.released);
        Released {
            text: self.release_to(until),
            stopped: false,
        }
    }

    /// Everything not yet released (the sequence ended without a stop string).
    pub(crate) fn finish(&mut self) -> String {
        self.release_to(self.text.len())
    }

    /// The generated text so far, cut before the stop string when one was found.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    fn release_to(&mut self, until: usize) -> String {
        let out = self.text[self.released..until].to_string();
        self.released = until;
        out
    }

    /// Length of the longest end of `text` (after the released part) that is a proper prefix of
    /// a stop string.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let pending = &self.text[self.released..];
        self.stops
            .iter()
            .filter_map(|stop| {
                (1..stop.len().min(pending.len() + 1))
                    .rev()
                    .filter(|&k| stop.is_char_boundary(k))
                    .find(|&k| pending.ends_with(&stop[..k]))
            })
            .max()
            .unwrap_or(0)
    }
}

/// The first stop string in `text`: the text before it, or `None` when it holds none.
pub(crate) fn cut_at_stop<'t>(text: &'t str, stops: &[String]) -> Option<&'t str> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|stop| text.find(stop.as_str()))
        .min()
        .map(|at| &text[..at])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut matcher = StopMatcher::new(&stops);
        let mut out = Vec::new();
        let mut stopped = false;
        for delta in deltas {
            let released = matcher.push(delta);
            out.push(released.text);
            if released.stopped {
                stopped = true;
                break;
            }
        }
        if !stopped {
            out.push(matcher.finish());
        }
        (out, stopped, matcher.text().to_string())
    }

    #[test]
    fn a_stop_string_across_tokens_is_never_shown() {
        let (out, stopped, text) = run(&["END"], &["Hello E", "N", "D and more"]);
        assert_eq!(out, ["Hello ", "", ""]);
        assert!(stopped);
        assert_eq!(text, "Hello ");
    }

    #[test]
    fn a_stop_string_ending_inside_a_token_cuts_that_token() {
        let (out, stopped, text) = run(&["\n\n"], &["one", ".\n", "\nTwo"]);
        assert_eq!(out, ["one", ".", ""]);
        assert!(stopped);
        assert_eq!(text, "one.");
    }

    #[test]
    fn held_text_that_turns_out_harmless_is_released() {
        let (out, stopped, text) = run(&["END"], &["The EN", "ding", " is near"]);
        assert_eq!(out, ["The ", "ENding", " is near", ""]);
        assert!(!stopped);
        assert_eq!(text, "The ENding is near");
        // Held at the very end: released by finish.
        let (out, _, _) = run(&["END"], &["so E"]);
        assert_eq!(out, ["so ", "E"]);
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let (out, _, text) = run(&["bc", "abc"], &["xab", "c"]);
        assert_eq!(out, ["x", ""]);
        assert_eq!(text, "x");
        assert_eq!(
            cut_at_stop("one two three", &["three".into(), "two".into()]),
            Some("one ")
        );
        assert_eq!(cut_at_stop("none", &["x".into()]), None);
    }

    #[test]
    fn multibyte_stop_strings_hold_whole_characters() {
        let (out, stopped, _) = run(&["日本"], &["今日", "本"]);
        assert_eq!(out, ["今", ""]);
        assert!(stopped);
        let (out, stopped, _) = run(&["日本"], &["日", "x"]);
        assert_eq!(out, ["", "日x", ""]);
        assert!(!stopped);
    }

    #[test]
    fn deltas_always_add_up_to_the_text() {
        let stops: Vec<String> = vec!["ab".into(), "ba".into(), "aab".into()];
        let alphabet = ["a", "b", "c", "ab", "ca"];
        for seed in 0..500u32 {
            let mut matcher = StopMatcher::new(&stops);
            let mut shown = String::new();
            let mut state = seed;
            for _ in 0..6 {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let delta = alphabet[(state >> 16) as usize % alphabet.len()];
                let released = matcher.push(delta);
                shown.push_str(&released.text);
                if released.stopped {
                    break;
                }
            }
            shown.push_str(&matcher.finish());
            assert_eq!(shown, matcher.text());
            assert!(stops.iter().all(|s| !shown.contains(s.as_str())), "{shown}");
        }
    }
}
