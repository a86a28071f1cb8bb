//! Authentication, off unless configured: API keys (`Authorization: Bearer KEY` or `x-api-key`)
//! and AWS Signature Version 4, verified the way SageMaker's runtime verifies the requests that
//! boto3, the AWS CLI and `aws-requests-auth` sign. `/ping` and the playground page (`GET /`)
//! are always open.
//!
//! SigV4 is rebuilt from the request as received: the raw path (encoded once more, as non-S3
//! services sign it), the query, the headers named in `SignedHeaders`, and the SHA-256 of the
//! exact body bytes. The signing key comes from `aws-sigv4`'s primitives; signatures and keys are
//! compared in constant time. A failure answers 401 (no credentials) or 403 (bad credentials)
//! with nothing that helps an attacker; the reason goes to the log.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::warn;

use crate::api_error::ApiError;

/// How far a signed request's `x-amz-date` may be from the server's clock (AWS's own limit).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// The service name boto3 and the AWS CLI sign SageMaker runtime requests for.
pub const SAGEMAKER_SERVICE: &str = "sagemaker";

/// Who may call the service. Empty: everyone.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// SHA-256 digests of the accepted API keys (compared digest to digest, in constant time, so
    /// neither a key's bytes nor its length leak through timing).
    api_key_digests: Vec<[u8; 32]>,
    /// `(access key id, secret access key)` pairs accepted for SigV4.
    sigv4_credentials: Vec<(String, String)>,
    /// The region requests must be signed for; any region when `None`.
    sigv4_region: Option<String>,
    /// The `host` value clients sign, when a proxy rewrites the `Host` header.
    sigv4_host: Option<String>,
}

impl AuthConfig {
    /// Parses the settings; `sigv4` entries are `ACCESS_KEY_ID:SECRET`.
    pub fn new(
        api_keys: &[String],
        sigv4: &[String],
        sigv4_region: Option<String>,
        sigv4_host: Option<String>,
    ) -> Result<Self, String> {
        let mut config = Self {
            sigv4_region,
            sigv4_host,
            ..Self::default()
        };
        for key in api_keys.iter().map(|k| k.trim()).filter(|k| !k.is_empty()) {
            config.api_key_digests.push(Sha256::digest(key).into());
        }
        for entry in sigv4.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            match entry.split_once(':') {
                Some((id, secret)) if !id.is_empty() && !secret.is_empty() => config
                    .sigv4_credentials
                    .push((id.to_string(), secret.to_string())),
                _ => {
                    return Err(
                        "--sigv4-credentials takes ACCESS_KEY_ID:SECRET (the secret redacted here)"
                            .to_string(),
                    )
                }
            }
        }
        Ok(config)
    }

    /// Whether any credential is required.
    pub fn is_enabled(&self) -> bool {
        !self.api_key_digests.is_empty() || !self.sigv4_credentials.is_empty()
    }

    fn api_key_matches(&self, key: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(key.trim()).into();
        // Every key is compared, so the time does not say which one matched.
        self.api_key_digests.iter().fold(0u8, |found, accepted| {
            found | accepted.ct_eq(&digest).unwrap_u8()
        }) == 1
    }
}

/// Why a request was refused (for the log only).
#[derive(Debug)]
enum Refusal {
    /// No credentials at all: 401.
    Missing,
    /// Credentials that are wrong: 401 for API keys, 403 for signatures.
    BadKey,
    BadSignature(String),
}

/// The routes that never ask for credentials: `/ping` (health checks must reach it) and the
/// playground page, `GET /` (and `HEAD /`), which is static and holds no data; the requests it
/// makes carry the key its user types.
fn is_open(method: &Method, path: &str) -> bool {
    path == "/ping" || (path == "/" && (method == Method::GET || method == Method::HEAD))
}

