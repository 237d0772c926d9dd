//! The output directory PEFT reads: tensor names, shapes, zero B, metadata, every JSON field,
//! rank-0 layers dropped, whitening, alpha adjustment and --targets.

use super::common::*;
use ndarray::{s, Array2};
use serde_json::json;
use std::path::Path;

/// Three layers of d = 32: isotropic (gets rank 0), steep and medium power laws.
fn dataset(dir: &Path) -> Vec<Vec<Array2<f32>>> {
    std::fs::create_dir_all(dir).unwrap();
    let spectra = [vec![1.0; 32], power_law(32, 2.0), power_law(32, 1.0)];
    let names = ["model.a.iso", "model.b.steep", "model.c.mid"];
    let mut seen = vec![Vec::new(); 3];
    for u in 0..8 {
        let layers: Vec<(String, Array2<f32>, usize)> = (0..3)
            .map(|g| {
                let x = gen_rows(40 + g as u64, u, 500, &spectra[g], 1.0);
                seen[g].push(x.clone());
                (names[g].to_string(), x, 20 + g)
            })
            .collect();
        write_shard(&shard(dir, u as usize), &layers, Fmt::F32);
    }
    seen
}

#[test]
fn adapter_files_follow_peft() {
    let tmp = tempdir();
    let data = tmp.path().join("acts");
    dataset(&data);
    let out = tmp.path().join("adapter");
    init_ok(
        &data,
        &out,
        &[
            "--rank",
            "2",
            "--rho",
            "2",
            "--alpha",
            "8",
            "--no-early-stop",
            "--base-model",
            "tiny/base",
            "--task-type",
            "CAUSAL_LM",
            "--lora-dropout",
            "0.05",
        ],
    );
    let w = read_adapter(&out);
    let names: Vec<&String> = w.tensors.keys().collect();
    assert_eq!(
        names,
        [
            "base_model.model.model.b.steep.lora_A.weight",
            "base_model.model.model.b.steep.lora_B.weight",
            "base_model.model.model.c.mid.lora_A.weight",
            "base_model.model.model.c.mid.lora_B.weight",
        ]
    );
    assert_eq!(w.metadata.get("format").map(String::as_str), Some("pt"));
    for (layer, out_features) in [("model.b.steep", 21), ("model.c.mid", 22)] {
        let a = &w.tensors[&format!("base_model.model.{layer}.lora_A.weight")];
        let b = &w.tensors[&format!("base_model.model.{layer}.lora_B.weight")];
        assert_eq!(a.dim(), (3, 32));
        assert_eq!(b.dim(), (out_features, 3));
        assert!(b.iter().all(|&v| v == 0.0), "B must be zero");
        let g = a.dot(&a.t());
        assert!(
            (&g - &Array2::<f32>::eye(3)).iter().all(|v| v.abs() < 1e-5),
            "A rows orthonormal"
        );
    }
    let c = &w.config;
    let want = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny/base",
        "r": 2,
        "lora_alpha": 8,
        "target_modules": ["model.b.steep", "model.c.mid"],
        "rank_pattern": {"model.b.steep": 3, "model.c.mid": 3},
        "alpha_pattern": {"model.b.steep": 12, "model.c.mid": 12},
        "init_lora_weights": "eva",
        "eva_config": {"rho": 2.0, "tau": 0.99, "use_label_mask": true, "label_mask_value": -100, "whiten": false, "adjust_scaling_factors": true},
        "bias": "none",
        "lora_dropout": 0.05,
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": null,
    });
    assert_eq!(c, &want);

    let r = &w.report;
    for key in [
        "eva_version",
        "source",
        "world_size",
        "steps",
        "batch_size",
        "units_seen",
        "units_total",
        "stop_reason",
        "converged",
        "unconverged_layers",
        "rank_budget",
        "r",
        "rho",
        "tau",
        "time_s",
        "bytes",
        "layers",
    ] {
        assert!(r.get(key).is_some(), "report field {key}");
    }
    for key in [
        "forward",
        "statistics",
        "communication",
        "leader",
        "writing",
        "total",
    ] {
        assert!(r["time_s"][key].as_f64().unwrap() >= 0.0, "time_s.{key}");
    }
    assert_eq!(r["world_size"], 1);
    assert_eq!(r["rank_budget"], 6);
    assert_eq!(r["units_total"], 8);
    let layers = r["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    assert_eq!(layers[0]["name"], "model.a.iso");
    assert_eq!(layers[0]["rank"], 0);
    for l in layers {
        for key in [
            "name",
            "input",
            "in_features",
            "out_features",
            "rank",
            "alpha",
            "explained_variance_ratio",
            "converged_step",
            "tokens",
            "estimator",
            "error_bound",
            "allocation_certain",
            "certificate",
        ] {
            assert!(l.get(key).is_some(), "layer field {key}");
        }
        assert_eq!(l["tokens"], 4000);
        assert_eq!(l["estimator"], "exact");
        assert_eq!(l["explained_variance_ratio"].as_array().unwrap().len(), 4);
        assert_eq!(l["certificate"]["kind"], "exact");
    }
}

