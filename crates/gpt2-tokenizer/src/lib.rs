//! GPT-2's byte-level BPE tokenizer: text ⇄ token ids.
//!
//! A thin wrapper over the `tokenizers` crate that knows where a GPT-2 model directory keeps its
//! tokenizer (`tokenizer.json`, or else `vocab.json` + `merges.txt`), falls back to the original
//! GPT-2 vocabulary embedded in this crate, decodes while skipping `<|endoftext|>`, and decodes
//! incrementally for streams without ever emitting half of a multi-byte character.
//!
//! ```
//! use gpt2_tokenizer::Gpt2Tokenizer;
//!
//! let tokenizer = Gpt2Tokenizer::embedded().unwrap();
//! let ids = tokenizer.encode("Hello, world!").unwrap();
//! assert_eq!(ids, vec![15496, 11, 995, 0]);
//! assert_eq!(tokenizer.decode(&ids).unwrap(), "Hello, world!");
//! ```

mod incremental;

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

pub use incremental::IncrementalDecoder;

/// The id of `<|endoftext|>` in the GPT-2 vocabulary.
pub const END_OF_TEXT_ID: u32 = 50256;
/// The text of GPT-2's only special token.
pub const END_OF_TEXT: &str = "<|endoftext|>";

const EMBEDDED_TOKENIZER_JSON: &[u8] = include_bytes!("../data/tokenizer.json");

/// Errors of loading or running the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A tokenizer file exists but could not be read or parsed.
    #[error("cannot load tokenizer from {path}: {reason}")]
    Load { path: String, reason: String },
    /// Encoding or decoding failed inside the `tokenizers` library.
    #[error("tokenizer failed: {0}")]
    Backend(String),
}

/// Where a [`Gpt2Tokenizer`] was loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// `tokenizer.json` in a model directory.
    TokenizerJson(std::path::PathBuf),
    /// `vocab.json` and `merges.txt` in a model directory.
    VocabAndMerges(std::path::PathBuf),
    /// The original GPT-2 tokenizer compiled into this crate.
    Embedded,
}

/// GPT-2's byte-level BPE tokenizer.
#[derive(Clone)]
pub struct Gpt2Tokenizer {
    inner: Tokenizer,
    source: TokenizerSource,
    special_ids: Vec<u32>,
    /// Input bytes the longest token covers (one per character of a byte-level token).
    max_token_bytes: usize,
}

impl std::fmt::Debug for Gpt2Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpt2Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Gpt2Tokenizer {
    /// The original GPT-2 tokenizer (50,257 tokens), compiled into the binary.
    pub fn embedded() -> Result<Self, TokenizerError> {
        let inner =
            Tokenizer::from_bytes(EMBEDDED_TOKENIZER_JSON).map_err(|e| TokenizerError::Load {
                path: "<embedded>".into(),
                reason: e.to_string(),
            })?;
        Ok(Self::from_parts(inner, TokenizerSource::Embedded))
    }

    /// Loads the tokenizer of a model directory: `tokenizer.json` when present, else
    /// `vocab.json` + `merges.txt`, else the embedded GPT-2 tokenizer.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_tokenizer_json(&json);
        }
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        if vocab.is_file() && merges.is_file() {
            return Self::from_vocab_and_merges(&vocab, &merges);
        }
        Self::embedded()
    }

    /// Loads a `tokenizers` library `tokenizer.json` file.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self::from_parts(
            inner,
            TokenizerSource::TokenizerJson(path.to_path_buf()),
        ))
    }

    /// Builds GPT-2's tokenizer from the `vocab.json` and `merges.txt` of the original release:
    /// byte-level pre-tokenizer and decoder, no prefix space, `<|endoftext|>` as a special token.
    pub fn from_vocab_and_merges(vocab: &Path, merges: &Path) -> Result<Self, TokenizerError> {
        let load_error = |reason: String| TokenizerError::Load {
            path: vocab.display().to_string(),
            reason,
        };
        let vocab_str = vocab
            .to_str()
            .ok_or_else(|| load_error("non UTF-8 path".into()))?;
        let merges_str = merges
            .to_str()
            .ok_or_else(|| load_error("non UTF-8 path".into()))?;
        let bpe = BPE::from_file(vocab_str, merges_str)
            .build()
            .map_err(|e| load_error(e.to_string()))?;
        let mut inner = Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
            .with_decoder(Some(ByteLevel::default()));
        inner
            .add_special_tokens([AddedToken::from(END_OF_TEXT, true)])
            .map_err(|e| load_error(e.to_string()))?;
        Ok(Self::from_parts(
            inner,
            TokenizerSource::VocabAndMerges(vocab.parent().unwrap_or(vocab).to_path_buf()),
        ))
    }

    fn from_parts(inner: Tokenizer, source: TokenizerSource) -> Self {
        let mut special_ids: Vec<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| *id)
            .collect();
        special_ids.sort_unstable();
        let max_token_bytes = inner
            .get_vocab(true)
            .keys()
            .map(|token| token.chars().count())
            .max()
            .unwrap_or(1)
            .max(1);
        Self {
            inner,
            source,
            special_ids,
            max_token_bytes,
        }
    }

    /// Where this tokenizer came from.
    pub fn source(&self) -> &TokenizerSource {
        &self.source
    }

    /// Number of ids, added tokens included (50,257 for GPT-2).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The most input bytes one token can cover (128 for GPT-2): a text longer than `n` times
    /// this encodes to more than `n` tokens, which callers can tell without encoding it.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// The id of `<|endoftext|>`, when the vocabulary has it.
    pub fn end_of_text_id(&self) -> Option<u32> {
        self.inner.token_to_id(END_OF_TEXT)
    }

    /// Whether `id` is a special token (skipped by [`Self::decode`]).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.binary_search(&id).is_ok()
    }

    /// Text to ids. The literal `<|endoftext|>` in the text becomes its special id, as in HF.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Backend(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids to text, skipping special tokens. Bytes that do not form valid UTF-8 become U+FFFD,
    /// as HF's `decode` does.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Backend(e.to_string()))
    }

    /// The text of one token on its own, for listings such as log-probability alternatives:
    /// a special token as its literal (`<|endoftext|>`), a token that holds part of a UTF-8
    /// character with U+FFFD in place of the incomplete bytes.
    pub fn token_text(&self, id: u32) -> Result<String, TokenizerError> {
        if self.is_special(id) {
            if let Some(token) = self.inner.id_to_token(id) {
                return Ok(token);
            }
        }
        self.decode(&[id])
    }

    /// A decoder that turns ids into text one id at a time, for streaming.
    pub fn incremental_decoder(&self) -> IncrementalDecoder<'_> {
        IncrementalDecoder::new(self)
    }
}

