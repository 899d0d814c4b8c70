//! Tokenisation masks on hand-checked token sequences, with the tiny byte-level tokenizer of
//! tests/common: 3 special tokens (0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>`), then the
//! 256 byte tokens in byte order (`tiny_vocab` lists GPT-2's byte characters indexed by byte
//! value), then the merges `he` (259) and `Ġt` (260).
//!
//! So byte `c` is token `c + 3`: `Q` = 84, `:` = 61, space (`Ġ`) = 35, newline (`Ċ`) = 13.

use crate::common;

use repnoise::data::encode::{
    encode_pair, encode_prompt, encode_qa, pad_batch, EncodeOptions, PadLength, PadSide, Padding,
    PromptFormat,
};
use repnoise::data::pairs::Pair;

/// The id of one byte token (hand-derived, see the module docs).
fn b(c: char) -> u32 {
    assert!(c.is_ascii(), "no hand-derived id for {c:?}");
    c as u32 + 3
}

fn bytes(s: &str) -> Vec<u32> {
    s.chars().map(b).collect()
}

const HE: u32 = 259;
const SP_T: u32 = 260;
const IM_END: u32 = 2;

/// `Question: hi\nAnswer:` (20 bytes, no merge applies).
fn prompt_ids() -> Vec<u32> {
    bytes("Question: hi\nAnswer:")
}

fn pair() -> Pair {
    Pair {
        prompt: "hi".into(),
        harmful: "the".into(),
        harmless: "no".into(),
        categories: None,
    }
}

#[test]
fn plain_qa_ids_and_answer_mask() {
    let tok = common::tiny_tok();
    let e = encode_qa(&tok, "hi", "the", &EncodeOptions::default()).unwrap();
    // " the" -> Ġ t h e -> (h e) first, then (Ġ t): [Ġt, he].
    let mut want = prompt_ids();
    want.extend([SP_T, HE]);
    assert_eq!(e.ids, want);
    let mut mask = vec![0u8; 20];
    mask.extend([1, 1]);
    assert_eq!(e.loss_mask, mask);
    assert_eq!(e.attention_mask, vec![1; 22]);
}

#[test]
fn bos_eos_and_truncation() {
    let tok = common::tiny_tok();
    let opts = EncodeOptions {
        add_bos: true,
        add_eos: true,
        ..EncodeOptions::default()
    };
    let e = encode_qa(&tok, "hi", "no", &opts).unwrap();
    let mut want = vec![1];
    want.extend(prompt_ids());
    want.extend([b(' '), b('n'), b('o'), IM_END]);
    assert_eq!(e.ids, want);
    let mut mask = vec![0u8; 21];
    mask.extend([1, 1, 1, 1]);
    assert_eq!(
        e.loss_mask, mask,
        "the appended end-of-sequence token is an answer token"
    );

    let cut = encode_qa(
        &tok,
        "hi",
        "no",
        &EncodeOptions {
            max_len: Some(22),
            ..opts
        },
    )
    .unwrap();
    assert_eq!(cut.ids, want[..22]);
    assert_eq!(cut.loss_mask, mask[..22]);

    let p = encode_prompt(&tok, "hi", &EncodeOptions::default()).unwrap();
    assert_eq!(p.ids, prompt_ids());
    assert_eq!(p.loss_mask, vec![0; 20]);
}

