//! Distributed runs give the adapter of a single process: in-process thread worlds
//! (`--local-ranks`) always, and `mpirun -np 1|2|4` with the `mpi` feature. A rank that meets bad
//! data ends the whole job quickly, naming the rank and the cause, with no output.
//!
//! Ranks get different thread counts here (a world of one uses both cores, two ranks one each):
//! the f32 kernels cut their work into tiles of fixed shapes (`linalg`), so only the order of
//! float64 sums depends on the world size.

use super::common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Asserts that two adapter directories hold the same ranks, steps and A matrices.
pub fn assert_same_adapter(a: &Path, b: &Path) {
    assert_same_written(&read_adapter(a), &read_adapter(b));
}

/// Shards for 3 inputs (d = 24, 40 and 600: dense, dense, iterative) and 12 units.
pub fn shards(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for u in 0..12u64 {
        let layers = vec![
            (
                "blk.0.attn.k".to_string(),
                gen_rows(1, u, 96, &power_law(24, 1.0), 2.0),
                24,
            ),
            (
                "blk.0.attn.q".to_string(),
                gen_rows(1, u, 96, &power_law(24, 1.0), 2.0),
                24,
            ),
            (
                "blk.0.mlp.up".to_string(),
                gen_rows(2, u, 96, &power_law(40, 0.7), 0.0),
                80,
            ),
            (
                "blk.1.mlp.up".to_string(),
                gen_rows(3, u, 96, &power_law(600, 1.3), 5.0),
                64,
            ),
        ];
        write_shard(&shard(dir, u as usize), &layers, Fmt::F32);
    }
}

