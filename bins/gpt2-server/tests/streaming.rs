//! Streamed answers, end to end: server-sent events on the invocation routes (read by Python
//! `requests` and raw HTTP), the AWS event-stream route as boto3's
//! `invoke_endpoint_with_response_stream` reads it, split UTF-8 characters, a client that goes
//! away mid-stream, errors before and after the stream starts. A missing client fails the test,
//! never skips it (`.ci/run` installs boto3 and requests).

mod support;

use std::io::Read;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{python, run_client, HttpResponse, Server};

const JSON: [(&str, &str); 1] = [("Content-Type", "application/json")];

/// One seeded request per mode, small enough for the demo model in a debug build.
const BODIES: [&str; 5] = [
    r#"{"input": "This is an input text", "mode": "sample-top-p", "seed": 7, "max_length": 16, "num_return_sequences": 3}"#,
    r#"{"input": "This is an input text", "mode": "sample-top-k", "seed": 8, "max_length": 16, "num_return_sequences": 2}"#,
    r#"{"input": "This is an input text", "mode": "sample", "temperature": 1.3, "seed": 9, "max_length": 16, "num_return_sequences": 3}"#,
    r#"{"input": "This is an input text", "mode": "greedy", "max_length": 16, "num_return_sequences": 2}"#,
    r#"{"input": "This is an input text", "mode": "beam", "num_beams": 3, "max_length": 14, "num_return_sequences": 2}"#,
];

/// The non-streamed answer, from the library.
fn expected(body: &str) -> Vec<String> {
    gpt2_engine::Pipeline::demo()
        .generate_json(body.as_bytes())
        .unwrap()
}

