//! Starts the built `gpt2-server` and talks raw HTTP/1.1 to it, so the tests exercise the
//! binary exactly as deployed.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running server; killed when dropped.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts the server on a free port with extra arguments and waits for `/ping`.
    pub fn start(extra_args: &[&str]) -> Self {
        Self::start_with_env(extra_args, &[])
    }

    pub fn start_with_env(extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut args = vec!["--host", "127.0.0.1", "--log-format", "json"];
        let explicit_port = extra_args.contains(&"--port")
            || env.iter().any(|(k, _)| *k == "SAGEMAKER_BIND_TO_PORT");
        if !explicit_port {
            args.extend(["--port", "0"]);
        }
        args.extend_from_slice(extra_args);
        let mut command = Command::new(env!("CARGO_BIN_EXE_gpt2-server"));
        command
            .args(&args)
            .env_remove("SAGEMAKER_BIND_TO_PORT")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("gpt2-server starts");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) {
                        if json["message"] == "listening" {
                            let addr = json["addr"].as_str().unwrap_or_default().to_string();
                            let port: u16 =
                                addr.rsplit(':').next().unwrap_or("0").parse().unwrap_or(0);
                            let _ = port_tx.send(port);
                        }
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let port = port_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server logs its address");
        let server = Self { child, port, logs };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(response) = server.try_request("GET", "/ping", &[], b"") {
                if response.status == 200 {
                    return server;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the server never answered /ping");
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        self.try_request(method, path, headers, body)
            .expect("HTTP exchange")
    }

    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<HttpResponse> {
        let mut stream = self.send(method, path, headers, body)?;
        read_response(&mut stream)
    }

    /// Sends a request and returns the open connection without reading the answer.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<TcpStream> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        Ok(stream)
    }

    /// POST a JSON body to /invocations.
    pub fn invoke(&self, body: &str) -> HttpResponse {
        self.request(
            "POST",
            "/invocations",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let started = Instant::now();
        while started.elapsed() < within {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts the error shape `{"error": "...", "error_type": "..."}` and returns both.
    pub fn error(&self) -> (String, String) {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        let json = self.json();
        let object = json.as_object().expect("an object");
        assert_eq!(object.len(), 2, "{json}");
        (
            json["error"]
                .as_str()
                .expect("error is a string")
                .to_string(),
            json["error_type"]
                .as_str()
                .expect("error_type is a string")
                .to_string(),
        )
    }
}

/// A raw connection to `server`, with a 30 s read timeout.
pub fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", server.port)).expect("the server accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("a read timeout");
    stream
}

pub fn read_response(stream: &mut TcpStream) -> std::io::Result<HttpResponse> {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..line_end]).trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        out.extend_from_slice(&data[start..start + size]);
        data = &data[start + size + 2..];
    }
    out
}

/// A request that keeps the demo model busy for a long time (until cancelled or its deadline).
pub const LONG_REQUEST: &str = r#"{"input": "Hello", "mode": "beam", "num_beams": 16, "num_return_sequences": 1, "no_repeat_ngram_size": 0, "max_length": 1024}"#;

/// Python with boto3 and requests, as `.ci/run` provides it.
pub fn python() -> String {
    std::env::var("GPT2_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// The AWS CLI, as `.ci/run` provides it.
pub fn aws() -> String {
    std::env::var("GPT2_TEST_AWS").unwrap_or_else(|_| "aws".to_string())
}

/// Runs a client and returns its output once it succeeded; a client that is missing or fails
/// fails the test (never skips it), with its output.
pub fn run_client(command: &mut Command, what: &str) -> std::process::Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what} could not be started ({e}); .ci/run installs it"));
    assert!(
        output.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `aws sagemaker-runtime invoke-endpoint` against `url` with a JSON `body`, writing the answer
/// to `out_file`; AWS CLI v2 also needs its raw-body flag. Credentials come from the caller.
pub fn aws_invoke_endpoint(url: &str, body: &str, out_file: &std::path::Path) -> Command {
    let version = Command::new(aws())
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("the AWS CLI could not be started ({e}); .ci/run installs it"));
    let version = String::from_utf8_lossy(&version.stdout).to_string()
        + &String::from_utf8_lossy(&version.stderr);
    let mut command = Command::new(aws());
    command.args([
        "sagemaker-runtime",
        "invoke-endpoint",
        "--endpoint-url",
        url,
        "--endpoint-name",
        "gpt-2",
        "--content-type",
        "application/json",
        "--body",
        body,
    ]);
    if version.contains("aws-cli/2") {
        command.args(["--cli-binary-format", "raw-in-base64-out"]);
    }
    command
        .arg(out_file)
        .env("AWS_EC2_METADATA_DISABLED", "true");
    command
}
