//! Resolution through the Hugging Face cache against a local hub (never the internet).

#[path = "support/hub_server.rs"]
mod hub_server;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gpt2_hub::{fetch_model, resolve_model, HubError, HubOptions, ModelSpec};
use hub_server::{fixture, temp_dir, unreachable_endpoint, HubRepo, HubServer};

fn options(cache: &Path, endpoint: &str) -> HubOptions {
    HubOptions {
        endpoint: endpoint.to_string(),
        revision: "main".to_string(),
        token: None,
        cache_dir: cache.to_path_buf(),
        offline: false,
        progress: false,
    }
}

fn same_bytes(a: &Path, b: &Path) {
    assert_eq!(
        std::fs::read(a).unwrap(),
        std::fs::read(b).unwrap(),
        "{} differs from {}",
        a.display(),
        b.display()
    );
}

#[test]
fn download_fills_the_cache_layout_and_offline_runs_read_it_back() {
    let repo = HubRepo::new("test/tiny", fixture("tiny-safetensors"));
    let commit = repo.commit();
    let hub = HubServer::start(vec![repo]);
    let home = temp_dir("layout");
    let cache = home.join("hub");

    let snapshot = fetch_model("test/tiny", &options(&cache, &hub.endpoint)).unwrap();
    let repo_dir = cache.join("models--test--tiny");
    assert_eq!(snapshot.dir, repo_dir.join("snapshots").join(&commit));
    assert_eq!(snapshot.commit, commit);
    assert_eq!(snapshot.files, ["config.json", "model.safetensors"]);
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        commit
    );
    for file in &snapshot.files {
        let path = snapshot.dir.join(file);
        assert!(
            path.symlink_metadata().unwrap().file_type().is_symlink(),
            "{file} links to a blob, as huggingface_hub lays it out"
        );
        assert!(std::fs::canonicalize(&path)
            .unwrap()
            .starts_with(std::fs::canonicalize(repo_dir.join("blobs")).unwrap()));
        same_bytes(&path, &fixture("tiny-safetensors").join(file));
    }
    assert!(
        !snapshot.dir.join("golden_logits.safetensors").exists(),
        "only the model's files are fetched"
    );

    // A second run finds every file in the snapshot: it asks the hub for the commit only.
    let before = hub.requests();
    let again = fetch_model("test/tiny", &options(&cache, &hub.endpoint)).unwrap();
    assert_eq!(again, snapshot);
    assert_eq!(hub.requests(), before + 1);

    // Offline: the cache alone, no request at all.
    let before = hub.requests();
    let mut offline = options(&cache, &hub.endpoint);
    offline.offline = true;
    assert_eq!(fetch_model("test/tiny", &offline).unwrap(), snapshot);
    assert_eq!(
        resolve_model(Path::new("test/tiny"), &offline).unwrap(),
        snapshot.dir
    );
    assert_eq!(hub.requests(), before, "offline never touches the network");

    // With the hub unreachable, the cached snapshot still answers.
    let down = options(&cache, &unreachable_endpoint());
    assert_eq!(fetch_model("test/tiny", &down).unwrap(), snapshot);

    // `--to DIR` copies: plain files, same bytes.
    let dest = home.join("copy");
    let written = gpt2_hub::copy_snapshot(&snapshot, &dest).unwrap();
    assert_eq!(written.len(), 2);
    for file in &written {
        assert!(file.symlink_metadata().unwrap().is_file());
    }
    same_bytes(
        &dest.join("model.safetensors"),
        &fixture("tiny-safetensors/model.safetensors"),
    );
    std::fs::remove_dir_all(&home).ok();
}

#[test]
fn offline_or_unreachable_with_an_empty_cache_fails_at_once_naming_the_cache_and_the_file() {
    let home = temp_dir("empty");
    let cache = home.join("hub");
    for (endpoint, offline, why) in [
        (
            "http://127.0.0.1:9".to_string(),
            true,
            "HF_HUB_OFFLINE is set",
        ),
        (
            unreachable_endpoint(),
            false,
            "cannot reach http://127.0.0.1:",
        ),
    ] {
        let mut options = options(&cache, &endpoint);
        options.offline = offline;
        let started = Instant::now();
        let error = fetch_model("openai-community/gpt2", &options).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "it fails fast");
        let message = error.to_string();
        assert!(matches!(error, HubError::NotCached { .. }), "{message}");
        assert!(message.contains(why), "{message}");
        assert!(
            message.contains(&cache.display().to_string()),
            "names the cache: {message}"
        );
        assert!(
            message.contains(
                &cache
                    .join("models--openai-community--gpt2/refs/main")
                    .display()
                    .to_string()
            ),
            "names the missing file: {message}"
        );
        assert_eq!(message.lines().count(), 1, "{message}");
    }
    std::fs::remove_dir_all(&home).ok();
}