#[test]
fn chat_format_masks_the_assistant_reply() {
    let tok = common::tiny_tok();
    let opts = EncodeOptions {
        format: PromptFormat::Chat,
        ..EncodeOptions::default()
    };
    let e = encode_qa(&tok, "hi", "the", &opts).unwrap();
    let masked: Vec<u32> = e
        .ids
        .iter()
        .zip(&e.loss_mask)
        .filter(|(_, m)| **m == 1)
        .map(|(i, _)| *i)
        .collect();
    // "the" after the newline has no leading space: t, he; then the end-of-turn token.
    assert_eq!(masked, vec![b('t'), HE, IM_END]);
    // The reply is the last turn: only the trailing newline follows it.
    let n = e.ids.len();
    assert_eq!(&e.ids[n - 4..], &[b('t'), HE, IM_END, b('\n')]);
    assert_eq!(&e.loss_mask[n - 4..], &[1, 1, 1, 0]);
    // The generation prompt ends with the assistant header.
    let p = encode_prompt(&tok, "hi", &opts).unwrap();
    assert!(p.loss_mask.iter().all(|&m| m == 0));
    let text = tok.decode(&p.ids, false).unwrap();
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
    // Options that only apply to the plain format are ignored by the chat format.
    let with_eos = encode_qa(
        &tok,
        "hi",
        "the",
        &EncodeOptions {
            add_eos: true,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(with_eos.ids, e.ids);
}

#[test]
fn pair_mask_right_padded_to_the_longest() {
    let tok = common::tiny_tok();
    let padding = Padding {
        side: PadSide::Right,
        pad_id: tok.pad_id,
        length: PadLength::Longest,
    };
    assert_eq!(tok.pad_id, IM_END);
    let p = encode_pair(&tok, &pair(), &EncodeOptions::default(), &padding).unwrap();
    let mut harmful = prompt_ids();
    harmful.extend([SP_T, HE, IM_END]);
    let mut harmless = prompt_ids();
    harmless.extend([b(' '), b('n'), b('o')]);
    assert_eq!(p.harmful.ids, harmful);
    assert_eq!(p.harmless.ids, harmless);
    let tail = |v: &[u8]| v[20..].to_vec();
    assert!(
        p.pair_mask[..20].iter().all(|&m| m == 0),
        "the shared prompt is not in the mask"
    );
    assert_eq!(tail(&p.pair_mask), vec![1, 1, 1]);
    assert_eq!(tail(&p.harmful.attention_mask), vec![1, 1, 0]);
    assert_eq!(tail(&p.harmful_mask()), vec![1, 1, 0]);
    assert_eq!(tail(&p.harmless_mask()), vec![1, 1, 1]);
    assert_eq!(tail(&p.harmful.loss_mask), vec![1, 1, 0]);
}

#[test]
fn pair_mask_with_eos_equal_to_pad() {
    // Both answers end with <|im_end|> (2), which is also the pad id: the harmful EOS at 22 is
    // real against the harmless 'o'; at 23 the harmful pad meets the harmless real EOS. Equal
    // ids, but one is padding, so the position still differs, and the harmful loss mask leaves
    // the padding out.
    let tok = common::tiny_tok();
    let padding = Padding {
        side: PadSide::Right,
        pad_id: IM_END,
        length: PadLength::Fixed(26),
    };
    let opts = EncodeOptions {
        add_eos: true,
        ..EncodeOptions::default()
    };
    let p = encode_pair(&tok, &pair(), &opts, &padding).unwrap();
    assert_eq!(
        p.harmful.ids[20..],
        [SP_T, HE, IM_END, IM_END, IM_END, IM_END]
    );
    assert_eq!(
        p.harmless.ids[20..],
        [b(' '), b('n'), b('o'), IM_END, IM_END, IM_END]
    );
    assert_eq!(p.pair_mask[20..], [1, 1, 1, 1, 0, 0]);
    assert_eq!(p.harmful_mask()[20..], [1, 1, 1, 0, 0, 0]);
    assert_eq!(p.harmless_mask()[20..], [1, 1, 1, 1, 0, 0]);
    assert_eq!(p.pair_mask.len(), 26);
}

#[test]
fn padding_errors_and_batches() {
    let tok = common::tiny_tok();
    let left = Padding {
        side: PadSide::Left,
        pad_id: 0,
        length: PadLength::Longest,
    };
    let e = encode_pair(&tok, &pair(), &EncodeOptions::default(), &left)
        .unwrap_err()
        .to_string();
    assert!(e.contains("right-padded"), "{e}");
    let short = Padding {
        side: PadSide::Right,
        pad_id: 0,
        length: PadLength::Fixed(10),
    };
    let e = encode_pair(&tok, &pair(), &EncodeOptions::default(), &short)
        .unwrap_err()
        .to_string();
    assert!(e.contains("22 tokens") && e.contains("max_len"), "{e}");
    // With truncation first, a fixed length works.
    let opts = EncodeOptions {
        max_len: Some(10),
        ..EncodeOptions::default()
    };
    let p = encode_pair(&tok, &pair(), &opts, &short).unwrap();
    assert_eq!(p.pair_mask, vec![0; 10]);

    // Left-padded generation batch.
    let mut batch = vec![
        encode_prompt(&tok, "hi", &EncodeOptions::default()).unwrap(),
        encode_prompt(&tok, "hi there", &EncodeOptions::default()).unwrap(),
    ];
    let len = pad_batch(
        &mut batch,
        &Padding {
            side: PadSide::Left,
            pad_id: 0,
            length: PadLength::Longest,
        },
    )
    .unwrap();
    assert_eq!(len, batch[1].len());
    let k = len - 20;
    assert_eq!(batch[0].ids[..k], vec![0; k]);
    assert_eq!(batch[0].attention_mask[..k], vec![0; k]);
    assert_eq!(batch[0].ids[k..], prompt_ids());
}

/// A Llama-2-style tokenizer puts its BOS token before every plain text, as `transformers`
/// tokenises one: the flag comes from `tokenizer.ggml.add_bos_token` (GGUF), from
/// `add_bos_token` in `tokenizer_config.json`, or, when that is absent, from what
/// `tokenizer.json`'s post-processor adds. A chat template writes its own, so chat encodings are
/// unchanged; SmolLM2-style tokenizers (no flag, byte-level BPE, no post-processor) add none.
#[test]
fn bos_as_the_tokenizer_asks() {
    use repnoise::model::tokenizer::Tok;
    use std::path::Path;
    let plain = EncodeOptions::default();
    let chat = EncodeOptions {
        format: PromptFormat::Chat,
        ..EncodeOptions::default()
    };
    let smol = common::tiny_tok();
    assert!(!smol.add_bos_token);

    // GGUF: the file's flag.
    let mut desc = common::tiny_tokenizer_description();
    desc.add_bos = Some(true);
    let llama = Tok::from_gguf(&desc, Path::new("tiny-llama.gguf")).unwrap();
    assert!(llama.add_bos_token);
    let e = encode_qa(&llama, "hi", "the", &plain).unwrap();
    let mut want = vec![1];
    want.extend(prompt_ids());
    want.extend([SP_T, HE]);
    assert_eq!(e.ids, want);
    assert_eq!(e.loss_mask[0], 0, "the BOS token is not an answer token");
    assert_eq!(llama.encode_text("hi").unwrap(), vec![1, b('h'), b('i')]);
    assert_eq!(smol.encode_text("hi").unwrap(), vec![b('h'), b('i')]);
    let p = encode_prompt(&llama, "hi", &plain).unwrap();
    assert_eq!(p.ids[0], 1);
    assert_eq!(&p.ids[1..], &prompt_ids()[..]);
    // A defence pair: BOS in both sequences, out of the pair mask.
    let pad = Padding {
        side: PadSide::Right,
        pad_id: 2,
        length: PadLength::Longest,
    };
    let ep = encode_pair(&llama, &pair(), &plain, &pad).unwrap();
    assert_eq!((ep.harmful.ids[0], ep.harmless.ids[0]), (1, 1));
    assert_eq!(ep.pair_mask[0], 0);
    assert_eq!(
        encode_qa(&llama, "hi", "the", &chat).unwrap().ids,
        encode_qa(&smol, "hi", "the", &chat).unwrap().ids,
        "a chat template writes its own special tokens"
    );

    // A Hugging Face directory whose tokenizer.json's post-processor adds the BOS token.
    let dir = std::env::temp_dir().join(format!("repnoise-bos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut tj =
        repnoise::model::tokenizer::gguf_tokenizer_json(&desc, Path::new("tiny.gguf")).unwrap();
    let bos = common::SPECIALS[1];
    tj["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [1], "tokens": [bos]}}
    });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    let config = |extra: serde_json::Value| {
        let mut c = serde_json::json!({"bos_token": bos, "eos_token": common::SPECIALS[2]});
        if let serde_json::Value::Object(m) = extra {
            c.as_object_mut().unwrap().extend(m);
        }
        std::fs::write(dir.join("tokenizer_config.json"), c.to_string()).unwrap();
        Tok::from_hf_dir(&dir).unwrap()
    };
    let t = config(serde_json::json!({}));
    assert!(t.add_bos_token, "the post-processor adds BOS");
    assert_eq!(encode_qa(&t, "hi", "the", &plain).unwrap().ids, want);
    let t = config(serde_json::json!({"add_bos_token": false}));
    assert!(!t.add_bos_token, "the config's flag wins");
    assert_eq!(encode_qa(&t, "hi", "the", &plain).unwrap().ids[0], b('Q'));
    let t = config(serde_json::json!({"add_bos_token": true}));
    assert!(t.add_bos_token);
    // Saving keeps the flag.
    let saved = dir.join("saved");
    std::fs::create_dir_all(&saved).unwrap();
    llama.save(&saved).unwrap();
    assert!(Tok::from_hf_dir(&saved).unwrap().add_bos_token);
    smol.save(&saved).unwrap();
    assert!(!Tok::from_hf_dir(&saved).unwrap().add_bos_token);
    // A flag that is not a boolean is named.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<|im_start|>", "add_bos_token": "yes"}"#,
    )
    .unwrap();
    let err = Tok::from_hf_dir(&dir)
        .err()
        .expect("a string flag is refused")
        .to_string();
    assert!(err.contains("add_bos_token"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The faithful modes' texts: the harmful answer joined as the reference code did,
/// `Answer:{a}` with no space, while the refusal keeps its space (the reference's refusals are
/// generations decoded after `Answer:`, which read `Answer: I ...`).
#[test]
fn reference_join_for_the_harmful_side_only() {
    let tok = common::tiny_tok();
    let opts = EncodeOptions {
        reference_join: true,
        ..EncodeOptions::default()
    };
    let e = encode_qa(&tok, "hi", "the", &opts).unwrap();
    let mut want = prompt_ids();
    want.extend([b('t'), HE]);
    assert_eq!(e.ids, want);
    assert_eq!(e.loss_mask[20..], [1, 1]);
    let pad = Padding {
        side: PadSide::Right,
        pad_id: 2,
        length: PadLength::Longest,
    };
    let ep = encode_pair(&tok, &pair(), &opts, &pad).unwrap();
    assert_eq!(&ep.harmful.ids[..22], &want[..]);
    let mut refusal = prompt_ids();
    refusal.extend(bytes(" no"));
    assert_eq!(&ep.harmless.ids[..23], &refusal[..]);
    // Both share the prompt; they differ from the first answer token on.
    assert_eq!(ep.pair_mask[..20], [0; 20]);
    assert!(ep.pair_mask[20..].iter().all(|&m| m == 1));
}
