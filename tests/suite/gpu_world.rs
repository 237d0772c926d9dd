//! Whole `eva init --device cuda` runs on the emulated device (feature `cuda-emu`), as a user
//! runs them: NCCL between thread ranks and between `mpirun` processes (with `mpi`) with `--pp 2`
//! against the one-rank adapter, a checkpoint killed and resumed, an NCCL peer that never arrives,
//! the CPU's adapter with each estimator on the shipped tiny Llama and the BERT fixture, and the
//! GPU each rank computes on.
//!
//! Every run gets its own `TMPDIR` (the emulated NCCL's meeting directories live there, and a
//! killed run leaves its directory behind) and `EVA_EMU_DEVICES` GPUs.

use super::common::*;
use super::distributed::{assert_same_adapter, shipped_model};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Runs of the shipped model: rank 3, steps of 16 examples (7 steps of examples/data/sample.txt).
const RUN: [&str; 7] = [
    "--rank",
    "3",
    "--batch-size",
    "16",
    "--device",
    "cuda",
    "--dtype",
];

/// `eva ARGS` on `devices` emulated GPUs, with its own temporary directory under `tmp`.
fn eva_on(devices: usize, tmp: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let scratch = tmp.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut c = Command::new(eva_bin());
    c.args(args)
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("EVA_EMU_DEVICES", devices.to_string())
        .env("TMPDIR", &scratch);
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The arguments of `eva init` of the shipped model in `dtype` into `out`, with `extra` ones.
fn init_args<'a>(out: &'a Path, dtype: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["init", "--out", out.to_str().unwrap()];
    args.extend_from_slice(&shipped_model());
    args.extend_from_slice(&RUN);
    args.push(dtype);
    args.extend_from_slice(extra);
    args
}

/// Asserts that a run whose NCCL peer stalled at `stall` failed within `limit`, naming the
/// collective `op` and `--collective-timeout 2`, and wrote nothing at `out`.
fn assert_collective_timed_out(
    o: &Output,
    took: Duration,
    limit: u64,
    stall: &str,
    op: &str,
    out: &Path,
) {
    let err = stderr(o);
    assert!(!o.status.success(), "{stall}: {err}");
    assert!(
        err.contains(&format!("collective {op}"))
            && err.contains("did not complete within --collective-timeout 2 s"),
        "{stall}: {err}"
    );
    assert!(took < Duration::from_secs(limit), "{stall}: took {took:?}");
    assert!(!out.exists());
}

/// `eva init` of the shipped model in `dtype` into `out`, with `extra` arguments; must succeed.
fn init(devices: usize, out: &Path, dtype: &str, extra: &[&str]) -> Output {
    let args = init_args(out, dtype, extra);
    let o = eva_on(devices, out.parent().unwrap(), &args, &[])
        .output()
        .unwrap();
    assert!(o.status.success(), "eva {args:?}: {}", stderr(&o));
    o
}

/// The one-rank adapter of the shipped model on the emulated device (`--dtype f32`), made once
/// for the tests that compare with it.
fn one_rank() -> &'static Path {
    static ONE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &ONE.get_or_init(|| {
        let tmp = tempdir();
        let out = tmp.path().join("one");
        init(1, &out, "f32", &["-q"]);
        (tmp, out)
    })
    .1
}

/// Asserts that the run's stderr names GPU `r` for each rank `r < n` (thread rank r takes GPU
/// `r mod devices`).
fn assert_ranks_on_distinct_gpus(err: &str, n: usize) {
    for r in 0..n {
        let line = format!("[eva] rank {r}: eva emulated CUDA device {r} (GPU {r},");
        assert!(err.contains(&line), "no {line:?} in:\n{err}");
    }
}

#[test]
fn nccl_pipelines_on_thread_ranks_give_the_one_rank_adapter() {
    let tmp = tempdir();
    for ranks in [2, 4] {
        let out = tmp.path().join(format!("t{ranks}"));
        let n = ranks.to_string();
        let o = init(
            ranks,
            &out,
            "f32",
            &["--comm", "nccl", "--local-ranks", &n, "--pp", "2"],
        );
        assert_ranks_on_distinct_gpus(&stderr(&o), ranks);
        let w = read_adapter(&out);
        assert_eq!(w.report["backend"], "nccl");
        assert_eq!(w.report["world_size"], ranks);
        assert_eq!(w.report["pipeline_stages"], 2);
        assert_same_adapter(one_rank(), &out);
    }
}

#[test]
fn nccl_refuses_two_ranks_on_one_gpu_like_nccl() {
    // Two thread ranks on one emulated GPU: NCCL's "Duplicate GPU detected", on every rank,
    // before any work.
    let tmp = tempdir();
    let out = tmp.path().join("dup");
    let args = init_args(&out, "f32", &["-q", "--comm", "nccl", "--local-ranks", "2"]);
    let o = eva_on(1, tmp.path(), &args, &[]).output().unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("Duplicate GPU detected: rank 0 and rank 1 both on emulated CUDA device 0"),
        "{err}"
    );
    assert!(!out.exists());
}

