//! One test per bad input: the exit code (2 usage, 1 data), a one-line message that names what
//! is wrong and where, and nothing written.

use super::common::*;
use ndarray::Array2;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// A small valid dataset: two layers of d = 8, `units` shards.
fn valid(dir: &Path, units: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for u in 0..units {
        let x = gen_rows(1, u as u64, 32, &power_law(8, 1.0), 0.0);
        let y = gen_rows(2, u as u64, 32, &power_law(8, 0.5), 0.0);
        write_shard(
            &shard(dir, u),
            &[("a.fc".into(), x, 4), ("b.fc".into(), y, 4)],
            Fmt::F32,
        );
    }
}

/// Runs `eva init` on `data` and checks the exit code, that stderr is one line containing every
/// `needle`, and that no output appeared.
fn refuse(data: &Path, extra: &[&str], code: i32, needles: &[&str]) {
    let tmp = tempdir();
    let out = tmp.path().join("adapter");
    let mut args = vec![
        "init",
        "--activations",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--no-early-stop",
    ];
    if !extra.contains(&"--rank") {
        args.extend_from_slice(&["--rank", "2"]);
    }
    args.extend_from_slice(extra);
    assert_refused(&eva(&args), code, needles, &out);
}

#[test]
fn missing_directory() {
    let tmp = tempdir();
    refuse(
        &tmp.path().join("nope"),
        &[],
        1,
        &["nope", "cannot read activations directory"],
    );
}

#[test]
fn directory_is_a_file() {
    let tmp = tempdir();
    let f = tmp.path().join("file.safetensors");
    std::fs::write(&f, b"x").unwrap();
    refuse(&f, &[], 1, &["file.safetensors"]);
}

#[test]
fn no_shards() {
    let tmp = tempdir();
    std::fs::write(tmp.path().join("notes.txt"), b"hello").unwrap();
    refuse(tmp.path(), &[], 1, &["no *.safetensors"]);
}

#[test]
fn truncated_shard() {
    let tmp = tempdir();
    valid(tmp.path(), 3);
    let p = shard(tmp.path(), 1);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    refuse(
        tmp.path(),
        &[],
        1,
        &[
            "unit-00001.safetensors",
            "unit 1",
            "not a valid safetensors",
        ],
    );
}

#[test]
fn corrupt_header() {
    let tmp = tempdir();
    valid(tmp.path(), 2);
    let p = shard(tmp.path(), 0);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[10] = b'{';
    bytes[11] = b'}';
    std::fs::write(&p, &bytes).unwrap();
    refuse(
        tmp.path(),
        &[],
        1,
        &["unit-00000.safetensors", "not a valid safetensors"],
    );
    std::fs::write(&p, b"garbage").unwrap();
    refuse(tmp.path(), &[], 1, &["unit-00000.safetensors"]);
}

#[test]
fn tensor_not_2d() {
    let tmp = tempdir();
    let outs = BTreeMap::from([("a.fc".to_string(), 4)]);
    let t = Raw {
        name: "a.fc".into(),
        dtype: Dtype::F32,
        shape: vec![2, 3, 4],
        bytes: vec![0; 96],
    };
    write_raw(&shard(tmp.path(), 0), &[t], Some(&outs));
    refuse(tmp.path(), &[], 1, &["a.fc", "2-D", "[2, 3, 4]"]);
}

#[test]
fn in_features_change_between_units() {
    let tmp = tempdir();
    valid(tmp.path(), 3);
    let x = gen_rows(1, 9, 32, &power_law(9, 1.0), 0.0);
    let y = gen_rows(2, 9, 32, &power_law(8, 0.5), 0.0);
    write_shard(
        &shard(tmp.path(), 2),
        &[("a.fc".into(), x, 4), ("b.fc".into(), y, 4)],
        Fmt::F32,
    );
    refuse(
        tmp.path(),
        &[],
        1,
        &[
            "unit-00002.safetensors",
            "unit 2",
            "a.fc",
            "in_features changed from 8",
            "to 9",
        ],
    );
}

#[test]
fn unsupported_dtype() {
    let tmp = tempdir();
    let outs = BTreeMap::from([("a.fc".to_string(), 4)]);
    let t = Raw {
        name: "a.fc".into(),
        dtype: Dtype::F64,
        shape: vec![4, 2],
        bytes: vec![0; 64],
    };
    write_raw(&shard(tmp.path(), 0), &[t], Some(&outs));
    refuse(tmp.path(), &[], 1, &["a.fc", "F64", "not supported"]);
    let t = Raw {
        name: "a.fc".into(),
        dtype: Dtype::I32,
        shape: vec![4, 2],
        bytes: vec![0; 32],
    };
    write_raw(&shard(tmp.path(), 0), &[t], Some(&outs));
    refuse(tmp.path(), &[], 1, &["I32"]);
}

