//! Prompt formats and tokenisation with masks (paper Section 3 and the attack of Section 4).
//!
//! Two formats: the paper's plain `Question: {prompt}\nAnswer: {response}`, and the model's own
//! chat template ([`crate::model::chat::render`]: a user turn, then an assistant turn).
//!
//! Every encoding carries the ids, the answer-only loss mask (1 on the response's tokens, so an
//! attack or a refusal loss trains on the answer only; the reference attack trained on prompt
//! and padding too) and the attention mask (1 on real tokens, 0 on padding). A defence pair also
//! carries the pair mask: after both sequences are padded to the same length, 1 wherever they
//! differ. A padding position and a real token differ even when the pad id equals the real id
//! (pad = end-of-sequence), so the mask never hides a real token behind padding. The loss masks
//! of a pair, [`EncodedPair::harmful_mask`] and [`EncodedPair::harmless_mask`], are the pair mask
//! restricted to that sequence's real tokens: padding is never trained on.
//!
//! Truncation keeps the first `max_len` tokens; padding (side, pad id, length) is explicit.
//! Pairs must be right-padded: the pair mask compares positions, so left padding would misalign
//! prompts of different lengths.

use serde::{Deserialize, Serialize};

use super::pairs::Pair;
use crate::model::chat::{self, Message};
use crate::model::tokenizer::Tok;
use crate::{Error, Result};

/// How a question and answer are laid out as text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptFormat {
    /// `Question: {prompt}\nAnswer: {response}` (the paper's format).
    #[default]
    Plain,
    /// The tokenizer's chat template: user turn, assistant turn.
    Chat,
}

/// Which end padding goes on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PadSide {
    Left,
    #[default]
    Right,
}

/// How long padded sequences are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PadLength {
    /// As long as the longest sequence padded together.
    Longest,
    /// Exactly this many tokens (a longer sequence is an error: truncate first).
    Fixed(usize),
}

/// Padding settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Padding {
    pub side: PadSide,
    pub pad_id: u32,
    pub length: PadLength,
}

/// Tokenisation settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodeOptions {
    pub format: PromptFormat,
    /// Prepend the tokenizer's beginning-of-sequence token (plain format; a chat template
    /// writes its own) even where the tokenizer does not ask for it. Where it does
    /// ([`Tok::add_bos_token`], e.g. Llama-2's), the plain format always starts with it, as
    /// `transformers` tokenises a text.
    pub add_bos: bool,
    /// Append the end-of-sequence token after the answer (plain format; a chat template ends
    /// the turn itself). It counts as an answer token.
    pub add_eos: bool,
    /// Keep at most this many tokens (the end is cut).
    pub max_len: Option<usize>,
    /// Plain format only: join question and answer with no space, `Answer:{a}`, as the
    /// reference code wrote its harmful training texts (the faithful modes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reference_join: bool,
}

/// One tokenised sequence.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// 1 on answer tokens (the tokens a loss is taken on).
    pub loss_mask: Vec<u8>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<u8>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Keep the first `max_len` tokens.
    pub fn truncate(&mut self, max_len: usize) {
        self.ids.truncate(max_len);
        self.loss_mask.truncate(max_len);
        self.attention_mask.truncate(max_len);
    }

    /// The real tokens' ids, padding left out.
    pub fn real_ids(&self) -> Vec<u32> {
        (0..self.len()).filter_map(|i| self.real(i)).collect()
    }

    /// The token at `i` if it is a real token (`None` for padding or past the end).
    fn real(&self, i: usize) -> Option<u32> {
        match self.attention_mask.get(i) {
            Some(1) => Some(self.ids[i]),
            _ => None,
        }
    }
}

/// A tokenised defence pair, both sequences padded to the same length.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EncodedPair {
    pub harmful: Encoded,
    pub harmless: Encoded,
    /// 1 where the two sequences differ (see the module docs).
    pub pair_mask: Vec<u8>,
}

