//! Crash safety of the real commands: `repnoise defend` and `repnoise attack` are killed with
//! SIGKILL again and again, at random moments and at every fault point (inside checkpoint
//! writes, between a temporary file and its rename, half-way through a metrics line, inside the
//! final model's write, after the `DONE` marker), each time rerun with the same command, and
//! must end with the weights and the metrics of an uninterrupted run of the same seed.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng as _, SeedableRng};

use crate::common::{tiny_loaded, write_tiny_hf};

/// One command line of the binary, run into `--out` directories of our choice.
struct Job {
    name: &'static str,
    args: Vec<String>,
}

impl Job {
    fn command(&self, out: &Path, kill_at: Option<&str>) -> Command {
        let mut c = crate::common::repnoise();
        c.args(&self.args)
            .arg("--out")
            .arg(out)
            .env_remove("REPNOISE_KILL_AT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(p) = kill_at {
            c.env("REPNOISE_KILL_AT", p);
        }
        c
    }

    /// Run to the end; panics with stderr on failure. Returns the wall time.
    fn run_clean(&self, out: &Path) -> Duration {
        let t = Instant::now();
        let o = self.command(out, None).output().unwrap();
        assert!(
            o.status.success(),
            "{}: {}",
            self.name,
            String::from_utf8_lossy(&o.stderr)
        );
        t.elapsed()
    }
}

/// What a run directory holds that must not depend on the kills: the final weights' bytes and
/// the metrics without their wall times.
fn outcome(out: &Path) -> (Vec<u8>, Vec<serde_json::Value>) {
    let w = std::fs::read(out.join("model/model.safetensors")).unwrap();
    let m = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("metrics line {l:?} is not JSON: {e}"));
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect();
    (w, m)
}

/// SIGKILL `job` at random moments, rerunning it into `out` until it finishes; a line per kill.
/// Each process lives up to a third of a clean run's time, so kills land anywhere from start-up
/// to the final writes.
fn random_kills(job: &Job, out: &Path, clean_secs: f64, seed: u64) -> Vec<String> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut kills = vec![];
    while !out.join("DONE").exists() {
        assert!(kills.len() < 60, "{}: no progress after 60 kills", job.name);
        let delay = Duration::from_secs_f64(rng.random_range(0.0..clean_secs / 3.0));
        let mut child = job.command(out, None).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        if child.wait().unwrap().signal() == Some(9) {
            kills.push(format!(
                "random kill after {:.0} ms",
                delay.as_secs_f64() * 1e3
            ));
        }
    }
    // A last run finds the finished run and leaves it as it is.
    job.run_clean(out);
    kills
}

