//! Answering prompts: batched greedy (or seeded sampled) generation over a list of prompts, in
//! their input order, with a progress bar. Every evaluation that reads a model's answers, the
//! alignment's refusal measurements and the defence pairs' refusals go through it.

use std::io::IsTerminal;

use crate::data::encode::{encode_prompt, length_order, EncodeOptions, Longest, PromptFormat};
use crate::model::generate::{generate, SamplingConfig};
use crate::model::llama::Llama;
use crate::model::tokenizer::Tok;
use crate::Result;

/// Answer `prompts` with greedy decoding, batched (prompts sorted by length), returning the
/// decoded answers in the input order.
pub fn answer_prompts(
    net: &Llama,
    tok: &Tok,
    prompts: &[String],
    format: PromptFormat,
    max_new_tokens: usize,
    batch: usize,
    label: &str,
) -> Result<Vec<String>> {
    let cfg = SamplingConfig {
        max_new_tokens,
        ..SamplingConfig::default()
    };
    answer_prompts_with(net, tok, prompts, format, &cfg, batch, label)
}

/// [`answer_prompts`] with any sampling settings.
pub fn answer_prompts_with(
    net: &Llama,
    tok: &Tok,
    prompts: &[String],
    format: PromptFormat,
    cfg: &SamplingConfig,
    batch: usize,
    label: &str,
) -> Result<Vec<String>> {
    let opts = EncodeOptions {
        format,
        ..EncodeOptions::default()
    };
    let enc: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| encode_prompt(tok, p, &opts).map(|e| e.ids))
        .collect::<Result<_>>()?;
    let out = generate_batched(net, tok, &enc, cfg, batch, label)?;
    Ok(out.into_iter().map(|t| t.trim().to_string()).collect())
}

/// The decoded continuations (untrimmed) of encoded prompts, in input order: batches of
/// `batch` in order of length, each with its own sampling stream (`cfg.seed` + the batch's
/// index), a progress bar on a terminal and a line every 8 batches otherwise.
pub fn generate_batched(
    net: &Llama,
    tok: &Tok,
    enc: &[Vec<u32>],
    cfg: &SamplingConfig,
    batch: usize,
    label: &str,
) -> Result<Vec<String>> {
    let order = length_order(enc.iter().map(Vec::len), Longest::Last);
    let bar = std::io::stderr().is_terminal().then(|| {
        let pb = indicatif::ProgressBar::new(enc.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_message(label.to_string());
        pb
    });
    let mut out = vec![String::new(); enc.len()];
    for (k, chunk) in order.chunks(batch.max(1)).enumerate() {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|&i| enc[i].clone()).collect();
        // One sampling stream per batch, so a batch's draws do not depend on the others.
        let c = SamplingConfig {
            seed: cfg.seed.wrapping_add(k as u64),
            ..cfg.clone()
        };
        let gen = generate(net, &ids, tok.pad_id, &tok.stop_ids, &c)?;
        for (&i, g) in chunk.iter().zip(gen) {
            out[i] = tok.decode(&g, true)?;
        }
        match &bar {
            Some(pb) => pb.inc(chunk.len() as u64),
            None => {
                if k % 8 == 0 {
                    eprintln!(
                        "{label}: {}/{} answered",
                        ((k + 1) * batch).min(enc.len()),
                        enc.len()
                    );
                }
            }
        }
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    Ok(out)
}
