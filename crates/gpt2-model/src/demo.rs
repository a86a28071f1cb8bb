use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Activation, Gpt2Config, Gpt2Model};

/// The seed the demo model's weights are drawn from; the same on every machine.
pub const DEMO_WEIGHTS_SEED: u64 = 0x6770_7432;

/// The demo model's shape: GPT-2's vocabulary and position table, two narrow layers.
pub fn demo_config() -> Gpt2Config {
    Gpt2Config {
        n_layer: 2,
        n_head: 4,
        n_embd: 64,
        n_inner: 256,
        ..Gpt2Config::default()
    }
}

/// Draws `len` values from N(0, std²) with the Box–Muller transform (no extra crate for it).
fn normal(rng: &mut ChaCha8Rng, len: usize, std: f32) -> Vec<f32> {
    let mut values = Vec::with_capacity(len + 1);
    while values.len() < len {
        let u1: f32 = rng.random_range(f32::EPSILON..1.0);
        let u2: f32 = rng.random();
        let radius = (-2.0 * u1.ln()).sqrt() * std;
        let angle = std::f32::consts::TAU * u2;
        values.push(radius * angle.cos());
        values.push(radius * angle.sin());
    }
    values.truncate(len);
    values
}

impl Gpt2Model {
    /// A deterministic GPT-2 with random weights (seed [`DEMO_WEIGHTS_SEED`]) and the real
    /// vocabulary, so that everything runs without a download. Its text is noise: it is not
    /// GPT-2, and callers should say so when they use it.
    pub fn demo() -> Self {
        Self::random(demo_config(), DEMO_WEIGHTS_SEED).expect("the demo config is valid")
    }

    /// A model of any shape with random weights (N(0, 0.02²), layer norms at identity), drawn
    /// deterministically from `seed`: for tests and benchmarks of real shapes without a download.
    pub fn random(config: Gpt2Config, seed: u64) -> Result<Self, crate::ModelError> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let device = Device::Cpu;
        let e = config.n_embd;
        let mut tensors = HashMap::new();
        let mut put = |name: String, shape: &[usize], values: Vec<f32>| {
            let tensor = Tensor::from_vec(values, shape, &device)
                .expect("demo tensor sizes match their shapes");
            tensors.insert(name, tensor);
        };
        let random =
            |shape: &[usize], rng: &mut ChaCha8Rng| normal(rng, shape.iter().product(), 0.02);
        put(
            "wte.weight".into(),
            &[config.vocab_size, e],
            random(&[config.vocab_size, e], &mut rng),
        );
        put(
            "wpe.weight".into(),
            &[config.n_positions, e],
            random(&[config.n_positions, e], &mut rng),
        );
        for idx in 0..config.n_layer {
            let p = format!("h.{idx}");
            for ln in ["ln_1", "ln_2"] {
                put(format!("{p}.{ln}.weight"), &[e], vec![1.0; e]);
                put(format!("{p}.{ln}.bias"), &[e], vec![0.0; e]);
            }
            let dense = [
                ("attn.c_attn", e, 3 * e),
                ("attn.c_proj", e, e),
                ("mlp.c_fc", e, config.n_inner),
                ("mlp.c_proj", config.n_inner, e),
            ];
            for (name, n_in, n_out) in dense {
                put(
                    format!("{p}.{name}.weight"),
                    &[n_in, n_out],
                    random(&[n_in, n_out], &mut rng),
                );
                put(
                    format!("{p}.{name}.bias"),
                    &[n_out],
                    random(&[n_out], &mut rng),
                );
            }
        }
        put("ln_f.weight".into(), &[e], vec![1.0; e]);
        put("ln_f.bias".into(), &[e], vec![0.0; e]);
        if !config.tie_word_embeddings {
            let shape = [config.vocab_size, e];
            put("lm_head.weight".into(), &shape, random(&shape, &mut rng));
        }
        Gpt2Model::from_tensors(config, tensors, &device)
    }
}

fn activation_name(activation: Activation) -> &'static str {
    match activation {
        Activation::GeluTanh => "gelu_new",
        Activation::GeluErf => "gelu",
        Activation::QuickGelu => "quick_gelu",
        Activation::Relu => "relu",
        Activation::Silu => "silu",
        Activation::Tanh => "tanh",
    }
}

/// `config.json` text that HF transformers and [`Gpt2Config::from_json`] both read back.
pub(crate) fn hf_config_json(config: &Gpt2Config) -> String {
    let mut json = serde_json::json!({
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,
        "vocab_size": config.vocab_size,
        "n_inner": config.n_inner,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "activation_function": activation_name(config.activation),
        "scale_attn_weights": config.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": config.reorder_and_upcast_attn,
        "tie_word_embeddings": config.tie_word_embeddings,
    });
    if let Some(eos) = config.eos_token_id {
        json["eos_token_id"] = eos.into();
        json["bos_token_id"] = eos.into();
    }
    serde_json::to_string_pretty(&json).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LogitsFor;

    #[test]
    fn demo_is_deterministic_and_round_trips_through_save_and_load() {
        let a = Gpt2Model::demo();
        let b = Gpt2Model::demo();
        let ids = Tensor::new(&[[464u32, 3290, 318]], &Device::Cpu).unwrap();
        let la = a.forward(&ids, &mut a.new_cache(), LogitsFor::All).unwrap();
        let lb = b.forward(&ids, &mut b.new_cache(), LogitsFor::All).unwrap();
        let diff = (&la - &lb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);

        let dir = std::env::temp_dir().join(format!("gpt2-demo-save-{}", std::process::id()));
        a.save(&dir).unwrap();
        let loaded = Gpt2Model::load(&dir, &Device::Cpu).unwrap();
        assert_eq!(loaded.config(), a.config());
        let ll = loaded
            .forward(&ids, &mut loaded.new_cache(), LogitsFor::All)
            .unwrap();
        let diff = (&la - &ll)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        std::fs::remove_dir_all(&dir).ok();
    }
}
