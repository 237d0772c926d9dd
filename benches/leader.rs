//! Leader time per step: the top-k eigenpairs of one exact input (d = 4096, k = 32) after one more
//! unit of rows, solved warm-started from the previous basis at `Precision::Step`, as the engine
//! does at every step; per input and times the number of inputs (32) a step has to solve.
//!
//! | row | what is timed |
//! |---|---|
//! | Step, warm | `Spectrum::from_gram(Gram::Local(..), warm = previous Final basis, Precision::Step)` |
//! | Step, warm from k vectors | the same, started from the previous `k` eigenvectors only |
//! | Final, warm | `Precision::Final`, started from the previous Final basis (what the engine's last solve does) |
//! | Step, cold | the same without a warm start (seeded random block) |
//! | Final, cold | `Precision::Final` on the previous statistics (gives the basis the warm starts use) |
//! | dense | `ExactStats::covariance()` and `eigen::dense_top_k` (faer, full `d x d`) |
//!
//! A second table splits one iteration into its parts (the product with the Gram or covariance in
//! its forms: `dsymm` on the Gram, `dgemm` on the full covariance (Final), `sgemm` on an f32 copy
//! (Step); orthonormalization by faer QR and by CholQR2; the small eigenproblem) and times the
//! dense top-k solvers `dsyevr` / `ssyevr` on the full matrix.
//!
//! Statistics: `SyntheticSource` "layers=1,dim=D,tokens=4096,units=4,decay=1.0" (eigenvalues
//! `1/i`, dense eigenvectors); units 0–1 (8192 rows) give the previous estimate, unit 2 is the new
//! step. Step and warm Final solves run once untimed, then `reps` interleaved rounds; median shown.
//! Cold Final and dense run once. Iteration counts (operator applications) come from
//! `eigen::subspace_top_k` called with the same operator, seed, tolerances and iteration caps as
//! `Spectrum::from_gram` (for d ≤ 512 the Step solve may end in `ssyevr` instead).
//!
//! Usage: `cargo bench --bench leader [-- [D] [k=32] [inputs=32] [reps=3] [dense=1]]`

mod util;

use eva::leader::{eigen, Gram, Precision, Spectrum, STEP_ITERATIONS, STEP_TOLERANCE};
use eva::linalg;
use eva::source::synthetic::{SyntheticSource, SyntheticSpec};
use eva::stats::exact::ExactStats;
use eva::stats::Workspace;
use ndarray::{Array2, ArrayView2};
use std::time::Instant;
use util::{summary, time_interleaved, time_runs, Args, Load};

const USAGE: &str =
    "usage: cargo bench --bench leader [-- [D] [k=N] [inputs=N] [reps=N] [dense=0|1]]";

/// Tolerance and iteration cap of `Precision::Final` (private in the library; keep in step with
/// `Precision::tolerance` in `leader/mod.rs`). Step's are public.
const FINAL_TOLERANCE: f64 = 1e-9;
const FINAL_MAX_ITER: usize = 400;

/// One solve as the engine does it on a local Gram; `warm` is the previous basis (read, and
/// replaced by this solve's).
fn solve(
    stats: &ExactStats,
    k: usize,
    warm: &mut Option<Array2<f64>>,
    precision: Precision,
) -> Spectrum {
    Spectrum::from_gram(
        Gram::Local(stats.gram()),
        &stats.moments,
        k,
        warm,
        precision,
    )
    .expect("eigensolver")
}

/// Iterations a solve takes (same operator, seed and tolerance as `Spectrum::from_gram`: the
/// f32 covariance at `Precision::Step`, the centered f64 Gram at `Final`).
fn iterations(
    stats: &ExactStats,
    k: usize,
    warm: Option<ArrayView2<f64>>,
    precision: Precision,
) -> (usize, bool) {
    let d = stats.dim();
    let (tol, max_iter) = match precision {
        Precision::Step => (STEP_TOLERANCE, STEP_ITERATIONS),
        Precision::Final => (FINAL_TOLERANCE, FINAL_MAX_ITER),
    };
    let c: Vec<f64> = stats.covariance().iter().copied().collect();
    let c32: Vec<f32> = c.iter().map(|&v| v as f32).collect();
    let mut cov = |q: ArrayView2<f64>| match precision {
        Precision::Step => linalg::gemm_square(&c32, d, q),
        Precision::Final => linalg::gemm_square(&c, d, q),
    };
    let top =
        eigen::subspace_top_k(&mut cov, d, k, warm, d as u64, tol, max_iter).expect("eigensolver");
    (top.iterations, top.converged)
}

/// `‖AᵀB‖_F² / k` for orthonormal `d x k` bases: 1 when the subspaces agree.
fn subspace_similarity(a: ArrayView2<f64>, b: ArrayView2<f64>) -> f64 {
    let m = a.t().dot(&b);
    m.iter().map(|v| v * v).sum::<f64>() / a.ncols() as f64
}

fn ms(t: f64) -> String {
    format!("{:.1}", t * 1e3)
}

