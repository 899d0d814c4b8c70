//! File output that never leaves a half-written result: write to a temporary name in the same
//! directory, flush to disk, then rename over the target.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

fn tmp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Write through `fill` into a temporary file, then rename it to `path`. On any error the
/// temporary file is removed and an existing `path` is left untouched.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    write_atomic_via(path, |tmp| {
        (|| -> std::io::Result<()> {
            let mut w = std::io::BufWriter::new(std::fs::File::create(tmp)?);
            fill(&mut w)?;
            w.into_inner().map_err(|e| e.into_error())?;
            Ok(())
        })()
        .map_err(|e| Error::file(path, format!("cannot write: {e}")))
    })
}

/// Write `path` atomically through `fill`, which writes the file at the temporary path it is
/// given (for writers that only write to a path). The temporary file is then synced and renamed
/// over `path`; on any error, `fill`'s included, it is removed and an existing `path` is left
/// untouched. `fill`'s errors are passed on as they are.
pub fn write_atomic_via(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::file(parent, format!("cannot create directory: {e}")))?;
        }
    }
    let tmp = tmp_name(path);
    let result = fill(&tmp).and_then(|()| {
        (|| -> std::io::Result<()> {
            std::fs::File::open(&tmp)?.sync_all()?;
            crate::util::fault::point("atomic.tmp");
            std::fs::rename(&tmp, path)
        })()
        .map_err(|e| Error::file(path, format!("cannot write: {e}")))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Write one compact JSON value per line (JSONL) atomically.
pub fn write_jsonl_atomic<T: serde::Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        text += &serde_json::to_string(r)
            .map_err(|e| Error::file(path, format!("cannot serialise: {e}")))?;
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

/// Write pretty JSON atomically.
pub fn write_json_atomic(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::file(path, format!("cannot serialise: {e}")))?;
    write_atomic(path, text.as_bytes())
}

/// The JSON value in `path`, if it exists and parses (how stages find their earlier results).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The stage result saved at `path` by an earlier invocation, or `make()`'s, saved there
/// atomically (how a resumed run skips finished stages).
pub fn cached<T: serde::Serialize + serde::de::DeserializeOwned>(
    path: &Path,
    make: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if let Some(v) = read_json(path) {
        return Ok(v);
    }
    let v = make()?;
    write_json_atomic(path, &v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let n = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(n, 1);
    }

    #[test]
    fn failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic(&p, b"good").unwrap();
        let e = write_atomic_with(&p, |_| Err(std::io::Error::other("disk full"))).unwrap_err();
        assert!(e.to_string().contains("disk full"));
        assert_eq!(std::fs::read(&p).unwrap(), b"good");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_path_writer_that_fails_half_way_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        write_atomic(&p, b"good").unwrap();
        // The writer wrote part of the temporary file, then failed: its own error comes back.
        let e = write_atomic_via(&p, |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(Error::tensor(tmp, "w", "cannot make"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("tensor `w`: cannot make"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"good");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A writer that wrote nothing: the sync fails, naming the target.
        let e = write_atomic_via(&p, |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("m.safetensors: cannot write"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"good");
    }

    #[test]
    fn jsonl_is_one_compact_value_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        let rows = vec![
            serde_json::json!({"a": 1, "b": "x\ny"}),
            serde_json::json!([2]),
        ];
        write_jsonl_atomic(&p, &rows).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"a\":1,\"b\":\"x\\ny\"}\n[2]\n"
        );
        write_jsonl_atomic::<u8>(&p, &[]).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "");
    }
}

/// A text file's contents; an error names the file ("cannot read: ...").
pub fn read_text(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))
}

/// Read a TOML configuration file (`what` names it in errors: "not a valid defend config").
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = read_text(path)?;
    toml::from_str(&text).map_err(|e| {
        crate::util::error::Error::file(path, format!("not a valid {what} config: {e}"))
    })
}
