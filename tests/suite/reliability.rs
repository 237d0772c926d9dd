//! Hostile inputs and faults (issue 24): inputs without variance, a checkpoint write that fails
//! half-way, two runs given one checkpoint directory, and ranks started with different command
//! lines. Each ends with one clear error or a correct adapter, and nothing half-written.

use super::common::*;
use ndarray::Array2;
use std::path::Path;
use std::process::Output;

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

// ---------------------------------------------------------------------------------------------
// Inputs without variance

/// Six units: q/k/v of block 0 read one input whose rows are one vector, perturbed by at most
/// one f32 ulp per entry in later units (rounding, not variance); up_proj and down_proj read
/// varied rows.
fn degenerate_dataset(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let d = 32;
    let row: Vec<f32> = (0..d).map(|j| 1.0 + 0.37 * j as f32).collect();
    for u in 0..6u64 {
        let constant = Array2::from_shape_fn((100, d), |(i, j)| {
            let ulps = ((i as u64 + u) % 3) as i32 - 1;
            let v = row[j];
            if u == 0 {
                v
            } else {
                f32::from_bits((v.to_bits() as i32 + ulps) as u32)
            }
        });
        let layers = vec![
            (
                "model.layers.0.mlp.down_proj".to_string(),
                gen_rows(7, u, 100, &power_law(48, 1.0), 1.0),
                d,
            ),
            (
                "model.layers.0.mlp.up_proj".to_string(),
                gen_rows(8, u, 100, &power_law(d, 0.5), 2.0),
                48,
            ),
            (
                "model.layers.0.self_attn.k_proj".into(),
                constant.clone(),
                8,
            ),
            (
                "model.layers.0.self_attn.q_proj".into(),
                constant.clone(),
                d,
            ),
            ("model.layers.0.self_attn.v_proj".into(), constant, 8),
        ];
        write_shard(&shard(dir, u as usize), &layers, Fmt::F32);
    }
}

#[test]
fn an_input_without_variance_gets_rank_zero_for_its_whole_group() {
    let tmp = tempdir();
    let data = tmp.path().join("acts");
    degenerate_dataset(&data);
    let out = tmp.path().join("adapter");
    let o = eva(&[
        "init",
        "--activations",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--rank",
        "4",
        "--batch-size",
        "2",
        "--no-early-stop",
    ]);
    let err = stderr_of(&o);
    assert!(o.status.success(), "{err}");
    let w = read_adapter(&out);
    let qkv = ["k_proj", "q_proj", "v_proj"].map(|m| format!("model.layers.0.self_attn.{m}"));
    for l in w.report["layers"].as_array().unwrap() {
        let name = l["name"].as_str().unwrap();
        let flat = qkv.iter().any(|n| n == name);
        assert_eq!(l["degenerate"], flat, "{name}");
        let rv = l["relative_variance"].as_f64().unwrap();
        if flat {
            assert_eq!(l["rank"], 0, "{name}");
            assert!(rv <= 1e-10, "{name}: {rv}");
            let ratios = l["explained_variance_ratio"].as_array().unwrap();
            assert!(ratios.iter().all(|r| r == 0.0), "{name}: {ratios:?}");
            assert!(!w.tensors.keys().any(|k| k.contains(name)), "{name}");
        } else {
            // The budget (4 × 5 layers) goes to the layers that vary, up to their caps (8).
            assert_eq!(l["rank"], 8, "{name}");
            assert!(rv > 0.01, "{name}: {rv}");
        }
    }
    assert_eq!(w.report["degenerate_layers"], serde_json::json!(qkv));
    // Nothing to converge: not listed as unconverged.
    let unconverged = w.report["unconverged_layers"].as_array().unwrap();
    assert!(
        !unconverged.iter().any(|n| qkv.iter().any(|q| q == n)),
        "{unconverged:?}"
    );
    let targets = w.config["target_modules"].as_array().unwrap();
    assert!(!targets
        .iter()
        .any(|t| t.as_str().unwrap().contains("_attn")));
    // The warning names the group and the threshold.
    assert!(
        err.contains("3 of 5 layers read an input that does not vary")
            && err.contains(&qkv.join(", "))
            && err.contains("1e-10"),
        "{err}"
    );
    let o = eva(&["report", out.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(
        text.contains("no variance     3 layer(s)") && text.contains("(rank 0, input "),
        "{text}"
    );
}

/// The probe: with `--max-seq-len 1` every example is the BOS token, so every layer
/// input is one repeated vector. The run fails, saying so, and writes nothing.
#[test]
fn every_input_without_variance_fails_and_writes_nothing() {
    let tmp = tempdir();
    let out = tmp.path().join("adapter");
    let o = eva(&[
        "init",
        "--model",
        repo_str("examples/tiny-llama"),
        "--data",
        repo_str("examples/data/train.txt"),
        "--out",
        out.to_str().unwrap(),
        "--max-seq-len",
        "1",
        "-q",
    ]);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("every target layer's input is degenerate")
            && err.contains("--max-seq-len")
            && err.contains("nothing was written"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_nothing_written(&out);
}

// ---------------------------------------------------------------------------------------------
// A checkpoint write that fails

/// A synthetic run of 30 steps, a few seconds in all, that does not converge early.
const SPEC: &str = "layers=4,group=2,dim=128,tokens=2048,units=60,mean=2";

fn synthetic<'a>(out: &'a Path, ck: Option<&'a Path>, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "init",
        "--synthetic",
        SPEC,
        "--batch-size",
        "2",
        "--no-early-stop",
        "--threads",
        "1",
        "-q",
        "--out",
        out.to_str().unwrap(),
    ];
    if let Some(ck) = ck {
        v.extend(["--checkpoint", ck.to_str().unwrap()]);
    }
    v.extend_from_slice(extra);
    v
}

/// `eva ARGS` whose files may not grow past `limit` bytes (`RLIMIT_FSIZE`, with SIGXFSZ
/// ignored so that a write past it fails with EFBIG instead of killing the process).
fn eva_with_file_limit(args: &[&str], limit: u64) -> Output {
    use std::os::unix::process::CommandExt;
    let mut c = std::process::Command::new(eva_bin());
    c.args(args).env("OPENBLAS_NUM_THREADS", "1");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().unwrap()
}

/// Every entry under `dir`, relative, sorted (hidden files included).
fn tree(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in walk(dir) {
        v.push(e.strip_prefix(dir).unwrap().display().to_string());
    }
    v.sort();
    v
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            v.extend(walk(&p));
        }
        v.push(p);
    }
    v
}

