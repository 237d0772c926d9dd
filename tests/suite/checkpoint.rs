//! Checkpoints (`--checkpoint`, `--resume`): a run killed with SIGKILL after a checkpoint, or
//! stopped by SIGTERM, resumes to the byte-identical adapter of the uninterrupted run, on one
//! process, thread worlds and pipeline grids; another run's checkpoint and damaged files are
//! refused with a message; an unwritable checkpoint directory fails before any work.

use super::common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A synthetic run of 30 steps, a few seconds in all, that does not converge early.
const SPEC: &str = "layers=4,group=2,dim=128,tokens=2048,units=60,mean=2";

/// [`SPEC`] with 200 steps: two ranks take a few seconds (60 units ended within half a second
/// of the staging directory on a fast machine, before the SIGTERM).
#[cfg(feature = "mpi")]
const LONG_SPEC: &str = "layers=4,group=2,dim=128,tokens=2048,units=400,mean=2";

fn args<'a>(out: &'a Path, ck: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "init",
        "--synthetic",
        SPEC,
        "--batch-size",
        "2",
        "--no-early-stop",
        "--threads",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--checkpoint",
        ck.to_str().unwrap(),
    ];
    v.extend_from_slice(extra);
    v
}

fn spawn(args: &[&str]) -> Child {
    Command::new(eva_bin())
        .args(args)
        .env("OPENBLAS_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Waits until `file` exists (a checkpoint's rank file, which appears whole).
fn wait_for(file: &Path, child: &mut Child) {
    let t = Instant::now();
    while !file.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before {} appeared",
            file.display()
        );
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{} never appeared",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the run has made `--out`'s temporary directory in `parent` (it is past its checks).
fn wait_for_staging(parent: &Path) {
    let t = Instant::now();
    while !parent
        .read_dir()
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains("eva-tmp"))
    {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn rank_file(ck: &Path, step: usize, rank: usize) -> PathBuf {
    ck.join(format!("step-{step:08}/rank-{rank:05}.ckpt"))
}

/// The run's bytes: weights and config (the report's times differ between runs).
fn adapter_bytes(out: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(out.join("adapter_config.json")).unwrap(),
    )
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("eva_report.json")).unwrap()).unwrap()
}

fn run_ok(args: &[&str]) -> Output {
    let o = eva(args);
    assert!(o.status.success(), "eva failed: {}", stderr_of(&o));
    o
}

#[test]
fn a_run_killed_after_a_checkpoint_resumes_to_the_same_bytes() {
    for extra in [
        &["--estimator", "exact"][..],
        &["--estimator", "sketch", "--local-ranks", "2"][..],
    ] {
        let dir = tempdir();
        let (full, out, ck) = (
            dir.path().join("full"),
            dir.path().join("out"),
            dir.path().join("ck"),
        );
        let mut plain = args(&full, &ck, extra);
        plain.truncate(plain.len() - 2);
        run_ok(&plain);
        let mut extra_every = extra.to_vec();
        extra_every.extend(["--checkpoint-every", "1"]);
        let mut child = spawn(&args(&out, &ck, &extra_every));
        wait_for(&rank_file(&ck, 3, 0), &mut child);
        child.kill().unwrap();
        let _ = child.wait();
        assert!(!out.exists());
        let mut resume = extra_every.clone();
        resume.push("--resume");
        let o = run_ok(&args(&out, &ck, &resume));
        let r = report(&out);
        let from = r["resumed_from_step"].as_u64().expect("resumed") as usize;
        // Rank 0's file of step 3 was there; with two ranks the other's may not have been, and
        // then step 2 is the latest complete one (seen once under load).
        assert!((2..30).contains(&from), "{r}");
        assert_eq!(r["steps"], 30, "{}", stderr_of(&o));
        assert_eq!(adapter_bytes(&full), adapter_bytes(&out), "{extra:?}");
        // Only the last complete checkpoint is kept, one file per rank.
        let steps: Vec<_> = std::fs::read_dir(&ck).unwrap().flatten().collect();
        assert_eq!(steps.len(), 1, "{steps:?}");
    }
}

