//! How many prompt tokens may run beside a decode step (one prompt's chunk, or several
//! prompts' together), by measurement.
//!
//! A chunk that runs in a decode step's pass shares the step's weight reads, but its rows still
//! cost arithmetic: on the 2-vCPU EPYC an f32 prompt token adds about 0.9 ms to a 13–17 ms step
//! of GPT-2 small, so a 64-token chunk quadrupled the running streams' inter-token gap. What a
//! token costs depends on the CPU, the weight format, the model and how far into the prompt the
//! chunk is (its attention grows), so the sizer measures it: it keeps moving averages of a plain
//! step's time and of the time a chunk token adds to a step, and sizes the next chunk so that it
//! adds at most a given share of a step ([`DEFAULT_STALL_SHARE`] unless configured). Chunks start
//! small and grow to at most twice the largest run so far, so that a wrong early estimate costs
//! one short stall, never a long one; until both averages exist (a burst of prompts can keep
//! every step busy with a chunk before any plain step was timed), that growth alone sets them.

use std::collections::BTreeMap;
use std::time::Duration;

/// The share of a decode step's time one chunk may add to it by default: the running streams'
/// gap stays near 1.5× their normal pace while a long prompt is prefilled beside them.
pub(crate) const DEFAULT_STALL_SHARE: f64 = 0.5;

/// The first chunk beside a step before any chunk was measured.
const FIRST_CHUNK: usize = 4;

/// Weight of the newest measurement in the moving averages.
const SMOOTHING: f64 = 0.25;

/// Chunk sizes for prompts prefilled beside decode steps (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct ChunkSizer {
    /// The largest chunk allowed (`--prefill-chunk-tokens`).
    cap: usize,
    /// The share of a step's time a chunk may add.
    share: f64,
    /// Moving average of a decode step's seconds without a chunk, per row count: a step of 48
    /// rows takes several times one of 3, so a chunk's cost is only measured against a plain
    /// step of its own row count. (Against one average, the steps of a burst, whose rows grow
    /// while every step carries a chunk, put the rows' growth on the chunk tokens, and the chunks
    /// shrank to one token: 5-token prompts started one per 5 steps.)
    step_secs: BTreeMap<usize, f64>,
    /// Moving average of the seconds one chunk token adds to a step.
    token_secs: Option<f64>,
    /// The largest chunk run beside a step so far: the next may be at most twice as large. (The
    /// last one could be a prompt's short remainder, which says nothing about what fits.)
    largest_chunk: usize,
}

impl ChunkSizer {
    /// A sizer whose chunks never exceed `cap` tokens (at least 1) and aim to add at most `share`
    /// of a step's time (a share that is not a positive number counts as the default; the
    /// engine passes at least 1%).
    pub(crate) fn new(cap: usize, share: f64) -> Self {
        Self {
            cap: cap.max(1),
            share: if share > 0.0 {
                share
            } else {
                DEFAULT_STALL_SHARE
            },
            step_secs: BTreeMap::new(),
            token_secs: None,
            largest_chunk: 0,
        }
    }

    /// Tokens for the next chunks beside a decode step of `rows` rows: at least 1, at most the
    /// cap.
    pub(crate) fn next_chunk(&self, rows: usize) -> usize {
        let measured = match (self.plain_step(rows), self.token_secs) {
            (Some(step), Some(token)) if token > 0.0 => {
                // The float-to-int cast saturates; the small addend keeps an exact quotient
                // from rounding down.
                (self.share * step / token + 1e-6) as usize
            }
            // Tokens that seem free, or nothing measured yet: the growth bound decides.
            _ => usize::MAX,
        };
        let growth = match self.largest_chunk {
            0 => FIRST_CHUNK,
            largest => largest.saturating_mul(2),
        };
        measured.min(growth).clamp(1, self.cap)
    }

    /// A plain step's seconds at `rows` rows: measured there, else at the nearest fewer rows
    /// (a step with more rows is no faster, so the chunks err small), else at the nearest more.
    fn plain_step(&self, rows: usize) -> Option<f64> {
        self.step_secs
            .range(..=rows)
            .next_back()
            .or_else(|| self.step_secs.range(rows..).next())
            .map(|(_, &secs)| secs)
    }

    /// Records a decode step of `rows` rows that took `elapsed` with chunks of `chunk_tokens`
    /// beside it (0: none).
    pub(crate) fn record_step(&mut self, rows: usize, chunk_tokens: usize, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if chunk_tokens == 0 {
            let mean = self.step_secs.get(&rows).copied();
            self.step_secs.insert(rows, average(mean, secs));
            return;
        }
        self.largest_chunk = self.largest_chunk.max(chunk_tokens);
        // Without a plain step of the same rows to compare with, what the chunk added is unknown.
        if let Some(&step) = self.step_secs.get(&rows) {
            let extra = (secs - step).max(0.0);
            self.token_secs = Some(average(self.token_secs, extra / chunk_tokens as f64));
        }
    }
}