fn init(out: &Path, source: &[&str], extra: &[&str]) {
    let mut args = vec![
        "init",
        "--out",
        out.to_str().unwrap(),
        "-q",
        "--rank",
        "3",
        "--batch-size",
        "3",
    ];
    args.extend_from_slice(source);
    args.extend_from_slice(extra);
    let o = eva(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn thread_worlds_match_a_single_process_on_shards() {
    let tmp = tempdir();
    let data = tmp.path().join("acts");
    shards(&data);
    let src = ["--activations", data.to_str().unwrap()];
    let single = tmp.path().join("p1");
    init(&single, &src, &[]);
    for p in ["2", "3", "4"] {
        let out = tmp.path().join(format!("t{p}"));
        init(&out, &src, &["--local-ranks", p]);
        assert_same_adapter(&single, &out);
        let w = read_adapter(&out);
        assert_eq!(w.report["world_size"].as_u64().unwrap().to_string(), p);
        assert_eq!(w.report["backend"], "threads");
    }
}

#[test]
fn thread_worlds_match_a_single_process_on_synthetic_data() {
    let tmp = tempdir();
    let spec = "layers=3,group=2,dim=64,tokens=128,units=30,mean=4";
    let single = tmp.path().join("p1");
    init(&single, &["--synthetic", spec], &[]);
    let out = tmp.path().join("t2");
    init(&out, &["--synthetic", spec], &["--local-ranks", "2"]);
    assert_same_adapter(&single, &out);
    let sketch1 = tmp.path().join("s1");
    init(&sketch1, &["--synthetic", spec], &["--estimator", "sketch"]);
    let sketch3 = tmp.path().join("s3");
    init(
        &sketch3,
        &["--synthetic", spec],
        &["--estimator", "sketch", "--local-ranks", "3"],
    );
    assert_same_adapter(&sketch1, &sketch3);
}

/// The tiny Llama checkpoint and text that ship with the repository.
pub fn shipped_model() -> [&'static str; 4] {
    [
        "--model",
        repo_str("examples/tiny-llama"),
        "--data",
        repo_str("examples/data/sample.txt"),
    ]
}

#[test]
fn thread_worlds_match_a_single_process_on_the_shipped_model() {
    let tmp = tempdir();
    let single = tmp.path().join("p1");
    init(&single, &shipped_model(), &[]);
    for p in ["2", "4"] {
        let out = tmp.path().join(format!("t{p}"));
        init(&out, &shipped_model(), &["--local-ranks", p]);
        assert_same_adapter(&single, &out);
    }
}

#[test]
fn bytes_per_step_do_not_grow_with_tokens() {
    let tmp = tempdir();
    let per_step = |tokens: usize| {
        let out = tmp.path().join(format!("b{tokens}"));
        let spec = format!("layers=2,dim=32,tokens={tokens},units=9");
        init(
            &out,
            &["--synthetic", &spec],
            &["--local-ranks", "2", "--no-early-stop"],
        );
        // The last step also carries the final solve and the outcome.
        read_adapter(&out).report["bytes"]["per_step"]
            .as_array()
            .unwrap()[..2]
            .to_vec()
    };
    let small = per_step(64);
    assert!(small[0].as_u64().unwrap() > 0);
    assert_eq!(small, per_step(512));
}

#[test]
fn a_failing_rank_ends_every_rank_with_its_cause() {
    let tmp = tempdir();
    let data = tmp.path().join("acts");
    shards(&data);
    // Unit 4 belongs to rank 1 of 3 (4 mod 3 = 1).
    let mut x = gen_rows(2, 4, 96, &power_law(40, 0.7), 0.0);
    x[(3, 7)] = f32::NAN;
    let layers = vec![
        (
            "blk.0.attn.k".to_string(),
            gen_rows(1, 4, 96, &power_law(24, 1.0), 2.0),
            24,
        ),
        (
            "blk.0.attn.q".to_string(),
            gen_rows(1, 4, 96, &power_law(24, 1.0), 2.0),
            24,
        ),
        ("blk.0.mlp.up".to_string(), x, 80),
        (
            "blk.1.mlp.up".to_string(),
            gen_rows(3, 4, 96, &power_law(600, 1.3), 5.0),
            64,
        ),
    ];
    write_shard(&shard(&data, 4), &layers, Fmt::F32);
    let out = tmp.path().join("adapter");
    let t = Instant::now();
    let o = eva(&[
        "init",
        "--activations",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--rank",
        "3",
        "--batch-size",
        "3",
        "--local-ranks",
        "3",
        "--no-early-stop",
    ]);
    assert!(t.elapsed() < Duration::from_secs(30));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("rank 1") && err.contains("non-finite") && err.contains("unit-00004"),
        "{err}"
    );
    assert_nothing_written(&out);
}

/// `mpirun` runs, with the environment OpenMPI needs as root in a container.
#[cfg(feature = "mpi")]
mod mpi {
    use super::*;

    #[test]
    fn collectives_closed_forms_under_mpirun() {
        let example = std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("examples/collectives");
        for np in [1, 2, 4] {
            let o = mpirun_program(np, &example, &[]).output().unwrap();
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success(),
                "np {np}: {}{}",
                out,
                String::from_utf8_lossy(&o.stderr)
            );
            assert_eq!(
                out.lines()
                    .filter(|l| l.ends_with("mpi collectives ok"))
                    .count(),
                np,
                "{out}"
            );
        }
    }

    fn mpi_init(np: usize, out: &Path, source: &[&str]) {
        let mut args = vec![
            "init",
            "--out",
            out.to_str().unwrap(),
            "-q",
            "--rank",
            "3",
            "--batch-size",
            "3",
        ];
        args.extend_from_slice(source);
        let o = mpirun(np, &args).output().unwrap();
        assert!(
            o.status.success(),
            "np {np}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let w = read_adapter(out);
        assert_eq!(w.report["world_size"], np);
        assert_eq!(w.report["backend"], "mpi");
    }

    #[test]
    fn mpirun_matches_a_single_process_on_shards_and_synthetic_data() {
        let tmp = tempdir();
        let data = tmp.path().join("acts");
        shards(&data);
        let spec = "layers=3,group=2,dim=64,tokens=128,units=30,mean=4";
        for source in [
            vec!["--activations", data.to_str().unwrap()],
            vec!["--synthetic", spec],
            shipped_model().to_vec(),
        ] {
            let single = tmp.path().join("single");
            init(&single, &source, &[]);
            for np in [1, 2, 4] {
                let out = tmp.path().join(format!("np{np}"));
                mpi_init(np, &out, &source);
                assert_same_adapter(&single, &out);
                std::fs::remove_dir_all(&out).unwrap();
            }
            std::fs::remove_dir_all(&single).unwrap();
        }
    }

    #[test]
    fn mpirun_pipeline_grids_match_a_single_process() {
        let tmp = tempdir();
        let data = tmp.path().join("acts");
        shards(&data);
        for (source, batch) in [
            (shipped_model().to_vec(), "16"),
            (vec!["--activations", data.to_str().unwrap()], "3"),
        ] {
            let run = |out: &Path, np: usize, pp: &str| {
                let mut args = vec![
                    "init",
                    "--out",
                    out.to_str().unwrap(),
                    "-q",
                    "--rank",
                    "3",
                    "--batch-size",
                    batch,
                    "--pp",
                    pp,
                ];
                args.extend_from_slice(&source);
                if np == 0 {
                    eva(&args)
                } else {
                    mpirun(np, &args).output().unwrap()
                }
            };
            let single = tmp.path().join("single");
            assert!(run(&single, 0, "1").status.success());
            for (np, pp) in [(2, "2"), (4, "2")] {
                let out = tmp.path().join(format!("np{np}"));
                let o = run(&out, np, pp);
                assert!(
                    o.status.success(),
                    "np {np} --pp {pp}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                assert_same_adapter(&single, &out);
                std::fs::remove_dir_all(&out).unwrap();
            }
            std::fs::remove_dir_all(&single).unwrap();
        }
    }

    #[test]
    fn a_failing_mpi_rank_ends_the_job_with_its_cause() {
        let tmp = tempdir();
        let data = tmp.path().join("acts");
        shards(&data);
        // Unit 5 belongs to rank 1 of 2 (5 mod 2), which alone reads it.
        let mut x = gen_rows(3, 5, 96, &power_law(600, 1.3), 5.0);
        x[(0, 0)] = f32::INFINITY;
        let layers = vec![
            (
                "blk.0.attn.k".to_string(),
                gen_rows(1, 5, 96, &power_law(24, 1.0), 2.0),
                24,
            ),
            (
                "blk.0.attn.q".to_string(),
                gen_rows(1, 5, 96, &power_law(24, 1.0), 2.0),
                24,
            ),
            (
                "blk.0.mlp.up".to_string(),
                gen_rows(2, 5, 96, &power_law(40, 0.7), 0.0),
                80,
            ),
            ("blk.1.mlp.up".to_string(), x, 64),
        ];
        write_shard(&shard(&data, 5), &layers, Fmt::F32);
        let out = tmp.path().join("adapter");
        let t = Instant::now();
        let o = mpirun(
            2,
            &[
                "init",
                "--activations",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--rank",
                "3",
            ],
        )
        .output()
        .unwrap();
        assert!(t.elapsed() < Duration::from_secs(60));
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        // Rank 1 prints its own error and rank 0 one naming rank 1; mpirun may kill rank 1 once
        // rank 0 has exited, so either line alone must name the failing rank and the cause.
        assert!(
            (err.contains("rank 1: activation shard") || err.contains("rank 0: rank 1 failed"))
                && err.contains("unit-00005")
                && err.contains("non-finite"),
            "{err}"
        );
        assert_nothing_written(&out);
    }
}