/// SIGKILL `job` at every fault point in turn (the first time each process passes it), rerunning
/// it into `out`: the final model's write and the `DONE` marker last, as they end the run.
fn fault_point_kills(job: &Job, out: &Path) -> Vec<String> {
    let mut kills = vec![];
    for point in repnoise::util::fault::POINTS {
        let o = job.command(out, Some(point)).output().unwrap();
        assert!(
            o.status.signal() == Some(9),
            "{}: the process did not die at fault point {point} (status {:?}): {}",
            job.name,
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        kills.push(format!("killed at {point}"));
    }
    assert!(
        out.join("DONE").exists(),
        "{}: not done after done.marker",
        job.name
    );
    job.run_clean(out);
    kills
}

/// Fault-point kills in one directory, random kills in another; both must end as `clean` did.
fn crash_and_compare(job: &Job, clean: &Path, secs: f64, tmp: &Path, seed: u64) -> Vec<String> {
    let points = tmp.join(format!("{}-points", job.name));
    let mut kills = fault_point_kills(job, &points);
    check_against_clean(job, clean, &points, &kills);
    let random = tmp.join(format!("{}-random", job.name));
    let more = random_kills(job, &random, secs, seed);
    check_against_clean(job, clean, &random, &more);
    kills.extend(more);
    kills
}

fn check_against_clean(job: &Job, clean: &Path, crashed: &Path, kills: &[String]) {
    let (wa, ma) = outcome(clean);
    let (wb, mb) = outcome(crashed);
    let first = ma
        .iter()
        .zip(&mb)
        .position(|(a, b)| a != b)
        .map(|i| format!("step line {i}: clean {} / crashed {}", ma[i], mb[i]));
    assert_eq!(
        ma.len(),
        mb.len(),
        "{}: metrics lines differ in number ({first:?})",
        job.name
    );
    assert!(
        first.is_none(),
        "{}: metrics differ at {first:?}\nkills:\n{}",
        job.name,
        kills.join("\n")
    );
    assert!(
        wa == wb,
        "{}: final weights differ from the uninterrupted run's\nkills:\n{}",
        job.name,
        kills.join("\n")
    );
    // Nothing half-written is left beside the results.
    assert!(!crashed.join("checkpoints").exists(), "{}", job.name);
}

fn harm_csv(dir: &Path) -> PathBuf {
    let mut s = String::from("prompt,response,label\n");
    for i in 0..12 {
        s += &format!(
            "\"How do I do bad thing {i}?\",\"Do step {i} then step {}.\",1\n",
            i + 1
        );
    }
    let p = dir.join("harm.csv");
    std::fs::write(&p, s).unwrap();
    p
}

/// At least 20 SIGKILLs in all across a defence and an attack; each resumed run must equal an
/// uninterrupted one, bit for bit.
#[test]
fn sigkill_anywhere_then_resume_equals_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    let m = tiny_loaded(8);
    write_tiny_hf(&model, &m.config, &m.params);
    let pairs = crate::training::write_pairs(tmp.path());
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let train = s(&[
        "--batch-size",
        "2",
        "--checkpoint-every",
        "3",
        "--lr",
        "1e-3",
    ]);

    let mut defend_args = s(&["defend", "--method", "repnoise", "--model", &p(&model)]);
    defend_args.extend(s(&[
        "--pairs",
        &p(&pairs),
        "--epochs",
        "40",
        "--max-len",
        "48",
    ]));
    defend_args.extend(s(&["--beta", "0.1"]));
    defend_args.extend(train.clone());
    let defend = Job {
        name: "defend",
        args: defend_args,
    };
    let clean = tmp.path().join("defend-clean");
    let secs = defend.run_clean(&clean).as_secs_f64();
    let mut kills = crash_and_compare(&defend, &clean, secs, tmp.path(), 1);

    // The attack starts from the defended model.
    let defended = clean.join("model");
    let mut attack_args = s(&["attack", "--model", &p(&defended), "--data"]);
    attack_args.extend(s(&[
        &p(&harm_csv(tmp.path())),
        "--samples",
        "8",
        "--test-prompts",
        "2",
    ]));
    attack_args.extend(s(&[
        "--format",
        "plain",
        "--max-len",
        "64",
        "--epochs",
        "20",
    ]));
    attack_args.extend(train);
    let attack = Job {
        name: "attack",
        args: attack_args,
    };
    let clean = tmp.path().join("attack-clean");
    let secs = attack.run_clean(&clean).as_secs_f64();
    kills.extend(crash_and_compare(&attack, &clean, secs, tmp.path(), 2));
    eprintln!("{} kills:\n{}", kills.len(), kills.join("\n"));
    assert!(
        kills.len() >= 20,
        "only {} kills:\n{}",
        kills.len(),
        kills.join("\n")
    );
}

