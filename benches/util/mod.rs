//! Helpers shared by the `harness = false` benches: timing with a warm-up and a median, the
//! command line (`cargo bench --bench NAME -- 1024 reps=5`), and what the BLAS library says about
//! itself. No criterion: CI compiles dev-dependencies on 2 cores.

#![allow(dead_code)]

use std::ffi::CStr;
use std::os::raw::{c_char, c_int};
use std::time::Instant;

extern "C" {
    fn openblas_get_config() -> *const c_char;
    fn openblas_get_corename() -> *const c_char;
    fn openblas_get_num_threads() -> c_int;
    fn openblas_set_num_threads(n: c_int);
}

/// Runs a reference BLAS call with OpenBLAS on all of eva's threads (`linalg::threads()`), as a
/// user calling OpenBLAS directly would; eva itself keeps OpenBLAS on one thread per tile.
pub fn blas_reference<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: OpenBLAS allows changing its thread count between calls.
    unsafe { openblas_set_num_threads(eva::linalg::threads() as c_int) };
    let r = f();
    unsafe { openblas_set_num_threads(1) };
    r
}

/// One line describing the OpenBLAS the binary runs with (version, build options, kernel, and
/// the threads its reference calls get).
pub fn openblas_description() -> String {
    // SAFETY: OpenBLAS returns pointers to static NUL-terminated strings.
    unsafe {
        format!(
            "{} (core: {}, threads: {})",
            CStr::from_ptr(openblas_get_config())
                .to_string_lossy()
                .trim(),
            CStr::from_ptr(openblas_get_corename()).to_string_lossy(),
            blas_reference(|| openblas_get_num_threads())
        )
    }
}

/// Seconds of each of `reps` timed runs of `f`, after one untimed warm-up run.
pub fn time_runs(reps: usize, mut f: impl FnMut()) -> Vec<f64> {
    f();
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect()
}

/// Interleaved timing: every function runs once untimed, then `reps` rounds run each function
/// once in turn, so a change in machine load hits all of them alike. Seconds per function and run.
pub fn time_interleaved(reps: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<Vec<f64>> {
    for f in fs.iter_mut() {
        f();
    }
    let mut out = vec![Vec::with_capacity(reps); fs.len()];
    for _ in 0..reps.max(1) {
        for (f, times) in fs.iter_mut().zip(out.iter_mut()) {
            let t = Instant::now();
            f();
            times.push(t.elapsed().as_secs_f64());
        }
    }
    out
}

/// CPU time used by this process and by the whole machine, from `/proc` (Linux), to tell how
/// much of the 2 cores other processes took while a bench ran.
pub struct Load {
    start: Instant,
    own: f64,
    busy: f64,
}

fn proc_times() -> Option<(f64, f64)> {
    let tick = 100.0; // USER_HZ, 100 on Linux x86_64
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let own = (f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / tick;
    let sys = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<f64> = sys
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...; busy = all but idle and iowait.
    let busy = cpu
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum::<f64>()
        / tick;
    Some((own, busy))
}

impl Load {
    pub fn start() -> Load {
        let (own, busy) = proc_times().unwrap_or((0.0, 0.0));
        Load {
            start: Instant::now(),
            own,
            busy,
        }
    }

    /// `(cores used by this process, cores used by everything else)` on average since `start`.
    pub fn finish(&self) -> (f64, f64) {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let (own, busy) = proc_times().unwrap_or((self.own, self.busy));
        let mine = (own - self.own) / wall;
        (mine, ((busy - self.busy) / wall - mine).max(0.0))
    }
}

/// Median, minimum and maximum of a non-empty sample.
pub fn summary(samples: &[f64]) -> (f64, f64, f64) {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).expect("times are finite"));
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    };
    (median, s[0], s[n - 1])
}

/// Command line of a bench binary: bare integers (sizes) and `key=value` options. Flags that
/// cargo adds (`--bench`) are ignored.
pub struct Args {
    pub sizes: Vec<usize>,
    pub options: Vec<(String, String)>,
}

impl Args {
    pub fn parse(usage: &str) -> Args {
        let mut sizes = Vec::new();
        let mut options = Vec::new();
        for arg in std::env::args().skip(1) {
            if arg.starts_with("--") {
                if arg == "--help" || arg == "-h" {
                    println!("{usage}");
                    std::process::exit(0);
                }
                continue;
            }
            if let Some((k, v)) = arg.split_once('=') {
                options.push((k.to_string(), v.to_string()));
            } else if let Ok(n) = arg.parse::<usize>() {
                sizes.push(n);
            } else {
                eprintln!("unrecognised argument `{arg}`\n{usage}");
                std::process::exit(2);
            }
        }
        Args { sizes, options }
    }

    /// The value of option `key` (an integer), or `default`.
    pub fn get(&self, key: &str, default: usize) -> usize {
        match self.options.iter().rev().find(|(k, _)| k == key) {
            Some((_, v)) => v.parse().unwrap_or_else(|_| {
                eprintln!("option {key} expects a non-negative integer, found `{v}`");
                std::process::exit(2)
            }),
            None => default,
        }
    }
}

/// Column means of `x` (`rows x d`), the reference vector the engine takes from unit 0.
pub fn column_means(x: ndarray::ArrayView2<f32>) -> Vec<f32> {
    let n = x.nrows().max(1) as f64;
    let mut s = vec![0.0f64; x.ncols()];
    for row in x.rows() {
        for (a, &v) in s.iter_mut().zip(row) {
            *a += v as f64;
        }
    }
    s.iter().map(|v| (v / n) as f32).collect()
}
