//! The contract's own clients, unchanged except for the address: boto3, the AWS CLI, Python
//! requests and curl. `.ci/run` installs them; a missing client fails the test, never skips it.

mod support;

use std::process::Command;

use support::{aws_invoke_endpoint, python, run_client, Server};

const BODY: &str = r#"{"input": "This is an input text", "max_length": 16, "seed": 5}"#;

fn expected() -> Vec<String> {
    gpt2_engine::Pipeline::demo()
        .generate_json(BODY.as_bytes())
        .unwrap()
}

fn dummy_aws_env(command: &mut Command) -> &mut Command {
    command
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
}

#[test]
fn boto3_invoke_endpoint() {
    let server = Server::start(&[]);
    let script = r#"
import json, sys, boto3
client = boto3.client("sagemaker-runtime", endpoint_url=sys.argv[1], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
response = client.invoke_endpoint(EndpointName="gpt-2", ContentType="application/json", Body=sys.argv[2])
assert response["ContentType"] == "application/json", response["ContentType"]
print(response["Body"].read().decode("utf-8"))
"#;
    let out = run_client(
        dummy_aws_env(Command::new(python()).args(["-c", script, &server.url(), BODY])),
        "python with boto3",
    );
    let texts: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(texts, expected());
}

#[test]
fn boto3_sees_validation_errors_as_model_errors() {
    let server = Server::start(&[]);
    let script = r#"
import sys, boto3
client = boto3.client("sagemaker-runtime", endpoint_url=sys.argv[1], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
try:
    client.invoke_endpoint(EndpointName="gpt-2", ContentType="application/json", Body='{"input": "x", "top_p": 3}')
except Exception as e:
    print(type(e).__name__, e)
else:
    raise SystemExit("expected an error")
"#;
    let out = run_client(
        dummy_aws_env(Command::new(python()).args(["-c", script, &server.url()])),
        "python with boto3",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("422") || text.contains("top_p"), "{text}");
}

#[test]
fn aws_cli_invoke_endpoint() {
    let server = Server::start(&[]);
    let dir = std::env::temp_dir().join(format!("gpt2-aws-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out_file = dir.join("out.json");
    run_client(
        dummy_aws_env(&mut aws_invoke_endpoint(&server.url(), BODY, &out_file)),
        "aws sagemaker-runtime invoke-endpoint",
    );
    let texts: Vec<String> = serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    assert_eq!(texts, expected());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn python_requests_post_json() {
    let server = Server::start(&[]);
    let script = r#"
import json, sys, requests
data = json.loads(sys.argv[2])
response = requests.post(sys.argv[1] + "/invocations", json=data)
response.raise_for_status()
print(json.dumps(response.json()))
"#;
    let out = run_client(
        Command::new(python()).args(["-c", script, &server.url(), BODY]),
        "python with requests",
    );
    let texts: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(texts, expected());
}

#[test]
fn curl_post_json() {
    let server = Server::start(&[]);
    let url = format!("{}/invocations", server.url());
    let out = run_client(
        Command::new("curl").args([
            "-sS",
            "-f",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data",
            BODY,
            &url,
        ]),
        "curl",
    );
    let texts: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(texts, expected());
}
