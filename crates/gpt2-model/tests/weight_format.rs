//! q8_0 weights: the logit drift against f32 stays small; and in every storage option a row's
//! logits do not depend on what shares its decode step.

use std::path::Path;

use candle_core::{Device, Tensor};
use gpt2_model::{Gpt2Model, KvFormat, LogitsFor, WeightFormat};

fn load(name: &str) -> Gpt2Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name);
    Gpt2Model::load(dir, &Device::Cpu).unwrap()
}

#[test]
fn q8_0_logits_drift_little_from_f32() {
    for name in ["tiny-safetensors", "tiny-eos"] {
        let f32_model = load(name);
        let q8_model = load(name).with_weight_format(WeightFormat::Q8_0).unwrap();
        assert_eq!(q8_model.weight_format(), WeightFormat::Q8_0);
        let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 500).collect();
        let input = Tensor::new(tokens.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let exact = f32_model
            .forward(&input, &mut f32_model.new_cache(), LogitsFor::All)
            .unwrap();
        let approx = q8_model
            .forward(&input, &mut q8_model.new_cache(), LogitsFor::All)
            .unwrap();
        let drift = (&exact - &approx)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let spread = exact
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let agree = exact
            .argmax(2)
            .unwrap()
            .eq(&approx.argmax(2).unwrap())
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!("{name}: q8_0 max abs logit drift {drift:.4} (logits up to {spread:.2}), top-1 agreement {agree:.3}");
        assert!(
            drift < 0.05 * spread,
            "{name}: drift {drift} against logits up to {spread}"
        );
        assert!(agree >= 0.9, "{name}: top-1 agreement {agree}");
    }
}

#[test]
fn rows_do_not_depend_on_their_batch_in_any_storage() {
    for (weights, kv) in [
        (WeightFormat::Q8_0, KvFormat::F32),
        (WeightFormat::F32, KvFormat::F16),
        (WeightFormat::Q8_0, KvFormat::F16),
    ] {
        let model = load("tiny-safetensors")
            .with_weight_format(weights)
            .unwrap()
            .with_kv_format(kv);
        let prompt = Tensor::new(&[[5u32, 17, 300, 2, 9]], &Device::Cpu).unwrap();
        let mut shared = model.new_cache();
        model
            .forward(&prompt, &mut shared, LogitsFor::Last)
            .unwrap();
        let mut alone = shared.clone();
        shared.reorder(&[0, 0, 0]).unwrap();
        let batched = model.forward_step(&[1, 2, 3], &mut [&mut shared]).unwrap();
        let single = model.forward_step(&[2], &mut [&mut alone]).unwrap();
        let vocab = model.config().vocab_size;
        assert_eq!(
            &batched[vocab..2 * vocab],
            single.as_slice(),
            "{weights:?} weights, {kv:?} KV"
        );
    }
}
