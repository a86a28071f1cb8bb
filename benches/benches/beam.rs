//! One beam-search step over 5 beams × 50,257 logits (log-softmax, no-repeat-2-gram bans, top-2k
//! selection, hypothesis bookkeeping).

use criterion::{criterion_group, criterion_main, Criterion};
use gpt2_benches::fake_logits;
use gpt2_generation::{BeamParams, BeamSearch};

fn beam(c: &mut Criterion) {
    let vocab = 50257;
    let logits = fake_logits(5, vocab);
    let prompt: Vec<u32> = vec![1212, 318, 281, 5128, 2420];
    let params = BeamParams {
        num_beams: 5,
        no_repeat_ngram_size: 2,
    };
    let mut started = BeamSearch::new(&prompt, params, 1000, Some(50256));
    started.advance(&logits[..vocab], vocab);
    c.bench_function("beam_step_5x50257", |b| {
        b.iter_batched(
            || started.clone(),
            |mut search| search.advance(&logits, vocab),
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, beam);
criterion_main!(benches);
