//! A local stand-in for the Hugging Face Hub, for tests that must never reach the internet: it
//! serves directories as repositories in the Hub's URL layout, with the headers `hf-hub` reads.
//! Shared by the tests of gpt2-hub, gpt2-cli and gpt2-server (`#[path]`-included).
//!
//! - `GET /api/models/{org}/{name}/revision/{rev}`: `{"sha", "siblings": [{"rfilename"}]}`;
//! - `GET /{org}/{name}/resolve/{rev}/{file}`: the file with `x-repo-commit` and `etag`, ranged
//!   (`Range: bytes=a-b` gives 206 and `Content-Range`); weight files (`*.safetensors`, `*.bin`)
//!   answer 302 to `/cdn/...` with `x-linked-etag`, as the Hub does for LFS files;
//! - anything else: 404.
//!
//! `{rev}` is `main` or the repository's commit; every request is counted.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A running hub (its thread ends with the test process).
pub struct HubServer {
    /// `http://127.0.0.1:{port}`.
    pub endpoint: String,
    requests: Arc<AtomicUsize>,
}

/// A repository: its id and the directory whose files it publishes.
#[derive(Clone)]
pub struct HubRepo {
    pub id: String,
    pub dir: PathBuf,
}

impl HubRepo {
    pub fn new(id: &str, dir: PathBuf) -> Self {
        Self {
            id: id.to_string(),
            dir,
        }
    }

    /// A fixed fake commit hash derived from the id.
    pub fn commit(&self) -> String {
        let hash = fnv(self.id.as_bytes());
        format!(
            "{hash:016x}{:016x}{:08x}",
            hash.rotate_left(17),
            hash as u32
        )
    }

    fn files(&self) -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.path().is_file())
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }
}

/// The fixtures directory of the workspace.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/models"
    ))
    .join(name)
}

/// A fresh empty directory under the system temp directory.
pub fn temp_dir(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "gpt2-hub-test-{}-{}-{name}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An endpoint where nothing listens (connections are refused at once).
pub fn unreachable_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

impl HubServer {
    pub fn start(repos: Vec<HubRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                let repos = repos.clone();
                std::thread::spawn(move || {
                    let _ = handle(stream, &repos, port);
                });
            }
        });
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            requests,
        }
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct Answer {
    status: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn not_found() -> Answer {
    Answer {
        status: "404 Not Found",
        headers: vec![("x-error-code".into(), "RepoNotFound".into())],
        body: b"{\"error\":\"Repository Not Found\"}".to_vec(),
    }
}

fn handle(mut stream: TcpStream, repos: &[HubRepo], port: u16) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&request).to_string();
    let mut lines = head.lines();
    let path = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or_default()
        .to_string();
    let range = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("range")
            .then(|| value.trim().to_string())
    });
    let answer = route(&path, range.as_deref(), repos, port);
    let mut out = format!("HTTP/1.1 {}\r\n", answer.status);
    for (name, value) in &answer.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        answer.body.len()
    ));
    stream.write_all(out.as_bytes())?;
    stream.write_all(&answer.body)?;
    stream.flush()
}

fn route(path: &str, range: Option<&str>, repos: &[HubRepo], port: u16) -> Answer {
    if let Some(rest) = path.strip_prefix("/api/models/") {
        for repo in repos {
            if let Some(rev) = rest
                .strip_prefix(&format!("{}/revision/", repo.id))
                .filter(|rev| *rev == "main" || *rev == repo.commit())
            {
                let _ = rev;
                let siblings: Vec<serde_json::Value> = repo
                    .files()
                    .into_iter()
                    .map(|f| serde_json::json!({ "rfilename": f }))
                    .collect();
                let body = serde_json::json!({ "sha": repo.commit(), "siblings": siblings });
                return Answer {
                    status: "200 OK",
                    headers: vec![("Content-Type".into(), "application/json".into())],
                    body: body.to_string().into_bytes(),
                };
            }
        }
        return not_found();
    }
    if let Some(rest) = path.strip_prefix("/cdn/") {
        // /cdn/{commit}/{file}
        let Some((commit, file)) = rest.split_once('/') else {
            return not_found();
        };
        let Some(repo) = repos.iter().find(|r| r.commit() == commit) else {
            return not_found();
        };
        return serve_file(repo, file, range, false, port);
    }
    for repo in repos {
        let prefix = format!("/{}/resolve/", repo.id);
        let Some(rest) = path.strip_prefix(&prefix) else {
            continue;
        };
        let Some((rev, file)) = rest.split_once('/') else {
            return not_found();
        };
        if rev != "main" && rev != repo.commit() {
            return not_found();
        }
        return serve_file(repo, file, range, true, port);
    }
    not_found()
}

fn serve_file(repo: &HubRepo, file: &str, range: Option<&str>, resolve: bool, port: u16) -> Answer {
    if file.contains('/') || file.contains("..") || !repo.dir.join(file).is_file() {
        return Answer {
            status: "404 Not Found",
            headers: vec![
                ("x-error-code".into(), "EntryNotFound".into()),
                ("x-repo-commit".into(), repo.commit()),
            ],
            body: Vec::new(),
        };
    }
    let body = std::fs::read(repo.dir.join(file)).unwrap_or_default();
    let etag = format!("\"{:016x}{:08x}\"", fnv(&body), body.len());
    let lfs = file.ends_with(".safetensors") || file.ends_with(".bin");
    if resolve && lfs {
        return Answer {
            status: "302 Found",
            headers: vec![
                ("x-repo-commit".into(), repo.commit()),
                ("x-linked-etag".into(), etag),
                ("x-linked-size".into(), body.len().to_string()),
                (
                    "Location".into(),
                    format!("http://127.0.0.1:{port}/cdn/{}/{file}", repo.commit()),
                ),
            ],
            body: Vec::new(),
        };
    }
    let mut headers = vec![("etag".to_string(), etag)];
    if resolve {
        headers.push(("x-repo-commit".into(), repo.commit()));
    }
    let total = body.len();
    let bounds = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(start, end)| {
            let start: usize = start.parse().ok()?;
            let end: usize = if end.is_empty() {
                total.checked_sub(1)?
            } else {
                end.parse::<usize>().ok()?.min(total.checked_sub(1)?)
            };
            (start <= end).then_some((start, end))
        });
    match bounds {
        Some((start, end)) => {
            headers.push((
                "Content-Range".into(),
                format!("bytes {start}-{end}/{total}"),
            ));
            Answer {
                status: "206 Partial Content",
                headers,
                body: body[start..=end].to_vec(),
            }
        }
        None => Answer {
            status: "200 OK",
            headers,
            body,
        },
    }
}
