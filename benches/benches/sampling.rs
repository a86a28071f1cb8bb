//! One sampling step over GPT-2's 50,257 logits: the warpers of each sampling mode, the draw,
//! and greedy's argmax.

use criterion::{criterion_group, criterion_main, Criterion};
use gpt2_benches::fake_logits;
use gpt2_generation::{argmax, sequence_rng, Candidates, SamplingParams};

fn sampling(c: &mut Criterion) {
    let logits = fake_logits(1, 50257);
    let mut group = c.benchmark_group("sampling_step");
    for (name, params) in [
        (
            "sample-top-p",
            SamplingParams {
                temperature: 1.0,
                top_k: 50,
                top_p: 0.92,
            },
        ),
        (
            "sample",
            SamplingParams {
                temperature: 0.7,
                top_k: 50,
                top_p: 0.92,
            },
        ),
        (
            "top-p-only",
            SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.92,
            },
        ),
    ] {
        let mut rng = sequence_rng(1, 0);
        group.bench_function(name, |b| {
            b.iter(|| Candidates::from_logits(&logits, &params).draw(&mut rng))
        });
    }
    group.bench_function("greedy-argmax", |b| b.iter(|| argmax(&logits)));
    group.finish();
}

criterion_group!(benches, sampling);
criterion_main!(benches);
