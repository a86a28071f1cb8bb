//! `docs/openapi.yaml`, the machine-readable description of the HTTP API: in step with the router
//! and the request schema (read here in Rust), valid OpenAPI 3.1 with examples that match their
//! schemas (openapi-spec-validator), and true of the live server (schemathesis, through
//! `tools/schemathesis.sh`).
//!
//! The Python checks need `openapi-spec-validator` and `schemathesis` in the python of
//! `GPT2_TEST_PYTHON` (default `python3`); `.ci/run` installs them in `target/client-venv`. They
//! fail, not skip, when those packages are missing.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use gpt2_engine::{GenerationRequest, Limits};
use serde_json::Value;
use support::{python, Server};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn spec() -> String {
    read("docs/openapi.yaml")
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The lines nested under the first line that reads `key:` at `at` spaces of indentation.
fn block<'a>(lines: &[&'a str], at: usize, key: &str) -> Vec<&'a str> {
    let header = format!("{}{key}:", " ".repeat(at));
    let start = lines
        .iter()
        .position(|l| l.trim_end() == header)
        .unwrap_or_else(|| panic!("docs/openapi.yaml has no `{header}`"));
    lines[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > at)
        .copied()
        .collect()
}

/// The keys of a YAML mapping block whose entries sit at `at` spaces (comments skipped).
fn keys(lines: &[&str], at: usize) -> Vec<String> {
    lines
        .iter()
        .filter(|l| indent(l) == at && !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            l.trim()
                .split_once(':')
                .map(|(k, _)| k.trim_matches('\'').to_string())
        })
        .collect()
}

/// Every path of the description, with its operations' methods.
fn spec_operations(spec: &str) -> BTreeMap<String, BTreeSet<String>> {
    let lines: Vec<&str> = spec.lines().collect();
    let paths = block(&lines, 0, "paths");
    keys(&paths, 2)
        .into_iter()
        .map(|path| {
            let methods = keys(&block(&paths, 2, &path), 4)
                .into_iter()
                .filter(|k| !matches!(k.as_str(), "parameters" | "summary" | "description"))
                .collect();
            (path, methods)
        })
        .collect()
}

/// The request body's fields, with the scalar `default:` of those that have one.
fn spec_request_fields(spec: &str) -> BTreeMap<String, Option<String>> {
    let lines: Vec<&str> = spec.lines().collect();
    let schemas = block(&block(&lines, 0, "components"), 2, "schemas");
    let request = block(&schemas, 4, "GenerationRequest");
    let properties = block(&request, 6, "properties");
    keys(&properties, 8)
        .into_iter()
        .map(|field| {
            let default = block(&properties, 8, &field).iter().find_map(|l| {
                l.trim()
                    .strip_prefix("default:")
                    .map(|v| v.trim().to_string())
            });
            (field, default)
        })
        .collect()
}

/// The string literal that follows `prefix` in `text`, at each of its occurrences.
fn literals_after(text: &str, prefix: &str) -> Vec<String> {
    text.match_indices(prefix)
        .filter_map(|(at, _)| {
            let rest = &text[at + prefix.len()..];
            let end = rest.find('"')?;
            Some(rest[..end].to_string())
        })
        .collect()
}

