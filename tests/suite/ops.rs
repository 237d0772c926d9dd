//! Operations: fail fast on an `--out` that cannot be made, negative numbers, non-finite
//! weights; real SIGTERM/SIGINT to the real binary; stale temporary directories; a hostile long
//! line tokenized by prefixes exactly like the whole line; hung ranks under `mpirun`.

use super::common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A synthetic run long enough (tens of seconds) to be interrupted.
const LONG_RUN: &str = "layers=4,dim=256,tokens=4096,units=100000";

fn example_model() -> PathBuf {
    repo().join("examples/tiny-llama")
}

fn example_data() -> PathBuf {
    repo().join("examples/data/train.txt")
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn one_error_line(err: &str) -> &str {
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("eva: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one `eva: error:` line: {err}");
    lines[0]
}

#[test]
fn out_under_sys_fails_before_the_model_is_opened() {
    // /sys refuses new directories even to root; the model and data do not exist either, so a
    // run that got past the --out check would name them instead.
    let o = eva(&[
        "init",
        "--model",
        "/nonexistent-model",
        "--data",
        "/nonexistent.txt",
        "--out",
        "/sys/eva-adapter",
    ]);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let line = one_error_line(&err);
    assert!(
        line.contains("/sys/.eva-adapter.eva-tmp-") && line.contains("--out"),
        "{line}"
    );
    assert!(
        !err.contains("nonexistent"),
        "the source must not be opened first: {err}"
    );
}

#[test]
fn out_whose_parent_is_a_file_fails_at_once() {
    let tmp = tempdir();
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let out = file.join("adapter");
    let t = Instant::now();
    let o = eva(&[
        "init",
        "--synthetic",
        LONG_RUN,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let line = one_error_line(&err);
    assert!(
        line.contains("plain-file is a file, not a directory") && line.contains("--out"),
        "{line}"
    );
    assert!(!err.contains("step "), "no step may run: {err}");
}

#[test]
fn missing_parents_are_created_at_start_and_removed_when_the_run_fails() {
    let tmp = tempdir();
    let out = tmp.path().join("a/b/adapter");
    // A source that fails after the --out check: the parents made for it must go again.
    let o = eva(&[
        "init",
        "--activations",
        tmp.path().join("none").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(
        !tmp.path().join("a").exists(),
        "created parents left behind"
    );
    let o = eva(&[
        "init",
        "--synthetic",
        "layers=2,dim=16,tokens=64,units=4",
        "--out",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(out.join("adapter_model.safetensors").is_file());
    assert_nothing_written(&tmp.path().join("a/b/other"));
}

#[test]
fn negative_numbers_reach_evas_range_checks() {
    let tmp = tempdir();
    let out = tmp.path().join("adapter");
    let cases: &[(&str, &str, &str)] = &[
        ("--tau", "-1", "--tau must be in [0, 1], found -1"),
        ("--rho", "-2", "--rho must be >= 1, found -2"),
        (
            "--alpha",
            "-8",
            "--alpha must be a positive number, found -8",
        ),
        (
            "--lora-dropout",
            "-0.1",
            "--lora-dropout must be in [0, 1), found -0.1",
        ),
        (
            "--stats-memory",
            "-1",
            "--stats-memory must be a non-negative number of GiB, found -1",
        ),
        (
            "--collective-timeout",
            "-5",
            "--collective-timeout must be a non-negative number of seconds",
        ),
        ("--rank", "-1", "expected a whole number >= 0, found -1"),
        (
            "--batch-size",
            "-3",
            "expected a whole number >= 0, found -3",
        ),
        (
            "--max-steps",
            "-1",
            "expected a whole number >= 0, found -1",
        ),
    ];
    for (flag, value, want) in cases {
        let o = eva(&[
            "init",
            "--synthetic",
            "layers=1,dim=8,tokens=16,units=2",
            "--out",
            out.to_str().unwrap(),
            flag,
            value,
        ]);
        let err = stderr_of(&o);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {err}");
        let line = one_error_line(&err);
        assert!(
            line.contains(want) && line.contains(flag),
            "{flag} {value}: {line}"
        );
        assert_nothing_written(&out);
    }
}

/// Copies `src` (a model directory) to `dst`, replacing element `at` of tensor `name` with NaN.
fn poison(src: &Path, dst: &Path, file: &str, name: &str, at: usize) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let bytes = std::fs::read(src.join(file)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(name).unwrap();
    let width = view.dtype().bitsize() / 8;
    let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize + at * width;
    let nan: Vec<u8> = match view.dtype() {
        safetensors::Dtype::F32 => f32::NAN.to_le_bytes().to_vec(),
        safetensors::Dtype::BF16 => half::bf16::NAN.to_bits().to_le_bytes().to_vec(),
        safetensors::Dtype::F16 => half::f16::INFINITY.to_bits().to_le_bytes().to_vec(),
        other => panic!("unexpected dtype {other:?}"),
    };
    let mut out = bytes.clone();
    out[start..start + width].copy_from_slice(&nan);
    std::fs::write(dst.join(file), out).unwrap();
}

#[test]
fn a_non_finite_weight_is_refused_naming_the_tensor() {
    let tmp = tempdir();
    let reference = reference_dir();
    // BF16 (decoded) and F32 (memory-mapped, never decoded) checkpoints.
    let cases = [
        (
            example_model(),
            "model.safetensors",
            "model.layers.2.mlp.up_proj.weight",
            77,
        ),
        (
            reference.join("bert"),
            "model.safetensors",
            "bert.encoder.layer.1.attention.self.key.weight",
            5,
        ),
    ];
    for (i, (src, file, name, at)) in cases.iter().enumerate() {
        let bytes = std::fs::read(src.join(file)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let Ok(view) = st.tensor(name) else {
            let names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
            panic!("{name} not in {}: {names:?}", src.display());
        };
        let cols = *view.shape().last().unwrap();
        let dir = tmp.path().join(format!("model{i}"));
        poison(src, &dir, file, name, *at);
        let out = tmp.path().join(format!("adapter{i}"));
        let o = eva(&[
            "init",
            "--model",
            dir.to_str().unwrap(),
            "--data",
            example_data().to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let err = stderr_of(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        let line = one_error_line(&err);
        let want = format!("row {}, column {}", at / cols, at % cols);
        assert!(
            line.contains(name) && line.contains("non-finite weight") && line.contains(&want),
            "{line}"
        );
        assert!(
            !err.contains("activation"),
            "reported as the weight, not a later activation: {err}"
        );
        assert_nothing_written(&out);
    }
}

/// Starts `eva init` on a long synthetic run and waits until its temporary directory exists.
fn start_long_run(out: &Path) -> (Child, PathBuf) {
    let child = Command::new(eva_bin())
        .args([
            "init",
            "--synthetic",
            LONG_RUN,
            "--no-early-stop",
            "--threads",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
        .env("OPENBLAS_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tmp = out.parent().unwrap().join(format!(
        ".{}.eva-tmp-{}",
        out.file_name().unwrap().to_string_lossy(),
        child.id()
    ));
    let t = Instant::now();
    while !tmp.join(".eva-owner").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            tmp.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let it get into its steps.
    std::thread::sleep(Duration::from_millis(700));
    (child, tmp)
}

#[test]
fn sigterm_and_sigint_stop_promptly_and_leave_nothing() {
    for (sig, code, name) in [
        (libc::SIGTERM, 143, "SIGTERM"),
        (libc::SIGINT, 130, "SIGINT"),
    ] {
        let dir = tempdir();
        let out = dir.path().join("adapter");
        let (child, tmp) = start_long_run(&out);
        let t = Instant::now();
        // SAFETY: sending a signal to our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let o = child.wait_with_output().unwrap();
        let err = stderr_of(&o);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{name} took {:?}",
            t.elapsed()
        );
        assert_eq!(o.status.code(), Some(code), "{name}: {err}");
        let line = one_error_line(&err);
        assert!(line.contains(name) && line.contains("eva-tmp"), "{line}");
        assert!(!tmp.exists(), "{} left behind", tmp.display());
        assert_nothing_written(&out);
    }
}

fn marker(pid: u32, start: u64) -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap().trim().to_string();
    format!(
        "eva temporary output\npid {pid}\nhost {}\nboot {}\nstart {start}\n",
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/random/boot_id")
    )
}

fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn stale_temporary_directories_of_dead_eva_processes_are_removed_and_only_those() {
    let dir = tempdir();
    let out = dir.path().join("adapter");
    let tmp_of = |pid: u32| dir.path().join(format!(".adapter.eva-tmp-{pid}"));
    // A process that has exited: its pid is free.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let me = std::process::id();
    let dead_dir = tmp_of(dead);
    let live_dir = tmp_of(me);
    let reused_dir = tmp_of(1);
    // Far from the pids in use (eva's own tmp directory would be removed whatever it holds).
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let unmarked_dir = tmp_of(pid_max - 7);
    for (d, m) in [
        (&dead_dir, Some(marker(dead, 12345))),
        (&live_dir, Some(marker(me, start_time(me)))),
        // pid 1 runs, but not since the start time in this marker: its eva is gone.
        (&reused_dir, Some(marker(1, start_time(1) + 1))),
        (&unmarked_dir, None),
    ] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("adapter_model.safetensors"), b"partial").unwrap();
        if let Some(m) = m {
            std::fs::write(d.join(".eva-owner"), m).unwrap();
        }
    }
    let o = eva(&[
        "init",
        "--synthetic",
        "layers=2,dim=16,tokens=64,units=4",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = stderr_of(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        !dead_dir.exists() && !reused_dir.exists(),
        "stale directories kept: {err}"
    );
    assert!(
        err.contains(&format!(".adapter.eva-tmp-{dead}")),
        "the removal is reported: {err}"
    );
    assert!(live_dir.exists(), "a live process's directory was removed");
    assert!(
        unmarked_dir.exists(),
        "a directory without eva's marker was removed"
    );
    assert!(out.join("adapter_model.safetensors").is_file() && !out.join(".eva-owner").exists());
}

/// The texts a hostile data file can hold, built from the shipped training text.
fn long_texts() -> Vec<(String, String)> {
    let base = std::fs::read_to_string(example_data())
        .unwrap()
        .replace('\n', " ");
    let mut prose = String::new();
    while prose.len() < 300_000 {
        prose.push_str(&base);
    }
    let word: String = "antidisestablishment".repeat(20_000);
    let spaces = format!("{} tail", " \t ".repeat(50_000));
    let unicode = "Größe naïve café — 東京 タワー 🚀 ".repeat(8_000);
    let newline_free_digits: String = (0..60_000).map(|i| i.to_string()).collect();
    vec![
        ("prose".into(), prose),
        ("one long word".into(), word),
        ("whitespace runs".into(), spaces),
        ("unicode".into(), unicode),
        ("digits".into(), newline_free_digits),
    ]
}

#[test]
fn long_lines_tokenize_by_prefixes_exactly_like_the_whole_line() {
    let root = repo();
    let mut dirs = vec![root.join("examples/tiny-llama")];
    for e in std::fs::read_dir(root.join("tests/reference"))
        .unwrap()
        .flatten()
    {
        if e.path().join("tokenizer.json").is_file() {
            dirs.push(e.path());
        }
    }
    assert!(dirs.len() >= 4, "{dirs:?}");
    let texts = long_texts();
    for dir in &dirs {
        for max_len in [7, 512] {
            let enc = eva::model::text::TextEncoder::open(dir, max_len).unwrap();
            let mut whole = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
            whole
                .with_truncation(Some(tokenizers::TruncationParams {
                    max_length: max_len,
                    ..Default::default()
                }))
                .unwrap();
            whole.with_padding(None);
            for (what, text) in &texts {
                assert!(text.len() > enc.whole_text_bytes());
                let want = whole.encode(text.as_str(), true).unwrap();
                let got = enc.encode_text(&[text]).unwrap();
                assert_eq!(
                    got.get_ids(),
                    want.get_ids(),
                    "{}: {what}, max_len {max_len}",
                    dir.display()
                );
                assert_eq!(
                    got.get_offsets(),
                    want.get_offsets(),
                    "{}: {what}",
                    dir.display()
                );
                // Prompt + completion split in the middle of the text.
                let mid = (text.len() / 3..)
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap();
                let pair = enc.encode_text(&[&text[..mid], &text[mid..]]).unwrap();
                assert_eq!(
                    pair.get_ids(),
                    want.get_ids(),
                    "{}: {what} as a pair",
                    dir.display()
                );
            }
        }
    }
}

/// Pids of the eva ranks `mpirun` (pid `launcher`) started, by rank.
#[cfg(feature = "mpi")]
fn ranks_of(launcher: u32, np: usize) -> Vec<u32> {
    let t = Instant::now();
    loop {
        let mut found = vec![0u32; np];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid: u32 = stat[stat.rfind(')').unwrap() + 1..]
                .split_whitespace()
                .nth(1)
                .unwrap()
                .parse()
                .unwrap();
            if ppid != launcher {
                continue;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            for var in env.split(|&b| b == 0) {
                if let Some(r) = var.strip_prefix(b"OMPI_COMM_WORLD_RANK=") {
                    let r: usize = String::from_utf8_lossy(r).parse().unwrap();
                    if r < np {
                        found[r] = pid;
                    }
                }
            }
        }
        if found.iter().all(|&p| p != 0) {
            return found;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "ranks of mpirun {launcher} not found: {found:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CPU seconds (user + system) a process has used.
#[cfg(feature = "mpi")]
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[cfg(feature = "mpi")]
#[test]
fn a_stopped_rank_ends_the_job_within_the_timeout_and_the_waiting_rank_does_not_spin() {
    let dir = tempdir();
    let out = dir.path().join("adapter");
    let timeout = 6.0;
    let child = mpirun(
        2,
        &[
            "init",
            "--synthetic",
            "layers=2,dim=128,tokens=512,units=1000000",
            "--no-early-stop",
            "--threads",
            "1",
            "--collective-timeout",
            &timeout.to_string(),
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let ranks = ranks_of(child.id(), 2);
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: stopping a process this test started.
    assert_eq!(unsafe { libc::kill(ranks[1] as i32, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    // Rank 0 now waits in a collective (its steps are short): it must sleep, not spin.
    std::thread::sleep(Duration::from_millis(2000));
    let before = cpu_seconds(ranks[0]);
    std::thread::sleep(Duration::from_millis(3000));
    let busy = (cpu_seconds(ranks[0]) - before) / 3.0;
    let o = child.wait_with_output().unwrap();
    let ended = stopped.elapsed();
    // SAFETY: as above; the stopped rank may already be gone.
    unsafe { libc::kill(ranks[1] as i32, libc::SIGKILL) };
    let err = stderr_of(&o);
    assert!(
        busy < 0.05,
        "the waiting rank used {:.0} % of a core",
        busy * 100.0
    );
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("did not complete within --collective-timeout 6 s")
            && err.contains("rank 0 of 2"),
        "{err}"
    );
    assert!(err.contains("ranks that did not arrive: 1"), "{err}");
    assert!(
        ended < Duration::from_secs_f64(timeout + 8.0),
        "the job took {ended:?} to end after the stop"
    );
    assert_nothing_written(&out);
}

/// Runs `eva init ARGS --out OUT` (progress on) and returns its output.
fn init_at(out: &Path, args: &[&str]) -> std::process::Output {
    let mut a = vec!["init", "--out", out.to_str().unwrap()];
    a.extend_from_slice(args);
    eva(&a)
}

#[test]
fn token_counts_that_cannot_reach_the_candidate_components_fail_before_any_step() {
    let tmp = tempdir();
    let out = tmp.path().join("adapter");
    // 3 units of 4 tokens against round(16 × 2) = 32 components.
    let o = init_at(
        &out,
        &[
            "--synthetic",
            "layers=2,dim=64,tokens=4,units=3",
            "--rank",
            "16",
        ],
    );
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let line = one_error_line(&err);
    for needle in [
        "layer model.layers.0.proj0",
        "at most 12 tokens",
        "3 units × at most 4 tokens each",
        "32 candidate components (round(--rank 16 × --rho 2))",
    ] {
        assert!(line.contains(needle), "`{needle}` missing: {line}");
    }
    assert!(!err.contains("[eva] step"), "no step may run first: {err}");
    assert_nothing_written(&out);

    // Text: --max-steps × --batch-size examples of at most --max-seq-len tokens.
    let (model, data) = (example_model(), example_data());
    let o = init_at(
        &out,
        &[
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--max-seq-len",
            "8",
            "--rank",
            "8",
        ],
    );
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let line = one_error_line(&err);
    assert!(
        line.contains("at most 16 tokens")
            && line.contains("2 units (--max-steps 1 × --batch-size 2) × at most 8 tokens each")
            && line.contains("16 candidate components"),
        "{line}"
    );
    assert!(!err.contains("[eva] step"), "no step may run first: {err}");
    assert_nothing_written(&out);

    // One token more than the components is enough to run.
    let o = init_at(
        &out,
        &[
            "--synthetic",
            "layers=2,dim=64,tokens=11,units=3",
            "--rank",
            "16",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
}