#[test]
fn sharded_safetensors_and_pytorch_bin_repositories_are_fetched_whole() {
    let sharded = HubRepo::new("test/sharded", fixture("tiny-sharded"));
    let bin = HubRepo::new("test/bin", fixture("tiny-bare-bin"));
    let hub = HubServer::start(vec![sharded, bin]);
    let home = temp_dir("layouts");
    let cache = home.join("hub");

    let snapshot = fetch_model("test/sharded", &options(&cache, &hub.endpoint)).unwrap();
    let mut expected = vec![
        "config.json".to_string(),
        "model.safetensors.index.json".to_string(),
    ];
    expected.extend((1..=6).map(|i| format!("model-0000{i}-of-00006.safetensors")));
    assert_eq!(snapshot.files, expected);
    for file in &snapshot.files {
        same_bytes(
            &snapshot.dir.join(file),
            &fixture("tiny-sharded").join(file),
        );
    }
    let mut offline = options(&cache, &hub.endpoint);
    offline.offline = true;
    assert_eq!(fetch_model("test/sharded", &offline).unwrap(), snapshot);
    // A shard missing from the cache is named.
    std::fs::remove_file(snapshot.dir.join("model-00004-of-00006.safetensors")).unwrap();
    let message = fetch_model("test/sharded", &offline)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(
            &snapshot
                .dir
                .join("model-00004-of-00006.safetensors")
                .display()
                .to_string()
        ),
        "{message}"
    );

    let snapshot = fetch_model("test/bin", &options(&cache, &hub.endpoint)).unwrap();
    assert_eq!(snapshot.files, ["config.json", "pytorch_model.bin"]);
    same_bytes(
        &snapshot.dir.join("pytorch_model.bin"),
        &fixture("tiny-bare-bin/pytorch_model.bin"),
    );
    std::fs::remove_dir_all(&home).ok();
}

#[test]
fn a_pinned_commit_resolves_online_and_offline() {
    let repo = HubRepo::new("test/pinned", fixture("tiny-safetensors"));
    let commit = repo.commit();
    let hub = HubServer::start(vec![repo]);
    let home = temp_dir("pinned");
    let cache = home.join("hub");
    let mut pinned = options(&cache, &hub.endpoint);
    pinned.revision = commit.clone();
    let snapshot = fetch_model("test/pinned", &pinned).unwrap();
    assert!(snapshot.dir.ends_with(&commit));
    pinned.offline = true;
    assert_eq!(fetch_model("test/pinned", &pinned).unwrap(), snapshot);
    // An unknown revision is the hub's 404.
    let mut other = options(&cache, &hub.endpoint);
    other.revision = "v9".to_string();
    let message = fetch_model("test/pinned", &other).unwrap_err().to_string();
    assert!(
        message.contains("test/pinned (revision v9) not found"),
        "{message}"
    );
    std::fs::remove_dir_all(&home).ok();
}

/// A cache as Python's huggingface_hub writes it (no trailing newline in refs, relative links
/// into blobs named by their hash) serves offline.
#[test]
fn a_cache_written_by_huggingface_hub_is_reused() {
    let home = temp_dir("python");
    let cache = home.join("hub");
    let repo_dir = cache.join("models--openai-community--gpt2");
    let commit = "607a30d783dfa663caf39e06633721c8d4cfcd7e";
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    for (file, blob) in [
        ("config.json", "10c66461e4c109db5a2196bff4bb59be30396ed8"),
        (
            "model.safetensors",
            "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
        ),
    ] {
        std::fs::copy(
            fixture("tiny-safetensors").join(file),
            repo_dir.join("blobs").join(blob),
        )
        .unwrap();
        std::os::unix::fs::symlink(PathBuf::from("../../blobs").join(blob), snapshot.join(file))
            .unwrap();
    }
    let mut offline = options(&cache, "http://127.0.0.1:9");
    offline.offline = true;
    let resolved = resolve_model(Path::new("openai-community/gpt2"), &offline).unwrap();
    assert_eq!(resolved, snapshot);
    std::fs::remove_dir_all(&home).ok();
}

#[test]
fn a_local_directory_never_touches_the_network_and_bad_values_are_usage_errors() {
    let hub = HubServer::start(vec![]);
    let home = temp_dir("local");
    let options = options(&home.join("hub"), &hub.endpoint);
    let dir = fixture("tiny-safetensors");
    assert_eq!(resolve_model(&dir, &options).unwrap(), dir);
    assert_eq!(
        ModelSpec::parse(&dir).unwrap(),
        ModelSpec::Directory(dir.clone())
    );
    assert_eq!(
        ModelSpec::parse(Path::new("org/name")).unwrap(),
        ModelSpec::Hub("org/name".into())
    );
    let missing = resolve_model(Path::new("/nonexistent/gpt2"), &options).unwrap_err();
    assert!(missing.is_usage());
    assert!(missing
        .to_string()
        .starts_with("model directory /nonexistent/gpt2 does not exist"));
    let file = dir.join("config.json");
    let not_dir = resolve_model(&file, &options).unwrap_err();
    assert!(not_dir.is_usage());
    assert!(not_dir.to_string().contains("not a directory"));
    assert_eq!(hub.requests(), 0);
    // A repository the hub does not have.
    let error = resolve_model(Path::new("nobody/nothing"), &options).unwrap_err();
    assert!(!error.is_usage());
    assert!(
        error
            .to_string()
            .contains("repository nobody/nothing (revision main) not found at http://127.0.0.1:"),
        "{error}"
    );
    std::fs::remove_dir_all(&home).ok();
}
