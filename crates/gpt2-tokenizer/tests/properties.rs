//! Properties of the embedded GPT-2 tokenizer over arbitrary text:
//! - `decode(encode(text))` is the text, with each literal `<|endoftext|>` removed (it becomes
//!   the special id, which `decode` skips);
//! - the incremental decoder's pieces and its `finish()` concatenate to `decode`, and over the ids
//!   of a text no piece holds a U+FFFD the text does not have: a piece never ends inside a
//!   character that a later id completes, and a complete text leaves nothing for `finish()`;
//! - for arbitrary ids (any bytes, valid UTF-8 or not), the pieces still concatenate to `decode`.

use std::sync::OnceLock;

use gpt2_tokenizer::{Gpt2Tokenizer, END_OF_TEXT};
use proptest::prelude::*;

fn tokenizer() -> &'static Gpt2Tokenizer {
    static TOKENIZER: OnceLock<Gpt2Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Gpt2Tokenizer::embedded().unwrap())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        // PROPTEST_CASES=<n> runs more (or fewer) cases.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(256),
        // Failures print their minimal case; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text made of pieces that exercise the byte-level BPE: words, spaces and line breaks,
/// contractions, digits, multi-byte scripts, emoji sequences (ZWJ, flags, skin tones), U+FFFD,
/// parts of the special token, and any character at all.
fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-zA-Z]{1,8}",
        "[ \t\r\n]{1,4}",
        prop::sample::select(vec!["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'"])
            .prop_map(String::from),
        "[0-9]{1,5}",
        "[éüßçñøåÆ]{1,3}",
        "[日本語のテキスト한국어Ελληνικάрусский]{1,4}",
        prop::sample::select(vec!["👩‍👩‍👧‍👦", "🇫🇷", "🤷🏽‍♀️", "😀", "\u{FE0F}", "\u{200D}"])
            .prop_map(String::from),
        Just("\u{FFFD}".to_string()),
        prop::sample::select(vec![
            "<|endoftext|",
            "<|",
            "|>",
            "endoftext",
            "<|endoftext|>"
        ])
        .prop_map(String::from),
        any::<char>().prop_map(String::from),
        "[\\x00-\\x1f\\x7f]",
    ];
    prop::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
}

/// The incremental decoder's pieces, and what `finish()` releases.
fn stream(ids: &[u32]) -> (Vec<String>, String) {
    let mut decoder = tokenizer().incremental_decoder();
    let mut pieces = Vec::new();
    for &id in ids {
        if let Some(piece) = decoder.push(id).unwrap() {
            pieces.push(piece);
        }
    }
    (pieces, decoder.finish().unwrap())
}

fn check_round_trip(text: &str) -> Result<(), TestCaseError> {
    let tokenizer = tokenizer();
    let ids = tokenizer.encode(text).unwrap();
    let decoded = tokenizer.decode(&ids).unwrap();
    prop_assert_eq!(&decoded, &text.replace(END_OF_TEXT, ""));
    if !text.contains(END_OF_TEXT) {
        prop_assert_eq!(&decoded, text);
    }
    prop_assert!(ids.len() * tokenizer.max_token_bytes() >= text.len());
    Ok(())
}

fn check_stream_of_text(text: &str) -> Result<(), TestCaseError> {
    let tokenizer = tokenizer();
    let ids = tokenizer.encode(text).unwrap();
    let decoded = tokenizer.decode(&ids).unwrap();
    let (pieces, tail) = stream(&ids);
    prop_assert_eq!(
        pieces.concat() + &tail,
        decoded.clone(),
        "pieces {:?}",
        pieces
    );
    if !text.contains('\u{FFFD}') {
        for piece in pieces.iter().chain([&tail]) {
            prop_assert!(!piece.contains('\u{FFFD}'), "{:?} split a character", piece);
        }
    }
    if !decoded.ends_with('\u{FFFD}') {
        prop_assert!(tail.is_empty(), "{:?} left for finish()", tail);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn decode_inverts_encode(text in text()) {
        check_round_trip(&text)?;
    }

    #[test]
    fn decode_inverts_encode_on_any_string(text in any::<String>()) {
        check_round_trip(&text)?;
    }

    #[test]
    fn streamed_pieces_are_the_decoded_text_and_never_split_a_character(text in text()) {
        check_stream_of_text(&text)?;
    }

    #[test]
    fn streamed_pieces_of_any_string(text in any::<String>()) {
        check_stream_of_text(&text)?;
    }

    #[test]
    fn streamed_pieces_of_any_ids_concatenate_to_decode(
        ids in prop::collection::vec(0u32..50257, 0..40),
    ) {
        let decoded = tokenizer().decode(&ids).unwrap();
        let (pieces, tail) = stream(&ids);
        prop_assert_eq!(pieces.concat() + &tail, decoded);
    }

    #[test]
    fn streamed_pieces_of_byte_tokens_concatenate_to_decode(
        bytes in prop::collection::vec(any::<u8>(), 0..24),
    ) {
        // One id per byte: arbitrary, mostly invalid, UTF-8, with characters that complete
        // across ids and others that never do.
        let ids: Vec<u32> = bytes.iter().map(|&b| byte_token(b)).collect();
        let decoded = tokenizer().decode(&ids).unwrap();
        prop_assert_eq!(&decoded, &String::from_utf8_lossy(&bytes).into_owned());
        let (pieces, tail) = stream(&ids);
        prop_assert_eq!(pieces.concat() + &tail, decoded);
    }
}

/// The id of the token that stands for the single byte `b`, from the embedded vocabulary.
fn byte_token(b: u8) -> u32 {
    static IDS: OnceLock<Vec<u32>> = OnceLock::new();
    let ids = IDS.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/tokenizer.json");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let vocab = &json["model"]["vocab"];
        (0u8..=255)
            .map(|byte| {
                let id = &vocab[byte_level_char(byte).to_string()];
                u32::try_from(id.as_u64().expect("every byte has a token")).unwrap()
            })
            .collect()
    });
    ids[usize::from(b)]
}

/// GPT-2's byte-to-unicode map (`bytes_to_unicode` in its encoder.py): printable bytes stand for
/// themselves, the others for 256, 257, … in byte order.
fn byte_level_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let offset = (0u8..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + offset).unwrap()
}
