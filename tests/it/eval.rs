//! Evaluations on tiny random models: log-likelihood scoring against a one-sequence reference,
//! the harness's context/continuation split, stability and trainability plumbing.

use repnoise::data::mc::{McItem, McOption};
use repnoise::eval::stability::{encode_option, evaluate_items, score_packed, score_tokens};
use repnoise::model::generate::token_logprobs;
use repnoise::model::llama::Llama;

use crate::common::tiny_loaded;

fn opt(c: &str, k: &str) -> McOption {
    McOption {
        context: c.into(),
        continuation: k.into(),
    }
}

#[test]
fn batched_option_scores_equal_one_sequence_at_a_time() {
    let m = tiny_loaded(21);
    let net = Llama::frozen(&m.config, &m.params).unwrap();
    let opts = [
        opt("Question: the cat\nAnswer:", " sat"),
        opt("Question: the cat\nAnswer:", " sat on the mat for a while"),
        opt("he said ", "hello there"), // trailing space moves to the continuation
        opt("", "A whole sentence scored from the start token."),
        opt("x", " y"),
    ];
    let seqs: Vec<_> = opts
        .iter()
        .map(|o| encode_option(&m.tok, 0, o).unwrap())
        .collect();
    // The harness's split: context tokens, then the rest of tokenize(context + continuation).
    assert_eq!(seqs[2].0, m.tok.encode("he said").unwrap());
    assert_eq!(seqs[3].0, vec![0]);
    assert_eq!(
        seqs[3].1,
        m.tok
            .encode("A whole sentence scored from the start token.")
            .unwrap()
    );
    for batch in [1, 2, 5] {
        let got = score_tokens(&net, &seqs, 1024, batch).unwrap();
        for ((c, k), s) in seqs.iter().zip(&got) {
            let ids: Vec<u32> = c.iter().chain(k).copied().collect();
            let lp = token_logprobs(&net, &ids).unwrap();
            let want: f64 = lp[lp.len() - k.len()..].iter().map(|&x| x as f64).sum();
            assert!(
                (s.loglik - want).abs() < 1e-3 * want.abs().max(1.0),
                "batch {batch}: {} vs {want}",
                s.loglik
            );
            assert_eq!(s.tokens, k.len());
        }
    }
    // Cut from the left: only the last max_len + 1 tokens count, the continuation first.
    let short = score_tokens(&net, &seqs[1..2], 4, 1).unwrap()[0];
    assert_eq!(short.tokens, 4);
}

/// Packed rows (a shared context once, each continuation seeing the context and itself) give
/// every option the log-likelihood of scoring it alone, in any batch; items whose options do not
/// share a context fall back to one sequence per option inside `evaluate_items`.
#[test]
fn packed_option_scores_equal_one_sequence_at_a_time() {
    let m = tiny_loaded(23);
    let net = Llama::frozen(&m.config, &m.params).unwrap();
    let enc = |c: &str, k: &str| encode_option(&m.tok, 0, &opt(c, k)).unwrap();
    let items: Vec<(Vec<u32>, Vec<Vec<u32>>)> = [
        (
            "Question: the cat\nAnswer:",
            vec![" sat", " sat on the mat", " ran", " x"],
        ),
        ("Q: two\nA:", vec![" one option only"]),
        (
            "The longest context of the three, with some words\nAnswer:",
            vec![" a", " bb"],
        ),
    ]
    .iter()
    .map(|(c, ks)| {
        let e: Vec<_> = ks.iter().map(|k| enc(c, k)).collect();
        (e[0].0.clone(), e.into_iter().map(|x| x.1).collect())
    })
    .collect();
    let alone = |c: &[u32], k: &[u32]| -> f64 {
        let ids: Vec<u32> = c.iter().chain(k).copied().collect();
        let lp = token_logprobs(&net, &ids).unwrap();
        lp[lp.len() - k.len()..].iter().map(|&x| x as f64).sum()
    };
    for batch in [1, 2, 3] {
        let got = score_packed(&net, &items, batch).unwrap();
        for ((c, ks), scores) in items.iter().zip(&got) {
            assert_eq!(scores.len(), ks.len());
            for (k, s) in ks.iter().zip(scores) {
                let want = alone(c, k);
                // f32 rounding is about 1e-6 here; a continuation that also saw the options
                // before it is off by about 1e-2 on this random model.
                assert!(
                    (s.loglik - want).abs() < 1e-4,
                    "batch {batch}: {} vs {want}",
                    s.loglik
                );
                assert_eq!(s.tokens, k.len());
            }
        }
    }
    // Through evaluate_items: a packed item, an item with per-option contexts (Winogrande's
    // shape) and an item too long to pack uncut, each as the unpacked scorer has it.
    let mc = |os: Vec<McOption>| McItem {
        options: os,
        correct: vec![0],
        group: None,
    };
    let its = vec![
        mc(vec![
            opt("Question: hi\nAnswer:", " yes"),
            opt("Question: hi\nAnswer:", " no way"),
        ]),
        mc(vec![opt("The cat", " sat."), opt("The dog", " sat.")]),
        mc(vec![opt("abcdefgh", " ijklmnop"), opt("abcdefgh", " q")]),
    ];
    for max_len in [256, 12] {
        let got = evaluate_items(&net, &m.tok, 0, &its, max_len, 2).unwrap();
        for (it, r) in its.iter().zip(&got) {
            let seqs: Vec<_> = it
                .options
                .iter()
                .map(|o| encode_option(&m.tok, 0, o).unwrap())
                .collect();
            let want = score_tokens(&net, &seqs, max_len, 1).unwrap();
            for (a, b) in r.logliks.iter().zip(&want) {
                assert!(
                    (a - b.loglik).abs() < 1e-3 * b.loglik.abs().max(1.0),
                    "{a} vs {b:?}"
                );
            }
        }
    }
}