/// A full disk during a checkpoint, made real with a file size limit (EFBIG, "File too large"):
/// the failed write leaves no partial file and no step directory, the last complete checkpoint
/// stays and the error names it, and `--resume` from it gives the uninterrupted adapter.
#[test]
fn a_failed_checkpoint_write_leaves_nothing_and_keeps_the_last_complete_one() {
    let dir = tempdir();
    let (one, out, ck) = (
        dir.path().join("one"),
        dir.path().join("out"),
        dir.path().join("ck"),
    );
    let o = eva(&synthetic(&one, None, &[]));
    assert!(o.status.success(), "{}", stderr_of(&o));
    // 1. The first checkpoint (about 480 KB) does not fit under 64 KiB.
    let every = ["--checkpoint-every", "4"];
    let o = eva_with_file_limit(&synthetic(&out, Some(&ck), &every), 64 << 10);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("File too large")
            && err.contains("writing the checkpoint of step 4 failed")
            && err.contains("no earlier complete checkpoint"),
        "{err}"
    );
    // The run created the checkpoint directory and leaves nothing, not even that.
    assert!(!ck.exists(), "{:?}", tree(&ck));
    assert_nothing_written(&out);
    // 2. A run killed after its checkpoint of step 4 (or 8) ...
    let mut child = std::process::Command::new(eva_bin())
        .args(synthetic(&out, Some(&ck), &every))
        .env("OPENBLAS_NUM_THREADS", "1")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = ck.join("step-00000004/rank-00000.ckpt");
    let t = std::time::Instant::now();
    while !first.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(t.elapsed() < std::time::Duration::from_secs(60));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kept: Vec<String> = tree(&ck)
        .into_iter()
        .filter(|p| p.ends_with("rank-00000.ckpt"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let step: usize = kept[0][5..13].parse().unwrap();
    // ... resumes under the limit: its next checkpoint fails and is removed; the killed run's
    // stays, and the error says so.
    let mut resume = synthetic(&out, Some(&ck), &every);
    resume.push("--resume");
    let o = eva_with_file_limit(&resume, 64 << 10);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let next = step + 4;
    assert!(
        err.contains(&format!("writing the checkpoint of step {next} failed"))
            && err.contains(&format!("the checkpoint of step {step} ("))
            && err.contains("--resume continues from it"),
        "{err}"
    );
    assert_eq!(tree(&ck), vec![format!("step-{step:08}"), kept[0].clone()]);
    assert_nothing_written(&out);
    // 3. Resumed without the limit, the run writes the uninterrupted run's adapter.
    let o = eva(&resume);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&one), bytes(&out));
}

