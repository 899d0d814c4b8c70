//! Chat templates rendered with `minijinja` from the model's own Jinja template, in a sandbox:
//! no loader is installed, so a template cannot read files or reach the network.
//!
//! Rendering a conversation returns the token ids and the assistant-only loss mask together
//! (as nanochat does), so every stage trains and scores the same tokens.

use serde::{Deserialize, Serialize};

use crate::model::tokenizer::Tok;
use crate::{Error, Result};

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

/// Instructions a chat template may execute per rendering (minijinja's fuel): a template comes
/// with the model, from whoever published it; this bounds its loops.
pub const TEMPLATE_FUEL: u64 = 5_000_000;
/// Most bytes a rendering may produce.
pub const TEMPLATE_MAX_OUTPUT: usize = 16 << 20;

/// A writer that refuses to grow past `limit` bytes.
struct Capped {
    buf: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("output cap"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Render `template` for `messages` to text, sandboxed: minijinja without a loader (no
/// `include`, `import` or `extends` reaches a file), no filesystem or network functions, its
/// fuel ([`TEMPLATE_FUEL`]) and an output cap ([`TEMPLATE_MAX_OUTPUT`]).
pub fn render_text(
    template: &str,
    tok: &Tok,
    messages: &[Message],
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_template("chat", template)
        .map_err(|e| Error::msg(format!("chat template does not parse: {e}")))?;
    let t = env
        .get_template("chat")
        .map_err(|e| Error::msg(format!("chat template: {e}")))?;
    let mut out = Capped {
        buf: vec![],
        limit: TEMPLATE_MAX_OUTPUT,
        overflowed: false,
    };
    t.render_captured_to(
        minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => tok.bos_token.clone().unwrap_or_default(),
            eos_token => tok.eos_token.clone().unwrap_or_default(),
        },
        &mut out,
    )
    .map_err(|e| {
        let e = if out.overflowed {
            format!("its output exceeds {TEMPLATE_MAX_OUTPUT} bytes")
        } else {
            format!("{e:#}")
        };
        Error::msg(format!("chat template failed to render: {e}"))
    })?;
    String::from_utf8(out.buf)
        .map_err(|e| Error::msg(format!("chat template rendered invalid UTF-8: {e}")))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tok {
        Tok::from_json_str(&crate::model::tokenizer::byte_tokenizer(), None).unwrap()
    }

    fn render(t: &str) -> Result<String> {
        render_text(t, &tok(), &[Message::user("hi")], true)
    }

    #[test]
    fn templates_render_in_a_sandbox() {
        assert_eq!(
            render("{% for m in messages %}{{ m.role }}:{{ m.content }}{% endfor %}").unwrap(),
            "user:hi"
        );
        // No file is reachable: include/import/extends have no loader.
        for t in [
            "{% include '/etc/passwd' %}",
            "{% import '/etc/hostname' as h %}",
            "{% extends '../../../../etc/passwd' %}",
        ] {
            let e = render(t).unwrap_err().to_string();
            assert!(e.contains("chat template failed to render"), "{t}: {e}");
            assert!(!e.contains("root:"), "{t}: {e}");
        }
        // Unbounded work is stopped: nested loops run out of fuel, output is capped.
        let e = render(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("fuel"), "{e}");
        let e = render("{% set s = 'x' * 100000 %}{% for i in range(1000) %}{{ s }}{% endfor %}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("exceeds"), "{e}");
        let e = render("{{ 'x' * 100000000000 }}").unwrap_err().to_string();
        assert!(e.contains("too large"), "{e}");
        // A template can refuse a conversation, and says why.
        let e = render("{{ raise_exception('no system role') }}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no system role"), "{e}");
    }
}
