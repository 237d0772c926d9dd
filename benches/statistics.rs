//! Statistics accumulation throughput per unit (one `accumulate` call on `tokens x d` rows), next
//! to the machine's own OpenBLAS rate for the same products, measured in the same binary.
//!
//! | row | work per unit | flops counted |
//! |---|---|---|
//! | `ExactStats::accumulate` | shift, moments, `ssyrk`, f64 add of the upper triangle | `2·n·d²` (conventional Gram count) |
//! | sgemm `XᵀX` | `(n x d)ᵀ·(n x d)` as a general `cblas_sgemm` (ndarray `general_mat_mul`) | `2·n·d²` |
//! | ssyrk `XᵀX` | `cblas_ssyrk`, upper triangle only (what `ExactStats` calls) | `n·d²` (work actually done) |
//! | `SketchStats::accumulate` | shift, moments, `P = X[Ω Θ]`, `XᵀP`, f64 add | `4·n·d·(k+10)` |
//! | sgemm sketch shapes | `X·T` (`n x d · d x (k+10)`) then `Xᵀ·P` | `4·n·d·(k+10)` |
//!
//! Rows come from `SyntheticSource` (power-law spectrum) and are generated before any timing.
//! Each kernel runs once untimed, then `reps` interleaved rounds run every kernel once in turn (so
//! a change in machine load hits all alike); the table shows the median. The CPU time other
//! processes took during the run is printed under the table.
//!
//! Usage: `cargo bench --bench statistics [-- [D ...] [tokens=4096] [k=64] [reps=N]]`
//! (default sizes 1024 and 4096, 5 rounds).

mod util;

use cblas_sys::{CBLAS_LAYOUT, CBLAS_TRANSPOSE, CBLAS_UPLO};
use eva::source::synthetic::{SyntheticSource, SyntheticSpec};
use eva::stats::exact::ExactStats;
use eva::stats::sketch::SketchStats;
use eva::stats::{Workspace, PROBES};
use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2};
use util::{summary, time_interleaved, Args, Load};

const USAGE: &str = "usage: cargo bench --bench statistics [-- [D ...] [tokens=N] [k=N] [reps=N]]";

struct Row {
    d: usize,
    kernel: String,
    flops: f64,
    flop_rule: &'static str,
    times: Vec<f64>,
    /// Time of the BLAS kernel this row is compared with, if any.
    baseline: Option<f64>,
}

/// `C = XᵀX` (upper triangle) by `cblas_ssyrk` into a preallocated `d x d` buffer.
fn ssyrk(x: ArrayView2<f32>, c: &mut [f32]) {
    let (n, d) = x.dim();
    let xs = x.as_slice().expect("standard layout");
    assert_eq!(c.len(), d * d);
    // SAFETY: `xs` is n*d row-major, `c` d*d; leading dimensions match.
    unsafe {
        cblas_sys::cblas_ssyrk(
            CBLAS_LAYOUT::CblasRowMajor,
            CBLAS_UPLO::CblasUpper,
            CBLAS_TRANSPOSE::CblasTrans,
            d as i32,
            n as i32,
            1.0,
            xs.as_ptr(),
            d as i32,
            0.0,
            c.as_mut_ptr(),
            d as i32,
        );
    }
}

