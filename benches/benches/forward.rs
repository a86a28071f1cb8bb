//! The forward pass: prefill of the contract's prompt, and one decode step at batch sizes 1, 3
//! and 16 (the decode shapes the engine runs).

use candle_core::Tensor;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use gpt2_benches::bench_model;
use gpt2_model::LogitsFor;

fn forward(c: &mut Criterion) {
    let model = bench_model();
    let device = model.device().clone();
    let prompt: Vec<u32> = vec![1212, 318, 281, 5128, 2420]; // "This is an input text"
    let prompt_tensor = Tensor::new(prompt.as_slice(), &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();

    let mut group = c.benchmark_group("forward");
    group.sample_size(10);
    group.bench_function("prefill_5_tokens", |b| {
        b.iter(|| {
            let mut cache = model.new_cache_with_capacity(100);
            model
                .forward(&prompt_tensor, &mut cache, LogitsFor::Last)
                .unwrap()
        })
    });
    for rows in [1usize, 3, 16] {
        let mut prefilled = model.new_cache_with_capacity(100);
        model
            .forward(&prompt_tensor, &mut prefilled, LogitsFor::Last)
            .unwrap();
        prefilled.reorder(&vec![0; rows]).unwrap();
        let tokens = vec![198u32; rows];
        group.bench_with_input(BenchmarkId::new("decode_step", rows), &rows, |b, _| {
            b.iter_batched(
                || prefilled.clone(),
                |mut cache| model.forward_step(&tokens, &mut [&mut cache]).unwrap(),
                criterion::BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