impl EncodedPair {
    /// The pair mask on the harmful sequence's real tokens.
    pub fn harmful_mask(&self) -> Vec<u8> {
        and(&self.pair_mask, &self.harmful.attention_mask)
    }

    /// The pair mask on the harmless sequence's real tokens.
    pub fn harmless_mask(&self) -> Vec<u8> {
        and(&self.pair_mask, &self.harmless.attention_mask)
    }
}

fn and(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().zip(b).map(|(x, y)| x & y).collect()
}

/// The plain prompt, ready for generation: `Question: {prompt}\nAnswer:`.
pub fn plain_prompt(prompt: &str) -> String {
    format!("Question: {prompt}\nAnswer:")
}

/// The plain question and answer: `Question: {prompt}\nAnswer: {response}`.
pub fn plain_text(prompt: &str, response: &str) -> String {
    format!("{} {response}", plain_prompt(prompt))
}

/// The reference code's harmful training text: `Question: {prompt}\nAnswer:{response}`, no
/// space (`boyiwei/RepNoise-Reproduce` a35c98a, `immunization_llms/datasets.py` lines 386-388).
pub fn reference_text(prompt: &str, response: &str) -> String {
    format!("{}{response}", plain_prompt(prompt))
}

fn eos_id(tok: &Tok) -> Result<u32> {
    tok.eos_token
        .as_deref()
        .and_then(|t| tok.token_to_id(t))
        .ok_or_else(|| Error::setting("add_eos", true, "the tokenizer has no eos token"))
}

/// The answer mask for a text whose answer is the byte span `[start, ..)`: a token belongs to the
/// answer when its span reaches past `start` (or, for an empty span, starts at or after it).
pub fn answer_mask(offsets: &[(usize, usize)], start: usize) -> Vec<u8> {
    offsets
        .iter()
        .map(|&(s, e)| (e > start || (s == e && s >= start)) as u8)
        .collect()
}

fn finish(
    tok: &Tok,
    mut ids: Vec<u32>,
    mut mask: Vec<u8>,
    opts: &EncodeOptions,
    answer: bool,
) -> Result<Encoded> {
    if opts.format == PromptFormat::Plain {
        if opts.add_bos || tok.add_bos_token {
            ids.insert(0, tok.bos_id()?);
            mask.insert(0, 0);
        }
        if opts.add_eos && answer {
            ids.push(eos_id(tok)?);
            mask.push(1);
        }
    }
    let n = ids.len();
    let mut enc = Encoded {
        ids,
        loss_mask: mask,
        attention_mask: vec![1; n],
    };
    if let Some(m) = opts.max_len {
        enc.truncate(m);
    }
    Ok(enc)
}

/// Tokenise a question and its answer, with the answer-only loss mask.
pub fn encode_qa(tok: &Tok, prompt: &str, response: &str, opts: &EncodeOptions) -> Result<Encoded> {
    match opts.format {
        PromptFormat::Plain => {
            let start = plain_prompt(prompt).len();
            let text = if opts.reference_join {
                reference_text(prompt, response)
            } else {
                plain_text(prompt, response)
            };
            let (ids, offsets) = tok.encode_with_offsets(&text)?;
            finish(tok, ids, answer_mask(&offsets, start), opts, true)
        }
        PromptFormat::Chat => {
            let r = chat::render(
                tok,
                &[Message::user(prompt), Message::assistant(response)],
                false,
            )?;
            finish(tok, r.ids, r.assistant_mask, opts, true)
        }
    }
}

/// Tokenise `prefix` followed by `answer` as one plain text (a task's own template, e.g. the
/// trainability tasks' `Meaning Representation: ...\nDescription:`), with the answer-only loss
/// mask; `add_bos`, `add_eos` and `max_len` apply as in the plain format.
pub fn encode_prefixed(
    tok: &Tok,
    prefix: &str,
    answer: &str,
    opts: &EncodeOptions,
) -> Result<Encoded> {
    let text = format!("{prefix}{answer}");
    let (ids, offsets) = tok.encode_with_offsets(&text)?;
    let opts = EncodeOptions {
        format: PromptFormat::Plain,
        ..*opts
    };
    finish(tok, ids, answer_mask(&offsets, prefix.len()), &opts, true)
}