/// The middleware: passes the open routes ([`is_open`]) and every request when no credential is
/// configured; else checks an API key or a SigV4 signature before the handler runs.
pub async fn authenticate(
    State(config): State<std::sync::Arc<AuthConfig>>,
    request: Request,
    next: Next,
) -> Response {
    if !config.is_enabled() || is_open(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let signed =
        header(&parts.headers, "authorization").is_some_and(|v| v.starts_with("AWS4-HMAC-SHA256 "));
    let outcome = if signed {
        if config.sigv4_credentials.is_empty() {
            Err(Refusal::BadSignature(
                "SigV4 is not enabled on this server".into(),
            ))
        } else {
            // The signature covers the body: read it (within the service's body limit) and hand
            // the same bytes on to the handler.
            match axum::body::to_bytes(body, crate::routes::MAX_BODY_BYTES).await {
                Err(error) => {
                    return crate::routes::unfinished_body(&error)
                        .unwrap_or_else(crate::routes::too_large)
                        .into_response();
                }
                Ok(bytes) => {
                    let verdict = verify_sigv4(&config, &parts, &bytes, SystemTime::now())
                        .map_err(Refusal::BadSignature);
                    let request = Request::from_parts(parts, Body::from(bytes));
                    return match verdict {
                        Ok(()) => next.run(request).await,
                        Err(refusal) => refuse(&request, refusal),
                    };
                }
            }
        }
    } else {
        let key = header(&parts.headers, "authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| header(&parts.headers, "x-api-key"));
        match key {
            None => Err(Refusal::Missing),
            Some(key) if config.api_key_matches(key) => Ok(()),
            Some(_) => Err(Refusal::BadKey),
        }
    };
    let request = Request::from_parts(parts, body);
    match outcome {
        Ok(()) => next.run(request).await,
        Err(refusal) => refuse(&request, refusal),
    }
}

fn refuse(request: &Request, refusal: Refusal) -> Response {
    let request_id = request
        .extensions()
        .get::<crate::routes::RequestId>()
        .map_or("-", |id| id.0.as_str());
    let (status, error_type, message) = match &refusal {
        Refusal::Missing => (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this server requires an API key (Authorization: Bearer KEY or x-api-key) or an AWS \
             Signature Version 4",
        ),
        Refusal::BadKey => (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the API key is not valid",
        ),
        Refusal::BadSignature(_) => (
            StatusCode::FORBIDDEN,
            "forbidden",
            "the request signature does not match, or its credentials are not accepted",
        ),
    };
    let reason = match &refusal {
        Refusal::BadSignature(reason) => reason.as_str(),
        Refusal::Missing => "no credentials",
        Refusal::BadKey => "unknown API key",
    };
    warn!(
        request_id,
        status = status.as_u16(),
        path = request.uri().path(),
        reason,
        "request refused by authentication"
    );
    let mut response = ApiError::new(status, error_type, message).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The parts of a SigV4 `Authorization` header.
struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Result<Authorization<'_>, String> {
    let fields = value
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("not an AWS4-HMAC-SHA256 authorization")?;
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for field in fields.split(',').map(str::trim) {
        match field.split_once('=') {
            Some(("Credential", v)) => credential = Some(v),
            Some(("SignedHeaders", v)) => signed_headers = Some(v),
            Some(("Signature", v)) => signature = Some(v),
            _ => return Err(format!("unexpected authorization field {field:?}")),
        }
    }
    let credential = credential.ok_or("no Credential")?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, "aws4_request"] = scope[..] else {
        return Err(format!("malformed credential scope {credential:?}"));
    };
    let signed_headers: Vec<&str> = signed_headers
        .ok_or("no SignedHeaders")?
        .split(';')
        .collect();
    Ok(Authorization {
        access_key_id,
        date,
        region,
        service,
        signed_headers,
        signature: signature.ok_or("no Signature")?,
    })
}

/// Checks a request's SigV4 signature against the configured credentials at time `now`.
fn verify_sigv4(
    config: &AuthConfig,
    parts: &axum::http::request::Parts,
    body: &Bytes,
    now: SystemTime,
) -> Result<(), String> {
    let headers = &parts.headers;
    let auth = parse_authorization(header(headers, "authorization").unwrap_or_default())?;
    let amz_date = header(headers, "x-amz-date").ok_or("no x-amz-date header")?;
    let signed_at =
        parse_amz_date(amz_date).ok_or_else(|| format!("bad x-amz-date {amz_date:?}"))?;
    let skew = now
        .duration_since(signed_at)
        .or_else(|_| signed_at.duration_since(now))
        .unwrap_or(Duration::MAX);
    if skew > MAX_CLOCK_SKEW {
        return Err(format!(
            "x-amz-date {amz_date} is {}s from the server's clock",
            skew.as_secs()
        ));
    }
    if !amz_date.starts_with(auth.date) || auth.date.len() != 8 {
        return Err("the credential scope's date is not x-amz-date's".into());
    }
    if let Some(region) = &config.sigv4_region {
        if auth.region != region || auth.service != SAGEMAKER_SERVICE {
            return Err(format!(
                "signed for {}/{}, not {region}/{SAGEMAKER_SERVICE}",
                auth.region, auth.service
            ));
        }
    }
    if !auth.signed_headers.contains(&"host") {
        return Err("host is not signed".into());
    }
    let Some((_, secret)) = config
        .sigv4_credentials
        .iter()
        .find(|(id, _)| id.as_bytes().ct_eq(auth.access_key_id.as_bytes()).into())
    else {
        return Err(format!("unknown access key id {:?}", auth.access_key_id));
    };
    let body_hash = hex(&Sha256::digest(body));
    if let Some(claimed) = header(headers, "x-amz-content-sha256") {
        if claimed != body_hash && claimed != "UNSIGNED-PAYLOAD" {
            return Err("x-amz-content-sha256 does not match the body".into());
        }
    }
    let canonical = canonical_request(
        parts,
        &auth.signed_headers,
        config.sigv4_host.as_deref(),
        &body_hash,
    )?;
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let key =
        aws_sigv4::sign::v4::generate_signing_key(secret, signed_at, auth.region, auth.service);
    let expected = aws_sigv4::sign::v4::calculate_signature(key, string_to_sign.as_bytes());
    if bool::from(expected.as_bytes().ct_eq(auth.signature.as_bytes())) {
        Ok(())
    } else {
        Err("signature mismatch".into())
    }
}

/// The canonical request of SigV4 for a request as received.
fn canonical_request(
    parts: &axum::http::request::Parts,
    signed_headers: &[&str],
    host_override: Option<&str>,
    body_hash: &str,
) -> Result<String, String> {
    let mut sorted = signed_headers.to_vec();
    sorted.sort_unstable();
    if sorted != signed_headers {
        return Err("SignedHeaders is not sorted".into());
    }
    let mut canonical_headers = String::new();
    for name in signed_headers {
        let value = if *name == "host" {
            match host_override {
                Some(host) => host.to_string(),
                None => header(&parts.headers, "host")
                    .map(str::to_string)
                    .or_else(|| parts.uri.authority().map(|a| a.to_string()))
                    .ok_or("no host header")?,
            }
        } else {
            let values: Vec<&str> = parts
                .headers
                .get_all(*name)
                .iter()
                .map(|v| v.to_str().map_err(|_| format!("header {name} is not text")))
                .collect::<Result<_, _>>()?;
            if values.is_empty() {
                return Err(format!("signed header {name} is missing"));
            }
            values
                .iter()
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join(",")
        };
        canonical_headers.push_str(&format!("{name}:{value}\n"));
    }
    Ok(format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        parts.method.as_str(),
        uri_encode(parts.uri.path(), true),
        canonical_query(parts.uri.query().unwrap_or("")),
        canonical_headers,
        signed_headers.join(";"),
        body_hash
    ))
}

