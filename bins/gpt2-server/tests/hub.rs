//! `--model org/name`: the built server resolves a repository id through the Hugging Face cache,
//! against a local hub (never the internet).

mod support;

#[path = "../../../crates/gpt2-hub/tests/support/hub_server.rs"]
mod hub_server;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hub_server::{fixture, temp_dir, unreachable_endpoint, HubRepo, HubServer};
use support::Server;

/// The Hugging Face variables of a run: a temp HF_HOME, an endpoint, offline or not; the
/// caller's own HF_* settings are blanked (an empty variable counts as unset).
fn hub_env<'a>(home: &'a str, endpoint: &'a str, offline: bool) -> Vec<(&'a str, &'a str)> {
    vec![
        ("HF_HOME", home),
        ("HF_ENDPOINT", endpoint),
        ("HF_HUB_OFFLINE", if offline { "1" } else { "0" }),
        ("HF_HUB_CACHE", ""),
        ("HUGGINGFACE_HUB_CACHE", ""),
        ("HF_TOKEN", ""),
        ("GPT2_MODEL_DIR", ""),
        ("GPT2_REVISION", ""),
    ]
}

fn greedy(server: &Server) -> Vec<String> {
    let response = server.invoke(r#"{"input": "a b c", "mode": "greedy", "max_length": 10}"#);
    assert_eq!(response.status, 200, "{response:?}");
    serde_json::from_value(response.json()).unwrap()
}

#[test]
fn serve_model_by_hub_id_then_from_the_cache_offline() {
    let repo = HubRepo::new("test/tiny", fixture("tiny-safetensors"));
    let commit = repo.commit();
    let hub = HubServer::start(vec![repo]);
    let home = temp_dir("server-hub");
    let home_text = home.to_str().unwrap();

    let server = Server::start_with_env(
        &["serve", "--model", "test/tiny"],
        &hub_env(home_text, &hub.endpoint, false),
    );
    let online = greedy(&server);
    let snapshot = home.join("hub/models--test--tiny/snapshots").join(&commit);
    assert!(snapshot.join("model.safetensors").is_file());
    let loaded = server
        .log_lines()
        .into_iter()
        .find(|line| line.contains("model loaded"))
        .expect("a model loaded line");
    assert!(loaded.contains(&commit), "{loaded}");
    drop(server);

    // The same output as the directory itself.
    let local = Server::start_with_env(
        &["--model", fixture("tiny-safetensors").to_str().unwrap()],
        &hub_env(home_text, "http://127.0.0.1:9", true),
    );
    assert_eq!(greedy(&local), online);
    drop(local);

    // Offline, the hub unreachable: the cache alone; --revision through GPT2_REVISION.
    let before = hub.requests();
    let mut env = hub_env(home_text, "http://127.0.0.1:9", true);
    env.push(("GPT2_MODEL_DIR", "test/tiny"));
    env.push(("GPT2_REVISION", &commit));
    let offline = Server::start_with_env(&[], &env);
    assert_eq!(greedy(&offline), online);
    assert_eq!(hub.requests(), before);
    drop(offline);
    std::fs::remove_dir_all(&home).ok();
}

/// Runs the server, which must exit at once; returns its exit code and stderr.
fn start_failure(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gpt2-server"));
    command
        .args(args)
        .args(["--port", "0"])
        .env_remove("SAGEMAKER_BIND_TO_PORT")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let started = Instant::now();
    let out = command.output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "it fails fast: {:?}",
        started.elapsed()
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_model_missing_from_the_cache_offline_or_unreachable_stops_the_start_with_one_line() {
    let home = temp_dir("server-hub-empty");
    let home_text = home.to_str().unwrap();
    let missing = Path::new(home_text)
        .join("hub/models--test--tiny/refs/main")
        .display()
        .to_string();
    let unreachable = unreachable_endpoint();
    for (endpoint, offline, why) in [
        ("http://127.0.0.1:9", true, "HF_HUB_OFFLINE is set"),
        (unreachable.as_str(), false, "cannot reach"),
    ] {
        let (code, stderr) = start_failure(
            &["serve", "--model", "test/tiny"],
            &hub_env(home_text, endpoint, offline),
        );
        assert_eq!(code, Some(1), "{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(
            errors[0].contains(why) && errors[0].contains(&missing),
            "{stderr}"
        );
    }
    // A repository the hub does not have.
    let hub = HubServer::start(vec![]);
    let (code, stderr) = start_failure(
        &["--model", "nobody/nothing"],
        &hub_env(home_text, &hub.endpoint, false),
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("repository nobody/nothing (revision main) not found"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&home).ok();
}