/// Tokenise a question alone, ready for generation (the loss mask is all 0).
pub fn encode_prompt(tok: &Tok, prompt: &str, opts: &EncodeOptions) -> Result<Encoded> {
    let ids = match opts.format {
        PromptFormat::Plain => tok.encode(&plain_prompt(prompt))?,
        PromptFormat::Chat => chat::render(tok, &[Message::user(prompt)], true)?.ids,
    };
    let n = ids.len();
    finish(tok, ids, vec![0; n], opts, false)
}

/// Which end of [`length_order`] comes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Longest {
    /// Shortest first (generation and scoring: the last, longest batch is the only wide one).
    Last,
    /// Longest first (scoring under a memory limit: the widest batch is met at once).
    First,
}

/// Item indices sorted by length, ties in input order: batching sequences in this order puts
/// sequences of similar length together, so little is padded. The one batching order of the
/// crate; callers cut it with `chunks(batch)` and put results back by index.
pub fn length_order(lens: impl IntoIterator<Item = usize>, longest: Longest) -> Vec<usize> {
    let lens: Vec<usize> = lens.into_iter().collect();
    let mut order: Vec<usize> = (0..lens.len()).collect();
    match longest {
        Longest::Last => order.sort_by_key(|&i| lens[i]),
        Longest::First => order.sort_by_key(|&i| std::cmp::Reverse(lens[i])),
    }
    order
}

/// Pad one sequence to `len` tokens with `pad_id` on `side` (mask 0 on padding).
pub fn pad_to(enc: &mut Encoded, len: usize, side: PadSide, pad_id: u32) -> Result<()> {
    let n = enc.len();
    if n > len {
        return Err(Error::setting(
            "padded length",
            len,
            format!("a sequence has {n} tokens; truncate it first (max_len)"),
        ));
    }
    let k = len - n;
    let fill = |v: &mut Vec<u32>, x: u32| match side {
        PadSide::Right => v.extend(std::iter::repeat_n(x, k)),
        PadSide::Left => {
            v.splice(0..0, std::iter::repeat_n(x, k));
        }
    };
    let fill8 = |v: &mut Vec<u8>| match side {
        PadSide::Right => v.extend(std::iter::repeat_n(0, k)),
        PadSide::Left => {
            v.splice(0..0, std::iter::repeat_n(0, k));
        }
    };
    fill(&mut enc.ids, pad_id);
    fill8(&mut enc.loss_mask);
    fill8(&mut enc.attention_mask);
    Ok(())
}

/// Pad sequences together; returns the padded length.
pub fn pad_batch(encs: &mut [Encoded], padding: &Padding) -> Result<usize> {
    let len = match padding.length {
        PadLength::Fixed(n) => n,
        PadLength::Longest => encs.iter().map(Encoded::len).max().unwrap_or(0),
    };
    for e in encs.iter_mut() {
        pad_to(e, len, padding.side, padding.pad_id)?;
    }
    Ok(len)
}

/// 1 at each position where `a` and `b` differ, over the longer length: two real tokens with
/// different ids, or a real token against padding / the end of the other sequence.
pub fn pair_mask(a: &Encoded, b: &Encoded) -> Vec<u8> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let (x, y) = (a.real(i), b.real(i));
            (x != y) as u8
        })
        .collect()
}

