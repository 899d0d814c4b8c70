//! The fuzz targets' bodies (`repnoise::dev::fuzzing`, also behind `cargo fuzz` in `fuzz/`) run on a
//! fixed number of seeded mutations of valid inputs: CI's short fuzzing run, without libFuzzer's
//! instrumentation (docs/RELIABILITY.md has the longer `cargo fuzz` runs). A panic fails the test
//! and saves the input under `target/fuzz-failures/`.
//!
//! `REPNOISE_FUZZ_SEEDS=DIR cargo test --release --test it fuzz::` also writes the seeds to
//! `DIR/<target>/`, the corpus `fuzz/run.sh` starts `cargo fuzz` from.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::{tiny_config, tiny_params, write_tiny_gguf};
use repnoise::dev::fuzzing;
use repnoise::model::config::Arch;

/// Numbers a header field is worth trying.
const INTERESTING: [u64; 8] = [
    0,
    1,
    0x7f,
    0xffff_ffff,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
];

/// One to four mutations of `seed`: bit flips, interesting bytes and 64-bit numbers, inserted,
/// deleted or duplicated ranges, truncation.
fn mutate(seed: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let n = b.len();
        let at = if n == 0 { 0 } else { rng.random_range(0..n) };
        match rng.random_range(0..7) {
            0 if n > 0 => b[at] ^= 1 << rng.random_range(0..8),
            1 if n > 0 => b[at] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b','][rng.random_range(0..7)],
            2 if n >= 8 => {
                let at = rng.random_range(0..=n - 8);
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            3 => {
                let len = rng.random_range(1..16);
                let ins: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                b.splice(at..at, ins);
            }
            4 if n > 0 => {
                let end = (at + rng.random_range(1..64)).min(n);
                b.drain(at..end);
            }
            5 if n > 0 => {
                let end = (at + rng.random_range(1..64)).min(n);
                let dup = b[at..end].to_vec();
                let to = rng.random_range(0..=b.len());
                b.splice(to..to, dup);
            }
            _ => b.truncate(at),
        }
    }
    b
}

/// Run `body` on every seed and on `execs` mutations of them; a panic saves the input and fails.
fn fuzz(name: &str, body: fn(&[u8]), seeds: &[Vec<u8>], execs: usize) {
    assert!(!seeds.is_empty());
    if let Some(dir) = std::env::var_os("REPNOISE_FUZZ_SEEDS") {
        let d = PathBuf::from(dir).join(name);
        std::fs::create_dir_all(&d).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i:03}")), s).unwrap();
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    let inputs = seeds
        .iter()
        .cloned()
        .chain((0..execs).map(|_| mutate(&seeds[rng.random_range(0..seeds.len())], &mut rng)));
    for (i, input) in inputs.enumerate() {
        let run = std::panic::catch_unwind(|| body(&input));
        if run.is_err() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let p = dir.join(format!("{name}-{i}"));
            std::fs::write(&p, &input).unwrap();
            panic!(
                "fuzz target {name} panicked on input {i}, saved to {} (replay: cargo fuzz run \
                 {name} {})",
                p.display(),
                p.display()
            );
        }
    }
}

#[test]
fn gguf_reader_survives_mutations() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Arch::Llama, true);
    let p = tmp.path().join("tiny.gguf");
    write_tiny_gguf(&p, &cfg, &tiny_params(&cfg, 1));
    let valid = std::fs::read(&p).unwrap();
    // The header alone (metadata and tensor infos, where the lengths and counts are): most
    // mutations of the whole file land in the weights.
    let header = valid[..valid.len().min(16 << 10)].to_vec();
    fuzz("gguf", fuzzing::gguf, &[valid, header], 1500);
}

#[test]
fn safetensors_reader_survives_mutations() {
    let seed = fuzzing::safetensors_seed();
    let header_len = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let header = seed[..8 + header_len].to_vec();
    fuzz("safetensors", fuzzing::safetensors, &[seed, header], 1500);
}

