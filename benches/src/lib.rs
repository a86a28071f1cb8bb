//! Shared setup of the criterion benchmarks (`cargo bench -p gpt2-benches`); the side-by-side
//! comparison with HF transformers is `benches/compare/run.py`.

use gpt2_model::{Gpt2Config, Gpt2Model};

/// The model benchmarks run: `GPT2_BENCH_MODEL` (a model directory) when set, else a
/// random-weight model of GPT-2 124M's shape (same FLOPs and bytes as the real one).
pub fn bench_model() -> Gpt2Model {
    match std::env::var_os("GPT2_BENCH_MODEL") {
        Some(dir) => {
            Gpt2Model::load(&dir, &candle_core::Device::Cpu).expect("GPT2_BENCH_MODEL loads")
        }
        None => {
            Gpt2Model::random(Gpt2Config::default(), 124).expect("the GPT-2 124M config is valid")
        }
    }
}

/// Deterministic logits with a realistic spread, `rows × vocab`.
pub fn fake_logits(rows: usize, vocab: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_u64;
    (0..rows * vocab)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 12.0
        })
        .collect()
}

/// README.md's Rust snippets, compiled and run as doctests (`cargo test -p gpt2-benches --doc`).
/// They live here because this crate is never published: a published crate cannot include a
/// file outside itself.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
