//! Logits equal HF transformers' for the tiny checkpoints that `tools/model_goldens.py` wrote,
//! at every prefill position and at every KV-cached decode step.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use gpt2_model::{Gpt2Model, LogitsFor, WeightFiles};

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs the golden prompt and decode steps through the model; returns the worst difference.
fn worst_logit_difference(name: &str) -> f32 {
    let dir = fixture(name);
    let device = Device::Cpu;
    let model = Gpt2Model::load(&dir, &device).unwrap();
    let golden =
        candle_core::safetensors::load(dir.join("golden_logits.safetensors"), &device).unwrap();
    let prompt = golden["prompt"].to_dtype(DType::U32).unwrap();
    let step_tokens = golden["step_tokens"].to_dtype(DType::U32).unwrap();
    let prefill_logits = &golden["prefill_logits"];
    let step_logits = &golden["step_logits"];

    let mut cache = model.new_cache();
    let logits = model.forward(&prompt, &mut cache, LogitsFor::All).unwrap();
    let mut worst = max_abs_diff(&logits, prefill_logits);
    assert!(worst <= TOLERANCE, "{name}: prefill differs by {worst}");

    let steps = step_tokens.dim(0).unwrap();
    for step in 0..steps {
        let tokens = step_tokens.get(step).unwrap().unsqueeze(1).unwrap();
        let logits = model.forward(&tokens, &mut cache, LogitsFor::Last).unwrap();
        let expected = step_logits.get(step).unwrap().unsqueeze(1).unwrap();
        let diff = max_abs_diff(&logits, &expected);
        assert!(
            diff <= TOLERANCE,
            "{name}: decode step {step} differs by {diff}"
        );
        worst = worst.max(diff);
    }
    // The logits are far from trivial: a wrong operation could not hide under the tolerance.
    let spread = prefill_logits
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        spread > 1.0,
        "{name}: golden logits too small to be discriminating ({spread})"
    );
    println!("{name}: max abs logit difference {worst:e} over prefill and {steps} decode steps");
    worst
}

#[test]
fn safetensors_prefixed_keys_match_hf() {
    assert!(matches!(
        WeightFiles::find(&fixture("tiny-safetensors")).unwrap(),
        WeightFiles::Safetensors(_)
    ));
    worst_logit_difference("tiny-safetensors");
}

#[test]
fn pytorch_bin_with_bare_keys_and_buffers_matches_hf() {
    assert!(matches!(
        WeightFiles::find(&fixture("tiny-bare-bin")).unwrap(),
        WeightFiles::PytorchBin(_)
    ));
    worst_logit_difference("tiny-bare-bin");
}

#[test]
fn sharded_safetensors_with_untied_head_matches_hf() {
    match WeightFiles::find(&fixture("tiny-sharded")).unwrap() {
        WeightFiles::ShardedSafetensors(shards) => assert!(shards.len() > 1),
        other => panic!("expected shards, found {other:?}"),
    }
    worst_logit_difference("tiny-sharded");
}

#[test]
fn batched_decode_equals_each_sequence_alone_and_forked_caches() {
    let model = Gpt2Model::load(fixture("tiny-safetensors"), &Device::Cpu).unwrap();
    let device = Device::Cpu;
    let prompt = Tensor::new(&[[5u32, 17, 300, 2, 9]], &device).unwrap();
    let mut cache = model.new_cache();
    model.forward(&prompt, &mut cache, LogitsFor::Last).unwrap();
    // Fork the prompt's cache into three sequences and feed each a different token.
    let mut forked = cache.select(&[0, 0, 0]).unwrap();
    let next = Tensor::new(&[[1u32], [2], [3]], &device).unwrap();
    let batched = model.forward(&next, &mut forked, LogitsFor::Last).unwrap();
    for (row, token) in [1u32, 2, 3].into_iter().enumerate() {
        let alone = Tensor::new(&[[5u32, 17, 300, 2, 9, token]], &device).unwrap();
        let logits = model
            .forward(&alone, &mut model.new_cache(), LogitsFor::Last)
            .unwrap();
        let diff = max_abs_diff(&batched.get(row).unwrap().unsqueeze(0).unwrap(), &logits);
        assert!(diff <= TOLERANCE, "row {row} differs by {diff}");
    }
}

#[test]
fn chunked_prefill_and_cache_growth_equal_one_pass() {
    let model = Gpt2Model::load(fixture("tiny-bare-bin"), &Device::Cpu).unwrap();
    let device = Device::Cpu;
    let tokens: Vec<u32> = vec![3, 141, 59, 26, 53, 58, 97, 93, 238, 46];
    let all = Tensor::new(tokens.as_slice(), &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let one_pass = model
        .forward(&all, &mut model.new_cache(), LogitsFor::Last)
        .unwrap();
    // Two prefill chunks then single steps, in a cache that starts with room for 2 positions.
    let mut cache = model.new_cache_with_capacity(2);
    let first = Tensor::new(&tokens[..3], &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let second = Tensor::new(&tokens[3..7], &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.forward(&first, &mut cache, LogitsFor::Last).unwrap();
    model.forward(&second, &mut cache, LogitsFor::Last).unwrap();
    let mut last = None;
    for &token in &tokens[7..] {
        let step = Tensor::new(&[[token]], &device).unwrap();
        last = Some(model.forward(&step, &mut cache, LogitsFor::Last).unwrap());
    }
    assert_eq!(cache.seq_len(), tokens.len());
    assert!(cache.capacity() >= tokens.len());
    let diff = max_abs_diff(&last.unwrap(), &one_pass);
    assert!(
        diff <= TOLERANCE,
        "chunked and stepped logits differ by {diff}"
    );
}