/// The JSON lines a script printed.
fn json_lines(output: &Output) -> Vec<Value> {
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

fn dummy_aws_env(command: &mut Command) -> &mut Command {
    command
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
}

/// The payloads of an SSE body: every event is exactly one `data: ` line ended by a blank line.
fn sse_data(text: &str) -> Vec<String> {
    assert!(
        text.ends_with("\n\n"),
        "events end with a blank line: {text:?}"
    );
    text[..text.len() - 2]
        .split("\n\n")
        .map(|event| {
            assert!(!event.contains('\n'), "one line per event: {event:?}");
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {event:?}"))
                .to_string()
        })
        .collect()
}

/// The payloads of the lines Python's `iter_lines` read: `data: ` lines, each followed by the
/// blank line that ends its event.
fn sse_lines(lines: &[Value]) -> Vec<String> {
    let lines: Vec<&str> = lines.iter().map(|l| l.as_str().unwrap()).collect();
    assert!(lines.len().is_multiple_of(2), "{lines:?}");
    lines
        .chunks(2)
        .map(|event| {
            assert_eq!(event[1], "", "a blank line ends each event: {lines:?}");
            event[0]
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {:?}", event[0]))
                .to_string()
        })
        .collect()
}

/// Checks a complete stream against the non-streamed answer `expected`: every payload is JSON
/// but the final `[DONE]`; token events carry `{id, text, logprob}`; each sequence ends exactly
/// once, with its last token (or alone in beam mode), with a finish reason and its whole string;
/// and the prompt followed by a sequence's token texts is that string.
fn check_stream(data: &[String], body: &str, expected: &[String]) {
    let request: Value = serde_json::from_str(body).unwrap();
    let prompt = request["input"].as_str().unwrap();
    let beam = request["mode"] == "beam";
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let mut deltas = vec![String::new(); expected.len()];
    let mut ends: Vec<Option<String>> = vec![None; expected.len()];
    for payload in &data[..data.len() - 1] {
        let event: Value = serde_json::from_str(payload)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {payload:?} in {body}"));
        assert!(event.get("error").is_none(), "{payload}");
        let index = event["index"].as_u64().expect("an index") as usize;
        assert!(index < expected.len(), "{payload}");
        assert!(
            ends[index].is_none(),
            "nothing after a sequence's end: {payload}"
        );
        match event.get("token") {
            Some(token) => {
                assert!(!beam, "beam mode sends no tokens: {payload}");
                assert!(token["id"].is_u64(), "{payload}");
                assert!(
                    token["logprob"].is_null() || token["logprob"].as_f64().unwrap() <= 0.0,
                    "{payload}"
                );
                deltas[index].push_str(token["text"].as_str().expect("a text"));
            }
            None => {
                assert!(
                    beam,
                    "outside beam mode a sequence ends with its last token: {payload}"
                );
                assert_eq!(event.as_object().unwrap().len(), 3, "{payload}");
            }
        }
        if let Some(text) = event.get("generated_text") {
            let reason = event["finish_reason"].as_str().expect("a finish reason");
            assert!(["length", "eos", "stop"].contains(&reason), "{payload}");
            ends[index] = Some(text.as_str().unwrap().to_string());
        } else {
            assert!(event.get("finish_reason").is_none(), "{payload}");
        }
    }
    let ends: Vec<String> = ends
        .into_iter()
        .map(|end| end.expect("every sequence ends"))
        .collect();
    assert_eq!(
        ends, expected,
        "generated_text is the non-streamed answer: {body}"
    );
    if !beam {
        let streamed: Vec<String> = deltas.iter().map(|d| format!("{prompt}{d}")).collect();
        assert_eq!(streamed, expected, "the deltas add up: {body}");
    }
}

/// Whether a server log line (JSON) has these fields.
fn logged(server: &Server, fields: &[(&str, Value)]) -> bool {
    server.log_lines().iter().any(|line| {
        let json: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        fields.iter().all(|(name, value)| &json[*name] == value)
    })
}

/// Waits (bounded) for a log line with these fields.
fn wait_for_log(server: &Server, fields: &[(&str, Value)]) {
    let started = Instant::now();
    while !logged(server, fields) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no log line with {fields:?}:\n{}",
            server.log_lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn boto3_response_stream_matches_the_plain_answer_in_every_mode() {
    let server = Server::start(&[]);
    let script = r#"
import json, sys, boto3
client = boto3.client("sagemaker-runtime", endpoint_url=sys.argv[1], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
for body in json.loads(sys.argv[2]):
    plain = client.invoke_endpoint(EndpointName="gpt-2", ContentType="application/json", Body=body)
    response = client.invoke_endpoint_with_response_stream(
        EndpointName="gpt-2", ContentType="application/json", Body=body)
    parts = []
    for event in response["Body"]:
        assert list(event) == ["PayloadPart"], event
        parts.append(event["PayloadPart"]["Bytes"].decode("utf-8"))
    print(json.dumps({"plain": json.loads(plain["Body"].read()),
                      "content_type": response["ContentType"], "parts": parts}))
"#;
    let bodies = serde_json::to_string(&BODIES).unwrap();
    let out = run_client(
        dummy_aws_env(Command::new(python()).args(["-c", script, &server.url(), &bodies])),
        "python with boto3",
    );
    let results = json_lines(&out);
    assert_eq!(results.len(), BODIES.len());
    for (body, result) in BODIES.iter().zip(&results) {
        let expected = expected(body);
        assert_eq!(result["plain"], serde_json::json!(expected), "{body}");
        assert_eq!(result["content_type"], "text/event-stream", "{body}");
        // Each PayloadPart carries exactly one whole event.
        let parts: Vec<String> = result["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|part| {
                let part = part.as_str().unwrap();
                assert_eq!(sse_data(part).len(), 1, "one event per part: {part:?}");
                part.to_string()
            })
            .collect();
        check_stream(&sse_data(&parts.concat()), body, &expected);
    }
}

#[test]
fn sse_read_by_python_requests_matches_the_plain_answer_in_every_mode() {
    let server = Server::start(&[]);
    let script = r#"
import json, sys, requests
url = sys.argv[1]
variants = [("/invocations", "body"), ("/invocations", "accept"),
            ("/endpoints/x/invocations", "body"), ("/endpoints/x/invocations", "accept")]
for i, body in enumerate(json.loads(sys.argv[2])):
    plain = requests.post(url + "/invocations", json=json.loads(body), timeout=60)
    print(json.dumps({"body": i, "how": "plain", "status": plain.status_code,
                      "content_type": plain.headers["Content-Type"], "plain": plain.json()}))
    for path, how in variants + ([("/invocations", "sagemaker-accept")] if i == 0 else []):
        payload, headers = json.loads(body), {}
        if how == "body":
            payload["stream"] = True
        elif how == "accept":
            headers["Accept"] = "text/event-stream"
        else:
            headers["X-Amzn-SageMaker-Accept"] = "text/event-stream"
        with requests.post(url + path, json=payload, headers=headers, stream=True, timeout=60) as r:
            lines = [line.decode("utf-8") for line in r.iter_lines()]
        print(json.dumps({"body": i, "path": path, "how": how, "status": r.status_code,
                          "content_type": r.headers.get("Content-Type"),
                          "transfer_encoding": r.headers.get("Transfer-Encoding"), "lines": lines}))
"#;
    let bodies = serde_json::to_string(&BODIES).unwrap();
    let out = run_client(
        Command::new(python()).args(["-c", script, &server.url(), &bodies]),
        "python with requests",
    );
    let results = json_lines(&out);
    assert_eq!(results.len(), BODIES.len() * 5 + 1, "{results:?}");
    let mut streamed = 0;
    for result in &results {
        let body = BODIES[result["body"].as_u64().unwrap() as usize];
        let expected = expected(body);
        assert_eq!(result["status"], 200, "{result}");
        if result["how"] == "plain" {
            assert_eq!(result["content_type"], "application/json", "{result}");
            assert_eq!(result["plain"], serde_json::json!(expected), "{body}");
            continue;
        }
        streamed += 1;
        assert_eq!(result["content_type"], "text/event-stream", "{result}");
        assert_eq!(result["transfer_encoding"], "chunked", "{result}");
        let data = sse_lines(result["lines"].as_array().unwrap());
        check_stream(&data, body, &expected);
    }
    assert_eq!(streamed, BODIES.len() * 4 + 1);
    // Streamed requests log their line with `stream` and the time to the first token.
    let stream_lines: Vec<Value> = server
        .log_lines()
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|json| json["message"] == "invocation" && json["stream"] == true)
        .collect();
    assert_eq!(stream_lines.len(), streamed, "{stream_lines:?}");
    for line in &stream_lines {
        assert_eq!(line["status"], 200, "{line}");
        assert!(line["first_token_ms"].is_u64(), "{line}");
        assert!(
            line["total_ms"].as_u64() >= line["first_token_ms"].as_u64(),
            "{line}"
        );
        // Beam mode sends no token events, but its sequences' tokens are counted all the same.
        assert!(line["generated_tokens"].as_u64() > Some(0), "{line}");
        assert!(line["generation_ms"].is_u64(), "{line}");
    }
}

/// A seeded request of the demo model (found by searching seeds) whose first sequence samples
/// token 12045 as its 24th token: the bytes of "ー" (U+30FC) followed by the first two bytes of
/// another three-byte character. The token ends inside a character, so its text is held back
/// ("") and goes out with the next token, 36449 (" ROB"), which does not complete that
/// character: "ー\u{FFFD} ROB", as the non-streamed answer decodes it.
const SPLIT_CHARACTER: &str = r#"{"input": "Hello", "mode": "sample", "temperature": 5, "top_k": 0, "top_p": 1.0, "max_length": 26, "num_return_sequences": 4, "seed": 109, "stream": true}"#;

fn events_of(data: &[String]) -> Vec<Value> {
    data.iter()
        .filter(|payload| payload.as_str() != "[DONE]")
        .map(|payload| {
            serde_json::from_str(payload).unwrap_or_else(|e| panic!("not JSON ({e}): {payload:?}"))
        })
        .collect()
}

#[test]
fn a_split_utf8_character_is_held_back_and_the_deltas_still_add_up() {
    let server = Server::start(&[]);
    let response = server.invoke(SPLIT_CHARACTER);
    assert_eq!(response.status, 200);
    let text = String::from_utf8(response.body).expect("the stream is UTF-8 throughout");
    let data = sse_data(&text);
    // Every payload is JSON and each sequence's deltas add up to its string.
    check_stream(&data, SPLIT_CHARACTER, &expected(SPLIT_CHARACTER));
    let events = events_of(&data);
    let is_held_back = |e: &Value| {
        e["token"]["text"] == "" && e["token"]["id"] != 50256 && e.get("finish_reason").is_none()
    };
    let next_of = |at: usize| {
        events[at + 1..]
            .iter()
            .find(|e| e["index"] == events[at]["index"])
            .unwrap()
    };
    // A token held back for its partial character, whose text (here "ー") goes out at the start
    // of the next token's: a non-ASCII character other than U+FFFD starts that token's text.
    let held = (0..events.len())
        .find(|&at| {
            is_held_back(&events[at]) && {
                let released = next_of(at)["token"]["text"].as_str().unwrap();
                released
                    .chars()
                    .next()
                    .is_some_and(|c| !c.is_ascii() && c != '\u{FFFD}')
            }
        })
        .unwrap_or_else(|| panic!("a held-back token released with the next one: {events:?}"));
    assert_eq!(
        (&events[held]["index"], &events[held]["token"]["id"]),
        (&Value::from(0), &Value::from(12045))
    );
    assert_eq!(next_of(held)["token"]["text"], "ー\u{FFFD} ROB");

    // Cut right after the partial token: the unfinished character goes with the sequence's
    // last token, as U+FFFD, like the non-streamed answer.
    let cut = SPLIT_CHARACTER.replace(r#""max_length": 26"#, r#""max_length": 25"#);
    let response = server.invoke(&cut);
    assert_eq!(response.status, 200);
    let data = sse_data(&String::from_utf8(response.body).unwrap());
    check_stream(&data, &cut, &expected(&cut));
    let last = events_of(&data)
        .into_iter()
        .rfind(|e| e["index"] == 0)
        .unwrap();
    assert_eq!(last["token"]["id"], 12045, "{last}");
    assert!(last["finish_reason"] == "length", "{last}");
    assert!(
        last["token"]["text"]
            .as_str()
            .unwrap()
            .ends_with('\u{FFFD}'),
        "{last}"
    );
    assert!(
        last["generated_text"]
            .as_str()
            .unwrap()
            .ends_with('\u{FFFD}'),
        "{last}"
    );
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_place() {
    let server = Server::start(&["--queue-capacity", "1"]);
    let long = r#"{"input": "Hello", "seed": 1, "max_length": 1000, "num_return_sequences": 16, "stream": true}"#;
    let mut socket = server
        .send("POST", "/invocations", &JSON, long.as_bytes())
        .unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !received.windows(6).any(|w| w == b"data: ") {
        let n = socket.read(&mut buffer).expect("the stream starts");
        assert!(n > 0, "{}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&buffer[..n]);
    }
    let head = String::from_utf8_lossy(&received).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");

    // The streamed request holds the only place: others are refused, streamed or not.
    let refused = server.invoke(r#"{"input": "Hi", "max_length": 4}"#);
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.error().1, "overloaded");
    let refused = server.invoke(r#"{"input": "Hi", "max_length": 4, "stream": true}"#);
    assert_eq!(refused.status, 503);
    assert_eq!(refused.error().1, "overloaded");

    drop(socket);
    let started = Instant::now();
    let admitted = loop {
        let response =
            server.invoke(r#"{"input": "Hi", "max_length": 4, "num_return_sequences": 1}"#);
        if response.status == 200 {
            break response;
        }
        assert_eq!(response.status, 503, "{response:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the place was never freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(admitted.json().as_array().unwrap().len(), 1);
    wait_for_log(
        &server,
        &[
            ("status", Value::from(499)),
            ("stream", Value::Bool(true)),
            ("error_type", Value::from("client_disconnected")),
            (
                "message",
                Value::from("streamed invocation abandoned by the client; its generation stops"),
            ),
        ],
    );
}

/// `(streamed, plain)` must be the same error answer.
fn assert_same_error(streamed: &HttpResponse, plain: &HttpResponse, what: &str) {
    assert!(plain.status >= 400, "{what}: {plain:?}");
    assert_eq!(streamed.status, plain.status, "{what}: {streamed:?}");
    let (message, error_type) = streamed.error();
    assert_eq!((message, error_type), plain.error(), "{what}");
}

#[test]
fn an_invalid_streamed_request_gets_the_plain_json_error() {
    let server = Server::start(&[]);
    let post = |path: &str, headers: &[(&str, &str)], body: &str| {
        let mut all = vec![("Content-Type", "application/json")];
        all.extend_from_slice(headers);
        server.request("POST", path, &all, body.as_bytes())
    };
    let sse = [("Accept", "text/event-stream")];
    // Checked after admission (the prompt is 2 tokens), before the first event.
    let too_short = r#"{"input": "Hello there", "max_length": 1}"#;
    let too_short_streamed = r#"{"input": "Hello there", "max_length": 1, "stream": true}"#;
    // Checked when the body is read.
    let bad_top_p = r#"{"input": "x", "top_p": 3}"#;
    // (path, body, headers, the same request non-streamed)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 6] = [
        ("/invocations", too_short_streamed, &[], too_short),
        ("/invocations", too_short, &sse, too_short),
        ("/invocations", bad_top_p, &sse, bad_top_p),
        (
            "/endpoints/x/invocations",
            bad_top_p,
            &[("X-Amzn-SageMaker-Accept", "text/event-stream")],
            bad_top_p,
        ),
        (
            "/endpoints/x/invocations-response-stream",
            too_short,
            &[],
            too_short,
        ),
        (
            "/endpoints/x/invocations-response-stream",
            bad_top_p,
            &[],
            bad_top_p,
        ),
    ];
    for (path, body, headers, plain_body) in cases {
        let streamed = post(path, headers, body);
        let plain = post("/invocations", &[], plain_body);
        assert_eq!(plain.status, 422);
        assert_same_error(&streamed, &plain, &format!("{path} {body} {headers:?}"));
    }
    // A stream flag that is not a boolean is a field error like any other.
    let bad_flag = post("/invocations", &sse, r#"{"input": "x", "stream": "yes"}"#);
    assert_eq!(bad_flag.status, 422);
    assert!(bad_flag.error().0.contains("`stream`"), "{bad_flag:?}");
    // Malformed JSON on the response-stream route: the same 400.
    let streamed = post("/endpoints/x/invocations-response-stream", &[], "{not json");
    let plain = post("/invocations", &[], "{not json");
    assert_eq!(plain.status, 400);
    assert_same_error(&streamed, &plain, "malformed JSON");
}

#[test]
fn an_error_after_the_stream_started_is_its_last_event() {
    let server = Server::start(&["--deadline-secs", "2"]);
    let long = r#"{"input": "Hello", "seed": 1, "max_length": 1024, "num_return_sequences": 16, "stream": true}"#;
    let started = Instant::now();
    let response = server.invoke(long);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let data = sse_data(&String::from_utf8(response.body).unwrap());
    assert!(
        !data.iter().any(|d| d == "[DONE]"),
        "no [DONE] after an error"
    );
    let events: Vec<Value> = data
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("not JSON ({e}): {d:?}")))
        .collect();
    let (last, tokens) = events.split_last().unwrap();
    assert!(!tokens.is_empty(), "tokens came before the error");
    assert!(
        tokens.iter().all(|e| e["token"]["id"].is_u64()),
        "{tokens:?}"
    );
    assert_eq!(last.as_object().unwrap().len(), 2, "{last}");
    assert_eq!(last["error_type"], "deadline_exceeded", "{last}");
    assert!(
        last["error"].as_str().unwrap().contains("deadline"),
        "{last}"
    );
    wait_for_log(
        &server,
        &[
            (
                "message",
                Value::from("invocation failed after its stream started"),
            ),
            ("status", Value::from(504)),
            ("stream", Value::Bool(true)),
            ("error_type", Value::from("deadline_exceeded")),
        ],
    );
}