/// Tokenise a defence pair: both answers after the same question, right-padded together, with
/// the pair mask.
pub fn encode_pair(
    tok: &Tok,
    pair: &Pair,
    opts: &EncodeOptions,
    padding: &Padding,
) -> Result<EncodedPair> {
    if padding.side != PadSide::Right {
        return Err(Error::setting(
            "padding side",
            "left",
            "defence pairs must be right-padded: the pair mask compares positions",
        ));
    }
    // The reference code's refusals are decoded generations after `Answer:`, so they read
    // `Answer: {refusal}` whichever way the harmful text is joined.
    let harmless_opts = EncodeOptions {
        reference_join: false,
        ..*opts
    };
    let mut harmful = encode_qa(tok, &pair.prompt, &pair.harmful, opts)?;
    let mut harmless = encode_qa(tok, &pair.prompt, &pair.harmless, &harmless_opts)?;
    let len = match padding.length {
        PadLength::Fixed(n) => n,
        PadLength::Longest => harmful.len().max(harmless.len()),
    };
    pad_to(&mut harmful, len, padding.side, padding.pad_id)?;
    pad_to(&mut harmless, len, padding.side, padding.pad_id)?;
    let pair_mask = pair_mask(&harmful, &harmless);
    Ok(EncodedPair {
        harmful,
        harmless,
        pair_mask,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_length_order_keeps_ties_in_input_order_at_either_end() {
        let lens = [3, 1, 3, 2, 1];
        assert_eq!(length_order(lens, Longest::Last), vec![1, 4, 3, 0, 2]);
        assert_eq!(length_order(lens, Longest::First), vec![0, 2, 3, 1, 4]);
        assert!(length_order(Vec::<usize>::new(), Longest::Last).is_empty());
    }

    fn enc(ids: &[u32], attn: &[u8]) -> Encoded {
        Encoded {
            ids: ids.to_vec(),
            loss_mask: vec![0; ids.len()],
            attention_mask: attn.to_vec(),
        }
    }

    #[test]
    fn plain_layout() {
        assert_eq!(plain_text("Hi?", "No."), "Question: Hi?\nAnswer: No.");
        assert_eq!(plain_prompt("Hi?"), "Question: Hi?\nAnswer:");
    }

    #[test]
    fn answer_mask_on_offsets() {
        // "Answer:" ends at 7; tokens: "Answer" (0,6) ":" (6,7) " No" (7,10) "." (10,11).
        assert_eq!(
            answer_mask(&[(0, 6), (6, 7), (7, 10), (10, 11)], 7),
            vec![0, 0, 1, 1]
        );
        // Trimmed offsets (the space dropped from " No") still count.
        assert_eq!(answer_mask(&[(6, 7), (8, 10)], 7), vec![0, 1]);
    }

    #[test]
    fn padding_both_sides() {
        let mut e = enc(&[5, 6], &[1, 1]);
        e.loss_mask = vec![0, 1];
        pad_to(&mut e, 4, PadSide::Left, 0).unwrap();
        assert_eq!(e.ids, vec![0, 0, 5, 6]);
        assert_eq!(e.loss_mask, vec![0, 0, 0, 1]);
        assert_eq!(e.attention_mask, vec![0, 0, 1, 1]);
        pad_to(&mut e, 5, PadSide::Right, 9).unwrap();
        assert_eq!(e.ids, vec![0, 0, 5, 6, 9]);
        assert!(pad_to(&mut e, 3, PadSide::Right, 9).is_err());
    }

    #[test]
    fn pair_mask_treats_padding_as_different() {
        // Same prompt (1, 2), different answers; the pad id 7 equals the harmful EOS 7.
        let a = enc(&[1, 2, 3, 7], &[1, 1, 1, 1]);
        let b = enc(&[1, 2, 4, 7], &[1, 1, 1, 0]);
        assert_eq!(pair_mask(&a, &b), vec![0, 0, 1, 1]);
        let p = EncodedPair {
            pair_mask: pair_mask(&a, &b),
            harmful: a,
            harmless: b,
        };
        assert_eq!(p.harmful_mask(), vec![0, 0, 1, 1]);
        assert_eq!(p.harmless_mask(), vec![0, 0, 1, 0]);
        // Unequal lengths: the extra tail differs.
        assert_eq!(
            pair_mask(&enc(&[1], &[1]), &enc(&[1, 2], &[1, 1])),
            vec![0, 1]
        );
    }
}
