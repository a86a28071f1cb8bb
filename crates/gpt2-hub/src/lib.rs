//! Resolves a `--model` value to a model directory that `gpt2_model::Gpt2Model::load` and
//! `gpt2_tokenizer::Gpt2Tokenizer::from_model_dir` read: an existing local directory as it is
//! (never touching the network), or a Hugging Face Hub repository id (`org/name`) through the
//! standard Hugging Face cache, with the [`hf_hub`] crate.
//!
//! The cache is the one Python's `huggingface_hub` uses (`$HF_HUB_CACHE`, else `$HF_HOME/hub`,
//! else `~/.cache/huggingface/hub`; `models--org--name/{blobs,refs,snapshots}`), so a model
//! downloaded by either is reused by the other. What a repository publishes decides what is
//! fetched: `config.json`, the weights in whichever layout it has (`model.safetensors`, sharded
//! safetensors with their index, or `pytorch_model.bin`) and the tokenizer files it has. Files
//! already in the snapshot are not downloaded again. `HF_ENDPOINT`, `HF_TOKEN` and
//! `HF_HUB_OFFLINE` are honoured; offline (or with the endpoint unreachable) the cache alone
//! answers, and a model it lacks is an error naming the cache and the missing file.
//!
//! ```no_run
//! use gpt2_hub::{resolve_model, HubOptions};
//!
//! let dir = resolve_model("openai-community/gpt2".as_ref(), &HubOptions::from_env()).unwrap();
//! println!("model files in {}", dir.display());
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

/// The Hub's address when `HF_ENDPOINT` is unset.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The weight files this crate loads, in the order it prefers them.
const SAFETENSORS: &str = "model.safetensors";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const PYTORCH: &str = "pytorch_model.bin";
/// The tokenizer files fetched when the repository has them (all optional).
const TOKENIZER_FILES: [&str; 3] = ["tokenizer.json", "vocab.json", "merges.txt"];

/// Where and how to fetch a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// Base URL of the hub, `https://huggingface.co` by default (`HF_ENDPOINT`).
    pub endpoint: String,
    /// Branch, tag or commit (`main` by default).
    pub revision: String,
    /// Bearer token for private or gated repositories (`HF_TOKEN`, else the token file that
    /// `huggingface-cli login` writes).
    pub token: Option<String>,
    /// The hub cache directory (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Never touch the network: answer from the cache alone (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Draw a progress bar per downloaded file on stderr (only when stderr is a terminal).
    pub progress: bool,
}

