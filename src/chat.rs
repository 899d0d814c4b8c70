//! Chat templates rendered with `minijinja` from the model's own Jinja template, in a sandbox:
//! no loader is installed, so a template cannot read files or reach the network.
//!
//! Rendering a conversation returns the token ids and the assistant-only loss mask together
//! (as nanochat does), so every stage trains and scores the same tokens.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::Tok;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn user(content: &str) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: &str) -> Self {
        Self::new("assistant", content)
    }
}

/// A rendered conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub ids: Vec<u32>,
    /// 1 where the token belongs to an assistant reply (its content and end-of-turn token).
    pub assistant_mask: Vec<u8>,
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        msg,
    ))
}

/// Render `template` for `messages` to text.
pub fn render_text(
    template: &str,
    tok: &Tok,
    messages: &[Message],
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_template("chat", template)
        .map_err(|e| Error::msg(format!("chat template does not parse: {e}")))?;
    let t = env
        .get_template("chat")
        .map_err(|e| Error::msg(format!("chat template: {e}")))?;
    t.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => tok.bos_token.clone().unwrap_or_default(),
        eos_token => tok.eos_token.clone().unwrap_or_default(),
    })
    .map_err(|e| Error::msg(format!("chat template failed to render: {e}")))
}

/// Render a conversation to ids with the assistant-only mask.
///
/// The mask is found by rendering growing prefixes of the conversation: an assistant message's
/// span is the text its rendering adds after the generation prompt of the conversation before
/// it (trailing whitespace after the end-of-turn token excluded).
pub fn render(tok: &Tok, messages: &[Message], add_generation_prompt: bool) -> Result<Rendered> {
    let template = tok
        .chat_template
        .as_deref()
        .ok_or_else(|| Error::msg("the model has no chat template"))?;
    let text = render_text(template, tok, messages, add_generation_prompt)?;
    let mut spans = vec![];
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render_text(template, tok, &messages[..i], true)?;
        let upto = render_text(template, tok, &messages[..=i], false)?;
        if !upto.starts_with(&before) || !text.starts_with(&upto) {
            return Err(Error::msg(format!(
                "the chat template does not render message {i} as an extension of the \
                 conversation before it; cannot locate the assistant reply"
            )));
        }
        let end = before.len() + upto[before.len()..].trim_end().len();
        spans.push((before.len(), end));
    }
    let (ids, offsets) = tok.encode_with_offsets(&text)?;
    let assistant_mask = offsets
        .iter()
        .map(|&(s, e)| {
            let inside = spans.iter().any(|&(a, b)| s >= a && e <= b && e > s);
            inside as u8
        })
        .collect();
    Ok(Rendered {
        text,
        ids,
        assistant_mask,
    })
}