#[test]
fn rank_pattern_sets_each_layers_cap_budget_and_alpha_as_peft() {
    let tmp = tempdir();
    let data = tmp.path().join("acts");
    dataset(&data);
    let out = tmp.path().join("adapter");
    // r_l: iso 2 (r), steep 1 (a suffix key), mid 4 (a full path); the first matching key wins.
    init_ok(
        &data,
        &out,
        &[
            "--rank",
            "2",
            "--rank-pattern",
            "model.c.mid=4,steep=1,mid=7",
            "--rho",
            "2",
            "--alpha",
            "8",
            "--no-early-stop",
        ],
    );
    let w = read_adapter(&out);
    let before = [2usize, 1, 4];
    let layers = w.report["layers"].as_array().unwrap();
    let ratios: Vec<Vec<f64>> = layers
        .iter()
        .map(|l| {
            let r = l["explained_variance_ratio"].as_array().unwrap();
            r.iter().map(|v| v.as_f64().unwrap()).collect()
        })
        .collect();
    // PEFT's max_components = round(r_l × rho) ratios per layer; the budget is Σ r_l.
    let caps: Vec<usize> = before.iter().map(|r| 2 * r).collect();
    assert_eq!(ratios.iter().map(Vec::len).collect::<Vec<_>>(), caps);
    assert_eq!(w.report["rank_budget"], 7);
    let ranks = peft_allocation(&ratios, &caps, 7);
    assert_eq!(ranks.iter().sum::<usize>(), 7);
    for (l, &rank) in layers.iter().zip(&ranks) {
        assert_eq!(l["rank"], rank, "{}", l["name"]);
    }
    // PEFT's load: rank_pattern holds ranks ≠ r, alpha_l = alpha × (rank / r_l) where rank ≠ r_l.
    let names = ["model.a.iso", "model.b.steep", "model.c.mid"];
    let (mut rank_pattern, mut alpha_pattern) = (json!({}), json!({}));
    for ((name, &rank), &r_l) in names.iter().zip(&ranks).zip(&before) {
        if rank == 0 {
            continue;
        }
        if rank != 2 {
            rank_pattern[name] = json!(rank);
        }
        let alpha = if rank != r_l {
            8.0 * (rank as f64 / r_l as f64)
        } else {
            8.0
        };
        if alpha != 8.0 {
            alpha_pattern[name] = if alpha.fract() == 0.0 {
                json!(alpha as i64)
            } else {
                json!(alpha)
            };
        }
    }
    assert_eq!(w.config["rank_pattern"], rank_pattern);
    assert_eq!(w.config["alpha_pattern"], alpha_pattern);
    assert!(
        !alpha_pattern.as_object().unwrap().is_empty(),
        "{alpha_pattern}"
    );
}