fn average(mean: Option<f64>, value: f64) -> f64 {
    match mean {
        Some(mean) => mean + SMOOTHING * (value - mean),
        None => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows of every step, where a test does not vary them.
    const ROWS: usize = 3;

    fn ms(ms: f64) -> Duration {
        Duration::from_secs_f64(ms / 1e3)
    }

    #[test]
    fn starts_small_and_grows_at_most_twofold() {
        let mut sizer = ChunkSizer::new(64, DEFAULT_STALL_SHARE);
        assert_eq!(sizer.next_chunk(ROWS), FIRST_CHUNK);
        sizer.record_step(ROWS, 0, ms(10.0));
        assert_eq!(sizer.next_chunk(ROWS), FIRST_CHUNK);
        // Tokens that cost nothing: the chunk doubles each time, up to the cap.
        let mut sizes = Vec::new();
        for _ in 0..6 {
            let chunk = sizer.next_chunk(ROWS);
            sizes.push(chunk);
            sizer.record_step(ROWS, chunk, ms(10.0));
        }
        assert_eq!(sizes, [4, 8, 16, 32, 64, 64]);
    }

    #[test]
    fn settles_where_a_chunk_adds_the_stall_share_of_a_step() {
        let mut sizer = ChunkSizer::new(1024, DEFAULT_STALL_SHARE);
        for _ in 0..5 {
            sizer.record_step(ROWS, 0, ms(12.0));
        }
        // Each token adds 0.5 ms: a 12 ms step allows 12 tokens (6 ms).
        for _ in 0..40 {
            let chunk = sizer.next_chunk(ROWS);
            sizer.record_step(ROWS, chunk, ms(12.0 + 0.5 * chunk as f64));
        }
        assert_eq!(sizer.next_chunk(ROWS), 12);
        // Tokens become dearer (the chunk's attention grows): the chunks shrink.
        for _ in 0..40 {
            let chunk = sizer.next_chunk(ROWS);
            sizer.record_step(ROWS, chunk, ms(12.0 + 2.0 * chunk as f64));
        }
        assert_eq!(sizer.next_chunk(ROWS), 3);
    }

    #[test]
    fn never_below_one_token_nor_above_the_cap() {
        let mut sizer = ChunkSizer::new(8, DEFAULT_STALL_SHARE);
        sizer.record_step(ROWS, 0, ms(1.0));
        sizer.record_step(ROWS, 4, ms(500.0));
        assert_eq!(sizer.next_chunk(ROWS), 1);
        let mut sizer = ChunkSizer::new(0, f64::NAN);
        assert_eq!(sizer.next_chunk(ROWS), 1);
        sizer.record_step(ROWS, 1, ms(0.0));
        assert_eq!(sizer.next_chunk(ROWS), 1);
    }

    #[test]
    fn a_larger_share_allows_larger_chunks() {
        let mut sizer = ChunkSizer::new(1024, 2.0);
        sizer.record_step(ROWS, 0, ms(12.0));
        for _ in 0..40 {
            let chunk = sizer.next_chunk(ROWS);
            sizer.record_step(ROWS, chunk, ms(12.0 + 0.5 * chunk as f64));
        }
        // 2 × 12 ms of room at 0.5 ms a token.
        assert_eq!(sizer.next_chunk(ROWS), 48);
    }

    #[test]
    fn a_short_remainder_does_not_shrink_the_next_chunks() {
        let mut sizer = ChunkSizer::new(64, DEFAULT_STALL_SHARE);
        sizer.record_step(ROWS, 0, ms(40.0));
        for chunk in [4, 8, 16] {
            sizer.record_step(ROWS, chunk, ms(40.0 + 0.1 * chunk as f64));
        }
        // A prompt's last token alone, then a new prompt.
        sizer.record_step(ROWS, 1, ms(40.1));
        assert_eq!(sizer.next_chunk(ROWS), 32);
    }

    #[test]
    fn before_any_plain_step_the_chunks_double_instead_of_sticking_at_the_first_size() {
        // A burst of prompts: every step carries a chunk, so no plain step was ever timed.
        let mut sizer = ChunkSizer::new(64, DEFAULT_STALL_SHARE);
        let mut sizes = Vec::new();
        for _ in 0..5 {
            let chunk = sizer.next_chunk(ROWS);
            sizes.push(chunk);
            sizer.record_step(ROWS, chunk, ms(30.0));
        }
        assert_eq!(sizes, [4, 8, 16, 32, 64]);
        // Once a plain step is timed, what a token adds is measured from then on.
        sizer.record_step(ROWS, 0, ms(10.0));
        sizer.record_step(ROWS, 64, ms(10.0 + 0.5 * 64.0));
        assert_eq!(sizer.next_chunk(ROWS), 10);
    }

    #[test]
    fn steps_that_grow_with_a_burst_do_not_shrink_the_chunks() {
        let mut sizer = ChunkSizer::new(64, DEFAULT_STALL_SHARE);
        // One request decoding alone: 3 rows, 15 ms; its prompt's chunks cost 0.5 ms a token.
        for _ in 0..3 {
            sizer.record_step(3, 0, ms(15.0));
        }
        sizer.record_step(3, 4, ms(17.0));
        // A burst: every step carries prompts, and each adds 3 rows (1 ms) to the batch.
        let mut sizes = Vec::new();
        for rows in (6..=48).step_by(3) {
            let chunk = sizer.next_chunk(rows);
            sizes.push(chunk);
            sizer.record_step(
                rows,
                chunk,
                ms(15.0 + rows as f64 / 3.0 + 0.5 * chunk as f64),
            );
        }
        // 0.5 ms a token against at least a 15 ms step: up to 15 tokens a step, never fewer.
        assert!(sizes.iter().all(|&s| s >= 8), "{sizes:?}");
        // Plain steps at 48 rows (31 ms): the budget follows that step's time.
        for _ in 0..3 {
            sizer.record_step(48, 0, ms(31.0));
        }
        sizer.record_step(48, 16, ms(39.0));
        assert_eq!(sizer.next_chunk(48), 31);
        assert_eq!(sizer.next_chunk(3), 15);
    }
}
