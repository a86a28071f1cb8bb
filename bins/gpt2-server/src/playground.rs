//! `GET /`: the playground, one self-contained HTML page (inline CSS and JavaScript, no external
//! assets) embedded in the binary. It calls `POST /invocations` from the browser with the
//! contract's fields and streams the sequences side by side.
//!
//! The page is static and holds no data, so it is served without credentials (see `auth.rs`); it
//! sends the API key a user types as `Authorization: Bearer`. Its Content-Security-Policy allows
//! only its own inline `<script>` and `<style>` (by their SHA-256, computed here from the embedded
//! page) and requests to its own origin.

use std::sync::LazyLock;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// The page, as served.
pub const PAGE: &str = include_str!("playground.html");

/// The Content-Security-Policy of the page: its own origin, its one inline script and its one
/// inline style, nothing else (no plugins, no framing, no form posts, no `<base>`).
static CONTENT_SECURITY_POLICY: LazyLock<String> = LazyLock::new(|| {
    let script = inline_hash(PAGE, "script");
    let style = inline_hash(PAGE, "style");
    format!(
        "default-src 'self'; script-src {script}; style-src {style}; img-src 'self' data:; \
         connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
});

/// `GET /` (and `HEAD /`): the playground page.
pub async fn page() -> Response {
    let mut response = PAGE.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Built from the embedded page's hashes: base64 and ASCII, so always a valid header value.
    if let Ok(csp) = HeaderValue::from_str(&CONTENT_SECURITY_POLICY) {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    response
}

/// The CSP source (`'sha256-…'`) of the first inline `<tag>` element of `page`, hashed as the
/// browser hashes it: its text after HTML's newline normalization, as UTF-8. `'none'` when the
/// page has no such element.
fn inline_hash(page: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let Some(start) = page.find(&open).map(|at| at + open.len()) else {
        return "'none'".to_string();
    };
    let Some(length) = page[start..].find(&close) else {
        return "'none'".to_string();
    };
    let text = page[start..start + length]
        .replace("\r\n", "\n")
        .replace('\r', "\n");
    format!("'sha256-{}'", base64(&Sha256::digest(text.as_bytes())))
}

/// Standard base64 with padding (RFC 4648 §4), as CSP hash sources are written.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
    }

    #[test]
    fn inline_hashes_normalize_newlines() {
        let lf = inline_hash("<script>a\nb</script>", "script");
        assert_eq!(lf, inline_hash("<script>a\r\nb</script>", "script"));
        assert_eq!(
            inline_hash("<style>x</style>", "style"),
            format!("'sha256-{}'", base64(&Sha256::digest(b"x")))
        );
        assert_eq!(inline_hash("<p>no script</p>", "script"), "'none'");
    }

    #[test]
    fn the_page_is_self_contained_and_allowed_by_its_policy() {
        // One inline script and one inline style, both hashed into the policy.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        let csp = CONTENT_SECURITY_POLICY.as_str();
        assert!(csp.starts_with("default-src 'self';"), "{csp}");
        assert!(!csp.contains("'none'; style-src"), "no script hash: {csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(csp.matches("'sha256-").count(), 2, "{csp}");
        // Nothing the policy would block: no inline handlers or style attributes, no external
        // scripts, styles, fonts or images.
        let lower = PAGE.to_ascii_lowercase();
        for forbidden in [
            " style=\"",
            " onclick=",
            " onload=",
            " onsubmit=",
            " oninput=",
            "src=\"http",
            "href=\"http",
            "javascript:",
        ] {
            assert!(
                !lower.contains(forbidden),
                "the page contains {forbidden:?}"
            );
        }
        let style = &lower[lower.find("<style>").unwrap()..lower.find("</style>").unwrap()];
        for forbidden in ["@import", "url("] {
            assert!(
                !style.contains(forbidden),
                "the style contains {forbidden:?}"
            );
        }
    }
}
