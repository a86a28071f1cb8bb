//! The generation controls of the native body through the built binary, read by Python
//! `requests`: `details` answers, `stop` strings in plain and streamed answers (never
//! half-streamed), `return_full_text`, `prompt_logprobs` and `top_logprobs`, and their errors.

mod support;

use std::process::Command;

use serde_json::{json, Value};
use support::{python, run_client, Server};

/// Posts each body with `requests` (streamed ones read line by line) and prints one JSON line per
/// answer: `{"status", "json"}` or `{"status", "events"}`.
const CLIENT: &str = r#"
import json, sys, requests
url, bodies = sys.argv[1], json.loads(sys.argv[2])
for body in bodies:
    r = requests.post(url + "/invocations", json=body, stream=body.get("stream", False), timeout=60)
    if body.get("stream"):
        events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                  if line.startswith("data: ") and line != "data: [DONE]"]
        print(json.dumps({"status": r.status_code, "events": events}))
    else:
        print(json.dumps({"status": r.status_code, "json": r.json()}))
"#;

fn post_all(server: &Server, bodies: &[Value]) -> Vec<Value> {
    let bodies = serde_json::to_string(bodies).unwrap();
    let out = run_client(
        Command::new(python()).args(["-c", CLIENT, &server.url(), &bodies]),
        "python with requests",
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn library(body: &Value) -> gpt2_engine::GenerationOutput {
    let request = gpt2_engine::GenerationRequest::from_json(
        body.to_string().as_bytes(),
        &gpt2_engine::Limits::default(),
    )
    .unwrap();
    gpt2_engine::Pipeline::demo()
        .run(&request, || false)
        .unwrap()
}

#[test]
fn details_stop_strings_and_logprobs_through_the_binary() {
    let server = Server::start(&[]);
    let prompt = "The quick brown fox";
    let greedy =
        json!({"input": prompt, "mode": "greedy", "max_new_tokens": 30, "num_return_sequences": 1});
    let plain = library(&greedy).texts.remove(0);
    let continuation = &plain[prompt.len()..];
    let chars: Vec<(usize, char)> = continuation.char_indices().collect();
    let stop = continuation[chars[6].0..chars[11].0].to_string();
    let cut = &continuation[..continuation.find(&stop).unwrap()];

    let mut with_stop = greedy.clone();
    with_stop["stop"] = json!([stop]);
    let mut detailed = with_stop.clone();
    detailed["details"] = json!(true);
    detailed["top_logprobs"] = json!(2);
    detailed["prompt_logprobs"] = json!(true);
    let mut streamed = with_stop.clone();
    streamed["stream"] = json!(true);
    let mut bare = greedy.clone();
    bare["return_full_text"] = json!(false);
    let mut sampled = json!({"input": prompt, "mode": "sample", "max_new_tokens": 5, "num_return_sequences": 2, "details": true});
    sampled["seed"] = json!(11);
    let both = json!({"input": prompt, "max_length": 40, "max_new_tokens": 5});
    let bad_bias = json!({"input": prompt, "logit_bias": {"50257": 1}});

    let answers = post_all(
        &server,
        &[with_stop, detailed, streamed, bare, sampled, both, bad_bias],
    );

    assert_eq!(answers[0]["json"], json!([format!("{prompt}{cut}")]));

    let details = &answers[1]["json"][0];
    assert_eq!(details["generated_text"], format!("{prompt}{cut}"));
    assert_eq!(details["finish_reason"], "stop");
    let tokens = details["tokens"].as_array().unwrap();
    assert_eq!(
        tokens.len() as u64,
        details["generated_tokens"].as_u64().unwrap()
    );
    for token in tokens {
        assert!(token["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(
            token["top_logprobs"][0]["id"], token["id"],
            "greedy takes the top token"
        );
    }
    assert_eq!(details["seed"], Value::Null);
    let prompt_tokens = details["prompt_tokens"].as_array().unwrap();
    assert_eq!(prompt_tokens[0]["logprob"], Value::Null);
    assert!(prompt_tokens[1]["logprob"].as_f64().unwrap() <= 0.0);

    // Streamed: the deltas add up to the cut text and never show the stop string.
    let events = answers[2]["events"].as_array().unwrap();
    let streamed: String = events
        .iter()
        .filter_map(|e| e["token"]["text"].as_str())
        .collect();
    assert_eq!(streamed, cut);
    let last = events.last().unwrap();
    assert_eq!(last["finish_reason"], "stop");
    assert_eq!(last["generated_text"], format!("{prompt}{cut}"));

    assert_eq!(answers[3]["json"], json!([continuation]));

    let sampled = answers[4]["json"].as_array().unwrap();
    assert_eq!(sampled.len(), 2);
    assert!(sampled.iter().all(|s| s["seed"] == 11));

    assert_eq!(answers[5]["status"], 422);
    assert!(answers[5]["json"]["error"]
        .as_str()
        .unwrap()
        .contains("max_new_tokens"));
    assert_eq!(answers[6]["status"], 422);
    assert!(answers[6]["json"]["error"]
        .as_str()
        .unwrap()
        .contains("logit_bias"));
}