fn bench_dim(d: usize, n: usize, k: usize, reps: usize, rows: &mut Vec<Row>) {
    let spec: SyntheticSpec = format!("layers=1,dim={d},tokens={n},units=1,decay=1.0,mean=0.5")
        .parse()
        .expect("valid spec");
    let source = SyntheticSource::new(spec).expect("synthetic source");
    let x = source.generate(0, 0);
    let reference = util::column_means(x.view());
    let (nf, df) = (n as f64, d as f64);
    let m = k.min(d) + PROBES;

    let mut c = Array2::<f32>::zeros((d, d));
    let mut c_syrk = vec![0.0f32; d * d];
    let mut exact = ExactStats::new(reference.clone());
    let mut sketch = SketchStats::new(reference, k, 0, 0);
    let test = Array2::<f32>::from_shape_fn((d, m), |(i, j)| {
        ((i * 31 + j * 17) % 23) as f32 / 23.0 - 0.5
    });
    let mut p = Array2::<f32>::zeros((n, m));
    let mut y = Array2::<f32>::zeros((d, m));

    let x = x.view();
    let (mut ws_exact, mut ws_sketch) = (Workspace::default(), Workspace::default());
    let mut f_exact = || exact.accumulate(x, &mut ws_exact).expect("accumulate");
    let mut f_sgemm = || util::blas_reference(|| general_mat_mul(1.0, &x.t(), &x, 0.0, &mut c));
    let mut f_syrk = || util::blas_reference(|| ssyrk(x, &mut c_syrk));
    let mut f_sketch = || sketch.accumulate(x, &mut ws_sketch).expect("accumulate");
    let mut f_gemm = || {
        util::blas_reference(|| {
            general_mat_mul(1.0, &x, &test, 0.0, &mut p);
            general_mat_mul(1.0, &x.t(), &p, 0.0, &mut y);
        })
    };
    let mut t = time_interleaved(
        reps,
        &mut [
            &mut f_exact,
            &mut f_sgemm,
            &mut f_syrk,
            &mut f_sketch,
            &mut f_gemm,
        ],
    )
    .into_iter();
    let (t_exact, t_sgemm, t_syrk, t_sketch, t_gemm) = (
        t.next().unwrap(),
        t.next().unwrap(),
        t.next().unwrap(),
        t.next().unwrap(),
        t.next().unwrap(),
    );

    let gram_flops = 2.0 * nf * df * df;
    let sketch_flops = 4.0 * nf * df * m as f64;
    let (syrk_med, gemm_med) = (summary(&t_syrk).0, summary(&t_gemm).0);
    rows.push(Row {
        d,
        kernel: "`ExactStats::accumulate`".into(),
        flops: gram_flops,
        flop_rule: "2·n·d²",
        times: t_exact,
        baseline: Some(syrk_med),
    });
    rows.push(Row {
        d,
        kernel: "OpenBLAS sgemm XᵀX".into(),
        flops: gram_flops,
        flop_rule: "2·n·d²",
        times: t_sgemm,
        baseline: None,
    });
    rows.push(Row {
        d,
        kernel: "OpenBLAS ssyrk XᵀX".into(),
        flops: nf * df * df,
        flop_rule: "n·d²",
        times: t_syrk.clone(),
        baseline: None,
    });
    rows.push(Row {
        d,
        kernel: "OpenBLAS ssyrk XᵀX".into(),
        flops: gram_flops,
        flop_rule: "2·n·d² (Gram-equivalent)",
        times: t_syrk,
        baseline: None,
    });
    rows.push(Row {
        d,
        kernel: format!("`SketchStats::accumulate` (k = {k})"),
        flops: sketch_flops,
        flop_rule: "4·n·d·(k+10)",
        times: t_sketch,
        baseline: Some(gemm_med),
    });
    rows.push(Row {
        d,
        kernel: format!("OpenBLAS sgemm X·T, Xᵀ·P (k+10 = {m})"),
        flops: sketch_flops,
        flop_rule: "4·n·d·(k+10)",
        times: t_gemm,
        baseline: None,
    });
}

fn main() {
    let args = Args::parse(USAGE);
    let sizes = if args.sizes.is_empty() {
        vec![1024, 4096]
    } else {
        args.sizes.clone()
    };
    let n = args.get("tokens", 4096);
    let k = args.get("k", 64);
    eva::linalg::set_threads(0);
    println!("# statistics accumulation, {n}-token units, k = {k}");
    println!();
    println!("OpenBLAS: {}", util::openblas_description());
    println!();
    let mut rows = Vec::new();
    let mut loads = Vec::new();
    for &d in &sizes {
        let reps = args.get("reps", 5);
        eprintln!("[statistics] d = {d}, n = {n}, reps = {reps} ...");
        let load = Load::start();
        bench_dim(d, n, k, reps, &mut rows);
        loads.push((d, load.finish()));
    }
    println!("| d | kernel | flops counted | median ms (min–max) | GFLOP/s | time of BLAS kernel / time |");
    println!("|---:|---|---|---:|---:|---:|");
    for r in &rows {
        let (med, min, max) = summary(&r.times);
        let share = r
            .baseline
            .map_or(String::from("—"), |b| format!("{:.0}%", 100.0 * b / med));
        println!(
            "| {} | {} | {} | {:.1} ({:.1}–{:.1}) | {:.1} | {} |",
            r.d,
            r.kernel,
            r.flop_rule,
            med * 1e3,
            min * 1e3,
            max * 1e3,
            r.flops / med / 1e9,
            share
        );
    }
    println!();
    for (d, (mine, others)) in loads {
        println!("- d = {d}: this process used {mine:.2} cores on average, other processes {others:.2} cores (above ~0.1 the numbers are disturbed).");
    }
    println!();
    println!("Last column: `ExactStats` against `ssyrk` on the same rows (the kernel it calls), `SketchStats` against the two sgemm calls of the same shapes; 100% = no overhead beyond BLAS.");
}
