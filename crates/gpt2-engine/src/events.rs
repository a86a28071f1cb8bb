//! The token stream every answer is built from: what a request's generator emits, turned into
//! text events. The non-streamed answer is the `text` of each sequence's [`SequenceEnd`], so a
//! stream and a plain answer cannot disagree.

use gpt2_generation::Emitted;
use gpt2_tokenizer::{Gpt2Tokenizer, IncrementalDecoder};
use serde::Serialize;

use crate::stop::{cut_at_stop, StopMatcher};
use crate::EngineError;

/// Why a returned sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// It reached `max_length` (or `max_new_tokens`).
    Length,
    /// The model produced its end-of-sequence token.
    Eos,
    /// A stop condition of the caller ended it.
    Stop,
}

impl FinishReason {
    /// The name used on the wire: `length`, `eos` or `stop`.
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
        }
    }
}

impl From<gpt2_generation::FinishReason> for FinishReason {
    fn from(reason: gpt2_generation::FinishReason) -> Self {
        match reason {
            gpt2_generation::FinishReason::Length => FinishReason::Length,
            gpt2_generation::FinishReason::Eos => FinishReason::Eos,
        }
    }
}

/// A likely token at some position, with its log-probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    /// The token id.
    pub id: u32,
    /// The token's text on its own (`<|endoftext|>` for the end-of-text token).
    pub text: String,
    /// Natural log of its probability under the model.
    pub logprob: f32,
}

/// One generated token of one returned sequence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenEvent {
    /// The returned sequence (`0..num_return_sequences`).
    pub index: usize,
    /// The token id.
    pub id: u32,
    /// The text this token lets out: never half a UTF-8 character (a byte-level token that ends
    /// inside one waits for the next) and never part of a stop string (text that could start
    /// one waits until it is resolved), so the texts of a sequence concatenate to its
    /// continuation. Empty while something is held back, and for the end-of-text token.
    pub text: String,
    /// The text this token completes, whether or not it is held back for a stop string: what
    /// token listings (log-probabilities, details) show.
    pub token_text: String,
    /// Natural log of the token's probability under the model (log-softmax of the raw logits).
    pub logprob: f32,
    /// The request's `top_logprobs` most likely tokens at this position, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// A token of the prompt, with its log-probability given the tokens before it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptToken {
    /// The token id.
    pub id: u32,
    /// The token's text on its own.
    pub text: String,
    /// Natural log of its probability given the tokens before it; `None` for the first token,
    /// which has nothing before it.
    pub logprob: Option<f32>,
    /// The request's `top_logprobs` most likely tokens at this position (none for the first).
    pub top_logprobs: Vec<TopLogprob>,
}

/// The end of one returned sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SequenceEnd {
    /// The returned sequence (`0..num_return_sequences`).
    pub index: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// The sequence's whole string, prompt included: exactly its string in the non-streamed
    /// answer.
    pub text: String,
    /// Tokens it generated (a final end-of-text token included, and every token up to the one
    /// that completed a stop string).
    pub generated_tokens: usize,
    /// The ids of those tokens.
    pub token_ids: Vec<u32>,
    /// The seed its sampling stream was drawn from (`None` for greedy and beam search).
    pub seed: Option<u64>,
}

/// What a generation stream yields.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum GenerationEvent {
    /// The prompt's tokens with their log-probabilities: the first event, when the request asked
    /// for `prompt_logprobs`.
    Prompt(Vec<PromptToken>),
    /// A token of one sequence (greedy and sampling; beam search knows its winners only at the
    /// end, so its sequences arrive as [`GenerationEvent::End`] alone).
    Token(TokenEvent),
    /// A sequence is complete; it comes right after that sequence's last token.
    End(SequenceEnd),
}

/// Everything one returned sequence produced: its end and its token events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SequenceOutput {
    /// How it ended, with its whole string.
    pub end: SequenceEnd,
    /// Its tokens as they were streamed (none in beam search, whose token ids are in `end`).
    pub tokens: Vec<TokenEvent>,
}