#[test]
fn the_description_lists_every_route_of_the_router() {
    let routes = read("bins/gpt2-server/src/routes.rs");
    let mut router: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (at, _) in routes.match_indices(".route(") {
        // `.route("/path", post(handler))`, on one line or several.
        let call = &routes[at + ".route(".len()..];
        let call = &call[..call.find(")\n").unwrap_or(call.len())];
        let path = literals_after(call, "\"")[0].clone();
        let methods = ["get", "post", "put", "patch", "delete"]
            .into_iter()
            .filter(|m| {
                call.match_indices(&format!("{m}("))
                    .any(|(i, _)| !call[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
            })
            .map(str::to_string);
        router.entry(path).or_default().extend(methods);
    }
    assert!(router.len() >= 5, "routes.rs parsed: {router:?}");

    let described = spec_operations(&spec());
    let described_paths: BTreeSet<&String> = described.keys().collect();
    let router_paths: BTreeSet<&String> = router.keys().collect();
    assert_eq!(
        described_paths, router_paths,
        "docs/openapi.yaml's paths are the router's"
    );
    for (path, methods) in &router {
        let in_spec = &described[path];
        for method in methods {
            assert!(
                in_spec.contains(method),
                "docs/openapi.yaml lacks {method} {path}"
            );
        }
        for method in in_spec {
            // axum answers HEAD wherever it answers GET.
            let served = methods.contains(method) || (method == "head" && methods.contains("get"));
            assert!(
                served,
                "docs/openapi.yaml describes {method} {path}, which the router does not serve"
            );
        }
    }
}

#[test]
fn the_description_lists_every_request_field_with_its_default_and_limits() {
    let fields = spec_request_fields(&spec());

    // Every field the validation reads ...
    let schema = read("crates/gpt2-schema/src/lib.rs");
    let mut parsed: BTreeSet<String> = literals_after(&schema, "present(\"").into_iter().collect();
    parsed.extend(literals_after(&schema, "object.get(\""));
    // ... and every field of the validated request.
    let defaults = serde_json::to_value(GenerationRequest::builder("x").build().unwrap()).unwrap();
    let mut defaults = defaults.as_object().unwrap().clone();
    // max_length is left out of the serialization at its default (it excludes max_new_tokens).
    assert!(defaults.get("max_length").is_none());
    defaults.insert("max_length".into(), serde_json::json!(100));
    let defaults = &defaults;
    let struct_fields: BTreeSet<String> = defaults.keys().cloned().collect();
    let described: BTreeSet<String> = fields.keys().cloned().collect();
    assert!(parsed.len() >= 10, "gpt2-schema parsed: {parsed:?}");
    assert_eq!(
        described, parsed,
        "docs/openapi.yaml's request fields are those validated"
    );
    assert_eq!(
        described, struct_fields,
        "docs/openapi.yaml's request fields are GenerationRequest's"
    );

    // The defaults the description states are the contract's.
    for (field, default) in defaults {
        let stated = fields[field].as_deref();
        match (field.as_str(), default) {
            ("input", _) => assert_eq!(stated, None, "input is required, it has no default"),
            // No default: absent (max_new_tokens) or random (seed).
            (_, Value::Null) => assert_eq!(stated, None, "{field} has no default"),
            // Empty lists and maps (stop, logit_bias): none given.
            (_, Value::Array(a)) if a.is_empty() => assert_eq!(stated, None, "{field}"),
            (_, Value::Object(o)) if o.is_empty() => assert_eq!(stated, None, "{field}"),
            (_, Value::String(s)) => assert_eq!(stated, Some(s.as_str()), "{field}'s default"),
            (_, Value::Bool(b)) => {
                assert_eq!(stated, Some(b.to_string().as_str()), "{field}'s default")
            }
            (_, Value::Number(n)) => {
                let stated: f64 = stated
                    .unwrap_or_else(|| panic!("docs/openapi.yaml states no default for {field}"))
                    .parse()
                    .unwrap();
                // Floats are f32 in the request: compare at that precision.
                assert_eq!(
                    stated as f32,
                    n.as_f64().unwrap() as f32,
                    "{field}'s default"
                );
            }
            (_, other) => panic!("{field}: unexpected default {other}"),
        }
    }

    // The per-request caps are the server's default limits.
    let lines: Vec<String> = spec().lines().map(str::to_string).collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let properties = block(
        &block(
            &block(&block(&lines, 0, "components"), 2, "schemas"),
            4,
            "GenerationRequest",
        ),
        6,
        "properties",
    );
    let maximum = |field: &str| -> usize {
        block(&properties, 8, field)
            .iter()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("maximum:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("docs/openapi.yaml states no maximum for {field}"))
    };
    let limits = Limits::default();
    assert_eq!(maximum("num_beams"), limits.max_num_beams);
    assert_eq!(
        maximum("num_return_sequences"),
        limits.max_num_return_sequences
    );
    assert_eq!(maximum("max_length"), u32::MAX as usize);
    assert_eq!(maximum("max_new_tokens"), u32::MAX as usize);
}

#[test]
fn the_description_lists_every_error_type_the_server_answers() {
    let mut kinds: BTreeSet<String> = BTreeSet::new();
    // Every source file, in modules' directories too (`openai/`, `head_guard/`).
    let mut pending = vec![repo_root().join("bins/gpt2-server/src")];
    let mut sources = Vec::new();
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                sources.push(path);
            }
        }
    }
    assert!(sources.iter().any(|p| p.ends_with("head_guard/refusal.rs")));
    for path in sources {
        let text = std::fs::read_to_string(&path).unwrap();
        // `ApiError::new(StatusCode::X, "kind", ...)`, however formatted.
        for (at, _) in text.match_indices("StatusCode::") {
            let rest = &text[at..];
            let Some(comma) = rest.find(',') else {
                continue;
            };
            let after = rest[comma + 1..].trim_start();
            if let Some(literal) = after.strip_prefix('"') {
                kinds.insert(literal[..literal.find('"').unwrap()].to_string());
            }
        }
    }
    // The request errors' kinds (`RequestError::kind`).
    let schema = read("crates/gpt2-schema/src/lib.rs");
    let kind_fn = &schema[schema.find("pub fn kind(").expect("RequestError::kind")..];
    let kind_fn = &kind_fn[..kind_fn.find("\n    }\n").unwrap()];
    kinds.extend(literals_after(kind_fn, "=> \""));
    // 499 is only ever logged: its client has gone.
    kinds.remove("client_disconnected");
    assert!(kinds.len() >= 10, "error kinds parsed: {kinds:?}");

    let spec = spec();
    let lines: Vec<&str> = spec.lines().collect();
    let error = block(
        &block(&block(&lines, 0, "components"), 2, "schemas"),
        4,
        "Error",
    );
    let described: BTreeSet<String> = block(&error, 8, "error_type")
        .iter()
        .filter_map(|l| l.trim().strip_prefix("- ").map(str::to_string))
        .collect();
    assert_eq!(
        described, kinds,
        "docs/openapi.yaml's error_type values are the server's"
    );
}

