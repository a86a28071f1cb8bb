use std::path::Path;

use serde::Deserialize;

use crate::ModelError;

/// The activation of the MLP, as named by HF's `activation_function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: GELU's tanh approximation (GPT-2's own).
    GeluTanh,
    /// `gelu`, `gelu_python`: exact GELU with erf.
    GeluErf,
    /// `quick_gelu`: x·σ(1.702x).
    QuickGelu,
    /// `relu`.
    Relu,
    /// `silu`, `swish`.
    Silu,
    /// `tanh`.
    Tanh,
}

impl Activation {
    /// Parses HF's `activation_function` name; `None` for names this crate does not implement.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Some(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "gelu" | "gelu_python" => Self::GeluErf,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            "tanh" => Self::Tanh,
            _ => return None,
        })
    }
}

/// A GPT-2 configuration, read from HF's `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Number of attention heads.
    pub n_head: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Longest sequence the position table covers.
    pub n_positions: usize,
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the MLP's hidden layer (HF's `n_inner`, null meaning 4·n_embd).
    pub n_inner: usize,
    /// Epsilon of every layer norm.
    pub layer_norm_epsilon: f64,
    /// The MLP's activation.
    pub activation: Activation,
    /// Divide attention scores by √head_dim.
    pub scale_attn_weights: bool,
    /// Also divide attention scores by (layer index + 1).
    pub scale_attn_by_inverse_layer_idx: bool,
    /// HF computes attention in f32 with the scale applied first; in f32 this is the same math.
    pub reorder_and_upcast_attn: bool,
    /// The LM head shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// The id that ends generation (50256 in GPT-2).
    pub eos_token_id: Option<u32>,
}

impl Default for Gpt2Config {
    /// The configuration of `openai-community/gpt2` (124M).
    fn default() -> Self {
        Self {
            n_layer: 12,
            n_head: 12,
            n_embd: 768,
            n_positions: 1024,
            vocab_size: 50257,
            n_inner: 3072,
            layer_norm_epsilon: 1e-5,
            activation: Activation::GeluTanh,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            tie_word_embeddings: true,
            eos_token_id: Some(50256),
        }
    }
}

/// `config.json` as HF writes it; every field optional so that defaults match HF's `GPT2Config`.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    n_layer: Option<usize>,
    n_head: Option<usize>,
    n_embd: Option<usize>,
    n_positions: Option<usize>,
    n_ctx: Option<usize>,
    vocab_size: Option<usize>,
    #[serde(default)]
    n_inner: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    activation_function: Option<String>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    reorder_and_upcast_attn: Option<bool>,
    tie_word_embeddings: Option<bool>,
    add_cross_attention: Option<bool>,
    eos_token_id: Option<serde_json::Value>,
}

impl Gpt2Config {
    /// Reads and checks a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Config(reason) => {
                ModelError::Config(format!("{}: {reason}", path.display()))
            }
            other => other,
        })
    }

    /// Parses and checks the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let hf: HfConfig =
            serde_json::from_str(text).map_err(|e| ModelError::Config(e.to_string()))?;
        let unsupported = |field: &str, value: String| {
            Err(ModelError::Config(format!(
                "unsupported {field} = {value}: this crate implements GPT-2 (model_type \"gpt2\") only"
            )))
        };
        if let Some(model_type) = &hf.model_type {
            if model_type != "gpt2" {
                return unsupported("model_type", format!("{model_type:?}"));
            }
        }
        if hf.add_cross_attention == Some(true) {
            return unsupported("add_cross_attention", "true".into());
        }
        let defaults = Self::default();
        let activation_name = hf
            .activation_function
            .unwrap_or_else(|| "gelu_new".to_string());
        let Some(activation) = Activation::from_hf_name(&activation_name) else {
            return Err(ModelError::Config(format!(
                "unsupported activation_function {activation_name:?} (supported: gelu_new, \
                 gelu_pytorch_tanh, gelu_fast, gelu, gelu_python, quick_gelu, relu, silu, swish, tanh)"
            )));
        };
        let n_embd = hf.n_embd.unwrap_or(defaults.n_embd);
        let eos_token_id = match hf.eos_token_id {
            None | Some(serde_json::Value::Null) => defaults.eos_token_id,
            Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            Some(serde_json::Value::Array(ids)) => ids
                .first()
                .and_then(|v| v.as_u64())
                .and_then(|n| u32::try_from(n).ok()),
            Some(other) => return unsupported("eos_token_id", other.to_string()),
        };
        let config = Self {
            n_layer: hf.n_layer.unwrap_or(defaults.n_layer),
            n_head: hf.n_head.unwrap_or(defaults.n_head),
            n_embd,
            n_positions: hf.n_positions.or(hf.n_ctx).unwrap_or(defaults.n_positions),
            vocab_size: hf.vocab_size.unwrap_or(defaults.vocab_size),
            n_inner: hf.n_inner.unwrap_or(4 * n_embd),
            layer_norm_epsilon: hf.layer_norm_epsilon.unwrap_or(defaults.layer_norm_epsilon),
            activation,
            scale_attn_weights: hf.scale_attn_weights.unwrap_or(true),
            scale_attn_by_inverse_layer_idx: hf.scale_attn_by_inverse_layer_idx.unwrap_or(false),
            reorder_and_upcast_attn: hf.reorder_and_upcast_attn.unwrap_or(false),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(true),
            eos_token_id,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks that the sizes describe a model that can exist.
    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("n_positions", self.n_positions),
            ("vocab_size", self.vocab_size),
            ("n_inner", self.n_inner),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ModelError::Config(format!("{name} must be positive")));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ModelError::Config(format!(
                "n_embd ({}) must be a multiple of n_head ({})",
                self.n_embd, self.n_head
            )));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return Err(ModelError::Config(format!(
                "layer_norm_epsilon must be a positive number, got {}",
                self.layer_norm_epsilon
            )));
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(ModelError::Config("vocab_size does not fit in u32".into()));
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_gpt2_config_parses_with_hf_defaults() {
        let config = Gpt2Config::from_json(
            r#"{"model_type":"gpt2","n_layer":2,"n_head":4,"n_embd":64,"n_inner":null,
                "vocab_size":1000,"n_positions":128,"activation_function":"gelu_new",
                "layer_norm_epsilon":1e-5,"attn_pdrop":0.1,"eos_token_id":50256}"#,
        )
        .unwrap();
        assert_eq!(config.n_inner, 256);
        assert_eq!(config.head_dim(), 16);
        assert!(config.tie_word_embeddings && config.scale_attn_weights);
        assert_eq!(config.eos_token_id, Some(50256));
        assert_eq!(Gpt2Config::from_json("{}").unwrap(), Gpt2Config::default());
    }

    #[test]
    fn unsupported_values_are_errors() {
        for (json, needle) in [
            (r#"{"activation_function":"mish"}"#, "activation_function"),
            (r#"{"model_type":"gpt_neo"}"#, "model_type"),
            (r#"{"add_cross_attention":true}"#, "add_cross_attention"),
            (r#"{"n_embd":10,"n_head":3}"#, "multiple of n_head"),
            (r#"{"n_layer":0}"#, "n_layer"),
            (r#"{"layer_norm_epsilon":-1}"#, "layer_norm_epsilon"),
            (r#"{"n_layer":"two"}"#, "invalid type"),
        ] {
            let err = Gpt2Config::from_json(json).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }
}