#[test]
fn missing_out_features_metadata() {
    let tmp = tempdir();
    let x = gen_rows(1, 0, 16, &power_law(8, 1.0), 0.0);
    let t = Raw {
        name: "a.fc".into(),
        dtype: Dtype::F32,
        shape: vec![16, 8],
        bytes: Fmt::F32.encode(&x),
    };
    write_raw(&shard(tmp.path(), 0), &[t], None);
    refuse(tmp.path(), &[], 1, &["out_features", "missing"]);
    // Metadata present but without this layer.
    let outs = BTreeMap::from([("other".to_string(), 4)]);
    let t = Raw {
        name: "a.fc".into(),
        dtype: Dtype::F32,
        shape: vec![16, 8],
        bytes: Fmt::F32.encode(&x),
    };
    write_raw(&shard(tmp.path(), 0), &[t], Some(&outs));
    refuse(tmp.path(), &[], 1, &["out_features", "a.fc"]);
}

/// [`valid`] with 3 units, unit 1's `a.fc` holding `value` at token 5, feature 3.
fn valid_but(dir: &Path, value: f32) {
    valid(dir, 3);
    let mut x: Array2<f32> = gen_rows(1, 1, 32, &power_law(8, 1.0), 0.0);
    x[(5, 3)] = value;
    let y = gen_rows(2, 1, 32, &power_law(8, 0.5), 0.0);
    write_shard(
        &shard(dir, 1),
        &[("a.fc".into(), x, 4), ("b.fc".into(), y, 4)],
        Fmt::F32,
    );
}

#[test]
fn nan_and_inf_activations() {
    for bad in [f32::NAN, f32::INFINITY] {
        let tmp = tempdir();
        valid_but(tmp.path(), bad);
        refuse(
            tmp.path(),
            &[],
            1,
            &[
                "unit-00001.safetensors",
                "unit 1",
                "a.fc",
                "non-finite",
                "token 5, feature 3",
            ],
        );
    }
}

/// Finite activations whose squares overflow f32 (|x| > ~1.8e19) cannot be accumulated: the run
/// ends with a data error naming the layer, after the step's reduce (every rank holds the same
/// sums), never with a panic in the eigen-solve.
#[test]
fn activations_whose_squares_overflow_f32() {
    let tmp = tempdir();
    valid_but(tmp.path(), 3e19);
    refuse(
        tmp.path(),
        &[],
        1,
        &["input of a.fc", "overflow f32", "feature 3"],
    );
}

#[test]
fn rank_larger_than_in_features() {
    let tmp = tempdir();
    valid(tmp.path(), 2);
    refuse(
        tmp.path(),
        &["--rank", "9"],
        2,
        &["--rank 9", "in_features = 8"],
    );
}

#[test]
fn rank_pattern_entries_are_checked() {
    let tmp = tempdir();
    valid(tmp.path(), 2);
    for bad in ["a.fc", "a.fc=0", "=2", "a.fc=two"] {
        refuse(
            tmp.path(),
            &["--rank-pattern", bad],
            2,
            &["--rank-pattern entries must be NAME=R", bad],
        );
    }
    refuse(
        tmp.path(),
        &["--rank-pattern", "b.fc=9"],
        2,
        &["rank_pattern's rank 9", "in_features = 8", "layer b.fc"],
    );
}

#[test]
fn rho_below_one() {
    let tmp = tempdir();
    valid(tmp.path(), 2);
    refuse(tmp.path(), &["--rho", "0.5"], 2, &["--rho", "0.5"]);
}

#[test]
fn tau_outside_unit_interval() {
    let tmp = tempdir();
    valid(tmp.path(), 2);
    refuse(tmp.path(), &["--tau", "1.5"], 2, &["--tau", "1.5"]);
    refuse(tmp.path(), &["--tau=-0.1"], 2, &["--tau"]);
}

#[test]
fn unknown_target() {
    let tmp = tempdir();
    valid(tmp.path(), 2);
    refuse(
        tmp.path(),
        &["--targets", "q_proj"],
        2,
        &["q_proj", "a.fc, b.fc"],
    );
}

#[test]
fn bad_flag_values_are_usage_errors() {
    let tmp = tempdir();
    valid(tmp.path(), 2);
    refuse(
        tmp.path(),
        &["--rank", "0"],
        2,
        &["--rank must be at least 1"],
    );
    refuse(
        tmp.path(),
        &["--batch-size", "0"],
        2,
        &["--batch-size must be at least 1"],
    );
    refuse(tmp.path(), &["--estimator", "magic"], 2, &["magic"]);
    refuse(
        tmp.path(),
        &["--estimator", "sketch", "--sketch-size", "2"],
        2,
        &["--sketch-size 2"],
    );
}