/// Collects a stream's events into whole sequences.
#[derive(Debug, Default)]
pub(crate) struct Collector {
    prompt: Option<Vec<PromptToken>>,
    tokens: Vec<Vec<TokenEvent>>,
    ends: Vec<Option<SequenceEnd>>,
}

impl Collector {
    pub(crate) fn new(sequences: usize) -> Self {
        Self {
            prompt: None,
            tokens: vec![Vec::new(); sequences],
            ends: vec![None; sequences],
        }
    }

    pub(crate) fn push(&mut self, event: GenerationEvent) {
        match event {
            GenerationEvent::Prompt(tokens) => self.prompt = Some(tokens),
            GenerationEvent::Token(token) => {
                if let Some(tokens) = self.tokens.get_mut(token.index) {
                    tokens.push(token);
                }
            }
            GenerationEvent::End(end) => {
                if let Some(slot) = self.ends.get_mut(end.index) {
                    *slot = Some(end);
                }
            }
        }
    }

    /// The answer: every sequence's string (empty for one that never ended) and its parts.
    pub(crate) fn finish(self, prompt_tokens: usize) -> crate::GenerationOutput {
        let mut texts = Vec::with_capacity(self.ends.len());
        let mut sequences = Vec::with_capacity(self.ends.len());
        let mut generated_tokens = 0;
        for (end, tokens) in self.ends.into_iter().zip(self.tokens) {
            match end {
                Some(end) => {
                    generated_tokens += end.generated_tokens;
                    texts.push(end.text.clone());
                    sequences.push(SequenceOutput { end, tokens });
                }
                None => texts.push(String::new()),
            }
        }
        crate::GenerationOutput {
            texts,
            prompt_tokens,
            generated_tokens,
            sequences,
            prompt: self.prompt,
        }
    }
}

/// One returned sequence on its way to text.
struct Sequence<'t> {
    decoder: Option<IncrementalDecoder<'t>>,
    stop: StopMatcher,
    ids: Vec<u32>,
    ended: bool,
}

/// What a request's answer strings are made of, besides the generated text.
#[derive(Debug, Clone, Default)]
pub(crate) struct AnswerShape {
    /// What each answer string starts with: the prompt, or nothing (`return_full_text: false`).
    pub(crate) prefix: String,
    /// The request's stop strings.
    pub(crate) stop: Vec<String>,
    /// The seed of the sampling streams, reported in each sequence's end.
    pub(crate) seed: Option<u64>,
}

/// Turns one request's emitted tokens into [`GenerationEvent`]s.
pub(crate) struct EventBuilder<'t> {
    tokenizer: &'t Gpt2Tokenizer,
    shape: AnswerShape,
    sequences: Vec<Sequence<'t>>,
}

impl<'t> EventBuilder<'t> {
    pub(crate) fn new(tokenizer: &'t Gpt2Tokenizer, shape: AnswerShape, sequences: usize) -> Self {
        Self {
            tokenizer,
            sequences: (0..sequences)
                .map(|_| Sequence {
                    decoder: Some(tokenizer.incremental_decoder()),
                    stop: StopMatcher::new(&shape.stop),
                    ids: Vec::new(),
                    ended: false,
                })
                .collect(),
            shape,
        }
    }

    fn top(&self, top: &[(u32, f32)]) -> Result<Vec<TopLogprob>, EngineError> {
        top.iter()
            .map(|&(id, logprob)| {
                Ok(TopLogprob {
                    id,
                    text: self.tokenizer.token_text(id)?,
                    logprob,
                })
            })
            .collect()
    }

