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
    if result.is_ok() {
        remove_dead_writers_temporaries(path);
    }
    result
}

/// A temporary file untouched for this long whose process is gone is a killed writer's: a live
/// writer rewrites its file's modification time with every buffer it writes, and syncs and
/// renames it within seconds of the last.
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(600);

/// Remove the temporary files of `path` (`.NAME.tmpPID`) that writers killed before their rename
/// left behind: each carries its dead process's id, so a later write by another process does not
/// reuse its name (unless the id is reused) and it would stay forever. Removed only when no
/// process has that id here and the file has not been modified for [`STALE_TEMPORARY`]: a writer
/// in another process-id namespace (another container or machine sharing the directory) looks
/// dead to this check, but its file is fresh. A file of a live process (another writer of the
/// same path, or a reused id) is kept; so is everything on a system where a process cannot be
/// looked up. Best effort: failures are ignored.
fn remove_dead_writers_temporaries(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.tmp", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|digits| digits.parse::<u32>().ok())
        else {
            continue;
        };
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= STALE_TEMPORARY);
        if stale && pid != std::process::id() && process_is_gone(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether no process with id `pid` exists (false where that cannot be told).
fn process_is_gone(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // Signal 0 checks that the process exists without signalling it; ESRCH: there is none.
        // SAFETY: kill with signal 0 sends nothing and touches no memory of ours.
        let r = unsafe { libc::kill(pid, 0) };
        r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        false
    }
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
    fn a_write_removes_temporaries_that_killed_writers_left() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        // pid 1 always runs; no pid reaches i32::MAX (Linux's ceiling is 2^22).
        let dead = dir.path().join(".model.safetensors.tmp2147483646");
        let live = dir.path().join(".model.safetensors.tmp1");
        let other = dir.path().join(".other.safetensors.tmp2147483646");
        let not_ours = dir.path().join(".model.safetensors.tmp2147483646x");
        let fresh = dir.path().join(".model.safetensors.tmp2147483645");
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let write_old = |f: &Path| {
            std::fs::write(f, b"half").unwrap();
            let file = std::fs::File::options().write(true).open(f).unwrap();
            file.set_modified(an_hour_ago).unwrap();
        };
        for f in [&dead, &live, &other, &not_ours] {
            write_old(f);
        }
        // A dead id's file written a moment ago (a writer in another process-id namespace).
        std::fs::write(&fresh, b"half").unwrap();
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(
            dead.exists(),
            !cfg!(unix),
            "a dead writer's temporary file stays"
        );
        for kept in [&live, &other, &not_ours, &fresh] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
        // A failed write removes nothing but its own temporary file.
        write_old(&dead);
        write_atomic_with(&p, |_| Err(std::io::Error::other("disk full"))).unwrap_err();
        assert!(dead.exists());
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