impl HubOptions {
    /// The Hub's defaults and the process environment: `HF_ENDPOINT`, `HF_TOKEN`,
    /// `HF_HUB_CACHE`, `HF_HOME`, `HF_HUB_OFFLINE` (see [`HubOptions::from_vars`]).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The options that the variables `var` gives (a variable that is empty or only whitespace
    /// counts as unset), as Python's `huggingface_hub` reads them:
    ///
    /// - endpoint: `HF_ENDPOINT`, else `https://huggingface.co`;
    /// - cache: `HF_HUB_CACHE` (or the older `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`, where
    ///   `HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`;
    /// - token: `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`), else the file
    ///   `$HF_TOKEN_PATH`, else `$HF_HOME/token`;
    /// - offline: `HF_HUB_OFFLINE` set to `1`, `true`, `yes` or `on` (any case).
    ///
    /// The revision is `main` and progress bars are on.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        let hf_home = get("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            get("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| get("HOME").map(|home| Path::new(&home).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = get("HF_TOKEN")
            .or_else(|| get("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let file = get("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                let token = std::fs::read_to_string(file).ok()?;
                Some(token.trim().to_string()).filter(|token| !token.is_empty())
            })
            .map(|token| token.trim().to_string());
        let offline = get("HF_HUB_OFFLINE").is_some_and(|value| {
            matches!(
                value.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Self {
            endpoint: get("HF_ENDPOINT")
                .map(|endpoint| endpoint.trim().trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            revision: "main".to_string(),
            token,
            cache_dir,
            offline,
            progress: true,
        }
    }
}

/// Why a model could not be resolved. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A `--model` value that is neither an existing directory nor a repository id.
    #[error(
        "model directory {0} does not exist; download a checkpoint with: \
         gpt2 download openai-community/gpt2 --to {0}, or pass a Hugging Face repository id \
         such as --model openai-community/gpt2"
    )]
    NoSuchDirectory(String),
    /// A `--model` value that names a file, not a directory.
    #[error("--model {0}: not a directory")]
    NotADirectory(String),
    /// A repository id that the Hub rejects as one.
    #[error("{0:?} is not a Hugging Face repository id (org/name)")]
    BadRepoId(String),
    /// Offline, or with the endpoint unreachable, and the cache lacks a file the model needs.
    #[error(
        "{why} and {repo} (revision {revision}) is not in the Hugging Face cache {cache}: \
         missing {missing}"
    )]
    NotCached {
        /// Why the network was not used: `HF_HUB_OFFLINE is set`, or the connection failure.
        why: String,
        /// The repository id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The cache directory.
        cache: String,
        /// The first file (or reference) the cache lacks.
        missing: String,
    },
    /// The hub answered that the repository (or revision) does not exist, or needs a token.
    #[error(
        "repository {repo} (revision {revision}) not found at {endpoint} (HTTP {status}); \
         check the name, or set HF_TOKEN for a private or gated repository"
    )]
    RepoNotFound {
        /// The repository id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The hub's address.
        endpoint: String,
        /// The HTTP status (401, 403 or 404).
        status: u16,
    },
    /// A request failed otherwise (HTTP error, missing header, transfer or cache failure).
    #[error("{what}: {reason}")]
    Request {
        /// What was being fetched.
        what: String,
        /// The failure.
        reason: String,
    },
    /// The repository has no file this crate can load as weights.
    #[error("{repo} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")]
    NoWeights {
        /// The repository id.
        repo: String,
    },
    /// The repository has no `config.json`.
    #[error("{repo} has no config.json: not a transformers model repository")]
    NoConfig {
        /// The repository id.
        repo: String,
    },
    /// A downloaded index is not what the Hub publishes.
    #[error("invalid {file}: {reason}")]
    BadIndex {
        /// The index file.
        file: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
}

impl HubError {
    /// Whether the error is the user's `--model` value rather than the hub or the cache.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::NoSuchDirectory(_) | Self::NotADirectory(_) | Self::BadRepoId(_)
        )
    }
}

/// Whether `value` has the shape of a Hub repository id: `org/name`, each part made of ASCII
/// letters, digits, `-`, `_` and `.`, starting with a letter or digit, without `--` or `..`, at
/// most 96 characters.
pub fn is_repo_id(value: &str) -> bool {
    let Some((org, name)) = value.split_once('/') else {
        return false;
    };
    let part_ok = |part: &str| {
        part.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !part.contains("--")
            && !part.contains("..")
            && !part.ends_with('.')
    };
    value.len() <= 96 && part_ok(org) && part_ok(name)
}

/// What a `--model` value names, decided without touching the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// An existing local directory: used as it is.
    Directory(PathBuf),
    /// A Hub repository id (`org/name`): resolved through the cache.
    Hub(String),
}

impl ModelSpec {
    /// An existing directory wins (so `org/name` is a directory when one exists there); else a
    /// value shaped like `org/name` is a repository id; else the directory is missing (or is a
    /// file): a usage error.
    pub fn parse(value: &Path) -> Result<Self, HubError> {
        if value.is_dir() {
            return Ok(Self::Directory(value.to_path_buf()));
        }
        if value.exists() {
            return Err(HubError::NotADirectory(value.display().to_string()));
        }
        match value.to_str() {
            Some(id) if is_repo_id(id) => Ok(Self::Hub(id.to_string())),
            _ => Err(HubError::NoSuchDirectory(value.display().to_string())),
        }
    }