    /// The prompt's event, from its ids and `(logprob, top alternatives)` for every token but
    /// the first.
    pub(crate) fn on_prompt(
        &self,
        prompt: &[u32],
        scored: &[crate::run::TokenScore],
        out: &mut Vec<GenerationEvent>,
    ) -> Result<(), EngineError> {
        let mut tokens = Vec::with_capacity(prompt.len());
        for (position, &id) in prompt.iter().enumerate() {
            let scores = position.checked_sub(1).and_then(|p| scored.get(p));
            tokens.push(PromptToken {
                id,
                text: self.tokenizer.token_text(id)?,
                logprob: scores.map(|s| s.0),
                top_logprobs: match scores {
                    Some((_, top)) => self.top(top)?,
                    None => Vec::new(),
                },
            });
        }
        out.push(GenerationEvent::Prompt(tokens));
        Ok(())
    }

    /// The events of one step's emitted tokens, appended to `out`. Returns the sequences that a
    /// stop string ended: the caller ends them in the generator.
    pub(crate) fn on_emitted(
        &mut self,
        emitted: &[Emitted],
        out: &mut Vec<GenerationEvent>,
    ) -> Result<Vec<usize>, EngineError> {
        let mut stopped = Vec::new();
        for e in emitted {
            let top_logprobs = self.top(&e.top_logprobs)?;
            let Some(sequence) = self.sequences.get_mut(e.index) else {
                continue;
            };
            if sequence.ended {
                continue;
            }
            sequence.ids.push(e.token);
            let mut token_text = match sequence.decoder.as_mut() {
                Some(decoder) => decoder.push(e.token)?.unwrap_or_default(),
                None => String::new(),
            };
            if e.finished.is_some() {
                // Whatever the decoder still holds (an incomplete character) goes with the last
                // token, so that the deltas add up to the continuation.
                if let Some(decoder) = sequence.decoder.take() {
                    token_text.push_str(&decoder.finish()?);
                }
            }
            let released = sequence.stop.push(&token_text);
            let mut text = released.text;
            if e.finished.is_some() && !released.stopped {
                text.push_str(&sequence.stop.finish());
            }
            out.push(GenerationEvent::Token(TokenEvent {
                index: e.index,
                id: e.token,
                text,
                token_text,
                logprob: e.logprob,
                top_logprobs,
            }));
            if released.stopped {
                stopped.push(e.index);
                out.push(self.end(e.index, FinishReason::Stop)?);
            } else if let Some(reason) = e.finished {
                out.push(self.end(e.index, reason.into())?);
            }
        }
        Ok(stopped)
    }

    /// The end events of the sequences that have not ended yet (all of them in beam search),
    /// from the generator's final outputs.
    pub(crate) fn on_outputs(
        &mut self,
        outputs: Vec<Vec<u32>>,
        eos_token_id: Option<u32>,
        out: &mut Vec<GenerationEvent>,
    ) -> Result<(), EngineError> {
        for (index, ids) in outputs.into_iter().enumerate() {
            if self.sequences.get(index).is_none_or(|s| s.ended) {
                continue;
            }
            let reason = gpt2_generation::FinishReason::of(&ids, eos_token_id);
            self.sequences[index].ids = ids;
            out.push(self.end(index, reason.into())?);
        }
        Ok(())
    }

