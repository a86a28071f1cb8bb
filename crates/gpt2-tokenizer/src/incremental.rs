use crate::{Gpt2Tokenizer, TokenizerError};

/// Turns a stream of ids into a stream of text pieces whose concatenation equals
/// [`Gpt2Tokenizer::decode`] of all the ids.
///
/// GPT-2 tokens are byte sequences, so one character (an emoji, a CJK ideograph) often spans
/// several tokens. A piece is released only once the bytes so far decode without a trailing
/// replacement character; until then the ids wait. [`IncrementalDecoder::finish`] releases
/// whatever is left, with U+FFFD for bytes that never completed a character.
#[derive(Debug)]
pub struct IncrementalDecoder<'a> {
    tokenizer: &'a Gpt2Tokenizer,
    ids: Vec<u32>,
    /// Start of the window decoded for context (byte-level decoding needs none, but other
    /// decoders strip or add spaces at a window's start, so the window keeps one released token).
    prefix_offset: usize,
    /// Ids before this index have been released as text.
    read_offset: usize,
}

impl<'a> IncrementalDecoder<'a> {
    pub(crate) fn new(tokenizer: &'a Gpt2Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds one id; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let released = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let window = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if window.ends_with('\u{FFFD}') || window.len() <= released.len() {
            return Ok(None);
        }
        let Some(piece) = window.get(released.len()..) else {
            return Ok(None);
        };
        let piece = piece.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(piece))
    }

    /// Releases the text of every id not yet released (incomplete characters become U+FFFD).
    pub fn finish(mut self) -> Result<String, TokenizerError> {
        let released = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let window = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.read_offset = self.ids.len();
        Ok(window.get(released.len()..).unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(tokenizer: &Gpt2Tokenizer, ids: &[u32]) -> (Vec<String>, String) {
        let mut decoder = tokenizer.incremental_decoder();
        let mut pieces = Vec::new();
        for &id in ids {
            if let Some(piece) = decoder.push(id).unwrap() {
                pieces.push(piece);
            }
        }
        let tail = decoder.finish().unwrap();
        (pieces, tail)
    }

    #[test]
    fn pieces_concatenate_to_full_decode_and_never_split_a_character() {
        let tokenizer = Gpt2Tokenizer::embedded().unwrap();
        for text in [
            "Hello, world! 👩‍👩‍👧‍👦 family",
            "日本語のテキストと한국어",
            "naïve café 🇫🇷🇩🇪 ok<|endoftext|>after",
            "\t\r\n  spaces   and 🤷🏽‍♀️",
        ] {
            let ids = tokenizer.encode(text).unwrap();
            let (pieces, tail) = stream(&tokenizer, &ids);
            for piece in &pieces {
                assert!(!piece.contains('\u{FFFD}'), "{piece:?} in {text:?}");
            }
            let joined = pieces.concat() + &tail;
            assert_eq!(joined, tokenizer.decode(&ids).unwrap());
            assert!(tail.is_empty(), "complete text leaves no tail: {tail:?}");
        }
    }

    #[test]
    fn multi_token_character_waits_for_its_last_byte() {
        let tokenizer = Gpt2Tokenizer::embedded().unwrap();
        let ids = tokenizer.encode("🤷").unwrap();
        assert!(ids.len() > 1, "the emoji spans several tokens: {ids:?}");
        let mut decoder = tokenizer.incremental_decoder();
        for &id in &ids[..ids.len() - 1] {
            assert_eq!(decoder.push(id).unwrap(), None);
        }
        assert_eq!(
            decoder.push(ids[ids.len() - 1]).unwrap().as_deref(),
            Some("🤷")
        );
    }

    #[test]
    fn unfinished_character_is_flushed_as_replacement() {
        let tokenizer = Gpt2Tokenizer::embedded().unwrap();
        let ids = tokenizer.encode("ok 🤷").unwrap();
        let (pieces, tail) = stream(&tokenizer, &ids[..ids.len() - 1]);
        assert_eq!(pieces.concat(), "ok");
        assert!(
            tail.starts_with(' ') && tail.ends_with('\u{FFFD}'),
            "{tail:?}"
        );
    }
}
