//! The playground, `GET /`, through the built binary: its headers and its authentication
//! exemption over raw HTTP, then the page itself in a real headless Chromium driven by Playwright
//! (`tools/playground_check.py`): type a prompt, run it, see the text stream in, stop one.
//!
//! The browser test needs Debian's `chromium` (at `GPT2_TEST_CHROMIUM`, default
//! `/usr/bin/chromium`) and the PyPI package `playwright` in the python of `GPT2_TEST_PYTHON`
//! (default `python3`); `.ci/install-browser` installs both. Without them it is skipped, with a
//! message, unless `GPT2_REQUIRE_BROWSER` is set (as `.ci/run` sets it): then it fails.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{python, run_client, Server};

const KEY: &str = "playground-test-key";
const BODY: &str = r#"{"input": "Hello", "max_length": 8, "seed": 3}"#;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_page_is_served_self_contained_with_a_strict_policy() {
    let server = Server::start(&[]);
    let page = server.request("GET", "/", &[], b"");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(page.header("cache-control"), Some("no-cache"));
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert!(page.header("x-request-id").is_some());
    let csp = page
        .header("content-security-policy")
        .expect("a Content-Security-Policy");
    assert!(csp.starts_with("default-src 'self';"), "{csp}");
    for directive in [
        "script-src 'sha256-",
        "style-src 'sha256-",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    let html = String::from_utf8(page.body.clone()).expect("UTF-8");
    assert!(html.starts_with("<!doctype html>"), "{}", &html[..80]);
    assert!(html.contains("<title>gpt2-server playground</title>"));
    let length: usize = page
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .expect("a Content-Length");
    assert_eq!(length, page.body.len());

    // HEAD: the same headers, no body.
    let head = server.request("HEAD", "/", &[], b"");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-security-policy"), Some(csp));
    assert!(head.body.is_empty());

    // Only GET and HEAD; other paths are still 404.
    let post = server.request("POST", "/", &[], b"");
    assert_eq!(post.status, 405);
    assert_eq!(post.error().1, "method_not_allowed");
    assert_eq!(server.request("GET", "/index.html", &[], b"").status, 404);
}

#[test]
fn the_page_loads_without_credentials_while_the_api_still_needs_them() {
    let server = Server::start(&["--api-key", KEY]);
    let json = ("Content-Type", "application/json");
    assert_eq!(server.request("GET", "/", &[], b"").status, 200);
    assert_eq!(server.request("HEAD", "/", &[], b"").status, 200);
    let refused = server.request("POST", "/invocations", &[json], BODY.as_bytes());
    assert_eq!(refused.status, 401);
    assert_eq!(refused.error().1, "unauthorized");
    // Another method on `/` is not exempt, nor is any other page.
    assert_eq!(server.request("POST", "/", &[], b"").status, 401);
    assert_eq!(server.request("GET", "/index.html", &[], b"").status, 401);
    assert_eq!(server.request("GET", "/metrics", &[], b"").status, 401);
    let bearer = format!("Bearer {KEY}");
    let ok = server.request(
        "POST",
        "/invocations",
        &[json, ("Authorization", &bearer)],
        BODY.as_bytes(),
    );
    assert_eq!(ok.status, 200);
}

/// Why the browser test cannot run here, if it cannot.
fn browser_missing(chromium: &Path) -> Option<String> {
    if !chromium.is_file() {
        return Some(format!(
            "no Chromium at {} (apt-get install chromium, or set GPT2_TEST_CHROMIUM)",
            chromium.display()
        ));
    }
    match Command::new(python())
        .args(["-c", "import playwright.sync_api"])
        .output()
    {
        Ok(output) if output.status.success() => None,
        Ok(output) => Some(format!(
            "{} cannot import playwright (pip install playwright): {}",
            python(),
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(e) => Some(format!("{} cannot be started: {e}", python())),
    }
}

#[test]
fn the_playground_streams_stops_and_gives_a_working_curl_command_in_chromium() {
    let chromium = PathBuf::from(
        std::env::var("GPT2_TEST_CHROMIUM")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "/usr/bin/chromium".to_string()),
    );
    if let Some(why) = browser_missing(&chromium) {
        let required = std::env::var_os("GPT2_REQUIRE_BROWSER").is_some_and(|v| !v.is_empty());
        assert!(
            !required,
            "GPT2_REQUIRE_BROWSER is set but {why}; .ci/install-browser installs them"
        );
        eprintln!(
            "SKIPPED the_playground_streams_stops_and_gives_a_working_curl_command_in_chromium: \
             {why}. .ci/install-browser installs Chromium and Playwright; set \
             GPT2_REQUIRE_BROWSER=1 to make this a failure."
        );
        return;
    }

    // With an API key, so the page's key field is exercised too.
    let server = Server::start(&["--api-key", KEY]);
    let started = Instant::now();
    let output = run_client(
        Command::new(python())
            .arg(repo_root().join("tools/playground_check.py"))
            .arg(server.url())
            .args(["--api-key", KEY])
            .arg("--chromium")
            .arg(&chromium)
            .current_dir(repo_root()),
        "tools/playground_check.py (python with playwright, and chromium)",
    );
    let summary = String::from_utf8_lossy(&output.stdout);
    eprintln!("playground_check.py in {:?}: {summary}", started.elapsed());
    let summary: serde_json::Value = serde_json::from_str(summary.trim())
        .unwrap_or_else(|e| panic!("{e}: the script's summary is not JSON: {summary}"));
    assert_eq!(summary["stop"]["queue_depth_after"], 0.0);

    // The stopped stream's generation was cancelled, as the server's log says.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let abandoned = server.log_lines().iter().any(|line| {
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|json| {
                json["message"]
                    == "streamed invocation abandoned by the client; its generation stops"
                    && json["status"] == 499
            })
        });
        if abandoned {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no log line shows the stopped stream's cancellation:\n{}",
            server.log_lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let panics: Vec<String> = server
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("panicked"))
        .collect();
    assert!(panics.is_empty(), "the server panicked: {panics:?}");
}