#[test]
fn sigterm_writes_a_checkpoint_exits_143_and_resumes_to_the_same_bytes() {
    let dir = tempdir();
    let (full, out, ck) = (
        dir.path().join("full"),
        dir.path().join("out"),
        dir.path().join("ck"),
    );
    let mut plain = args(&full, &ck, &[]);
    plain.truncate(plain.len() - 2);
    run_ok(&plain);
    // The periodic checkpoint would come only after the run: the signal's is the only one.
    let child = spawn(&args(&out, &ck, &["--checkpoint-every", "1000"]));
    wait_for_staging(dir.path());
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let o = child.wait_with_output().unwrap();
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(143), "{err}");
    assert!(
        err.contains("eva: error: interrupted by SIGTERM after step") && err.contains("--resume"),
        "{err}"
    );
    assert_nothing_written(&out);
    let steps: Vec<_> = std::fs::read_dir(&ck).unwrap().flatten().collect();
    assert_eq!(steps.len(), 1, "one checkpoint, the signal's: {steps:?}");
    run_ok(&args(
        &out,
        &ck,
        &["--checkpoint-every", "1000", "--resume"],
    ));
    assert!(report(&out)["resumed_from_step"].as_u64().is_some());
    assert_eq!(adapter_bytes(&full), adapter_bytes(&out));
}

#[test]
fn a_pipeline_grid_resumes_to_the_one_process_adapter() {
    let dir = tempdir();
    let (one, out, ck) = (
        dir.path().join("one"),
        dir.path().join("out"),
        dir.path().join("ck"),
    );
    let model = super::distributed::shipped_model();
    let run = |out: &Path, extra: &[&str]| {
        let mut a = vec!["init", "-q", "--out", out.to_str().unwrap()];
        a.extend_from_slice(&model);
        a.extend_from_slice(extra);
        run_ok(&a);
    };
    run(&one, &[]);
    let grid = ["--local-ranks", "4", "--pp", "2", "--checkpoint"];
    let ck_s = ck.to_str().unwrap();
    // Every 5 steps: the run (13 steps) leaves its last checkpoint, of step 10, behind.
    run(
        &dir.path().join("first"),
        &[&grid[..], &[ck_s, "--checkpoint-every", "5"]].concat(),
    );
    run(
        &out,
        &[&grid[..], &[ck_s, "--checkpoint-every", "5", "--resume"]].concat(),
    );
    assert_eq!(report(&out)["resumed_from_step"], 10);
    assert_eq!(adapter_bytes(&one), adapter_bytes(&out));
}

/// A checkpoint of the synthetic run after a few steps, in `ck`.
fn make_checkpoint(dir: &Path, ck: &Path, extra: &[&str]) {
    let first = dir.join("first");
    let mut a = args(
        &first,
        ck,
        &["--checkpoint-every", "4", "--max-steps", "5", "--force"],
    );
    a.extend_from_slice(extra);
    run_ok(&a);
}

#[test]
fn another_runs_checkpoint_is_refused_naming_what_differs() {
    let dir = tempdir();
    let ck = dir.path().join("ck");
    make_checkpoint(dir.path(), &ck, &[]);
    let out = dir.path().join("out");
    let base = ["--checkpoint-every", "4", "--max-steps", "5", "--resume"];
    for (extra, needles) in [
        (
            &["--rank", "4"][..],
            &["--rank: 8 in the checkpoint, 4 now"][..],
        ),
        (
            &["--seed", "3"][..],
            &["--seed: 0 in the checkpoint, 3 now"][..],
        ),
        (
            &["--local-ranks", "2"][..],
            &["rank 1 finds no checkpoint"][..],
        ),
    ] {
        let mut a = args(&out, &ck, &base);
        a.extend_from_slice(extra);
        let o = eva(&a);
        assert_refused(&o, 2, needles, &out);
    }
    // Other data: the synthetic spec and the layer catalog differ.
    let mut a = args(&out, &ck, &base);
    a[2] = "layers=4,group=2,dim=128,tokens=2048,units=61,mean=2";
    assert_refused(
        &eva(&a),
        2,
        &["--synthetic:", "units=61", "another run"],
        &out,
    );
    // A grid of the same size but other stages.
    let ck2 = dir.path().join("ck2");
    make_checkpoint(dir.path(), &ck2, &["--local-ranks", "2"]);
    let mut a = args(&out, &ck2, &base);
    a.extend_from_slice(&["--local-ranks", "2", "--pp", "2"]);
    assert_refused(
        &eva(&a),
        2,
        &["pipeline stages: 1 in the checkpoint, 2 now"],
        &out,
    );
}