fn main() {
    let args = Args::parse(USAGE);
    let d = args.sizes.first().copied().unwrap_or(4096);
    let k = args.get("k", 32);
    let inputs = args.get("inputs", 32);
    let reps = args.get("reps", 3);
    let run_dense = args.get("dense", 1) != 0;
    linalg::set_threads(0);
    println!("# leader step time, d = {d}, k = {k}, {inputs} inputs per step");
    println!();
    println!("OpenBLAS: {}", util::openblas_description());
    println!();
    let load = Load::start();

    eprintln!("[leader] generating 3 units of 4096 x {d} ...");
    let spec: SyntheticSpec = format!("layers=1,dim={d},tokens=4096,units=4,decay=1.0")
        .parse()
        .expect("valid spec");
    let source = SyntheticSource::new(spec).expect("synthetic source");
    let units: Vec<Array2<f32>> = (0..3).map(|u| source.generate(0, u)).collect();
    let mut ws = Workspace::default();
    let mut stats = ExactStats::new(util::column_means(units[0].view()));
    for u in &units[..2] {
        stats.accumulate(u.view(), &mut ws).expect("accumulate");
    }

    eprintln!("[leader] Final solve on 8192 rows ...");
    let t = Instant::now();
    let mut basis = None;
    let previous = solve(&stats, k, &mut basis, Precision::Final);
    let t_final = t.elapsed().as_secs_f64();
    let basis = basis.expect("a solve leaves its basis");
    let (it_final, conv_final) = iterations(&stats, k, None, Precision::Final);
    stats
        .accumulate(units[2].view(), &mut ws)
        .expect("accumulate");
    drop(units);

    eprintln!("[leader] Step solves on 12288 rows, {reps} rounds ...");
    let warm = basis.view();
    let (mut warm_out, mut cold_out, mut warmk_out, mut final_out) = (None, None, None, None);
    let times = time_interleaved(
        reps,
        &mut [
            &mut || warm_out = Some(solve(&stats, k, &mut Some(basis.clone()), Precision::Step)),
            &mut || cold_out = Some(solve(&stats, k, &mut None, Precision::Step)),
            &mut || {
                warmk_out = Some(solve(
                    &stats,
                    k,
                    &mut Some(previous.vectors.clone()),
                    Precision::Step,
                ))
            },
            &mut || final_out = Some(solve(&stats, k, &mut Some(basis.clone()), Precision::Final)),
        ],
    );
    let (warm_out, cold_out, final_out) = (
        warm_out.expect("ran"),
        cold_out.expect("ran"),
        final_out.expect("ran"),
    );
    let (it_warm, conv_warm) = iterations(&stats, k, Some(warm), Precision::Step);
    let (it_cold, conv_cold) = iterations(&stats, k, None, Precision::Step);
    let (it_warmk, conv_warmk) =
        iterations(&stats, k, Some(previous.vectors.view()), Precision::Step);
    let (it_fwarm, conv_fwarm) = iterations(&stats, k, Some(warm), Precision::Final);

    // Cost of one iteration's parts, with the block size the solver uses.
    let m = eigen::block_size(k, d);
    let q = linalg::orthonormalize_householder(
        Array2::from_shape_fn((d, m), |(i, j)| ((i * 7 + j * 13) % 29) as f64 - 14.0).view(),
    );
    let t_apply = time_runs(5, || {
        let mut gq = stats.gram_apply(q.view()).expect("apply");
        stats.moments.center(&mut gq, q.view());
    });
    let t_orth = time_runs(5, || {
        linalg::orthonormalize_householder(q.view());
    });
    let t_cholqr = time_runs(5, || {
        linalg::cholqr2(q.view()).expect("well conditioned");
    });
    let h = q.t().dot(&stats.gram_apply(q.view()).expect("apply"));
    let h = (&h + &h.t()) * 0.5;
    let t_eig = time_runs(5, || {
        linalg::sym_eig_desc(h.view()).expect("eig");
    });
    let t_rr = time_runs(5, || {
        let _ = q.dot(&h);
    });

    // The same product on a full (not triangle) matrix: what a dgemm or an f32 sgemm would cost.
    let t = Instant::now();
    let c = stats.covariance();
    let t_cov = t.elapsed().as_secs_f64();
    let t_dgemm = time_runs(5, || {
        let _ = util::blas_reference(|| c.dot(&q));
    });
    let (c32, q32) = (c.mapv(|v| v as f32), q.mapv(|v| v as f32));
    let t_sgemm = time_runs(5, || {
        let _ = util::blas_reference(|| c32.dot(&q32));
    });
    let c32 = c32.into_raw_vec_and_offset().0;
    let t_sgemm_sq = time_runs(5, || {
        linalg::gemm_square(&c32, d, q.view()).expect("sgemm");
    });
    drop(c32);
    let cu: Vec<f64> = c.iter().copied().collect();
    let t_dsyevr = time_runs(3, || {
        eigen::dense_top_k_upper(&mut cu.clone(), d, k).expect("dsyevr");
    });
    let cu32: Vec<f32> = cu.iter().map(|&v| v as f32).collect();
    let t_ssyevr = time_runs(3, || {
        eigen::dense_top_k_upper(&mut cu32.clone(), d, k).expect("ssyevr");
    });

    let dense = if run_dense {
        eprintln!("[leader] dense eigendecomposition of {d} x {d} (once) ...");
        let t = Instant::now();
        let top = eigen::dense_top_k(c.view(), k).expect("dense eigensolver");
        Some((t.elapsed().as_secs_f64(), top))
    } else {
        None
    };
    drop(c);
    let (mine, others) = load.finish();

    let (wm, wmin, wmax) = summary(&times[0]);
    let (cm, cmin, cmax) = summary(&times[1]);
    let (km, kmin, kmax) = summary(&times[2]);
    let (fm, fmin, fmax) = summary(&times[3]);
    println!("| solve (d = {d}, k = {k}, block {m}) | iterations | time per input, ms | × {inputs} inputs per step, s |");
    println!("|---|---:|---:|---:|");
    println!(
        "| Step, warm-started from the previous Final vectors | {it_warm}{} | {} ({}–{}) | {:.2} |",
        if conv_warm {
            ""
        } else {
            " (cap, not converged)"
        },
        ms(wm),
        ms(wmin),
        ms(wmax),
        wm * inputs as f64
    );
    println!(
        "| Step, warm-started from the previous k vectors only | {it_warmk}{} | {} ({}–{}) | {:.2} |",
        if conv_warmk { "" } else { " (cap, not converged)" },
        ms(km),
        ms(kmin),
        ms(kmax),
        km * inputs as f64
    );
    println!(
        "| Final, warm-started from the previous Final basis | {it_fwarm}{} | {} ({}–{}) | {:.2} |",
        if conv_fwarm {
            ""
        } else {
            " (not converged: dense fallback)"
        },
        ms(fm),
        ms(fmin),
        ms(fmax),
        fm * inputs as f64
    );
    println!(
        "| Step, cold (random start) | {it_cold}{} | {} ({}–{}) | {:.2} |",
        if conv_cold {
            ""
        } else {
            " (cap, not converged)"
        },
        ms(cm),
        ms(cmin),
        ms(cmax),
        cm * inputs as f64
    );
    println!(
        "| Final, cold (previous statistics, once) | {it_final}{} | {} | {:.2} |",
        if conv_final {
            ""
        } else {
            " (not converged: dense fallback)"
        },
        ms(t_final),
        t_final * inputs as f64
    );
    println!(
        "| dense: `covariance()` (once) | — | {} | {:.2} |",
        ms(t_cov),
        t_cov * inputs as f64
    );
    if let Some((t_eig, _)) = &dense {
        println!(
            "| dense: `dense_top_k` on {d}² (once) | — | {} | {:.2} |",
            ms(*t_eig),
            t_eig * inputs as f64
        );
    }
    println!();
    println!("One iteration's parts (median of 5, block {d} x {m}):");
    println!();
    println!("| part | ms |");
    println!("|---|---:|");
    println!(
        "| `gram_apply` (dsymm) + centering | {} |",
        ms(summary(&t_apply).0)
    );
    println!(
        "| for comparison: `C·Q` as dgemm on the full f64 matrix | {} |",
        ms(summary(&t_dgemm).0)
    );
    println!(
        "| for comparison: `C·Q` as sgemm on a full f32 copy | {} |",
        ms(summary(&t_sgemm).0)
    );
    println!(
        "| `linalg::gemm_square` in f32 (what the Step iteration uses, with conversions) | {} |",
        ms(summary(&t_sgemm_sq).0)
    );
    println!(
        "| `linalg::orthonormalize_householder` (faer thin QR + copies) | {} |",
        ms(summary(&t_orth).0)
    );
    println!(
        "| `linalg::cholqr2` (what the iteration uses) | {} |",
        ms(summary(&t_cholqr).0)
    );
    println!(
        "| `sym_eig_desc` of the {m} x {m} Rayleigh quotient | {} |",
        ms(summary(&t_eig).0)
    );
    println!(
        "| one `d x m · m x m` product (ndarray) | {} |",
        ms(summary(&t_rr).0)
    );
    println!(
        "| dense top {k}: `dsyevr` on {d}² | {} |",
        ms(summary(&t_dsyevr).0)
    );
    println!(
        "| dense top {k}: `ssyevr` on {d}² | {} |",
        ms(summary(&t_ssyevr).0)
    );
    println!();
    let res = |s: &Spectrum| s.summary.residuals.iter().copied().fold(0.0, f64::max);
    println!(
        "Checks: max residual warm {:.1e}, cold {:.1e}, final warm {:.1e}; top-{k} subspace similarity warm vs cold {:.8}{}.",
        res(&warm_out),
        res(&cold_out),
        res(&final_out),
        subspace_similarity(warm_out.vectors.view(), cold_out.vectors.view()),
        match &dense {
            Some((_, top)) => format!(", warm vs dense {:.8}", subspace_similarity(warm_out.vectors.view(), top.vectors.view())),
            None => String::new(),
        }
    );
    println!();
    println!("Load: this process used {mine:.2} cores on average, other processes {others:.2} cores (above ~0.1 the numbers are disturbed).");
}
