//! Tokenizers: a Hugging Face `tokenizer.json`, or one rebuilt from a GGUF file's vocabulary and
//! merges with the pre-tokenizer its `tokenizer.ggml.pre` names. For SmolLM2 (`smollm`) that is
//! the published `Sequence[Digits(individual), ByteLevel]`: each digit is its own pre-token (a
//! plain GPT-2 byte-level tokenizer, as candle's GGUF loader builds, merges digit runs).

use std::path::Path;

use serde_json::{json, Value};

use crate::model::gguf::GgufTokenizer;
use crate::{Error, Result};

/// Names that end an assistant turn in the chat formats we know.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end|>",
    "</s>",
];

/// The Qwen2 pre-tokenizer split (its `tokenizer.json`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer with the model's special tokens and chat template.
#[derive(Clone)]
pub struct Tok {
    inner: tokenizers::Tokenizer,
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// Whether the model's tokenizer puts its beginning-of-sequence token before a text, as
    /// `transformers` does when it tokenises one (`add_bos_token` in `tokenizer_config.json`,
    /// else what `tokenizer.json`'s post-processor adds; `tokenizer.ggml.add_bos_token` in a
    /// GGUF file). The plain format honours it; a chat template writes its own.
    pub add_bos_token: bool,
    /// Padding id (the pad token, else the end-of-sequence token, else 0).
    pub pad_id: u32,
    /// Ids that end generation (end of sequence and end of turn).
    pub stop_ids: Vec<u32>,
}

fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