fn run_python(args: &[&str]) -> Output {
    Command::new(python())
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (GPT2_TEST_PYTHON): {e}", python()))
}

fn require_module(module: &str, package: &str) {
    let output = run_python(&["-c", &format!("import {module}")]);
    assert!(
        output.status.success(),
        "{} cannot import {module}: install the PyPI package `{package}` there (.ci/run installs it \
         into target/client-venv) or point GPT2_TEST_PYTHON at a python that has it\n{}",
        python(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Checks, with the validator's own JSON Schema library, that each example in the description
/// matches the schema it illustrates.
const EXAMPLES_MATCH_THEIR_SCHEMAS: &str = r##"
import sys, yaml, jsonschema
spec = yaml.safe_load(open(sys.argv[1]))
bad, checked = [], 0
def check(schema, value, where):
    global checked
    checked += 1
    root = {"components": spec["components"], "allOf": [schema]}
    for error in jsonschema.Draft202012Validator(root).iter_errors(value):
        bad.append(f"{where}: {error.message}")
def walk(node, where):
    if isinstance(node, dict):
        if "schema" in node:
            if "example" in node:
                check(node["schema"], node["example"], where)
            for name, example in (node.get("examples") or {}).items():
                if isinstance(example, dict) and "value" in example:
                    check(node["schema"], example["value"], f"{where}/examples/{name}")
        elif isinstance(node.get("examples"), list):
            for i, example in enumerate(node["examples"]):
                check(node, example, f"{where}/examples/{i}")
        for key, value in node.items():
            walk(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            walk(value, f"{where}/{i}")
walk(spec, "#")
print(f"{checked} examples checked")
if bad or checked < 30:
    sys.exit("\n".join(bad) or "too few examples found")
"##;

#[test]
fn the_description_is_valid_openapi_3_1() {
    require_module("openapi_spec_validator", "openapi-spec-validator");
    let output = run_python(&[
        "-m",
        "openapi_spec_validator",
        "--schema",
        "3.1",
        "docs/openapi.yaml",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("OK"),
        "openapi-spec-validator rejects docs/openapi.yaml:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let output = run_python(&["-c", EXAMPLES_MATCH_THEIR_SCHEMAS, "docs/openapi.yaml"]);
    assert!(
        output.status.success(),
        "docs/openapi.yaml's examples do not match their schemas:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Schemathesis against the built server, bounded: every generation answers within the 1 s
/// deadline (a described 504 otherwise), the examples, the whole coverage phase (every boundary
/// and type violation of every field, every undocumented method) and 12 fuzzed cases per
/// operation run with a fixed seed (`SCHEMATHESIS_SEED` overrides it), and the run is killed, and
/// fails, past 150 s. About 40 s on 2 cores.
#[test]
fn schemathesis_finds_no_server_error_and_no_answer_that_breaks_the_description() {
    require_module("schemathesis", "schemathesis");
    let server = Server::start(&["--deadline-secs", "1"]);
    let started = Instant::now();
    let output = Command::new("bash")
        .arg(repo_root().join("tools/schemathesis.sh"))
        .arg(server.url())
        .env("GPT2_TEST_PYTHON", python())
        .env("SCHEMATHESIS_MAX_EXAMPLES", "12")
        .env("SCHEMATHESIS_TIME_LIMIT", "150")
        .env("SCHEMATHESIS_REQUEST_TIMEOUT", "15")
        .env_remove("SCHEMATHESIS_MAX_TIME")
        .env(
            "SCHEMATHESIS_SEED",
            std::env::var("SCHEMATHESIS_SEED").unwrap_or("1".into()),
        )
        .current_dir(repo_root())
        .output()
        .expect("bash runs tools/schemathesis.sh");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found answers that break docs/openapi.yaml (exit {:?}, {:?}):\n{report}",
        output.status.code(),
        started.elapsed()
    );
    // A run that generated next to nothing would pass without checking anything.
    let generated: u64 = report
        .lines()
        .find_map(|l| {
            // "1500 generated, 1500 passed" (warnings may say "generated" too).
            l.trim()
                .split_once(" generated")
                .and_then(|(n, _)| n.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no test case count in the report:\n{report}"));
    assert!(
        generated >= 100,
        "only {generated} test cases ran:\n{report}"
    );
    eprintln!(
        "schemathesis: {generated} test cases in {:?}, no failures",
        started.elapsed()
    );

    // The server survived it: still healthy, and no panic in its log.
    let ping = server.request("GET", "/ping", &[], b"");
    assert_eq!(ping.status, 200);
    std::thread::sleep(Duration::from_millis(100));
    let panics: Vec<String> = server
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("panicked"))
        .collect();
    assert!(panics.is_empty(), "the server panicked: {panics:?}");
}