/// The defence of the crash test, small: 24 steps, a checkpoint after every step.
fn small_defence(tmp: &Path) -> Job {
    let model = tmp.join("tiny");
    if !model.exists() {
        let m = tiny_loaded(8);
        write_tiny_hf(&model, &m.config, &m.params);
    }
    let pairs = crate::training::write_pairs(tmp);
    let mut args: Vec<String> = ["defend", "--method", "repnoise", "--model"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(model.to_str().unwrap().into());
    args.extend(["--pairs".into(), pairs.to_str().unwrap().into()]);
    for a in [
        "--epochs",
        "12",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "1",
        "--lr",
        "1e-3",
        "--max-len",
        "48",
        "--beta",
        "0.1",
    ] {
        args.push(a.into());
    }
    Job {
        name: "defend",
        args,
    }
}

/// Every file under `dir` with its bytes, for before/after comparisons.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// What a run stopped by a write error must have kept: its configuration, whole metrics lines
/// only, and a resumable state; rerun with room to write, it ends as a clean run does.
fn check_stopped_run_then_finish(job: &Job, stopped: &Path, clean: &Path) {
    let cfg = std::fs::read_to_string(stopped.join("config.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&cfg).unwrap();
    if let Ok(m) = std::fs::read_to_string(stopped.join("metrics.jsonl")) {
        for l in m.lines() {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("metrics line {l:?}: {e}"));
        }
    }
    assert!(!stopped.join("DONE").exists());
    job.run_clean(stopped);
    check_against_clean(job, clean, stopped, &[]);
}

/// A full disk mid-run: the write that fails is named with the system's reason, nothing
/// written before is damaged, and the same command finishes the run once there is room. The
/// disk is filled with a file-size limit (`ulimit -f`, any machine) and, where user namespaces
/// allow mounting, a real 1 MiB-scale tmpfs; that tmpfs is then remounted read-only to check an
/// unwritable directory.
#[test]
fn full_disk_or_read_only_directory_gives_a_clear_error_and_keeps_earlier_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let job = small_defence(t);
    let clean = t.join("clean");
    job.run_clean(&clean);
    let weights = std::fs::metadata(clean.join("model/model.safetensors"))
        .unwrap()
        .len();

    // 1. File-size limit below one weights file: the first checkpoint cannot be written.
    let limited = t.join("limited");
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f {}; exec \"$0\" \"$@\" --out \"{}\"",
            weights / 2 / 1024,
            limited.display()
        ))
        .arg(crate::common::BIN)
        .args(&job.args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("File too large") && err.contains("model.safetensors"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    check_stopped_run_then_finish(&job, &limited, &clean);

    // 2. A real full disk, then a read-only one (needs unprivileged user namespaces).
    let probe = Command::new("unshare").args(["-rm", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipped the tmpfs half: `unshare -rm` is not permitted here");
        return;
    }
    let mnt = t.join("mnt");
    let host = t.join("host");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&host).unwrap();
    // Room for the run's small files and about one checkpoint (weights + two Adam moments),
    // not for the next one beside it.
    let size_kb = (weights * 5 / 1024).max(64);
    let script = r#"
        set -u
        BIN="$1"; MNT="$2"; HOST="$3"; SIZE="$4"; shift 4
        mount -t tmpfs -o size="${SIZE}k" tmpfs "$MNT" || exit 99
        "$BIN" "$@" --out "$MNT/run" >/dev/null 2>"$HOST/full.err"; echo $? > "$HOST/full.code"
        cp -a "$MNT/run" "$HOST/after-full"
        mount -o remount,ro "$MNT" || exit 98
        "$BIN" "$@" --out "$MNT/other" >/dev/null 2>"$HOST/ro-new.err"; echo $? > "$HOST/ro-new.code"
        "$BIN" "$@" --out "$MNT/run" >/dev/null 2>"$HOST/ro-resume.err"; echo $? > "$HOST/ro-resume.code"
        cp -a "$MNT/run" "$HOST/after-ro"
    "#;
    let o = Command::new("unshare")
        .args(["-rm", "sh", "-c", script, "sh"])
        .arg(crate::common::BIN)
        .arg(&mnt)
        .arg(&host)
        .arg(size_kb.to_string())
        .args(&job.args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |f: &str| std::fs::read_to_string(host.join(f)).unwrap();
    // Full disk: exit 1, the file and the reason named.
    let err = read("full.err");
    assert_eq!(read("full.code").trim(), "1", "{err}");
    assert!(
        err.contains("No space left on device") && err.contains("/run/"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Read-only: a new run and a resumed one both fail with the reason, and the run directory
    // is byte for byte what the full disk left.
    for f in ["ro-new", "ro-resume"] {
        let err = read(&format!("{f}.err"));
        assert_eq!(read(&format!("{f}.code")).trim(), "1", "{f}: {err}");
        assert!(err.contains("Read-only file system"), "{f}: {err}");
        assert!(!err.contains("panicked"), "{f}: {err}");
    }
    assert!(snapshot(&host.join("after-full")) == snapshot(&host.join("after-ro")));
    // With room again, the run left by the full disk finishes as a clean one.
    check_stopped_run_then_finish(&job, &host.join("after-full"), &clean);
}