/// Out-of-range values of the knobs the command line shares with the Python package, and the
/// whole message each gets: the library's one validation (`eva::config::validate`) words it
/// for both, so `python/tests/test_eva_lora.py::test_out_of_range_values_get_the_clis_messages`
/// finds the same line after `eva: error: ` for the same values.
pub const SHARED_RANGE_ERRORS: &[(&str, &str, &str)] = &[
    ("--rank", "0", "--rank must be at least 1, found 0 (Python: LoraConfig.r)"),
    ("--rho", "0.5", "--rho must be >= 1, found 0.5 (Python: EvaConfig.rho)"),
    ("--rho", "inf", "--rho must be >= 1, found inf (Python: EvaConfig.rho)"),
    ("--tau", "1.5", "--tau must be in [0, 1], found 1.5 (Python: EvaConfig.tau)"),
    ("--tau", "-0.1", "--tau must be in [0, 1], found -0.1 (Python: EvaConfig.tau)"),
    ("--alpha", "0", "--alpha must be a positive number, found 0 (Python: LoraConfig.lora_alpha)"),
    ("--lora-dropout", "1", "--lora-dropout must be in [0, 1), found 1 (Python: LoraConfig.lora_dropout)"),
    ("--batch-size", "0", "--batch-size must be at least 1, found 0 (Python: the data loader's batch size, summed over the ranks)"),
    ("--max-steps", "0", "--max-steps must be at least 1, found 0 (Python: max_steps)"),
    ("--sketch-size", "0", "--sketch-size must be at least 1, found 0 (Python: sketch_size)"),
    ("--rank-pattern", "a.fc=0", "--rank-pattern entries must be NAME=R with a module name and a rank of at least 1, found `a.fc=0` (Python: LoraConfig.rank_pattern)"),
];

#[test]
fn out_of_range_values_get_the_message_the_python_package_gives() {
    let tmp = tempdir();
    valid(tmp.path(), 2);
    for (flag, value, want) in SHARED_RANGE_ERRORS {
        let out = tmp.path().join("adapter");
        let flag_value = format!("{flag}={value}");
        let o = eva(&[
            "init",
            "--activations",
            tmp.path().to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            &flag_value,
        ]);
        assert_refused(&o, 2, &[want], &out);
        assert_eq!(
            String::from_utf8_lossy(&o.stderr).trim_end(),
            format!("eva: error: {want}"),
            "{flag_value}"
        );
    }
}

#[test]
fn existing_output_is_kept_without_force() {
    let tmp = tempdir();
    let data = tmp.path().join("acts");
    valid(&data, 2);
    let out = tmp.path().join("adapter");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let o = eva(&[
        "init",
        "--activations",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--rank",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"mine");
    init_ok(&data, &out, &["--rank", "2", "--force"]);
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("adapter_model.safetensors").exists());
}

#[test]
fn synthetic_spec_errors_are_usage_errors() {
    let tmp = tempdir();
    let out = tmp.path().join("adapter");
    let o = eva(&[
        "init",
        "--synthetic",
        "dim=0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("dim"));
    let o = eva(&["init", "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "a source is required");
    assert_nothing_written(&out);
}

/// `--device cuda` on a machine without what it needs: exit code 2 before any work, one
/// sentence naming what is missing and where it was looked for, nothing written. A build without
/// the `cuda` feature says how to rebuild; a `--features cuda` build on a machine without the
/// driver names the driver's file names and `LD_LIBRARY_PATH` (probed before cudarc, which would
/// panic). On a machine with a GPU the probe finds everything and this test has nothing to refuse.
#[test]
fn device_cuda_without_a_gpu_is_a_usage_error_naming_what_is_missing() {
    if eva::device::cuda::available().is_ok() {
        eprintln!("a usable GPU is present: this test is about machines without one");
        return;
    }
    let tmp = tempdir();
    let out = tmp.path().join("adapter");
    let (model, data) = (
        repo_str("examples/tiny-llama"),
        repo_str("examples/data/train.txt"),
    );
    let o = Command::new(eva_bin())
        .args(["init", "--model", model, "--data", data, "--device", "cuda"])
        .args(["--out", out.to_str().unwrap()])
        .env("LD_LIBRARY_PATH", "/nonexistent-eva-test")
        .output()
        .unwrap();
    let needles: &[&str] = if cfg!(feature = "cuda") {
        &["--device cuda:"]
    } else {
        &["--device cuda", "--features cuda"]
    };
    assert_refused(&o, 2, needles, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    if cfg!(feature = "cuda") {
        // No driver: its file names and the library path; a driver without a GPU: that.
        assert!(
            (err.contains("libcuda.so.1")
                && err.contains("LD_LIBRARY_PATH (/nonexistent-eva-test)"))
                || err.contains("found no GPU"),
            "{err}"
        );
    }
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("eva: error:"), "{err}");
}