/// `--comm nccl` with a peer that never arrives (`EVA_EMU_NCCL_STALL`, at its join or at a later
/// call) ends within `--collective-timeout` (2 s here), with the collective named.
#[test]
fn a_missing_nccl_peer_ends_the_job_within_the_timeout() {
    for (stall, op) in [
        ("1@0", "NCCL communicator init"),
        ("1@2", "NCCL all-reduce"),
    ] {
        let tmp = tempdir();
        let out = tmp.path().join("out");
        let extra = [
            "-q",
            "--comm",
            "nccl",
            "--local-ranks",
            "2",
            "--collective-timeout",
            "2",
        ];
        let args = init_args(&out, "f32", &extra);
        let t = Instant::now();
        let o = eva_on(2, tmp.path(), &args, &[("EVA_EMU_NCCL_STALL", stall)])
            .output()
            .unwrap();
        // Two seconds of waiting, the rest is start-up (and the emulator's first launches).
        assert_collective_timed_out(&o, t.elapsed(), 45, stall, op, &out);
    }
}

/// A checkpointed `--comm nccl --pp 2` run on two emulated GPUs, killed after step 3's
/// checkpoint, resumes to the byte-identical adapter of the uninterrupted run (the device
/// statistics leave the GPUs for the checkpoint and come back).
#[test]
fn a_killed_nccl_pipeline_resumes_to_the_same_bytes() {
    let tmp = tempdir();
    let (full, out, ck) = (
        tmp.path().join("full"),
        tmp.path().join("out"),
        tmp.path().join("ck"),
    );
    let grid = ["--comm", "nccl", "--local-ranks", "2", "--pp", "2", "-q"];
    init(2, &full, "f32", &grid);
    let args = |resume: bool| {
        let mut a = init_args(&out, "f32", &grid);
        a.extend([
            "--checkpoint",
            ck.to_str().unwrap(),
            "--checkpoint-every",
            "1",
        ]);
        if resume {
            a.push("--resume");
        }
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let first = args(false);
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let mut child: Child = eva_on(2, tmp.path(), &first, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Both ranks' files of step 3: the checkpoint of step 3 is complete.
    let t = Instant::now();
    let step3 = |r: usize| ck.join(format!("step-{:08}/rank-{r:05}.ckpt", 3));
    while !(step3(0).exists() && step3(1).exists()) {
        assert!(child.try_wait().unwrap().is_none(), "ended before step 3");
        assert!(t.elapsed() < Duration::from_secs(120), "no step 3");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    let _ = child.wait();
    assert!(!out.exists());
    let resume = args(true);
    let resume: Vec<&str> = resume.iter().map(String::as_str).collect();
    let o = eva_on(2, tmp.path(), &resume, &[]).output().unwrap();
    assert!(o.status.success(), "resume: {}", stderr(&o));
    let w = read_adapter(&out);
    let from = w.report["resumed_from_step"].as_u64().expect("resumed");
    assert!((3..7).contains(&from), "{}", w.report);
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert!(
            std::fs::read(full.join(f)).unwrap() == std::fs::read(out.join(f)).unwrap(),
            "{f} differs from the uninterrupted run's"
        );
    }
}

/// Same ranks as the CPU adapter in `cpu`, and each layer's `lora_A` rows span the CPU's
/// subspace to similarity ≥ `min` (the parity bound of docs/numerics.md).
fn assert_cpu_parity(cpu: &Path, gpu: &Path, min: f64, what: &str) {
    let (cpu, gpu) = (read_adapter(cpu), read_adapter(gpu));
    let names: Vec<&String> = cpu
        .tensors
        .keys()
        .filter(|n| n.contains("lora_A"))
        .collect();
    assert!(!names.is_empty(), "{what}");
    for name in names {
        let (a, b) = (&cpu.tensors[name], &gpu.tensors[name]);
        assert_eq!(a.dim(), b.dim(), "{what}: {name}: ranks differ");
        let u = eva::linalg::orthonormalize_householder(a.mapv(f64::from).t());
        let sim = subspace_similarity(b, u.view());
        assert!(
            sim >= min,
            "{what}: {name}: subspace similarity {sim:.6} < {min}"
        );
    }
}

/// `--device cuda --dtype f32` gives the CPU's adapter (same ranks, similarity ≥ 0.9999 per
/// layer) with `--estimator exact`, `sketch` and `auto`, on the tiny Llama (auto: the one-rank
/// run; gpu.rs's whole-adapter test covers it on the long text) and the BERT fixture, whose GPU
/// runs take two thread ranks on two GPUs (the threads backend).
#[test]
fn f32_adapters_match_the_cpu_with_every_estimator() {
    let tmp = tempdir();
    let bert = fixture("bert");
    let text = repo().join("examples/data/sample.txt");
    let bert_source = [
        "--model",
        bert.to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
    ];
    let cases: [(&str, &[&str], &str); 5] = [
        ("llama", &shipped_model(), "exact"),
        ("llama", &shipped_model(), "sketch"),
        ("bert", &bert_source, "exact"),
        ("bert", &bert_source, "sketch"),
        ("bert", &bert_source, "auto"),
    ];
    let cpu_of = |source: &[&str], estimator: &str, name: &str| {
        let out = tmp.path().join(name);
        let mut args = vec!["init", "--out", out.to_str().unwrap(), "-q"];
        args.extend_from_slice(source);
        args.extend([
            "--rank",
            "3",
            "--batch-size",
            "16",
            "--estimator",
            estimator,
        ]);
        let o = eva(&args);
        assert!(o.status.success(), "cpu {name}: {}", stderr(&o));
        out
    };
    for (model, source, estimator) in cases {
        let name = format!("{model}-{estimator}");
        let cpu = cpu_of(source, estimator, &format!("cpu-{name}"));
        let gpu = tmp.path().join(format!("gpu-{name}"));
        let mut args = vec!["init", "--out", gpu.to_str().unwrap()];
        args.extend_from_slice(source);
        args.extend_from_slice(&RUN);
        args.extend(["f32", "--estimator", estimator]);
        let threads = model == "bert";
        if threads {
            args.extend(["--local-ranks", "2"]);
        } else {
            args.push("-q");
        }
        let o = eva_on(2, tmp.path(), &args, &[]).output().unwrap();
        assert!(o.status.success(), "gpu {name}: {}", stderr(&o));
        if threads {
            assert_ranks_on_distinct_gpus(&stderr(&o), 2);
        }
        assert_cpu_parity(&cpu, &gpu, 0.9999, &name);
    }
    let cpu = cpu_of(&shipped_model(), "auto", "cpu-llama-auto");
    assert_cpu_parity(&cpu, one_rank(), 0.9999, "llama-auto");
}

/// `--dtype bf16` (the GPU default) stays within the bound docs/numerics.md states for it: the
/// CPU's ranks and per-layer subspace similarity ≥ 0.999 on the shipped tiny Llama (measured
/// worst: 0.99988).
#[test]
fn bf16_adapter_stays_within_the_documented_bound() {
    let tmp = tempdir();
    let cpu = tmp.path().join("cpu");
    let mut args = vec!["init", "--out", cpu.to_str().unwrap(), "-q"];
    args.extend_from_slice(&shipped_model());
    args.extend(["--rank", "3", "--batch-size", "16"]);
    let o = eva(&args);
    assert!(o.status.success(), "cpu: {}", stderr(&o));
    let gpu = tmp.path().join("gpu-bf16");
    init(1, &gpu, "bf16", &["-q"]);
    assert_cpu_parity(&cpu, &gpu, 0.999, "llama-bf16");
}

/// `mpirun -np 2` and `-np 4` processes, one emulated GPU each (`local_rank`), `--comm nccl
/// --pp 2`: the one-rank adapter; and an NCCL peer that never joins ends the job within the
/// timeout (MPI aborts every process).
#[cfg(feature = "mpi")]
mod mpi {
    use super::*;

    /// [`common::mpirun`](super::super::common::mpirun) on `np` emulated GPUs, with its own
    /// temporary directory under `tmp`.
    fn mpirun(np: usize, tmp: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        let scratch = tmp.join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        let mut m = super::mpirun(np, args);
        m.env("EVA_EMU_DEVICES", np.to_string())
            .env("TMPDIR", &scratch);
        for (k, v) in env {
            m.env(k, v);
        }
        m.output()
            .expect("mpirun is installed (apt-get install openmpi-bin)")
    }

    #[test]
    fn mpirun_nccl_pipelines_give_the_one_rank_adapter() {
        let tmp = tempdir();
        for np in [2, 4] {
            let out = tmp.path().join(format!("np{np}"));
            let args = init_args(&out, "f32", &["-q", "--comm", "nccl", "--pp", "2"]);
            let o = mpirun(np, tmp.path(), &args, &[]);
            assert!(o.status.success(), "np {np}: {}", stderr(&o));
            let w = read_adapter(&out);
            assert_eq!(w.report["backend"], "nccl");
            assert_eq!(w.report["world_size"], np);
            assert_same_adapter(one_rank(), &out);
        }
    }

    #[test]
    fn a_missing_nccl_process_ends_the_mpi_job_within_the_timeout() {
        for (stall, op) in [
            ("1@0", "NCCL communicator init"),
            ("1@2", "NCCL all-reduce"),
        ] {
            let tmp = tempdir();
            let out = tmp.path().join("out");
            let extra = ["-q", "--comm", "nccl", "--collective-timeout", "2"];
            let args = init_args(&out, "f32", &extra);
            let t = Instant::now();
            let o = mpirun(2, tmp.path(), &args, &[("EVA_EMU_NCCL_STALL", stall)]);
            assert_collective_timed_out(&o, t.elapsed(), 60, stall, op, &out);
        }
    }
}
