//! Downloads a GPT-2 checkpoint from the Hugging Face Hub (or any server with the same
//! `{endpoint}/{repo}/resolve/{revision}/{file}` layout) into a model directory that
//! `gpt2_model::Gpt2Model::load` reads: `config.json`, the weights in whichever layout the repository
//! publishes (`model.safetensors`, sharded safetensors with their index, or `pytorch_model.bin`),
//! and the tokenizer files it has.
//!
//! ```no_run
//! use gpt2_hub::{download_model, HubOptions};
//!
//! let files = download_model("openai-community/gpt2", "gpt2".as_ref(), &HubOptions::from_env()).unwrap();
//! println!("downloaded {} files", files.len());
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

/// Where and how to download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// Base URL, `https://huggingface.co` by default (`HF_ENDPOINT` overrides it).
    pub endpoint: String,
    /// Branch, tag or commit (`main` by default).
    pub revision: String,
    /// Bearer token for private or gated repositories (`HF_TOKEN`).
    pub token: Option<String>,
}

impl HubOptions {
    /// The Hub's defaults, with `HF_ENDPOINT` and `HF_TOKEN` from the environment.
    pub fn from_env() -> Self {
        Self {
            endpoint: std::env::var("HF_ENDPOINT")
                .ok()
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "https://huggingface.co".to_string()),
            revision: "main".to_string(),
            token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
        }
    }
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The server could not be reached or answered with an error.
    #[error("GET {url}: {reason}")]
    Http { url: String, reason: String },
    /// The repository has no file this crate can load as weights.
    #[error("{repo} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")]
    NoWeights { repo: String },
    /// A downloaded index is not what the Hub publishes.
    #[error("invalid {file}: {reason}")]
    BadIndex { file: String, reason: String },
    /// The destination could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

struct Client {
    agent: ureq::Agent,
    repo: String,
    options: HubOptions,
    dest: PathBuf,
}

impl Client {
    fn url(&self, file: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.options.endpoint.trim_end_matches('/'),
            self.repo,
            self.options.revision,
            file
        )
    }

    /// Downloads `file` into the destination; `Ok(None)` when the server says it does not exist.
    fn fetch(&self, file: &str) -> Result<Option<PathBuf>, HubError> {
        let url = self.url(file);
        let target = self.dest.join(file);
        if target.is_file() {
            return Ok(Some(target));
        }
        let mut request = self.agent.get(&url);
        if let Some(token) = &self.options.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let http_error = |reason: String| HubError::Http {
            url: url.clone(),
            reason,
        };
        let response = request.call().map_err(|e| http_error(e.to_string()))?;
        let status = response.status().as_u16();
        if status == 404 {
            return Ok(None);
        }
        if !(200..300).contains(&status) {
            return Err(http_error(format!("status {status}")));
        }
        let io_error = |path: &Path| {
            let path = path.display().to_string();
            move |source| HubError::Io { path, source }
        };
        let partial = self.dest.join(format!("{file}.partial"));
        let mut out = std::fs::File::create(&partial).map_err(io_error(&partial))?;
        let mut body = response.into_body().into_reader();
        std::io::copy(&mut body, &mut out).map_err(|e| http_error(e.to_string()))?;
        out.flush().map_err(io_error(&partial))?;
        std::fs::rename(&partial, &target).map_err(io_error(&target))?;
        Ok(Some(target))
    }
}

/// Downloads `repo` (e.g. `openai-community/gpt2`) into `dest` and returns the files written.
/// Files already in `dest` are kept as they are.
pub fn download_model(
    repo: &str,
    dest: &Path,
    options: &HubOptions,
) -> Result<Vec<PathBuf>, HubError> {
    std::fs::create_dir_all(dest).map_err(|source| HubError::Io {
        path: dest.display().to_string(),
        source,
    })?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let client = Client {
        agent,
        repo: repo.to_string(),
        options: options.clone(),
        dest: dest.to_path_buf(),
    };
    let mut files = Vec::new();
    let config = client.fetch("config.json")?.ok_or_else(|| HubError::Http {
        url: client.url("config.json"),
        reason: "not found (is the repository name right?)".into(),
    })?;
    files.push(config);
    if let Some(weights) = client.fetch("model.safetensors")? {
        files.push(weights);
    } else if let Some(index) = client.fetch("model.safetensors.index.json")? {
        for shard in shards(&index)? {
            let path = client.fetch(&shard)?.ok_or_else(|| HubError::BadIndex {
                file: index.display().to_string(),
                reason: format!("shard {shard} does not exist"),
            })?;
            files.push(path);
        }
        files.push(index);
    } else if let Some(weights) = client.fetch("pytorch_model.bin")? {
        files.push(weights);
    } else {
        return Err(HubError::NoWeights {
            repo: repo.to_string(),
        });
    }
    for optional in ["tokenizer.json", "vocab.json", "merges.txt"] {
        if let Some(path) = client.fetch(optional)? {
            files.push(path);
        }
    }
    Ok(files)
}

/// The shard file names of a `model.safetensors.index.json`, each once.
fn shards(index: &Path) -> Result<Vec<String>, HubError> {
    let bad = |reason: String| HubError::BadIndex {
        file: index.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no weight_map".into()))?;
    let mut shards: Vec<String> = Vec::new();
    for file in map.values() {
        let file = file
            .as_str()
            .ok_or_else(|| bad("a shard name is not a string".into()))?;
        if file.contains('/') || file.contains("..") {
            return Err(bad(format!("refusing shard path {file:?}")));
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    Ok(shards)
}