    fn end(
        &mut self,
        index: usize,
        mut finish_reason: FinishReason,
    ) -> Result<GenerationEvent, EngineError> {
        let sequence = &mut self.sequences[index];
        sequence.ended = true;
        let generated = if finish_reason == FinishReason::Stop {
            sequence.stop.text().to_string()
        } else {
            let decoded = self.tokenizer.decode(&sequence.ids)?;
            // Beam search's sequences arrive whole: their stop strings are found here.
            match cut_at_stop(&decoded, &self.shape.stop) {
                Some(cut) => {
                    finish_reason = FinishReason::Stop;
                    cut.to_string()
                }
                None => decoded,
            }
        };
        Ok(GenerationEvent::End(SequenceEnd {
            index,
            finish_reason,
            text: format!("{}{}", self.shape.prefix, generated),
            generated_tokens: sequence.ids.len(),
            token_ids: sequence.ids.clone(),
            seed: self.shape.seed,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpt2_generation::FinishReason as Reason;

    fn shape(prefix: &str) -> AnswerShape {
        AnswerShape {
            prefix: prefix.into(),
            ..AnswerShape::default()
        }
    }

    fn emitted(index: usize, token: u32, finished: Option<Reason>) -> Emitted {
        Emitted {
            index,
            token,
            logprob: -1.5,
            finished,
            top_logprobs: Vec::new(),
        }
    }

    #[test]
    fn a_character_split_across_tokens_is_held_back_until_complete() {
        let tokenizer = Gpt2Tokenizer::embedded().unwrap();
        // "日本": each ideograph's three UTF-8 bytes span two byte-level tokens.
        let ids = [33768, 98, 17312, 105];
        let mut builder = EventBuilder::new(&tokenizer, shape("Say:"), 1);
        let mut events = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let finished = (i == ids.len() - 1).then_some(Reason::Length);
            builder
                .on_emitted(&[emitted(0, id, finished)], &mut events)
                .unwrap();
        }
        let texts: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                GenerationEvent::Token(t) => Some(t.text.as_str()),
                GenerationEvent::End(_) | GenerationEvent::Prompt(_) => None,
            })
            .collect();
        assert_eq!(texts, ["", "日", "", "本"]);
        let GenerationEvent::End(end) = events.last().unwrap() else {
            panic!("the last event ends the sequence")
        };
        assert_eq!(end.text, "Say:日本");
        assert_eq!(
            (end.finish_reason, end.generated_tokens),
            (FinishReason::Length, 4)
        );
    }

    #[test]
    fn an_unfinished_character_at_the_end_goes_with_the_last_token() {
        let tokenizer = Gpt2Tokenizer::embedded().unwrap();
        let mut builder = EventBuilder::new(&tokenizer, shape("x"), 2);
        let mut events = Vec::new();
        builder
            .on_emitted(
                &[
                    emitted(0, 33768, Some(Reason::Length)),
                    emitted(1, 50256, Some(Reason::Eos)),
                ],
                &mut events,
            )
            .unwrap();
        let (GenerationEvent::Token(cut), GenerationEvent::End(cut_end)) = (&events[0], &events[1])
        else {
            panic!("token then end: {events:?}")
        };
        assert_eq!(
            format!("x{}", cut.text),
            cut_end.text,
            "deltas add up to the string"
        );
        assert!(cut.text.ends_with('\u{FFFD}'));
        let GenerationEvent::End(eos_end) = &events[3] else {
            panic!("{events:?}")
        };
        assert_eq!(
            (eos_end.text.as_str(), eos_end.finish_reason),
            ("x", FinishReason::Eos)
        );
        // Sequences that already ended are not ended twice by the final outputs.
        let mut more = Vec::new();
        builder
            .on_outputs(vec![vec![33768], vec![50256]], Some(50256), &mut more)
            .unwrap();
        assert!(more.is_empty());
    }

    #[test]
    fn beam_outputs_arrive_as_ends_alone() {
        let tokenizer = Gpt2Tokenizer::embedded().unwrap();
        let mut builder = EventBuilder::new(&tokenizer, shape("Hi"), 2);
        let mut events = Vec::new();
        builder
            .on_outputs(
                vec![vec![995, 50256], vec![995, 995]],
                Some(50256),
                &mut events,
            )
            .unwrap();
        let ends: Vec<(usize, FinishReason, &str)> = events
            .iter()
            .map(|e| match e {
                GenerationEvent::End(end) => (end.index, end.finish_reason, end.text.as_str()),
                _ => panic!("no tokens in beam search"),
            })
            .collect();
        assert_eq!(
            ends,
            [
                (0, FinishReason::Eos, "Hi world"),
                (1, FinishReason::Length, "Hi world world")
            ]
        );
    }
}
