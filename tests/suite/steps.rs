//! Steps and stopping: early stopping on convergence, --max-steps, data running out, and the
//! report's marks for unconverged layers.

use super::common::*;

fn run(spec: &str, extra: &[&str]) -> (std::process::Output, Written) {
    let tmp = tempdir();
    let out = tmp.path().join("adapter");
    let mut args = vec!["init", "--synthetic", spec, "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = eva(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = read_adapter(&out);
    (o, w)
}

#[test]
fn early_stopping_ends_before_the_data() {
    let (_, w) = run(
        "layers=3,dim=32,tokens=512,units=200,decay=1.5",
        &["--rank", "2", "--batch-size", "2", "-q"],
    );
    let r = &w.report;
    assert_eq!(r["stop_reason"], "converged");
    assert_eq!(r["converged"], true);
    let steps = r["steps"].as_u64().unwrap();
    assert!(steps < 100, "took {steps} steps of 100");
    for l in r["layers"].as_array().unwrap() {
        let c = l["converged_step"].as_u64().expect("converged");
        assert!(c >= 2 && c <= steps);
    }
    assert_eq!(r["units_seen"].as_u64().unwrap(), 2 * steps);
}

#[test]
fn refined_converged_layers_hold_the_pca_of_all_data_read() {
    // Layers converge at different steps (decay 0.5..1.5 over the inputs).
    let spec = "layers=4,dim=48,tokens=32,units=400,decay=1.0";
    let common = ["--rank", "4", "--batch-size", "1", "-q"];
    let (_, frozen) = run(spec, &common);
    let (_, refined) = run(spec, &[&common[..], &["--refine-converged"]].concat());
    let r = &refined.report;
    // The same convergence and stop: done layers are not tested again.
    assert_eq!(r["stop_reason"], "converged");
    assert_eq!(r["steps"], frozen.report["steps"]);
    let layers = |w: &Written| w.report["layers"].as_array().unwrap().clone();
    let steps = r["steps"].as_u64().unwrap();
    assert!(
        layers(&frozen)
            .iter()
            .any(|l| l["converged_step"].as_u64().unwrap() < steps),
        "no layer converged early"
    );
    for (a, b) in layers(&frozen).iter().zip(&layers(&refined)) {
        assert_eq!(a["converged_step"], b["converged_step"]);
        // Every input accumulated every unit read.
        assert_eq!(b["tokens"].as_u64().unwrap(), 32 * steps);
    }
    // Its adapter is that of a run over the same units that never stops accumulating anything.
    let (_, all) = run(
        spec,
        &[
            &common[..],
            &["--no-early-stop", "--max-steps", &steps.to_string()],
        ]
        .concat(),
    );
    assert_same_written(&refined, &all);
}

#[test]
fn max_steps_stops_and_marks_unconverged_layers() {
    // tau = 1 is never reached by a moving estimate.
    let (o, w) = run(
        "layers=2,dim=32,tokens=256,units=50",
        &["--rank", "2", "--tau", "1", "--max-steps", "3"],
    );
    let r = &w.report;
    assert_eq!(r["stop_reason"], "max_steps");
    assert_eq!(r["steps"], 3);
    assert_eq!(r["converged"], false);
    assert_eq!(r["unconverged_layers"].as_array().unwrap().len(), 2);
    for l in r["layers"].as_array().unwrap() {
        assert!(l["converged_step"].is_null());
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning") && err.contains("not converged"),
        "{err}"
    );
}

#[test]
fn running_out_of_data_warns_and_still_writes() {
    let (o, w) = run(
        "layers=2,dim=32,tokens=64,units=3",
        &["--rank", "2", "--tau", "1", "-q"],
    );
    assert_eq!(w.report["stop_reason"], "data_exhausted");
    assert_eq!(w.report["units_seen"], 3);
    assert!(String::from_utf8_lossy(&o.stderr).contains("data exhausted"));
}

#[test]
fn no_early_stop_uses_all_data_once() {
    let (_, w) = run(
        "layers=2,dim=32,tokens=128,units=10,decay=2",
        &["--rank", "2", "--no-early-stop", "--batch-size", "4", "-q"],
    );
    assert_eq!(w.report["stop_reason"], "all_data");
    assert_eq!(w.report["steps"], 3);
    assert_eq!(w.report["units_seen"], 10);
    for l in w.report["layers"].as_array().unwrap() {
        assert_eq!(l["tokens"], 1280);
    }
}

#[test]
fn progress_lines_are_plain_when_not_a_terminal() {
    let (o, _) = run(
        "layers=1,dim=16,tokens=64,units=4",
        &["--rank", "2", "--no-early-stop", "--batch-size", "1"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.lines().any(|l| l.starts_with("[eva] step 4/4")),
        "{err}"
    );
    assert!(!err.contains('\r'));
    let (o, _) = run("layers=1,dim=16,tokens=64,units=4", &["--rank", "2", "-q"]);
    assert!(o.stderr.is_empty() || String::from_utf8_lossy(&o.stderr).contains("warning"));
}
