//! f16 KV caches: decode-step logits drift little from f32 caches (batch independence is tested
//! with the other storage options in weight_format.rs).

use std::path::Path;

use candle_core::{Device, Tensor};
use gpt2_model::{Gpt2Model, KvFormat, LogitsFor};

mod support;

use support::prefilled;

fn load(name: &str) -> Gpt2Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name);
    Gpt2Model::load(dir, &Device::Cpu).unwrap()
}

/// Logits of the prompt's last position, then of each decode step that feeds `continuation`.
fn decode(model: &Gpt2Model, prompt: &[u32], continuation: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache_with_capacity(prompt.len() + continuation.len());
    let input = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let first = model
        .forward(&input, &mut cache, LogitsFor::Last)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut steps = vec![first];
    for &token in continuation {
        steps.push(model.forward_step(&[token], &mut [&mut cache]).unwrap());
    }
    steps
}

fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold(0, |best, (i, v)| if *v > values[best] { i } else { best })
}

#[test]
fn f16_kv_logits_drift_little_from_f32() {
    for name in ["tiny-safetensors", "tiny-eos"] {
        let exact_model = load(name);
        let half_model = load(name).with_kv_format(KvFormat::F16);
        assert_eq!(half_model.kv_format(), KvFormat::F16);
        let (exact_cache, half_cache) = (exact_model.new_cache(), half_model.new_cache());
        assert_eq!(half_cache.format(), KvFormat::F16);
        assert_eq!(exact_cache.format(), KvFormat::F32);

        let prompt: Vec<u32> = (0..8).map(|i| (i * 37 + 11) % 500).collect();
        let continuation: Vec<u32> = (0..24).map(|i| (i * 53 + 7) % 500).collect();
        let exact = decode(&exact_model, &prompt, &continuation);
        let half = decode(&half_model, &prompt, &continuation);
        let (mut drift, mut spread, mut agree) = (0.0f32, 0.0f32, 0usize);
        for (e, h) in exact.iter().zip(&half) {
            for (a, b) in e.iter().zip(h) {
                drift = drift.max((a - b).abs());
                spread = spread.max(a.abs());
            }
            agree += usize::from(argmax(e) == argmax(h));
        }
        let agreement = agree as f32 / exact.len() as f32;
        println!(
            "{name}: f16 KV max abs logit drift {drift:.5} (logits up to {spread:.2}), top-1 agreement {agreement:.3}"
        );
        assert!(drift > 0.0, "{name}: the f16 cache should round something");
        assert!(
            drift < 0.01 * spread,
            "{name}: drift {drift} against logits up to {spread}"
        );
        assert!(agreement >= 0.95, "{name}: top-1 agreement {agreement}");
    }
}

#[test]
fn kv_cache_bytes_bounds_what_a_generation_allocates() {
    for format in [KvFormat::F32, KvFormat::F16] {
        let model = Gpt2Model::demo().with_kv_format(format);
        let rows = 3;
        let positions = 40;
        let mut cache = model.new_cache_with_capacity(positions);
        let prompt = candle_core::Tensor::new(&[[15496u32, 11]], model.device()).unwrap();
        model
            .forward(&prompt, &mut cache, gpt2_model::LogitsFor::Last)
            .unwrap();
        cache.reorder(&[0, 0, 0]).unwrap();
        for _ in 0..30 {
            model.forward_step(&[1, 2, 3], &mut [&mut cache]).unwrap();
            cache.reorder(&[2, 0, 1]).unwrap();
        }
        let reserved = model.kv_cache_bytes(rows, positions);
        assert!(
            cache.allocated_bytes() <= reserved,
            "{format:?}: {} > {reserved}",
            cache.allocated_bytes()
        );
        assert!(
            cache.allocated_bytes() * 2 > reserved,
            "{format:?}: the estimate is tight"
        );
    }
}

/// A cache of each format in one step (models differing only in their KV format share weights
/// and caches): each cache's rows get the logits of a step over that cache alone.
#[test]
fn a_step_over_caches_of_both_formats_answers_each_as_alone() {
    let f32_model = Gpt2Model::demo();
    let f16_model = Gpt2Model::demo().with_kv_format(KvFormat::F16);
    let (mut a, mut b) = (
        prefilled(&f32_model, &[5, 17, 300], 2),
        prefilled(&f16_model, &[9, 1000, 44, 2], 1),
    );
    let (mut lone_a, mut lone_b) = (a.clone(), b.clone());
    let together = f32_model
        .forward_step(&[7, 8, 9], &mut [&mut a, &mut b])
        .unwrap();
    let mut alone = f32_model.forward_step(&[7, 8], &mut [&mut lone_a]).unwrap();
    alone.extend(f32_model.forward_step(&[9], &mut [&mut lone_b]).unwrap());
    assert_eq!(together, alone);
    assert_eq!(b.format(), KvFormat::F16);
}
