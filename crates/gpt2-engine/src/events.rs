//! The token stream every answer is built from: what a request's generator emits, turned into
//! text events. The non-streamed answer is the `text` of each sequence's [`SequenceEnd`], so a
//! stream and a plain answer cannot disagree.

use gpt2_generation::Emitted;
use gpt2_tokenizer::{Gpt2Tokenizer, IncrementalDecoder};
use serde::Serialize;

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

/// One generated token of one returned sequence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenEvent {
    /// The returned sequence (`0..num_return_sequences`).
    pub index: usize,
    /// The token id.
    pub id: u32,
    /// The text this token completes: never half a UTF-8 character (a byte-level token that
    /// ends inside one waits for the next), so the texts of a sequence concatenate to its
    /// continuation. Empty while a character is incomplete, and for the end-of-text token.
    pub text: String,
    /// Natural log of the token's probability under the model (log-softmax of the raw logits).
    pub logprob: f32,
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
    /// Tokens it generated (a final end-of-text token included).
    pub generated_tokens: usize,
}

/// What a generation stream yields.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum GenerationEvent {
    /// A token of one sequence (greedy and sampling; beam search knows its winners only at the
    /// end, so its sequences arrive as [`GenerationEvent::End`] alone).
    Token(TokenEvent),
    /// A sequence is complete; it comes right after that sequence's last token.
    End(SequenceEnd),
}

/// One returned sequence on its way to text.
struct Sequence<'t> {
    decoder: Option<IncrementalDecoder<'t>>,
    ids: Vec<u32>,
    ended: bool,
}

/// Turns one request's emitted tokens into [`GenerationEvent`]s.
pub(crate) struct EventBuilder<'t> {
    tokenizer: &'t Gpt2Tokenizer,
    input: String,
    sequences: Vec<Sequence<'t>>,
}

impl<'t> EventBuilder<'t> {
    pub(crate) fn new(tokenizer: &'t Gpt2Tokenizer, input: &str, sequences: usize) -> Self {
        Self {
            tokenizer,
            input: input.to_string(),
            sequences: (0..sequences)
                .map(|_| Sequence {
                    decoder: Some(tokenizer.incremental_decoder()),
                    ids: Vec::new(),
                    ended: false,
                })
                .collect(),
        }
    }

    /// The events of one step's emitted tokens, appended to `out`.
    pub(crate) fn on_emitted(
        &mut self,
        emitted: &[Emitted],
        out: &mut Vec<GenerationEvent>,
    ) -> Result<(), EngineError> {
        for e in emitted {
            let Some(sequence) = self.sequences.get_mut(e.index) else {
                continue;
            };
            sequence.ids.push(e.token);
            let mut text = match sequence.decoder.as_mut() {
                Some(decoder) => decoder.push(e.token)?.unwrap_or_default(),
                None => String::new(),
            };
            if e.finished.is_some() {
                // Whatever the decoder still holds (an incomplete character) goes with the last
                // token, so that the deltas add up to the continuation.
                if let Some(decoder) = sequence.decoder.take() {
                    text.push_str(&decoder.finish()?);
                }
            }
            out.push(GenerationEvent::Token(TokenEvent {
                index: e.index,
                id: e.token,
                text,
                logprob: e.logprob,
            }));
            if let Some(reason) = e.finished {
                out.push(self.end(e.index, reason.into())?);
            }
        }
        Ok(())
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
        finish_reason: FinishReason,
    ) -> Result<GenerationEvent, EngineError> {
        let sequence = &mut self.sequences[index];
        sequence.ended = true;
        Ok(GenerationEvent::End(SequenceEnd {
            index,
            finish_reason,
            text: format!("{}{}", self.input, self.tokenizer.decode(&sequence.ids)?),
            generated_tokens: sequence.ids.len(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpt2_generation::FinishReason as Reason;

    fn emitted(index: usize, token: u32, finished: Option<Reason>) -> Emitted {
        Emitted {
            index,
            token,
            logprob: -1.5,
            finished,
        }
    }

    #[test]
    fn a_character_split_across_tokens_is_held_back_until_complete() {
        let tokenizer = Gpt2Tokenizer::embedded().unwrap();
        // "日本": each ideograph's three UTF-8 bytes span two byte-level tokens.
        let ids = [33768, 98, 17312, 105];
        let mut builder = EventBuilder::new(&tokenizer, "Say:", 1);
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
                GenerationEvent::End(_) => None,
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
        let mut builder = EventBuilder::new(&tokenizer, "x", 2);
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
        let mut builder = EventBuilder::new(&tokenizer, "Hi", 2);
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
                GenerationEvent::Token(_) => panic!("no tokens in beam search"),
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