/// Percent-encodes every byte but the unreserved ones (and `/` in paths). Applied to the raw
/// path as received, this is the double encoding non-S3 services sign: `%` becomes `%25`.
fn uri_encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// The query's `key=value` pairs as sent, sorted (botocore signs a URL's query this way).
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(&str, &str)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    pairs.sort_unstable();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `YYYYMMDDTHHMMSSZ` as a time.
fn parse_amz_date(value: &str) -> Option<SystemTime> {
    let b = value.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| value.get(range)?.parse::<u64>().ok();
    let (year, month, day) = (number(0..4)?, number(4..6)?, number(6..8)?);
    let (hour, minute, second) = (number(9..11)?, number(11..13)?, number(13..15)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // Days from 1970-01-01 to the civil date (Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let year_of_era = y - era * 400;
    let day_of_year = (153 * m + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = (era * 146_097 + day_of_era).checked_sub(719_468)?;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's documented example (the SigV4 test suite's `get-vanilla`), checked end to end.
    #[test]
    fn verifies_the_aws_test_suite_example_and_refuses_its_variants() {
        let config = AuthConfig::new(
            &[],
            &["AKIDEXAMPLE:wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()],
            Some("us-east-1".into()),
            None,
        )
        .unwrap();
        let request = |auth: &str, date: &str| {
            axum::http::Request::builder()
                .method("GET")
                .uri("/")
                .header("host", "example.amazonaws.com")
                .header("x-amz-date", date)
                .header("authorization", auth)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        let auth =
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
                    SignedHeaders=host;x-amz-date, \
                    Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";
        let signed_at = parse_amz_date("20150830T123600Z").unwrap();
        // The suite's service is "service": accepted when no region is required...
        let open = AuthConfig {
            sigv4_region: None,
            ..config.clone()
        };
        assert_eq!(
            verify_sigv4(
                &open,
                &request(auth, "20150830T123600Z"),
                &Bytes::new(),
                signed_at
            ),
            Ok(())
        );
        // ...and refused when the server requires us-east-1/sagemaker.
        assert!(verify_sigv4(
            &config,
            &request(auth, "20150830T123600Z"),
            &Bytes::new(),
            signed_at
        )
        .is_err());
        // A body that was not signed, a clock 6 minutes on, another date header: refused.
        assert!(verify_sigv4(
            &open,
            &request(auth, "20150830T123600Z"),
            &Bytes::from_static(b"x"),
            signed_at
        )
        .is_err());
        let later = signed_at + Duration::from_secs(6 * 60);
        assert!(verify_sigv4(
            &open,
            &request(auth, "20150830T123600Z"),
            &Bytes::new(),
            later
        )
        .is_err());
        assert!(verify_sigv4(
            &open,
            &request(auth, "20150830T123601Z"),
            &Bytes::new(),
            signed_at
        )
        .is_err());
        let wrong_key = auth.replace("AKIDEXAMPLE", "AKIDOTHER");
        assert!(verify_sigv4(
            &open,
            &request(&wrong_key, "20150830T123600Z"),
            &Bytes::new(),
            signed_at
        )
        .is_err());
    }

    #[test]
    fn amz_dates_parse_to_unix_time() {
        assert_eq!(
            parse_amz_date("20150830T123600Z"),
            UNIX_EPOCH.checked_add(Duration::from_secs(1_440_938_160))
        );
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(UNIX_EPOCH));
        for bad in [
            "",
            "20150830123600Z",
            "20151330T123600Z",
            "2015083XT123600Z",
            "20150830T126000Z",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn paths_are_encoded_once_more_and_queries_sorted() {
        assert_eq!(
            uri_encode("/endpoints/my%20model/invocations", true),
            "/endpoints/my%2520model/invocations"
        );
        assert_eq!(uri_encode("a b/c", false), "a%20b%2Fc");
        assert_eq!(canonical_query("b=2&a=1&a=0"), "a=0&a=1&b=2");
    }

    #[test]
    fn only_ping_and_the_playground_page_are_open() {
        assert!(is_open(&Method::GET, "/ping") && is_open(&Method::HEAD, "/ping"));
        assert!(is_open(&Method::GET, "/") && is_open(&Method::HEAD, "/"));
        assert!(!is_open(&Method::POST, "/"));
        for path in [
            "/invocations",
            "/metrics",
            "/execution-parameters",
            "//",
            "/index.html",
        ] {
            assert!(!is_open(&Method::GET, path), "{path}");
        }
        assert!(!is_open(&Method::POST, "/invocations"));
    }

    #[test]
    fn api_keys_match_exactly() {
        let config =
            AuthConfig::new(&["secret-one".into(), "two".into()], &[], None, None).unwrap();
        assert!(config.is_enabled());
        assert!(config.api_key_matches("secret-one") && config.api_key_matches("two"));
        assert!(!config.api_key_matches("secret-on") && !config.api_key_matches(""));
        assert!(!AuthConfig::default().is_enabled());
        assert!(AuthConfig::new(&[], &["no-colon".into()], None, None).is_err());
    }
}