/// A two-row BeaverTails-shaped Parquet file (`prompt`, `response`, `is_safe`).
fn parquet_seed() -> Vec<u8> {
    use parquet::basic::{ConvertedType, Repetition, Type as Phys};
    use parquet::data_type::{BoolType, ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::types::Type;
    let col = |name: &str, phys, utf8: bool| {
        let mut b = Type::primitive_type_builder(name, phys).with_repetition(Repetition::REQUIRED);
        if utf8 {
            b = b.with_converted_type(ConvertedType::UTF8);
        }
        Arc::new(b.build().unwrap())
    };
    let schema = Type::group_type_builder("schema")
        .with_fields(vec![
            col("prompt", Phys::BYTE_ARRAY, true),
            col("response", Phys::BYTE_ARRAY, true),
            col("is_safe", Phys::BOOLEAN, false),
        ])
        .build()
        .unwrap();
    let mut buf = vec![];
    {
        let props = Arc::new(WriterProperties::builder().build());
        let mut w = SerializedFileWriter::new(&mut buf, Arc::new(schema), props).unwrap();
        let mut rg = w.next_row_group().unwrap();
        let texts = [["How do I hurt a cat?", "What is 2+2?"], ["Kick it.", "4"]];
        for t in texts {
            let mut c = rg.next_column().unwrap().unwrap();
            let v: Vec<ByteArray> = t.iter().map(|s| ByteArray::from(*s)).collect();
            c.typed::<ByteArrayType>()
                .write_batch(&v, None, None)
                .unwrap();
            c.close().unwrap();
        }
        let mut c = rg.next_column().unwrap().unwrap();
        c.typed::<BoolType>()
            .write_batch(&[false, true], None, None)
            .unwrap();
        c.close().unwrap();
        rg.close().unwrap();
        w.close().unwrap();
    }
    buf
}

#[test]
fn dataset_readers_survive_mutations() {
    // Each fixture under every format that takes its extension.
    let mut seeds = vec![];
    let dir = Path::new("tests/fixtures/data");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let parquet = parquet_seed();
    for (i, (_, ext)) in fuzzing::DATASET_FORMATS.iter().enumerate() {
        for f in &files {
            if f.extension().is_some_and(|e| e == *ext) {
                let mut s = vec![i as u8];
                s.extend(std::fs::read(f).unwrap());
                seeds.push(s);
            }
        }
        if *ext == "parquet" {
            let mut s = vec![i as u8];
            s.extend(&parquet);
            seeds.push(s);
        }
    }
    fuzz("dataset", fuzzing::dataset, &seeds, 3000);
}

/// Inputs that crashed a libFuzzer run (`fuzz/run.sh`, docs/RELIABILITY.md), replayed: each is
/// now rejected with an error.
#[test]
fn crashes_found_by_libfuzzer_stay_fixed() {
    let dir = Path::new("tests/fixtures/fuzz/dataset");
    let mut n = 0;
    for f in std::fs::read_dir(dir).unwrap().flatten() {
        fuzzing::dataset(&std::fs::read(f.path()).unwrap()); // a panic fails the test
        n += 1;
    }
    assert!(n >= 1);
    // A Parquet column chunk with a negative start: the parquet crate asserts on it.
    let bytes = std::fs::read(dir.join("parquet-negative-column-start")).unwrap();
    let (kind, ext) = fuzzing::DATASET_FORMATS[bytes[0] as usize % fuzzing::DATASET_FORMATS.len()];
    assert_eq!(ext, "parquet");
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("data.parquet");
    std::fs::write(&p, &bytes[1..]).unwrap();
    let e = repnoise::data::stats::load(&p, kind)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("data.parquet") && e.contains("outside the file"),
        "{e}"
    );
    // A dictionary-encoded page without its dictionary: the parquet crate panics while decoding.
    let bytes = std::fs::read(dir.join("parquet-dictionary-page-missing")).unwrap();
    std::fs::write(&p, &bytes[1..]).unwrap();
    let (kind, _) = fuzzing::DATASET_FORMATS[bytes[0] as usize % fuzzing::DATASET_FORMATS.len()];
    let e = repnoise::data::stats::load(&p, kind)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("data.parquet") && e.contains("malformed"), "{e}");
}

#[test]
fn config_parsers_survive_mutations() {
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir("configs")
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    seeds.sort();
    seeds.push(
        tiny_config(Arch::Llama, true)
            .to_hf_json()
            .to_string()
            .into_bytes(),
    );
    fuzz("config", fuzzing::config, &seeds, 3000);
}