#[cfg(test)]
mod token_text_tests {
    use super::*;

    #[test]
    fn token_text_shows_special_tokens_and_decodes_the_others() {
        let tokenizer = Gpt2Tokenizer::embedded().unwrap();
        assert_eq!(tokenizer.token_text(50256).unwrap(), "<|endoftext|>");
        assert_eq!(tokenizer.token_text(995).unwrap(), " world");
        assert_eq!(tokenizer.token_text(33768).unwrap(), "\u{FFFD}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_matches_hf_reference_ids() {
        let tokenizer = Gpt2Tokenizer::embedded().unwrap();
        assert_eq!(tokenizer.vocab_size(), 50257);
        assert_eq!(
            tokenizer.encode("Hello, world!").unwrap(),
            vec![15496, 11, 995, 0]
        );
        assert_eq!(tokenizer.end_of_text_id(), Some(END_OF_TEXT_ID));
        assert!(tokenizer.is_special(END_OF_TEXT_ID));
        assert!(!tokenizer.is_special(0));
    }

    #[test]
    fn no_token_covers_more_input_bytes_than_max_token_bytes() {
        let tokenizer = Gpt2Tokenizer::embedded().unwrap();
        assert_eq!(tokenizer.max_token_bytes(), 128);
        // The longest token: 128 bytes of input in one id, and one byte more needs a second id.
        let longest = "ÃÂ".repeat(32);
        assert_eq!(longest.len(), 128);
        assert_eq!(tokenizer.encode(&longest).unwrap().len(), 1);
        assert_eq!(tokenizer.encode(&format!("{longest}x")).unwrap().len(), 2);
    }

    #[test]
    fn decode_skips_end_of_text() {
        let tokenizer = Gpt2Tokenizer::embedded().unwrap();
        let ids = tokenizer.encode("a<|endoftext|>b").unwrap();
        assert!(ids.contains(&END_OF_TEXT_ID));
        assert_eq!(tokenizer.decode(&ids).unwrap(), "ab");
    }

    #[test]
    fn vocab_and_merges_equal_tokenizer_json() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gpt2-tokenizer");
        let from_files =
            Gpt2Tokenizer::from_vocab_and_merges(&dir.join("vocab.json"), &dir.join("merges.txt"))
                .unwrap();
        let embedded = Gpt2Tokenizer::embedded().unwrap();
        for text in [
            "Hello, world!",
            "  leading spaces\tand tabs\r\n",
            "it's <|endoftext|> done",
            "日本語のテキスト 👩‍👩‍👧",
        ] {
            assert_eq!(
                from_files.encode(text).unwrap(),
                embedded.encode(text).unwrap()
            );
        }
        assert_eq!(from_files.vocab_size(), 50257);
        assert!(from_files.is_special(END_OF_TEXT_ID));
    }

    #[test]
    fn directory_without_tokenizer_falls_back_to_embedded() {
        let dir = std::env::temp_dir().join(format!("gpt2-tok-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tokenizer = Gpt2Tokenizer::from_model_dir(&dir).unwrap();
        assert_eq!(tokenizer.source(), &TokenizerSource::Embedded);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn corrupt_tokenizer_json_is_an_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("gpt2-tok-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
        let err = Gpt2Tokenizer::from_model_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
