//! The non-streamed completion answer, and the pieces the stream shares with it.

use gpt2_engine::gpt2_tokenizer::Gpt2Tokenizer;
use gpt2_engine::{Completed, FinishReason, PromptToken, TokenEvent, TopLogprob};
use serde_json::{json, Map, Value};

use super::request::CompletionRequest;

/// What every answer and chunk of one completion carries.
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// OpenAI's finish reasons: `stop` for the end-of-text token and for a stop string.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop => "stop",
    }
}

/// JSON has no infinities: a token with no probability reports `null`.
fn finite(logprob: f32) -> Value {
    crate::streaming::finite(logprob)
}

/// `{token text: logprob}` of a position's alternatives.
fn top_dict(top: &[TopLogprob]) -> Value {
    let mut dict = Map::new();
    for t in top {
        dict.entry(t.text.clone())
            .or_insert_with(|| finite(t.logprob));
    }
    Value::Object(dict)
}

/// OpenAI's `logprobs` object of a choice, built token by token: `text_offset` counts the
/// characters of the tokens before each one, from the start of the choice's text.
#[derive(Default)]
pub struct Logprobs {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
    /// Characters so far.
    offset: usize,
}

impl Logprobs {
    fn push(&mut self, token: String, logprob: Value, top: Value) {
        self.text_offset.push(json!(self.offset));
        self.offset += token.chars().count();
        self.tokens.push(Value::String(token));
        self.token_logprobs.push(logprob);
        self.top_logprobs.push(top);
    }

    /// The prompt's tokens (with `echo`): the first has no log-probability (`null`).
    pub fn push_prompt(&mut self, prompt: &[PromptToken]) {
        for token in prompt {
            let (logprob, top) = match token.logprob {
                Some(logprob) => (finite(logprob), top_dict(&token.top_logprobs)),
                None => (Value::Null, Value::Null),
            };
            self.push(token.text.clone(), logprob, top);
        }
    }

    /// A generated token, listed as the tokenizer writes it on its own (as its alternatives are).
    pub fn push_token(&mut self, token: &TokenEvent, tokenizer: &Gpt2Tokenizer) {
        let text = tokenizer
            .token_text(token.id)
            .unwrap_or_else(|_| token.token_text.clone());
        self.push(text, finite(token.logprob), top_dict(&token.top_logprobs));
    }

    /// The entries pushed since the last call, as a `logprobs` object (the stream's chunks).
    pub fn take(&mut self) -> Value {
        let value = self.value();
        self.tokens.clear();
        self.token_logprobs.clear();
        self.top_logprobs.clear();
        self.text_offset.clear();
        value
    }

    pub fn value(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

/// `usage` of a completion.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// The whole answer: `n` choices per prompt, in order.
pub fn completion(
    request: &CompletionRequest,
    completed: &[Completed],
    meta: &Meta,
    tokenizer: &Gpt2Tokenizer,
) -> Value {
    let n = request.n;
    let mut choices = Vec::with_capacity(completed.len() * n);
    for (p, done) in completed.iter().enumerate() {
        let echo = request.echo_texts.get(p).map_or("", String::as_str);
        for i in 0..n {
            let sequence = done.output.sequences.iter().find(|s| s.end.index == i);
            let (text, reason) = match sequence {
                Some(s) => (s.end.text.as_str(), finish_reason(s.end.finish_reason)),
                None => ("", "length"),
            };
            let logprobs = request.logprobs.map(|_| {
                let mut logprobs = Logprobs::default();
                if request.echo {
                    if let Some(prompt) = &done.output.prompt {
                        logprobs.push_prompt(prompt);
                    }
                }
                for token in sequence.map_or(&[][..], |s| s.tokens.as_slice()) {
                    logprobs.push_token(token, tokenizer);
                }
                logprobs.value()
            });
            choices.push(json!({
                "index": p * n + i,
                "text": format!("{echo}{text}"),
                "logprobs": logprobs,
                "finish_reason": reason,
            }));
        }
    }
    let prompt_tokens = completed.iter().map(|c| c.output.prompt_tokens).sum();
    let completion_tokens = completed.iter().map(|c| c.output.generated_tokens).sum();
    json!({
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    })
}