// ---------------------------------------------------------------------------------------------
// Ranks started with different command lines

/// Every rank of a two-rank job says its ranks were not started alike, naming `named` (e.g.
/// "in --pp"); rank 1's line, and only it, also holds `here` (both values) where given. mpirun
/// stops the job as soon as one rank exits non-zero: a rank it terminated before its line was
/// out says "interrupted by SIGTERM" instead (seen under load), so one line may be missing, never
/// both.
#[cfg(feature = "mpi")]
fn assert_every_rank_names(err: &str, named: &str, here: Option<&str>) {
    let mut said = 0;
    for rank in 0..2 {
        let start = format!("eva: error: rank {rank}: the ranks were not started with the same command line and files: rank(s) 1 differ from rank 0 {named}");
        match err.lines().find(|l| l.starts_with(&start)) {
            Some(line) => {
                said += 1;
                if let Some(here) = here {
                    assert_eq!(line.contains(here), rank == 1, "{line}");
                }
            }
            None if err.contains("interrupted by SIGTERM") => {}
            None => panic!("rank {rank}: {err}"),
        }
    }
    assert!(said > 0, "{err}");
}

/// `mpirun -np 1 eva A : -np 1 eva B` (OpenMPI's MPMD form): two ranks, two command lines.
#[cfg(feature = "mpi")]
fn mpirun_two(a: &[&str], b: &[&str]) -> Output {
    let mut c = mpirun(1, a);
    c.arg(":").args(["-np", "1"]).arg(eva_bin()).args(b);
    c.output().unwrap()
}

#[cfg(feature = "mpi")]
#[test]
fn ranks_started_with_different_flags_or_data_stop_before_any_work() {
    let dir = tempdir();
    let out = dir.path().join("out");
    let model = repo_str("examples/tiny-llama");
    let train = repo_str("examples/data/train.txt");
    // The shipped data and the same lines in another order: equal length, other content.
    let text = std::fs::read_to_string(train).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.reverse();
    let other = dir.path().join("reversed.txt");
    std::fs::write(&other, lines.join("\n") + "\n").unwrap();
    assert_eq!(
        std::fs::metadata(&other).unwrap().len(),
        std::fs::metadata(train).unwrap().len()
    );
    let (other, out) = (other.to_str().unwrap(), out.to_str().unwrap());
    let run = |data, extra: &[&'static str]| {
        let mut v = vec!["init", "-q", "--model", model, "--data", data, "--out", out];
        v.extend_from_slice(extra);
        v
    };
    let cases = [
        (
            run(train, &["--rank", "8"]),
            run(train, &["--rank", "4"]),
            "in --rank",
            "(rank 1: --rank: 4 here, 8 on rank 0)",
        ),
        (
            run(train, &[]),
            run(other, &[]),
            "in --data",
            "(rank 1: --data: 160498 bytes, hash ",
        ),
    ];
    for (a, b, named, here) in cases {
        let t = std::time::Instant::now();
        let o = mpirun_two(&a, &b);
        let err = stderr_of(&o);
        assert!(!o.status.success(), "{err}");
        assert!(t.elapsed() < std::time::Duration::from_secs(60), "{err}");
        assert_every_rank_names(&err, named, Some(here));
        assert_nothing_written(Path::new(out));
    }
}

// ---------------------------------------------------------------------------------------------
// One run per checkpoint directory

/// A marker as eva writes it (`engine/checkpoint/owner.rs`), for a holder that eva did not
/// start: `host`, this machine's boot id, a pid and start time of no running process.
fn foreign_marker(ck: &Path, host: &str) {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    std::fs::create_dir_all(ck).unwrap();
    std::fs::write(
        ck.join(".eva-owner"),
        format!(
            "eva checkpoint owner\npid 4194000\nhost {host}\nboot {}\nstart 1\nstarted 1700000000\nfingerprint 0123456789abcdef\nslurm none\n",
            boot.trim()
        ),
    )
    .unwrap();
}