#[test]
fn whitening_divides_by_root_singular_values() {
    let tmp = tempdir();
    let data = tmp.path().join("acts");
    let seen = dataset(&data);
    let out = tmp.path().join("adapter");
    init_ok(
        &data,
        &out,
        &[
            "--rank",
            "2",
            "--no-early-stop",
            "--whiten",
            "--no-adjust-alpha",
        ],
    );
    let w = read_adapter(&out);
    assert_eq!(w.config["alpha_pattern"], json!({}));
    assert_eq!(w.config["eva_config"]["whiten"], true);
    assert_eq!(w.config["eva_config"]["adjust_scaling_factors"], false);
    let (vals, vecs) = dense_pca(&seen[1]);
    let n = 4000.0;
    let a = &w.tensors["base_model.model.model.b.steep.lora_A.weight"];
    for (i, &val) in vals.iter().enumerate().take(a.nrows()) {
        // PEFT: A_i = u_i / sqrt(σ_i), σ_i = singular value of the centered data = sqrt(λ_i (n-1)).
        let sigma = (val * (n - 1.0)).sqrt();
        let norm = a
            .row(i)
            .mapv(|v| v as f64)
            .dot(&a.row(i).mapv(|v| v as f64))
            .sqrt();
        assert!(
            (norm * sigma.sqrt() - 1.0).abs() < 1e-4,
            "row {i}: norm {norm}, sigma {sigma}"
        );
        let cos = a.row(i).mapv(|v| v as f64).dot(&vecs.column(i)) / norm;
        assert!(cos.abs() > 0.9999);
    }
}

#[test]
fn targets_select_layers_by_suffix() {
    let tmp = tempdir();
    let data = tmp.path().join("acts");
    dataset(&data);
    let out = tmp.path().join("adapter");
    init_ok(
        &data,
        &out,
        &["--rank", "2", "--no-early-stop", "--targets", "steep,c.mid"],
    );
    let w = read_adapter(&out);
    let layers: Vec<&str> = w.report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(layers, ["model.b.steep", "model.c.mid"]);
    assert_eq!(w.report["rank_budget"], 4);
}

#[test]
fn equal_inputs_form_groups_whose_leader_holds_the_largest_rank() {
    let tmp = tempdir();
    let data = tmp.path().join("acts");
    std::fs::create_dir_all(&data).unwrap();
    for u in 0..4 {
        let x = gen_rows(7, u, 300, &power_law(24, 1.0), 0.5);
        let y = gen_rows(8, u, 300, &power_law(24, 1.0), 0.5);
        write_shard(
            &shard(&data, u as usize),
            &[
                ("blk.k_proj".into(), x.clone(), 8),
                ("blk.q_proj".into(), x.clone(), 24),
                ("blk.v_proj".into(), x, 8),
                ("blk.up".into(), y, 48),
            ],
            Fmt::F32,
        );
    }
    let out = tmp.path().join("adapter");
    init_ok(&data, &out, &["--rank", "3", "--no-early-stop"]);
    let w = read_adapter(&out);
    let layers = w.report["layers"].as_array().unwrap();
    let by_name = |n: &str| layers.iter().find(|l| l["name"] == n).unwrap();
    for n in ["blk.k_proj", "blk.q_proj", "blk.v_proj"] {
        assert_eq!(by_name(n)["input"], "blk.k_proj");
    }
    assert_eq!(by_name("blk.up")["input"], "blk.up");
    let k = by_name("blk.k_proj")["rank"].as_u64().unwrap();
    assert!(
        k >= by_name("blk.q_proj")["rank"].as_u64().unwrap()
            && k >= by_name("blk.v_proj")["rank"].as_u64().unwrap()
    );
    // Group members get prefixes of the same components.
    let ak = &w.tensors["base_model.model.blk.k_proj.lora_A.weight"];
    let aq = &w.tensors["base_model.model.blk.q_proj.lora_A.weight"];
    let r = aq.nrows().min(ak.nrows());
    assert_eq!(ak.slice(s![..r, ..]), aq.slice(s![..r, ..]));
}