impl Tok {
    fn finish(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        pad_token: Option<String>,
        add_bos_token: Option<bool>,
        extra_stop: &[u32],
    ) -> Self {
        // Not stated: what the post-processor does to a text with special tokens on.
        let add_bos_token = add_bos_token.unwrap_or_else(|| {
            let bos = bos_token.as_deref().and_then(|b| inner.token_to_id(b));
            let first = inner
                .encode("a", true)
                .ok()
                .and_then(|e| e.get_ids().first().copied());
            bos.is_some() && first == bos
        });
        let mut stop_ids: Vec<u32> = extra_stop.to_vec();
        for name in eos_token
            .iter()
            .map(String::as_str)
            .chain(END_OF_TURN.iter().copied())
        {
            if let Some(id) = inner.token_to_id(name) {
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        let pad_id = pad_token
            .as_deref()
            .and_then(|p| inner.token_to_id(p))
            .or_else(|| eos_token.as_deref().and_then(|e| inner.token_to_id(e)))
            .unwrap_or(0);
        Tok {
            inner,
            chat_template,
            bos_token,
            eos_token,
            pad_token,
            add_bos_token,
            pad_id,
            stop_ids,
        }
    }

    /// Load `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`,
    /// `generation_config.json` when present) from a Hugging Face model directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(Error::file(
                &tj,
                "missing: the model directory needs a tokenizer.json (fast tokenizer)",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| Error::file(&tj, format!("not a valid tokenizer: {e}")))?;
        let mut chat_template = None;
        let (mut bos, mut eos, mut pad, mut add_bos) = (None, None, None, None);
        let tc = dir.join("tokenizer_config.json");
        if tc.is_file() {
            let text = crate::util::io::read_text(&tc)?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::file(&tc, format!("not valid JSON: {e}")))?;
            chat_template = match v.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(String::from),
                Some(Value::Null) | None => None,
                Some(_) => {
                    return Err(Error::field(
                        &tc,
                        "chat_template",
                        "must be a string or a list of {name, template}",
                    ))
                }
            };
            bos = token_str(v.get("bos_token"));
            eos = token_str(v.get("eos_token"));
            pad = token_str(v.get("pad_token"));
            add_bos = match v.get("add_bos_token") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(_) => return Err(Error::field(&tc, "add_bos_token", "must be true or false")),
            };
        }
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.is_file() {
            chat_template = Some(crate::util::io::read_text(&jinja)?);
        }
        let mut extra = vec![];
        let gc = dir.join("generation_config.json");
        if gc.is_file() {
            if let Ok(v) = std::fs::read_to_string(&gc)
                .map_err(|_| ())
                .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|_| ()))
            {
                match v.get("eos_token_id") {
                    Some(Value::Number(n)) => extra.extend(n.as_u64().map(|x| x as u32)),
                    Some(Value::Array(xs)) => {
                        extra.extend(xs.iter().filter_map(|x| x.as_u64().map(|x| x as u32)))
                    }
                    _ => {}
                }
            }
        }
        Ok(Self::finish(
            inner,
            chat_template,
            bos,
            eos,
            pad,
            add_bos,
            &extra,
        ))
    }

    /// Build the tokenizer a GGUF file describes. `origin` names the file for messages.
    pub fn from_gguf(g: &GgufTokenizer, origin: &Path) -> Result<Self> {
        let json = gguf_tokenizer_json(g, origin)?;
        let inner = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes())
            .map_err(|e| Error::file(origin, format!("cannot build the tokenizer: {e}")))?;
        let name = |id: Option<u32>| id.and_then(|i| g.tokens.get(i as usize).cloned());
        Ok(Self::finish(
            inner,
            g.chat_template.clone(),
            name(g.bos_id),
            name(g.eos_id),
            name(g.pad_id),
            // llama.cpp's default when the file does not say: on for SentencePiece
            // vocabularies (`llama`), off for byte-level BPE (`gpt2`).
            Some(g.add_bos.unwrap_or(g.model == "llama")),
            &g.eos_id.into_iter().collect::<Vec<_>>(),
        ))
    }

    /// The byte-level tokenizer of [`byte_tokenizer`] with its specials (`<s>` first in a text,
    /// `</s>` ending it, `<pad>`) and a Llama-2-style chat template: for models of a shape
    /// with random weights (`repnoise init`), whose ids stay below any vocabulary.
    pub fn byte_level() -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(byte_tokenizer().as_bytes())
            .map_err(|e| Error::msg(format!("the byte-level tokenizer: {e}")))?;
        let template = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}\
{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}\
{{ ' ' + m['content'] + eos_token }}{% else %}{{ '<<SYS>>' + m['content'] + '<</SYS>> ' }}\
{% endif %}{% endfor %}";
        Ok(Self::finish(
            inner,
            Some(template.into()),
            Some("<s>".into()),
            Some("</s>".into()),
            Some("<pad>".into()),
            Some(true),
            &[],
        ))
    }

    /// Build from a `tokenizer.json` text (tests, tiny models).
    pub fn from_json_str(json: &str, chat_template: Option<String>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| Error::msg(format!("invalid tokenizer json: {e}")))?;
        Ok(Self::finish(
            inner,
            chat_template,
            None,
            None,
            None,
            None,
            &[],
        ))
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encode text exactly as given: special tokens written in the text are recognised, nothing
    /// (no BOS) is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text)?.0)
    }

    /// Encode a whole text as the model's tokenizer would for a model input: [`Self::encode`],
    /// after the beginning-of-sequence token when the tokenizer asks for one
    /// ([`Self::add_bos_token`]).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if self.add_bos_token {
            ids.insert(0, self.bos_id()?);
        }
        Ok(ids)
    }

    /// The BOS token's id; an error when the tokenizer names none (or names one it lacks).
    pub fn bos_id(&self) -> Result<u32> {
        self.bos_token
            .as_deref()
            .and_then(|b| self.token_to_id(b))
            .ok_or_else(|| Error::setting("add_bos", true, "the tokenizer has no bos token"))
    }

    /// Ids and the byte span of each token in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::msg(format!("tokenization failed: {e}")))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::msg(format!("decoding failed: {e}")))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Check the tokenizer fits a model with `model_vocab` embedding rows.
    pub fn check_vocab(&self, model_vocab: usize, origin: &Path) -> Result<()> {
        let max_id = self
            .inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .unwrap_or(0) as usize;
        if max_id >= model_vocab {
            return Err(Error::file(
                origin,
                format!(
                    "the tokenizer's vocabulary disagrees with the model: it has token id {max_id} \
                     but the model's embedding has only {model_vocab} rows"
                ),
            ));
        }
        Ok(())
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` (with the chat template) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| Error::msg(format!("cannot serialise the tokenizer: {e}")))?;
        crate::util::io::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
        let mut cfg = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": false,
            "model_max_length": 1_000_000_000u64,
        });
        let obj = cfg.as_object_mut().expect("json object literal");
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("chat_template", &self.chat_template),
        ] {
            if let Some(v) = v {
                obj.insert(k.into(), Value::String(v.clone()));
            }
        }
        obj.insert("add_bos_token".into(), Value::Bool(self.add_bos_token));
        crate::util::io::write_json_atomic(&dir.join("tokenizer_config.json"), &cfg)
    }
}

/// The `tokenizer.json` equivalent of a GGUF tokenizer description.
pub fn gguf_tokenizer_json(g: &GgufTokenizer, origin: &Path) -> Result<Value> {
    if g.model != "gpt2" {
        return Err(Error::field(
            origin,
            "tokenizer.ggml.model",
            format!(
                "`{}` is not supported (supported: gpt2 byte-level BPE); use a Hugging Face \
                 directory with tokenizer.json instead",
                g.model
            ),
        ));
    }
    let byte_level = |trim: bool, regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": trim, "use_regex": regex});
    let (normalizer, pre) = match g.pre.as_deref() {
        Some("smollm") => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true, true)
            ]}),
        ),
        None | Some("default") | Some("gpt-2") | Some("gpt2") => {
            (Value::Null, byte_level(true, true))
        }
        Some("qwen2") => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                byte_level(false, false)
            ]}),
        ),
        Some(other) => {
            return Err(Error::field(
                origin,
                "tokenizer.ggml.pre",
                format!(
                    "pre-tokenizer `{other}` is not supported (supported: smollm, gpt2, qwen2); \
                     use a Hugging Face directory with tokenizer.json instead"
                ),
            ))
        }
    };
    let mut vocab = serde_json::Map::with_capacity(g.tokens.len());
    let mut added = vec![];
    for (id, tok) in g.tokens.iter().enumerate() {
        if vocab.contains_key(tok) {
            return Err(Error::field(
                origin,
                format!("tokenizer.ggml.tokens[{id}]"),
                format!("duplicate token {tok:?}"),
            ));
        }
        vocab.insert(tok.clone(), json!(id));
        // 3 = control, 4 = user-defined (llama.cpp's token types).
        let ty = g.token_types.get(id).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == 3
            }));
        }
    }
    for (i, m) in g.merges.iter().enumerate() {
        if m.split(' ').count() != 2 {
            return Err(Error::field(
                origin,
                format!("tokenizer.ggml.merges[{i}]"),
                format!("{m:?} is not two tokens separated by one space"),
            ));
        }
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": g.merges
        }
    }))
}

/// A byte-level BPE tokenizer with 256 byte tokens and 4 specials (no merges).
pub fn byte_tokenizer() -> String {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(format!("<0x{b:02X}>"), b.into());
    }
    let specials = ["<s>", "</s>", "<pad>", "<unk>"];
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), (256 + i).into());
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": 256 + i, "content": s, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0", "added_tokens": added,
        "model": {"type": "BPE", "vocab": vocab, "merges": [], "byte_fallback": true,
                  "unk_token": "<unk>"},
    })
    .to_string()
}