#[test]
fn a_second_run_on_a_busy_checkpoint_directory_is_refused_naming_the_holder() {
    let dir = tempdir();
    // b apart from a, whose temporary output directory is beside it while it runs.
    let (a, b, ck) = (
        dir.path().join("a"),
        dir.path().join("other/b"),
        dir.path().join("ck"),
    );
    // 30 steps (a second or more): the second run starts as soon as the marker is there.
    let args_a = synthetic(&a, Some(&ck), &[]);
    let mut first = std::process::Command::new(eva_bin())
        .args(&args_a)
        .env("OPENBLAS_NUM_THREADS", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let marker = ck.join(".eva-owner");
    let t = std::time::Instant::now();
    while !marker.exists() {
        assert!(first.try_wait().unwrap().is_none(), "the first run ended");
        assert!(t.elapsed() < std::time::Duration::from_secs(60));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let held = std::fs::read_to_string(&marker).unwrap();
    assert!(held.contains(&format!("pid {}\n", first.id())), "{held}");
    // Another seed: another run, which would overwrite and prune the first run's files.
    let o = eva(&synthetic(&b, Some(&ck), &["--seed", "2"]));
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "checkpoint directory {} is in use by another eva run: pid {} on host",
            ck.display(),
            first.id()
        )) && err.contains("another command line or other files")
            && err.contains("which still runs"),
        "{err}"
    );
    assert_nothing_written(&b);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), held);
    let o = first.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(a.join("adapter_model.safetensors").is_file());
    // The first run released the directory: only its checkpoint files are left.
    assert!(!marker.exists());
    for e in std::fs::read_dir(&ck).unwrap().flatten() {
        assert!(
            e.file_name().to_string_lossy().starts_with("step-"),
            "{e:?}"
        );
    }
}

#[test]
fn a_dead_holder_is_taken_over_and_another_hosts_only_with_checkpoint_takeover() {
    let dir = tempdir();
    let (out, ck) = (dir.path().join("out"), dir.path().join("ck"));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    // An eva of this host that no longer runs: taken over, saying so.
    foreign_marker(&ck, host.trim());
    let mut args = synthetic(&out, Some(&ck), &["--max-steps", "2"]);
    args.retain(|a| *a != "-q");
    let o = eva(&args);
    let err = stderr_of(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("[eva] took over checkpoint directory")
            && err.contains("from an eva run that no longer runs (pid 4194000 on host"),
        "{err}"
    );
    assert!(!ck.join(".eva-owner").exists());
    // One of another host: refused, saying how to force it; nothing written.
    foreign_marker(&ck, "node-elsewhere");
    let out2 = dir.path().join("out2");
    let args = synthetic(&out2, Some(&ck), &["--max-steps", "2"]);
    let o = eva(&args);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is held by an eva run on another host: pid 4194000 on host node-elsewhere")
            && err.contains("pass --checkpoint-takeover"),
        "{err}"
    );
    assert_nothing_written(&out2);
    assert!(std::fs::read_to_string(ck.join(".eva-owner"))
        .unwrap()
        .contains("node-elsewhere"));
    let mut forced = args.clone();
    forced.push("--checkpoint-takeover");
    let o = eva(&forced);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(!ck.join(".eva-owner").exists());
}

/// Flags that change which collectives a rank makes (checkpointing, `--pp`) on one rank only:
/// the ranks still reach the agreement (nothing before it depends on them) and each names them
/// ([`assert_every_rank_names`]); the checkpoint directory rank 0 created for its check is
/// removed again.
#[cfg(feature = "mpi")]
#[test]
fn a_flag_that_shapes_the_collectives_on_one_rank_only_is_named_on_both() {
    let dir = tempdir();
    let (out, ck) = (dir.path().join("out"), dir.path().join("ck"));
    let plain = synthetic(&out, None, &[]);
    for (extra, named) in [
        (
            vec!["--checkpoint", ck.to_str().unwrap()],
            "in --checkpoint",
        ),
        (vec!["--pp", "2"], "in --pp"),
    ] {
        let with: Vec<&str> = plain.iter().copied().chain(extra).collect();
        let o = mpirun_two(&with, &plain);
        let err = stderr_of(&o);
        assert!(!o.status.success(), "{err}");
        assert_every_rank_names(&err, named, None);
        assert!(!ck.exists());
        assert_nothing_written(&out);
    }
}
