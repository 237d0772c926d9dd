//! The exact estimator against a float64 dense PCA computed here: subspace similarity ≥ 0.9999
//! for every layer and ranks equal to PEFT's allocation of the exact ratios.

use super::common::*;
use ndarray::{s, Array2};

/// Subspace similarity every layer must reach (DESIGN.md §4).
const MIN_SIMILARITY: f64 = 0.9999;
/// Explained-variance ratios agree with the f64 reference to this relative error: f32 products
/// over ≤ 4096 rows of mean-shifted data, summed in f64.
const RATIO_RTOL: f64 = 1e-5;

struct Input {
    dim: usize,
    spectrum: Vec<f64>,
    mean: f64,
}

/// Writes `units` shards for `layers` (name, input index, out_features), returning each
/// input's rows as eva reads them (rounded to `fmt`).
fn write_dataset(
    dir: &std::path::Path,
    inputs: &[Input],
    layers: &[(&str, usize, usize)],
    units: usize,
    tokens: usize,
    fmt: Fmt,
) -> Vec<Vec<Array2<f32>>> {
    let mut seen = vec![Vec::new(); inputs.len()];
    for u in 0..units {
        let rows: Vec<Array2<f32>> = inputs
            .iter()
            .enumerate()
            .map(|(g, inp)| {
                fmt.round(&gen_rows(
                    100 + g as u64,
                    u as u64,
                    tokens,
                    &inp.spectrum,
                    inp.mean,
                ))
            })
            .collect();
        let shard_layers: Vec<(String, Array2<f32>, usize)> = layers
            .iter()
            .map(|&(n, g, o)| (n.to_string(), rows[g].clone(), o))
            .collect();
        write_shard(&shard(dir, u), &shard_layers, fmt);
        for (g, r) in rows.into_iter().enumerate() {
            seen[g].push(r);
        }
    }
    for (g, inp) in inputs.iter().enumerate() {
        assert_eq!(seen[g][0].ncols(), inp.dim);
    }
    seen
}

fn check_against_reference(fmt: Fmt) {
    let inputs = vec![
        Input {
            dim: 48,
            spectrum: power_law(48, 1.0),
            mean: 30.0,
        },
        Input {
            dim: 48,
            spectrum: power_law(48, 0.5),
            mean: 0.0,
        },
        Input {
            dim: 600,
            spectrum: power_law(600, 1.5),
            mean: 100.0,
        },
    ];
    // Catalog order is natural name order; k_proj and q_proj share input 0 (k_proj leads).
    let layers = [
        ("model.layers.0.mlp.up_proj", 1, 96),
        ("model.layers.0.self_attn.k_proj", 0, 16),
        ("model.layers.0.self_attn.q_proj", 0, 48),
        ("model.layers.1.mlp.down_proj", 2, 40),
    ];
    let tmp = tempdir();
    let data = tmp.path().join("acts");
    std::fs::create_dir(&data).unwrap();
    let seen = write_dataset(&data, &inputs, &layers, 10, 200, fmt);
    let out = tmp.path().join("adapter");
    init_ok(
        &data,
        &out,
        &[
            "--rank",
            "4",
            "--rho",
            "2",
            "--no-early-stop",
            "--estimator",
            "exact",
            "--batch-size",
            "3",
        ],
    );
    let w = read_adapter(&out);

    let refs: Vec<(Vec<f64>, Array2<f64>)> = seen.iter().map(|units| dense_pca(units)).collect();
    let ratios: Vec<Vec<f64>> = refs
        .iter()
        .map(|(vals, _)| {
            let t: f64 = vals.iter().sum();
            vals.iter().take(8).map(|v| v / t).collect()
        })
        .collect();
    let layer_ratios: Vec<Vec<f64>> = layers.iter().map(|&(_, g, _)| ratios[g].clone()).collect();
    let want = peft_allocation(&layer_ratios, &vec![8; layers.len()], 4 * layers.len());
    assert_eq!(want.iter().sum::<usize>(), 16);

    let report_layers = w.report["layers"].as_array().unwrap();
    for (l, &(name, g, out_features)) in layers.iter().enumerate() {
        let rep = &report_layers[l];
        assert_eq!(rep["name"], name);
        assert_eq!(
            rep["rank"].as_u64().unwrap() as usize,
            want[l],
            "{fmt:?} rank of {name}"
        );
        let got: Vec<f64> = rep["explained_variance_ratio"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (a, b) in got.iter().zip(&ratios[g]) {
            assert!(
                (a - b).abs() <= RATIO_RTOL * b,
                "{fmt:?} {name}: ratio {a} vs reference {b}"
            );
        }
        let a = &w.tensors[&format!("base_model.model.{name}.lora_A.weight")];
        assert_eq!(a.dim(), (want[l], inputs[g].dim));
        let sim = subspace_similarity(a, refs[g].1.slice(s![.., ..want[l]]));
        assert!(
            sim >= MIN_SIMILARITY,
            "{fmt:?} {name}: subspace similarity {sim}"
        );
        let b = &w.tensors[&format!("base_model.model.{name}.lora_B.weight")];
        assert_eq!(b.dim(), (out_features, want[l]));
    }
}

#[test]
fn f32_shards_match_dense_pca() {
    check_against_reference(Fmt::F32);
}

#[test]
fn bf16_shards_match_dense_pca() {
    check_against_reference(Fmt::BF16);
}

#[test]
fn f16_shards_match_dense_pca() {
    check_against_reference(Fmt::F16);
}

#[test]
fn synthetic_source_matches_dense_pca_and_known_spectrum() {
    let spec = "layers=3,dim=40,tokens=400,units=6,mean=10,decay=1.2,seed=5";
    let tmp = tempdir();
    let out = tmp.path().join("adapter");
    let o = eva(&[
        "init",
        "--synthetic",
        spec,
        "--out",
        out.to_str().unwrap(),
        "-q",
        "--no-early-stop",
        "--estimator",
        "exact",
        "--rank",
        "3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = read_adapter(&out);
    let src = eva::source::synthetic::SyntheticSource::new(spec.parse().unwrap()).unwrap();
    for (g, rep) in w.report["layers"].as_array().unwrap().iter().enumerate() {
        let units: Vec<Array2<f32>> = (0..6).map(|u| src.generate(g, u)).collect();
        let (vals, vecs) = dense_pca(&units);
        let rank = rep["rank"].as_u64().unwrap() as usize;
        if rank == 0 {
            continue;
        }
        let name = rep["name"].as_str().unwrap();
        let a = &w.tensors[&format!("base_model.model.{name}.lora_A.weight")];
        assert!(subspace_similarity(a, vecs.slice(s![.., ..rank])) >= MIN_SIMILARITY);
        // The sample spectrum is close to the generating one (2400 tokens).
        let truth = src.eigenvalues(g);
        assert!(
            (vals[0] / truth[0] - 1.0).abs() < 0.15,
            "top eigenvalue {} vs generating {}",
            vals[0],
            truth[0]
        );
    }
}
