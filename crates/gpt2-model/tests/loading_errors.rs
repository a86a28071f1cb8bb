//! Every broken checkpoint is an error that says what is wrong, never a panic or a wrong model.

use std::path::{Path, PathBuf};

use candle_core::Device;
use gpt2_model::Gpt2Model;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name)
}

/// A copy of a fixture in a fresh temporary directory, to break on purpose.
fn scratch_copy(name: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gpt2-load-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

fn load_error(dir: &Path) -> String {
    Gpt2Model::load(dir, &Device::Cpu).unwrap_err().to_string()
}

#[test]
fn missing_weights_names_the_expected_files() {
    let dir = scratch_copy("tiny-safetensors", "noweights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("pytorch_model.bin"),
        "{err}"
    );
}

#[test]
fn config_that_disagrees_with_weights_names_the_tensor() {
    let dir = scratch_copy("tiny-safetensors", "shape");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"n_embd\": 32", "\"n_embd\": 64"),
    )
    .unwrap();
    let err = load_error(&dir);
    assert!(err.contains("wte.weight") && err.contains("shape"), "{err}");
}

#[test]
fn missing_layer_names_the_tensor() {
    let dir = scratch_copy("tiny-safetensors", "layers");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"n_layer\": 2", "\"n_layer\": 3"),
    )
    .unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("h.2.ln_1.weight") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn untied_config_without_lm_head_names_it() {
    let dir = scratch_copy("tiny-safetensors", "untied");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = config.replace(
        "\"tie_word_embeddings\": true",
        "\"tie_word_embeddings\": false",
    );
    std::fs::write(dir.join("config.json"), config).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("lm_head.weight"), "{err}");
}

#[test]
fn truncated_weight_file_is_an_error() {
    let dir = scratch_copy("tiny-safetensors", "truncated");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn missing_shard_is_an_error() {
    let dir = scratch_copy("tiny-sharded", "shard");
    std::fs::remove_file(dir.join("model-00003-of-00006.safetensors")).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("model-00003-of-00006.safetensors"), "{err}");
}

#[test]
fn missing_config_is_an_error() {
    let dir = scratch_copy("tiny-safetensors", "noconfig");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("config.json"), "{err}");
}