    /// The model directory: the directory itself, or the repository's snapshot in the cache
    /// (downloaded first when the cache lacks it, unless offline).
    pub fn resolve(&self, options: &HubOptions) -> Result<PathBuf, HubError> {
        match self {
            Self::Directory(dir) => Ok(dir.clone()),
            Self::Hub(repo) => fetch_model(repo, options).map(|snapshot| snapshot.dir),
        }
    }
}

/// [`ModelSpec::parse`] then [`ModelSpec::resolve`].
pub fn resolve_model(value: &Path, options: &HubOptions) -> Result<PathBuf, HubError> {
    ModelSpec::parse(value)?.resolve(options)
}

/// A repository's files in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// `{cache}/models--org--name/snapshots/{commit}`: a model directory.
    pub dir: PathBuf,
    /// The commit the snapshot holds.
    pub commit: String,
    /// The model's files, relative to `dir`: config, weights, tokenizer files.
    pub files: Vec<String>,
}

/// Fetches `repo` into the cache (only the files the snapshot lacks) and returns its snapshot.
/// Offline (`options.offline`), or when the endpoint cannot be reached, the cache alone answers.
pub fn fetch_model(repo: &str, options: &HubOptions) -> Result<Snapshot, HubError> {
    if !is_repo_id(repo) {
        return Err(HubError::BadRepoId(repo.to_string()));
    }
    if options.offline {
        return from_cache(repo, options, "HF_HUB_OFFLINE is set");
    }
    let cache = Cache::new(options.cache_dir.clone());
    let api = ApiBuilder::from_cache(cache.clone())
        .with_endpoint(options.endpoint.trim_end_matches('/').to_string())
        .with_token(options.token.clone())
        .with_progress(options.progress)
        .build()
        .map_err(|e| HubError::Request {
            what: "the Hub client".to_string(),
            reason: e.to_string(),
        })?;
    let repository =
        Repo::with_revision(repo.to_string(), RepoType::Model, options.revision.clone());
    let remote = api.repo(repository.clone());
    let info = match remote.info() {
        Ok(info) => info,
        Err(ApiError::RequestError(error)) => match *error {
            ureq::Error::Status(status @ (401 | 403 | 404), _) => {
                return Err(HubError::RepoNotFound {
                    repo: repo.to_string(),
                    revision: options.revision.clone(),
                    endpoint: options.endpoint.clone(),
                    status,
                })
            }
            ureq::Error::Status(status, _) => {
                return Err(HubError::Request {
                    what: format!("{repo} at {}", options.endpoint),
                    reason: format!("HTTP {status}"),
                })
            }
            ureq::Error::Transport(transport) => {
                let why = format!(
                    "cannot reach {} ({})",
                    options.endpoint,
                    one_line(&transport.to_string())
                );
                let snapshot = from_cache(repo, options, &why)?;
                log::warn!(
                    "{why}: using the cached snapshot {}",
                    snapshot.dir.display()
                );
                return Ok(snapshot);
            }
        },
        Err(other) => {
            return Err(HubError::Request {
                what: format!("{repo} at {}", options.endpoint),
                reason: one_line(&other.to_string()),
            })
        }
    };
    let published: HashSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let dir = cache
        .path()
        .join(repository.folder_name())
        .join("snapshots")
        .join(&info.sha);
    let fetcher = Fetcher {
        remote: &remote,
        dir: &dir,
        commit: &info.sha,
    };
    if !published.contains("config.json") {
        return Err(HubError::NoConfig {
            repo: repo.to_string(),
        });
    }
    let mut files = vec!["config.json".to_string()];
    if published.contains(SAFETENSORS) {
        files.push(SAFETENSORS.to_string());
    } else if published.contains(SAFETENSORS_INDEX) {
        let index = fetcher.fetch(SAFETENSORS_INDEX)?;
        files.push(SAFETENSORS_INDEX.to_string());
        files.extend(shards(&index)?);
    } else if published.contains(PYTORCH) {
        files.push(PYTORCH.to_string());
    } else {
        return Err(HubError::NoWeights {
            repo: repo.to_string(),
        });
    }
    files.extend(
        TOKENIZER_FILES
            .iter()
            .filter(|file| published.contains(*file))
            .map(|file| file.to_string()),
    );
    for file in &files {
        fetcher.fetch(file)?;
    }
    if info.sha != options.revision {
        // What `refs/{revision}` says is what an offline run (or Python) finds.
        cache
            .repo(repository)
            .create_ref(&info.sha)
            .map_err(|source| HubError::Io {
                path: options.cache_dir.display().to_string(),
                source,
            })?;
    }
    Ok(Snapshot {
        dir,
        commit: info.sha,
        files,
    })
}

