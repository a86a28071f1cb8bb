//! Authentication through the built binary, with the clients users sign requests with: API keys
//! from curl-like raw requests, SigV4 from boto3, the AWS CLI and `requests` + `aws-requests-auth`.
//! `.ci/run` installs them; a missing client fails the test, never skips it.

mod support;

use std::process::{Command, Output};

use support::{aws_invoke_endpoint, python, Server};

const BODY: &str = r#"{"input": "Hello", "max_length": 8, "seed": 3}"#;
const ACCESS_KEY_ID: &str = "AKIDGPT2TEST";
const SECRET: &str = "correct-horse-battery-staple";

fn expected() -> Vec<String> {
    gpt2_engine::Pipeline::demo()
        .generate_json(BODY.as_bytes())
        .unwrap()
}

fn run(command: &mut Command, what: &str) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("{what} could not be started ({e}); .ci/run installs it"))
}

/// The server's refusal log lines, once at least `count` have been read from its stderr.
fn refusals(server: &Server, count: usize) -> Vec<serde_json::Value> {
    let started = std::time::Instant::now();
    loop {
        let lines: Vec<serde_json::Value> = server
            .log_lines()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|json| json["message"] == "request refused by authentication")
            .collect();
        if lines.len() >= count || started.elapsed() > std::time::Duration::from_secs(10) {
            return lines;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn api_keys_from_flags_or_the_environment_guard_everything_but_ping() {
    let json = ("Content-Type", "application/json");
    for server in [
        Server::start(&["--api-key", "key-one", "--api-key", "key-two"]),
        Server::start_with_env(&[], &[("GPT2_API_KEYS", "key-one, key-two")]),
    ] {
        assert_eq!(server.request("GET", "/ping", &[], b"").status, 200);
        let missing = server.request("POST", "/invocations", &[json], BODY.as_bytes());
        assert_eq!(missing.status, 401);
        assert_eq!(missing.error().1, "unauthorized");
        assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
        assert!(missing.header("x-request-id").is_some());
        for (name, value) in [
            ("Authorization", "Bearer key-one"),
            ("x-api-key", "key-two"),
        ] {
            let ok = server.request(
                "POST",
                "/invocations",
                &[json, (name, value)],
                BODY.as_bytes(),
            );
            assert_eq!(ok.status, 200, "{name}");
            let texts: Vec<String> = serde_json::from_slice(&ok.body).unwrap();
            assert_eq!(texts, expected());
        }
        for (name, value) in [
            ("Authorization", "Bearer key-on"),
            ("x-api-key", "key-one-and-more"),
            ("Authorization", "Basic a2V5LW9uZQ=="),
        ] {
            let refused = server.request(
                "POST",
                "/invocations",
                &[json, (name, value)],
                BODY.as_bytes(),
            );
            assert_eq!(refused.status, 401, "{name}: {value}");
        }
        // Other routes are guarded too, and the refusals are logged with their reason.
        assert_eq!(
            server
                .request("GET", "/execution-parameters", &[], b"")
                .status,
            401
        );
        let logged = refusals(&server, 5);
        assert!(logged.len() >= 5, "{logged:?}");
        assert!(logged.iter().any(|l| l["reason"] == "unknown API key"));
    }
}

/// A Python script run against `server` with the client libraries: prints one JSON line.
fn python_clients(server: &Server, script: &str, secret: &str) -> serde_json::Value {
    let out = run(
        Command::new(python())
            .args(["-c", script, &server.url(), ACCESS_KEY_ID, secret, BODY])
            .env_remove("AWS_PROFILE")
            .env("AWS_EC2_METADATA_DISABLED", "true"),
        "python with boto3 and aws-requests-auth",
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

const SIGV4_CLIENTS: &str = r#"
import datetime, json, sys
from unittest import mock
from urllib.parse import urlparse
import boto3, botocore.auth, requests
from botocore.exceptions import ClientError
from aws_requests_auth.aws_auth import AWSRequestsAuth

url, key_id, secret, body = sys.argv[1:5]
result = {}

def runtime(secret, region="us-east-1"):
    return boto3.client("sagemaker-runtime", endpoint_url=url, region_name=region,
                        aws_access_key_id=key_id, aws_secret_access_key=secret)

def boto3_status(client, **kwargs):
    try:
        response = client.invoke_endpoint(EndpointName="gpt-2", ContentType="application/json",
                                          Body=body, **kwargs)
        return 200, json.loads(response["Body"].read())
    except ClientError as e:
        return e.response["ResponseMetadata"]["HTTPStatusCode"], None

result["boto3"] = boto3_status(runtime(secret))
result["boto3_wrong_secret"] = boto3_status(runtime(secret + "x"))[0]
result["boto3_other_region"] = boto3_status(runtime(secret, "eu-west-1"))[0]
stream = runtime(secret).invoke_endpoint_with_response_stream(
    EndpointName="gpt-2", ContentType="application/json", Body=body)
result["boto3_stream"] = b"".join(p["PayloadPart"]["Bytes"] for p in stream["Body"]).decode()

# A request signed 6 minutes ago (botocore's clock, fixed), then replayed.
six_minutes_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=6)
with mock.patch.object(botocore.auth, "get_current_datetime", return_value=six_minutes_ago):
    result["boto3_replayed"] = boto3_status(runtime(secret))[0]

host = urlparse(url).netloc
def signed(secret):
    return AWSRequestsAuth(aws_access_key=key_id, aws_secret_access_key=secret, aws_host=host,
                           aws_region="us-east-1", aws_service="sagemaker")
endpoint = url + "/endpoints/gpt-2/invocations"
headers = {"Content-Type": "application/json"}
ok = requests.post(endpoint, data=body, headers=headers, auth=signed(secret))
result["requests"] = [ok.status_code, ok.json()]
result["requests_wrong_secret"] = requests.post(endpoint, data=body, headers=headers,
                                                auth=signed("nope")).status_code
# The body altered after signing.
prepared = requests.Request("POST", endpoint, data=body, headers=headers).prepare()
prepared = signed(secret)(prepared)
prepared.body = body.replace("Hello", "Howdy").encode()
prepared.headers["Content-Length"] = str(len(prepared.body))
with requests.Session() as session:
    altered = session.send(prepared)
result["requests_altered_body"] = [altered.status_code, altered.json()]
result["unsigned"] = requests.post(endpoint, data=body, headers=headers).status_code
print(json.dumps(result))
"#;

#[test]
fn sigv4_as_boto3_and_aws_requests_auth_sign_it() {
    let credentials = format!("{ACCESS_KEY_ID}:{SECRET}");
    let server = Server::start(&[
        "--sigv4-credentials",
        &credentials,
        "--sigv4-region",
        "us-east-1",
    ]);
    let result = python_clients(&server, SIGV4_CLIENTS, SECRET);
    let texts = serde_json::to_value(expected()).unwrap();
    assert_eq!(result["boto3"], serde_json::json!([200, texts]), "{result}");
    assert_eq!(result["boto3_wrong_secret"], 403, "{result}");
    assert_eq!(result["boto3_other_region"], 403, "{result}");
    assert_eq!(result["boto3_replayed"], 403, "{result}");
    assert!(
        result["boto3_stream"]
            .as_str()
            .unwrap()
            .ends_with("data: [DONE]\n\n"),
        "{result}"
    );
    assert_eq!(
        result["requests"],
        serde_json::json!([200, texts]),
        "{result}"
    );
    assert_eq!(result["requests_wrong_secret"], 403, "{result}");
    assert_eq!(result["requests_altered_body"][0], 403, "{result}");
    assert_eq!(
        result["requests_altered_body"][1]["error_type"],
        "forbidden"
    );
    assert_eq!(result["unsigned"], 401, "{result}");
    // A refusal says nothing of why; the log does.
    let reasons: Vec<String> = refusals(&server, 6)
        .iter()
        .map(|l| l["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    for needle in [
        "signature mismatch",
        "from the server's clock",
        "not us-east-1/sagemaker",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(needle)),
            "{needle}: {reasons:?}"
        );
    }
}

#[test]
fn malformed_credentials_are_a_usage_error_that_does_not_echo_the_secret() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpt2-server"))
        .args(["--port", "0", "--sigv4-credentials", "no-colon-here-s3cr3t"])
        .env_remove("SAGEMAKER_BIND_TO_PORT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ACCESS_KEY_ID:SECRET"), "{stderr}");
    assert!(!stderr.contains("s3cr3t"), "{stderr}");
}

#[test]
fn sigv4_as_the_aws_cli_signs_it() {
    let credentials = format!("{ACCESS_KEY_ID}:{SECRET}");
    let server = Server::start_with_env(&[], &[("GPT2_SIGV4_CREDENTIALS", credentials.as_str())]);
    let dir = std::env::temp_dir().join(format!("gpt2-auth-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out_file = dir.join("answer.json");
    let invoke = |secret: &str| {
        run(
            aws_invoke_endpoint(&server.url(), BODY, &out_file)
                .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
                .env("AWS_SECRET_ACCESS_KEY", secret)
                .env("AWS_DEFAULT_REGION", "us-east-1")
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .env_remove("AWS_PROFILE"),
            "the AWS CLI",
        )
    };
    let ok = invoke(SECRET);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let texts: Vec<String> = serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    assert_eq!(texts, expected());
    let refused = invoke("wrong-secret");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("403"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
