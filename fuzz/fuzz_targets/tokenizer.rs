//! The embedded GPT-2 tokenizer: encode/decode round trips and incremental decoding.
//!
//! Invariants checked (a failed assertion is a crash):
//! - for any UTF-8 input, `decode(encode(text))` is `text` with every literal `<|endoftext|>`
//!   removed (it encodes to the special id, which `decode` skips), so exactly `text` when it has
//!   none; every id is in the vocabulary; no token covers more than `max_token_bytes()` bytes;
//! - the incremental decoder's pieces, then its `finish()`, concatenate to `decode` of the same
//!   ids, and over the ids of a text no piece holds a U+FFFD the text does not (a piece never
//!   ends inside a character that a later id completes);
//! - the same concatenation holds for arbitrary id sequences (the input's bytes read as ids),
//!   which need not be valid UTF-8 at all;
//! - nothing panics.

#![no_main]

use std::sync::OnceLock;

use gpt2_tokenizer::{Gpt2Tokenizer, END_OF_TEXT};
use libfuzzer_sys::fuzz_target;

/// Ids read from the raw input, at most (the incremental decoder re-decodes its window per id).
const MAX_RAW_IDS: usize = 96;

fn tokenizer() -> &'static Gpt2Tokenizer {
    static TOKENIZER: OnceLock<Gpt2Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Gpt2Tokenizer::embedded().expect("the embedded tokenizer loads"))
}

/// The incremental decoder's pieces and its final flush.
fn stream(tokenizer: &Gpt2Tokenizer, ids: &[u32]) -> (Vec<String>, String) {
    let mut decoder = tokenizer.incremental_decoder();
    let mut pieces = Vec::new();
    for &id in ids {
        if let Some(piece) = decoder.push(id).expect("push") {
            assert!(!piece.is_empty(), "an empty piece for {ids:?}");
            pieces.push(piece);
        }
    }
    let tail = decoder.finish().expect("finish");
    (pieces, tail)
}

fuzz_target!(|data: &[u8]| {
    let tokenizer = tokenizer();
    let vocab = tokenizer.vocab_size();

    if let Ok(text) = std::str::from_utf8(data) {
        let ids = tokenizer.encode(text).expect("encode");
        assert!(ids.iter().all(|&id| (id as usize) < vocab), "{ids:?}");
        assert!(
            ids.len() * tokenizer.max_token_bytes() >= text.len(),
            "{} ids for {} bytes",
            ids.len(),
            text.len()
        );
        let decoded = tokenizer.decode(&ids).expect("decode");
        assert_eq!(
            decoded,
            text.replace(END_OF_TEXT, ""),
            "round trip of {text:?}"
        );

        let (pieces, tail) = stream(tokenizer, &ids);
        let joined = pieces.concat() + &tail;
        assert_eq!(joined, decoded, "pieces {pieces:?} + {tail:?}");
        if !text.contains('\u{FFFD}') {
            for piece in pieces.iter().chain([&tail]) {
                assert!(!piece.contains('\u{FFFD}'), "{piece:?} of {text:?}");
            }
        }
        // A complete text leaves nothing waiting unless it ends with U+FFFD itself (a piece that
        // ends with one is held back, as it may be an unfinished character).
        if !decoded.ends_with('\u{FFFD}') {
            assert!(tail.is_empty(), "tail {tail:?} of {text:?}");
        }
    }

    // Arbitrary ids: every pair of bytes is one id.
    let ids: Vec<u32> = data
        .chunks_exact(2)
        .take(MAX_RAW_IDS)
        .map(|pair| u32::from(u16::from_le_bytes([pair[0], pair[1]])) % vocab as u32)
        .collect();
    let decoded = tokenizer.decode(&ids).expect("decode");
    let (pieces, tail) = stream(tokenizer, &ids);
    assert_eq!(pieces.concat() + &tail, decoded, "ids {ids:?}");
});