/// Downloads the files a snapshot lacks.
struct Fetcher<'a> {
    remote: &'a ApiRepo,
    dir: &'a Path,
    commit: &'a str,
}

impl Fetcher<'_> {
    /// The file in the snapshot, downloaded first when it is not there yet.
    fn fetch(&self, file: &str) -> Result<PathBuf, HubError> {
        let target = self.dir.join(file);
        if target.is_file() {
            return Ok(target);
        }
        let url = self.remote.url(file);
        let fail = |reason: String| HubError::Request {
            what: format!("GET {url}"),
            reason,
        };
        let path = self.remote.download(file).map_err(|error| match error {
            ApiError::RequestError(error) => match *error {
                ureq::Error::Status(status, _) => fail(format!("HTTP {status}")),
                ureq::Error::Transport(transport) => fail(one_line(&transport.to_string())),
            },
            ApiError::MissingHeader(header) => fail(format!(
                "the answer has no {header} header (is HF_ENDPOINT a Hugging Face hub?)"
            )),
            other => fail(one_line(&other.to_string())),
        })?;
        if path != target {
            return Err(fail(format!(
                "the repository moved from commit {} during the download; run again",
                self.commit
            )));
        }
        Ok(path)
    }
}

/// The snapshot that the cache holds for `repo` at `options.revision`, when it holds every file
/// the model needs; `why` says why the network is not used.
fn from_cache(repo: &str, options: &HubOptions, why: &str) -> Result<Snapshot, HubError> {
    let cache = Cache::new(options.cache_dir.clone());
    let repository =
        Repo::with_revision(repo.to_string(), RepoType::Model, options.revision.clone());
    let repo_dir = cache.path().join(repository.folder_name());
    let missing_text = |missing: String| HubError::NotCached {
        why: why.to_string(),
        repo: repo.to_string(),
        revision: options.revision.clone(),
        cache: options.cache_dir.display().to_string(),
        missing,
    };
    let missing = |path: &Path| missing_text(path.display().to_string());
    let reference = repo_dir.join("refs").join(&options.revision);
    let commit = match std::fs::read_to_string(&reference) {
        Ok(commit) => commit.trim().to_string(),
        // A commit hash needs no reference: its snapshot is named after it.
        Err(_) if is_commit(&options.revision) => options.revision.clone(),
        Err(_) => return Err(missing(&reference)),
    };
    let dir = repo_dir.join("snapshots").join(&commit);
    // `hf_hub`'s cache lookup follows `refs/{revision}`; a bare commit is looked up directly.
    let cached = cache.repo(repository);
    let lookup = |file: &str| -> Option<PathBuf> {
        match cached.get(file) {
            Some(path) => Some(path),
            None => Some(dir.join(file)).filter(|path| path.is_file()),
        }
    };
    let need = |file: &str| lookup(file).ok_or_else(|| missing(&dir.join(file)));
    need("config.json")?;
    let mut files = vec!["config.json".to_string()];
    if lookup(SAFETENSORS).is_some() {
        files.push(SAFETENSORS.to_string());
    } else if let Some(index) = lookup(SAFETENSORS_INDEX) {
        files.push(SAFETENSORS_INDEX.to_string());
        for shard in shards(&index)? {
            need(&shard)?;
            files.push(shard);
        }
    } else if lookup(PYTORCH).is_some() {
        files.push(PYTORCH.to_string());
    } else {
        return Err(missing_text(format!(
            "{} (nor {SAFETENSORS_INDEX} or {PYTORCH})",
            dir.join(SAFETENSORS).display()
        )));
    }
    files.extend(
        TOKENIZER_FILES
            .iter()
            .filter(|file| lookup(file).is_some())
            .map(|file| file.to_string()),
    );
    Ok(Snapshot { dir, commit, files })
}

