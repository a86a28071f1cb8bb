//! The `gpt2` binary, run as users run it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use gpt2_engine::{Limits, Pipeline};
use hub_server::{fixture, temp_dir, HubRepo, HubServer};

#[path = "../../../crates/gpt2-hub/tests/support/hub_server.rs"]
mod hub_server;

fn gpt2(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny-safetensors")
}

#[test]
fn tokenize_prints_hf_ids() {
    let out = gpt2(&["tokenize", "Hello, world!"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "[15496,11,995,0]\n");
    let out = gpt2(
        &[
            "tokenize",
            "--model",
            tiny_model().to_str().unwrap(),
            "<|endoftext|>",
        ],
        None,
    );
    assert_eq!(stdout(&out), "[50256]\n");
}

#[test]
fn request_from_stdin_prints_exactly_the_library_response() {
    let body = r#"{"input": "The meaning of life is", "mode": "beam", "max_length": 16, "num_beams": 3, "num_return_sequences": 2}"#;
    let out = gpt2(&["generate", "--request", "-"], Some(body));
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: Vec<String> = serde_json::from_str(&stdout(&out)).unwrap();
    let expected = Pipeline::demo().generate_json(body.as_bytes()).unwrap();
    assert_eq!(printed, expected);
    assert!(
        stderr(&out).contains("DEMO model"),
        "the demo model announces itself"
    );
}

#[test]
fn request_file_and_flags_combine_and_seeds_repeat() {
    let dir = std::env::temp_dir().join(format!("gpt2-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("request.json");
    std::fs::write(
        &file,
        r#"{"input": "Once upon a time", "max_length": 20, "mode": "sample"}"#,
    )
    .unwrap();
    let run = |seed: &str| {
        let out = gpt2(
            &[
                "generate",
                "--request",
                file.to_str().unwrap(),
                "--seed",
                seed,
            ],
            None,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str::<Vec<String>>(&stdout(&out)).unwrap()
    };
    let first = run("7");
    assert_eq!(first.len(), 3);
    assert!(first.iter().all(|t| t.starts_with("Once upon a time")));
    assert_eq!(first, run("7"));
    assert_ne!(first, run("8"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn flags_give_readable_text_or_json() {
    let args = [
        "generate",
        "--input",
        "Hello",
        "--mode",
        "greedy",
        "--max-new-tokens",
        "5",
        "--num-return-sequences",
        "1",
    ];
    let out = gpt2(&args, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("Hello") && !text.starts_with('['),
        "{text}"
    );
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = gpt2(&json_args, None);
    let printed: Vec<String> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(format!("{}\n", printed[0]), text);
}

#[test]
fn greedy_on_a_model_directory_matches_the_library() {
    let model = tiny_model();
    let body = r#"{"input": "a b c", "mode": "greedy", "max_length": 12}"#;
    let out = gpt2(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--request",
            "-",
        ],
        Some(body),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: Vec<String> = serde_json::from_str(&stdout(&out)).unwrap();
    let pipeline = Pipeline::load(&model)
        .unwrap()
        .with_limits(Limits::default());
    assert_eq!(printed, pipeline.generate_json(body.as_bytes()).unwrap());
    assert_eq!(printed.len(), 3);
    assert!(
        printed.iter().all(|t| t == &printed[0]),
        "greedy sequences are identical"
    );
    assert!(!stderr(&out).contains("DEMO"));
}

#[test]
fn bad_requests_exit_2_with_one_line_and_no_stdout() {
    let cases: Vec<(Vec<&str>, Option<&str>, &str)> = vec![
        (
            vec!["generate", "--input", "x", "--top-p", "1.5"],
            None,
            "top_p",
        ),
        (
            vec!["generate", "--input", "x", "--mode", "nucleus"],
            None,
            "mode",
        ),
        (vec!["generate"], None, "input"),
        (vec!["generate", "--input", ""], None, "input"),
        (
            vec!["generate", "--request", "-"],
            Some("{not json"),
            "malformed JSON",
        ),
        (
            vec!["generate", "--request", "-"],
            Some("[1]"),
            "JSON object",
        ),
        (
            vec!["generate", "--request", "/nonexistent/request.json"],
            None,
            "--request",
        ),
        (
            vec!["generate", "--input", "x", "--model", "/nonexistent/model"],
            None,
            "model directory /nonexistent/model does not exist",
        ),
        (
            vec!["generate", "--input", "x", "--max-length", "2000"],
            None,
            "max_length",
        ),
        (
            vec!["generate", "--input", "x", "--kv-dtype", "f8"],
            None,
            "--kv-dtype",
        ),
        (
            vec![
                "generate",
                "--input",
                "x",
                "--mode",
                "beam",
                "--num-beams",
                "2",
            ],
            None,
            "num_return_sequences",
        ),
    ];
    for (args, stdin, needle) in cases {
        let out = gpt2(&args, stdin);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?} printed {}", stdout(&out));
        let err = stderr(&out);
        let error_lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(error_lines.len(), 1, "{args:?}: {err}");
        assert!(error_lines[0].contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn a_missing_model_directory_points_to_gpt2_download() {
    let dir = std::env::temp_dir().join(format!("gpt2-cli-missing-{}", std::process::id()));
    let missing = dir.join("gpt2");
    let missing = missing.to_str().unwrap();
    let request = dir.join("request.json");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&request, r#"{"input": "Hello"}"#).unwrap();
    for args in [
        vec!["generate", "--model", missing, "--input", "Hello"],
        vec!["tokenize", "--model", missing, "Hello"],
        vec![
            "bench",
            "--model",
            missing,
            "--request",
            request.to_str().unwrap(),
        ],
    ] {
        let out = gpt2(&args, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?} printed {}", stdout(&out));
        assert_eq!(
            stderr(&out),
            format!(
                "gpt2: error: model directory {missing} does not exist; download a checkpoint \
                 with: gpt2 download openai-community/gpt2 --to {missing}, or pass a Hugging \
                 Face repository id such as --model openai-community/gpt2\n"
            ),
            "{args:?}"
        );
    }
    // A file is not a model directory either, but downloading is not the cure.
    let out = gpt2(
        &[
            "generate",
            "--model",
            request.to_str().unwrap(),
            "--input",
            "x",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not a directory"), "{}", stderr(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn q8_0_weights_and_f16_caches_generate_from_the_same_request() {
    let model = tiny_model();
    let body =
        r#"{"input": "a b c", "mode": "greedy", "max_length": 12, "num_return_sequences": 1}"#;
    let out = gpt2(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--dtype",
            "q8_0",
            "--kv-dtype",
            "f16",
            "--request",
            "-",
        ],
        Some(body),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: Vec<String> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(printed.len(), 1);
    assert!(printed[0].starts_with("a b c") && printed[0].len() > "a b c".len());
}

/// A `gpt2` command with a fresh Hugging Face cache and no HF_* variable from the caller.
fn gpt2_with_hub(args: &[&str], home: &Path, endpoint: &str, offline: bool) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args(args)
        .env("HF_HOME", home)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_OFFLINE", if offline { "1" } else { "0" })
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn download_fills_the_hf_cache_and_copies_sharded_weights_to_a_directory() {
    let hub = HubServer::start(vec![HubRepo::new("test/tiny", fixture("tiny-sharded"))]);
    let home = temp_dir("cli-download");
    let dest = home.join("model");
    let out = gpt2_with_hub(
        &[
            "download",
            "test/tiny",
            "--to",
            dest.to_str().unwrap(),
            "--endpoint",
            &hub.endpoint,
        ],
        &home,
        "http://127.0.0.1:9",
        false,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = stdout(&out);
    assert!(
        listed.contains("model.safetensors.index.json")
            && listed.contains("model-00006-of-00006.safetensors"),
        "{listed}"
    );
    assert!(
        !dest.join("tokenizer.json").exists(),
        "absent optional files are skipped"
    );
    let snapshots = home.join("hub/models--test--tiny/snapshots");
    assert_eq!(
        std::fs::read_dir(&snapshots).unwrap().count(),
        1,
        "the cache holds the snapshot too"
    );
    // The copied directory serves requests.
    let body = r#"{"input": "a b", "mode": "greedy", "max_length": 6, "num_return_sequences": 1}"#;
    let out = gpt2(
        &[
            "generate",
            "--model",
            dest.to_str().unwrap(),
            "--request",
            "-",
        ],
        Some(body),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // A repository that does not exist is one clear error line and a non-zero exit.
    let out = gpt2_with_hub(&["download", "nobody/nothing"], &home, &hub.endpoint, false);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("repository nobody/nothing (revision main) not found"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().count(), 1);
    // Not a repository id: a usage error.
    let out = gpt2_with_hub(&["download", "../etc"], &home, &hub.endpoint, false);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    std::fs::remove_dir_all(&home).ok();
}

#[test]
fn model_by_hub_id_downloads_once_then_works_offline() {
    let hub = HubServer::start(vec![HubRepo::new("test/tiny", fixture("tiny-safetensors"))]);
    let home = temp_dir("cli-hub-id");
    let body = r#"{"input": "a b c", "mode": "greedy", "max_length": 12}"#;
    let generate = |endpoint: &str, offline: bool| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gpt2"))
            .args(["generate", "--model", "test/tiny", "--request", "-"])
            .env("HF_HOME", &home)
            .env("HF_ENDPOINT", endpoint)
            .env("HF_HUB_OFFLINE", if offline { "1" } else { "0" })
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(body.as_bytes()).unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    };
    let out = generate(&hub.endpoint, false);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: Vec<String> = serde_json::from_str(&stdout(&out)).unwrap();
    let pipeline = Pipeline::load(tiny_model()).unwrap();
    assert_eq!(printed, pipeline.generate_json(body.as_bytes()).unwrap());
    // `gpt2 download` without --to lists the files of the cached snapshot.
    let out = gpt2_with_hub(&["download", "test/tiny"], &home, &hub.endpoint, false);
    assert!(out.status.success(), "{}", stderr(&out));
    let snapshot = home.join("hub/models--test--tiny/snapshots");
    assert!(
        stdout(&out)
            .lines()
            .all(|line| Path::new(line).starts_with(&snapshot)),
        "{}",
        stdout(&out)
    );
    // Offline, from the cache alone, the server gone.
    let out = generate("http://127.0.0.1:9", true);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        serde_json::from_str::<Vec<String>>(&stdout(&out)).unwrap(),
        printed
    );
    // Offline with an empty cache: one line naming the cache and the missing file.
    let empty = home.join("empty");
    let out = gpt2_with_hub(
        &["tokenize", "--model", "test/tiny", "x"],
        &empty,
        "http://127.0.0.1:9",
        true,
    );
    assert_eq!(out.status.code(), Some(1));
    let message = stderr(&out);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(
        message.contains(&empty.join("hub").display().to_string())
            && message.contains("models--test--tiny/refs/main"),
        "{message}"
    );
    std::fs::remove_dir_all(&home).ok();
}

#[test]
fn stream_prints_one_sequence_as_it_grows_and_several_as_json_events() {
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let base = [
        "generate",
        "--model",
        model,
        "--input",
        "a b",
        "--max-length",
        "12",
    ];
    let expected = |extra: &[&str]| {
        let out = gpt2(&[&base[..], extra, &["--json"]].concat(), None);
        serde_json::from_str::<Vec<String>>(&stdout(&out)).unwrap()
    };

    let one = ["--seed", "3", "--num-return-sequences", "1"];
    let out = gpt2(&[&base[..], &one, &["--stream"]].concat(), None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{}\n", expected(&one)[0]));

    for several in [
        &["--seed", "3"][..],
        &["--mode", "beam", "--num-beams", "3"][..],
    ] {
        let out = gpt2(&[&base[..], several, &["--stream"]].concat(), None);
        assert!(out.status.success(), "{}", stderr(&out));
        let events: Vec<serde_json::Value> = stdout(&out)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let want = expected(several);
        let mut deltas = vec![String::from("a b"); want.len()];
        let mut ends = vec![String::new(); want.len()];
        for event in &events {
            let index = event["index"].as_u64().unwrap() as usize;
            match event.get("finish_reason") {
                Some(reason) => {
                    assert!(["length", "eos"].contains(&reason.as_str().unwrap()));
                    ends[index] = event["text"].as_str().unwrap().to_string();
                }
                None => deltas[index].push_str(event["text"].as_str().unwrap()),
            }
        }
        assert_eq!(ends, want, "{several:?}");
        if !several.contains(&"beam") {
            assert_eq!(
                deltas, want,
                "{several:?}: the deltas add up to each sequence"
            );
        }
    }

    let out = gpt2(&[&base[..], &["--stream", "--json"]].concat(), None);
    assert_eq!(out.status.code(), Some(2), "--stream and --json conflict");
}

/// `gpt2 generate` of 8 greedy tokens on the tiny model, with `extra` flags and `GPT2_ISA=isa`.
fn tiny_greedy_with_isa(extra: &[&str], isa: &str) -> Output {
    let model = tiny_model();
    Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--input",
            "a b",
        ])
        .args(["--mode", "greedy", "--json", "--max-length", "8"])
        .args(extra)
        .env("GPT2_ISA", isa)
        .output()
        .unwrap()
}

#[test]
fn gpt2_isa_pins_the_kernels_and_a_bad_value_is_a_usage_error() {
    let run = |isa: &str| tiny_greedy_with_isa(&[], isa);
    let portable = run("portable");
    assert!(portable.status.success(), "{}", stderr(&portable));
    let detected = run("");
    assert_eq!(
        stdout(&portable),
        stdout(&detected),
        "greedy text is the same on every path"
    );
    let bad = run("sse9");
    assert_eq!(bad.status.code(), Some(2));
    assert!(bad.stdout.is_empty());
    let message = stderr(&bad);
    assert!(
        message.contains("GPT2_ISA") && message.contains("portable"),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");
}

/// `GPT2_ISA=amx` runs the bf16 matmuls on AMX tiles where the CPU and kernel allow it (the same
/// greedy text as the `vdpbf16ps` path), and is refused with exit code 2 elsewhere.
#[test]
fn gpt2_isa_amx_runs_bf16_on_tiles_or_is_refused() {
    let run = |isa: &str| tiny_greedy_with_isa(&["--dtype", "bf16"], isa);
    let amx = run("amx");
    if gpt2_engine::Isa::Amx.is_supported() {
        assert!(amx.status.success(), "{}", stderr(&amx));
        let detected = run("");
        assert_eq!(stdout(&amx), stdout(&detected), "amx is the widest level");
        let portable = run("portable");
        assert!(portable.status.success(), "{}", stderr(&portable));
        assert_eq!(stdout(&amx), stdout(&portable), "greedy text on every path");
    } else {
        assert_eq!(amx.status.code(), Some(2), "{}", stderr(&amx));
        let message = stderr(&amx);
        assert!(message.contains("does not support"), "{message}");
    }
}