#[test]
fn damaged_checkpoints_are_refused_cleanly() {
    let dir = tempdir();
    let ck = dir.path().join("ck");
    make_checkpoint(dir.path(), &ck, &[]);
    let file = rank_file(&ck, 4, 0);
    let good = std::fs::read(&file).unwrap();
    let out = dir.path().join("out");
    let mut damaged: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("header only", good[..8].to_vec()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("last byte gone", good[..good.len() - 1].to_vec()),
        ("not a checkpoint", b"{\"step\": 4}".repeat(50)),
    ];
    for at in [9, 40, good.len() / 3, good.len() / 2, good.len() - 3] {
        let mut b = good.clone();
        b[at] ^= 0x41;
        damaged.push(("flipped byte", b));
    }
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 16]);
    damaged.push(("trailing bytes", longer));
    for (what, bytes) in damaged {
        std::fs::write(&file, &bytes).unwrap();
        let o = eva(&args(
            &out,
            &ck,
            &["--checkpoint-every", "4", "--max-steps", "5", "--resume"],
        ));
        let err = stderr_of(&o);
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(
            o.status.code() == Some(1) && err.contains("rank-00000.ckpt"),
            "{what}: {err}"
        );
        assert_nothing_written(&out);
    }
    std::fs::write(&file, &good).unwrap();
    run_ok(&args(
        &out,
        &ck,
        &["--checkpoint-every", "4", "--max-steps", "5", "--resume"],
    ));
}

#[test]
fn an_unwritable_checkpoint_directory_fails_before_any_work() {
    let dir = tempdir();
    let out = dir.path().join("out");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    for ck in ["/sys/eva-checkpoints".into(), file.join("ck")] {
        let t = Instant::now();
        // The model does not exist: a run that got past the check would name it instead.
        let o = eva(&[
            "init",
            "--model",
            "/nonexistent-model",
            "--data",
            "/nonexistent.txt",
            "--out",
            out.to_str().unwrap(),
            "--checkpoint",
            ck.to_str().unwrap(),
        ]);
        let err = stderr_of(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("checkpoint directory") && !err.contains("nonexistent"),
            "{err}"
        );
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_nothing_written(&out);
    }
}

#[cfg(feature = "mpi")]
#[test]
fn mpirun_ranks_resume_a_pipeline_checkpoint() {
    let dir = tempdir();
    let (one, out, ck) = (
        dir.path().join("one"),
        dir.path().join("out"),
        dir.path().join("ck"),
    );
    let model = super::distributed::shipped_model();
    let mut a = vec!["init", "-q", "--out", one.to_str().unwrap()];
    a.extend_from_slice(&model);
    run_ok(&a);
    let mpi = |out: &Path, resume: bool| {
        let mut a = vec!["init", "-q", "--pp", "2"];
        a.extend_from_slice(&model);
        a.extend([
            "--out",
            out.to_str().unwrap(),
            "--checkpoint",
            ck.to_str().unwrap(),
        ]);
        a.extend(["--checkpoint-every", "4"]);
        a.extend(resume.then_some("--resume"));
        let o = mpirun(2, &a).output().unwrap();
        assert!(o.status.success(), "{}", stderr_of(&o));
    };
    mpi(&dir.path().join("first"), false);
    mpi(&out, true);
    assert_eq!(report(&out)["resumed_from_step"], 12);
    assert_eq!(adapter_bytes(&one), adapter_bytes(&out));
}

/// SIGTERM to `mpirun` (as Slurm or a user sends it): the launcher forwards it to every rank,
/// which checkpoint the same step and exit; the resumed job writes the one-process adapter.
#[cfg(feature = "mpi")]
#[test]
fn sigterm_to_mpirun_checkpoints_every_rank_and_resumes() {
    let dir = tempdir();
    let (one, out, ck) = (
        dir.path().join("one"),
        dir.path().join("out"),
        dir.path().join("ck"),
    );
    let mut plain = args(&one, &ck, &[]);
    plain.truncate(plain.len() - 2);
    plain[2] = LONG_SPEC;
    run_ok(&plain);
    let mpi = |resume: bool| {
        let mut a = args(&out, &ck, &["--checkpoint-every", "1000"]);
        a[2] = LONG_SPEC;
        a.extend(resume.then_some("--resume"));
        let mut c = mpirun(2, &a);
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        c
    };
    let child = mpi(false).spawn().unwrap();
    wait_for_staging(dir.path());
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success(), "{}", stderr_of(&o));
    assert_nothing_written(&out);
    let steps: Vec<_> = std::fs::read_dir(&ck).unwrap().flatten().collect();
    assert_eq!(steps.len(), 1, "{steps:?}: {}", stderr_of(&o));
    for rank in 0..2 {
        assert!(steps[0]
            .path()
            .join(format!("rank-{rank:05}.ckpt"))
            .is_file());
    }
    let o = mpi(true).output().unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(report(&out)["resumed_from_step"].as_u64().is_some());
    assert_eq!(adapter_bytes(&one), adapter_bytes(&out));
}