/// Copies the snapshot's files into `dest` (created when missing), resolving the cache's links,
/// and returns the files written.
pub fn copy_snapshot(snapshot: &Snapshot, dest: &Path) -> Result<Vec<PathBuf>, HubError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| HubError::Io { path, source }
    };
    std::fs::create_dir_all(dest).map_err(io(dest))?;
    let mut written = Vec::new();
    for file in &snapshot.files {
        let target = dest.join(file);
        let partial = dest.join(format!("{file}.partial"));
        std::fs::copy(snapshot.dir.join(file), &partial).map_err(io(&partial))?;
        std::fs::rename(&partial, &target).map_err(io(&target))?;
        written.push(target);
    }
    Ok(written)
}

/// Whether `revision` is a full commit hash.
fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// `text` on one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The shard file names of a `model.safetensors.index.json`, each once, sorted.
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
        if file.contains('/') || file.contains('\\') || file.contains("..") || file.is_empty() {
            return Err(bad(format!("refusing shard path {file:?}")));
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    shards.sort();
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_have_the_hubs_shape() {
        for id in [
            "openai-community/gpt2",
            "distilbert/distilgpt2",
            "org/name.v2",
            "a/b",
        ] {
            assert!(is_repo_id(id), "{id}");
        }
        for id in [
            "gpt2",
            "/abs/path",
            "./gpt2",
            "a/b/c",
            "org/",
            "/name",
            "org/na--me",
            "org/..",
            "org/-x",
            "org/x.",
            "org name/x",
        ] {
            assert!(!is_repo_id(id), "{id}");
        }
    }

    #[test]
    fn options_follow_huggingface_hub_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| value.to_string())
            }
        };
        let options = HubOptions::from_vars(vars(&[("HOME", "/home/u")]));
        assert_eq!(options.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(
            options.cache_dir,
            Path::new("/home/u/.cache/huggingface/hub")
        );
        assert!(!options.offline);
        assert_eq!(options.revision, "main");
        let options = HubOptions::from_vars(vars(&[
            ("HOME", "/home/u"),
            ("HF_HOME", "/data/hf"),
            ("HF_ENDPOINT", "http://mirror:8000/"),
            ("HF_TOKEN", " hf_x "),
            ("HF_HUB_OFFLINE", "True"),
        ]));
        assert_eq!(options.cache_dir, Path::new("/data/hf/hub"));
        assert_eq!(options.endpoint, "http://mirror:8000");
        assert_eq!(options.token.as_deref(), Some("hf_x"));
        assert!(options.offline);
        let options = HubOptions::from_vars(vars(&[
            ("HF_HOME", "/data/hf"),
            ("HF_HUB_CACHE", "/fast/hub"),
            ("HF_HUB_OFFLINE", "0"),
            ("HF_ENDPOINT", " "),
        ]));
        assert_eq!(options.cache_dir, Path::new("/fast/hub"));
        assert_eq!(options.endpoint, DEFAULT_ENDPOINT);
        assert!(!options.offline);
    }

    #[test]
    fn shard_names_are_plain_file_names() {
        let dir = std::env::temp_dir().join(format!("gpt2-hub-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let index = dir.join(SAFETENSORS_INDEX);
        std::fs::write(
            &index,
            r#"{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s1.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(
            shards(&index).unwrap(),
            ["s1.safetensors", "s2.safetensors"]
        );
        std::fs::write(&index, r#"{"weight_map": {"a": "../../etc/passwd"}}"#).unwrap();
        assert!(shards(&index).unwrap_err().to_string().contains("refusing"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
