//! The Nyström sketch's certificate holds: the true error never exceeds the reported bound, on
//! fast- and slow-decay spectra, with and without a large mean.

use super::common::*;
use eva::stats::sketch::SketchStats;
use ndarray::Array2;

/// Covariance of the rows, dense f64.
fn covariance(units: &[Array2<f32>]) -> Array2<f64> {
    let views: Vec<_> = units.iter().map(|u| u.view()).collect();
    let x = ndarray::concatenate(ndarray::Axis(0), &views)
        .unwrap()
        .mapv(|v| v as f64);
    let mean = x.mean_axis(ndarray::Axis(0)).unwrap();
    let xc = &x - &mean;
    xc.t().dot(&xc) / (x.nrows() as f64 - 1.0)
}

fn check(decay: f64, mean: f64, k: usize, seed: u64) {
    let d = 160;
    let units: Vec<Array2<f32>> = (0..6)
        .map(|u| gen_rows(seed, u, 400, &power_law(d, decay), mean))
        .collect();
    let reference: Vec<f32> = units[0].mean_axis(ndarray::Axis(0)).unwrap().to_vec();
    let mut sk = SketchStats::new(reference, k, 11, 0);
    let mut ws = eva::stats::Workspace::default();
    for u in &units {
        sk.accumulate(u.view(), &mut ws).unwrap();
    }
    let ny = sk.nystrom().unwrap();
    let c = covariance(&units);
    let trace: f64 = (0..d).map(|i| c[(i, i)]).sum();
    // f32 partial sums over 256-row blocks: relative error far below 1e-6.
    assert!(
        (ny.trace - trace).abs() <= 1e-6 * trace,
        "trace {} vs {}",
        ny.trace,
        trace
    );
    let lam = Array2::from_diag(&ndarray::Array1::from(ny.values.clone()));
    let approx = ny.vectors.dot(&lam).dot(&ny.vectors.t());
    let e = &c - &approx;
    let (eig_e, _) = eva::linalg::sym_eig_desc(e.view()).unwrap();
    let spectral = eig_e.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let nuclear: f64 = eig_e.iter().map(|v| v.abs()).sum();
    let tol = 1e-9 * trace;
    assert!(
        nuclear <= ny.nuclear_error + tol,
        "decay {decay}: nuclear error {nuclear} > reported {}",
        ny.nuclear_error
    );
    assert!(
        spectral <= ny.spectral_bound + tol,
        "decay {decay}: spectral error {spectral} > bound {}",
        ny.spectral_bound
    );
    assert!(spectral <= ny.error_bound() + tol);
    // Every true eigenvalue lies in [λ̂_i, λ̂_i + ε] (Nyström never over-estimates).
    let (true_vals, _) = eva::linalg::sym_eig_desc(c.view()).unwrap();
    for (i, (&t, &h)) in true_vals.iter().zip(&ny.values).enumerate() {
        assert!(
            h <= t + tol && t <= h + ny.error_bound() + tol,
            "decay {decay}: λ_{i} = {t} outside [{h}, {h} + {}]",
            ny.error_bound()
        );
    }
}

#[test]
fn bound_holds_on_fast_decay() {
    check(2.0, 0.0, 24, 1);
    check(1.5, 50.0, 40, 2);
}

#[test]
fn bound_holds_on_slow_decay() {
    check(0.5, 0.0, 24, 3);
    check(0.3, 20.0, 48, 4);
}

#[test]
fn sketch_run_reports_its_certificate() {
    let tmp = tempdir();
    let out = tmp.path().join("adapter");
    let spec = "layers=2,dim=96,tokens=300,units=4,decay=1.5,seed=3";
    let o = eva(&[
        "init",
        "--synthetic",
        spec,
        "--out",
        out.to_str().unwrap(),
        "-q",
        "--no-early-stop",
        "--estimator",
        "sketch",
        "--rank",
        "4",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = read_adapter(&out);
    let src = eva::source::synthetic::SyntheticSource::new(spec.parse().unwrap()).unwrap();
    for (g, l) in w.report["layers"].as_array().unwrap().iter().enumerate() {
        assert_eq!(l["estimator"], "sketch");
        assert_eq!(l["certificate"]["kind"], "sketch");
        assert_eq!(
            l["certificate"]["sketch_size"], 32,
            "max(4k, k+16) for k = 8"
        );
        let bound = l["error_bound"].as_f64().unwrap();
        let units: Vec<Array2<f32>> = (0..4).map(|u| src.generate(g, u)).collect();
        let (vals, _) = dense_pca(&units);
        let t: f64 = vals.iter().sum();
        for (i, r) in l["explained_variance_ratio"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let (got, want) = (r.as_f64().unwrap(), vals[i] / t);
            assert!(
                got <= want + 1e-9 && want <= got + bound + 1e-9,
                "ratio {i}: {want} outside [{got}, {got} + {bound}]"
            );
        }
    }
}

/// `--estimator auto` keeps exact statistics for the inputs that fit `--stats-memory`, smallest
/// first, and sketches only the rest.
#[test]
fn auto_sketches_only_the_inputs_beyond_the_memory_budget() {
    let tmp = tempdir();
    let data = tmp.path().join("acts");
    // Inputs of d = 24 (k and q), 40 and 600: Grams of 4.6 KB, 12.8 KB and 2.9 MB.
    super::distributed::shards(&data);
    let run = |memory: &str| {
        let out = tmp.path().join(format!("adapter-{memory}"));
        let o = init_ok(&data, &out, &["--rank", "3", "--stats-memory", memory]);
        let w = read_adapter(&out);
        let est = w.report["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["name"].as_str().unwrap().to_string(),
                    l["estimator"].as_str().unwrap().to_string(),
                )
            })
            .collect::<Vec<_>>();
        (est, String::from_utf8_lossy(&o.stderr).to_string())
    };
    let (est, err) = run("0.001");
    for (name, e) in &est {
        let want = if name == "blk.1.mlp.up" {
            "sketch"
        } else {
            "exact"
        };
        assert_eq!(e, want, "{name}: {est:?}");
    }
    // The user is told, with the budget that would keep every input exact (2.9 MB: 0.003 GiB).
    assert!(
        err.contains("exact statistics for 2 of 3 inputs") && err.contains("--stats-memory 0.003"),
        "{err}"
    );
    let (est, err) = run("4");
    assert!(est.iter().all(|(_, e)| e == "exact"));
    assert!(!err.contains("Nystrom"), "{err}");
}