#[test]
fn a_model_prefers_what_it_was_given_to_score_highest() {
    // An item whose correct option is the model's own greedy continuation is answered
    // correctly, and the greedy flag says so.
    let m = tiny_loaded(22);
    let net = Llama::frozen(&m.config, &m.params).unwrap();
    let ctx = "Question: pick one\nAnswer:";
    let ids = m.tok.encode(ctx).unwrap();
    let cfg = repnoise::model::generate::SamplingConfig {
        max_new_tokens: 3,
        ..Default::default()
    };
    let g = repnoise::model::generate::generate(&net, &[ids], m.tok.pad_id, &[], &cfg).unwrap();
    let greedy_text = m.tok.decode(&g[0], false).unwrap();
    let item = McItem {
        options: vec![opt(ctx, "zzzz qqqq"), opt(ctx, &greedy_text)],
        correct: vec![1],
        group: None,
    };
    let r = evaluate_items(&net, &m.tok, 0, &[item], 256, 4).unwrap();
    // Byte-level tokens may merge differently at the boundary; the greedy text still wins.
    assert_eq!(r[0].acc, 1.0, "{:?}", r[0]);
}

/// `repnoise eval over-refusal` answers a seeded draw of XSTest's safe and unsafe prompts,
/// writes one row per answer and the figures, and refuses a count XSTest does not have.
#[test]
fn over_refusal_cli_answers_the_drawn_prompts() {
    use crate::common::{tiny_config, tiny_params, write_tiny_hf};
    use repnoise::model::config::Arch;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Arch::Llama, true);
    let model = tmp.path().join("m");
    write_tiny_hf(&model, &cfg, &tiny_params(&cfg, 3));
    let out = tmp.path().join("out");
    let run = |extra: &[&str]| {
        crate::common::repnoise()
            .args(["eval", "over-refusal", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .args(["--max-new-tokens", "3", "--format", "plain"])
            .args(extra)
            .env("REPNOISE_CACHE", tmp.path())
            .output()
            .unwrap()
    };
    let o = run(&["--safe", "3", "--unsafe", "2"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("safe prompts: refused") && stdout.contains("/3)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("unsafe prompts: refused") && stdout.contains("/2)"),
        "{stdout}"
    );
    let rows = std::fs::read_to_string(out.join("overrefusal.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 5);
    assert!(out.join("overrefusal.json").exists());
    let o = run(&["--safe", "300"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("safe") && err.contains("250"), "{err}");
}

/// The held-out cross-entropy packs each item's harmful answer and refusal behind their shared
/// prompt; every item's two figures are those of scoring each sequence alone (the mean
/// negative log-probability of its answer tokens), in any batch, for an item whose answer the
/// length cap cuts, and for one whose two encodings do not share their prompt (scored apart).
#[test]
fn packed_heldout_scores_equal_each_sequence_alone() {
    use repnoise::data::encode::PromptFormat;
    use repnoise::eval::heldout::{self, HeldoutConfig, HeldoutItem};
    let m = tiny_loaded(29);
    let net = Llama::frozen(&m.config, &m.params).unwrap();
    let item = |p: &str, h: &str, r: &str| HeldoutItem {
        prompt: p.into(),
        harmful: h.into(),
        refusal: r.into(),
    };
    let items = [
        item("how to", "like so", "no"),
        item("a", "a long answer that the cap cuts", "no"),
        item("why", "as", "not that"),
        item("the long one", "so", "no"),
    ];
    let cfg = |max_len| HeldoutConfig {
        format: PromptFormat::Chat,
        max_len,
        ..HeldoutConfig::default()
    };
    // A cap 6 tokens short of the second item's harmful sequence, above every other one.
    let whole = heldout::encode(&m.tok, &items, &cfg(1000)).unwrap();
    let cap = whole.harmful[1].len() - 6;
    assert!((whole.harmful.iter().chain(&whole.refusal))
        .enumerate()
        .all(|(k, e)| k == 1 || e.len() <= cap));
    let mut enc = heldout::encode(&m.tok, &items, &cfg(cap)).unwrap();
    assert_eq!(enc.harmful[1].len(), cap);
    // The last item's refusal gets another prompt token: its pair cannot share a prompt.
    enc.refusal[3].ids[1] = enc.refusal[3].ids[1] % 200 + 1;
    let alone = |e: &repnoise::data::Encoded| -> f32 {
        let lp = token_logprobs(&net, &e.ids).unwrap();
        let picked: Vec<f64> = (1..e.len())
            .filter(|&p| e.loss_mask[p] == 1)
            .map(|p| -lp[p - 1] as f64)
            .collect();
        (picked.iter().sum::<f64>() / picked.len() as f64) as f32
    };
    for batch in [1, 2, 3] {
        let got = heldout::score(&net, &enc, batch).unwrap();
        for i in 0..items.len() {
            for (what, g, e) in [
                ("harmful", got.harmful_ce[i], &enc.harmful[i]),
                ("refusal", got.refusal_ce[i], &enc.refusal[i]),
            ] {
                let want = alone(e);
                assert!(
                    (g - want).abs() < 1e-4 * want.abs().max(1.0),
                    "item {i} {what} batch {batch}: {g} against {want} alone"
                );
            }
        }
    }
}
