//! Dense linear algebra on row-major `ndarray` matrices, and the threads eva's own loops run on.
//!
//! | module | what |
//! |---|---|
//! | `threads` | the thread count and the one scheduler of eva's parallel loops ([`par_tiles`], [`par_groups`], [`par_rows`]) |
//! | `blas` | CBLAS on the calling thread: [`sgemm`], the [`Gemm`] scalars |
//! | `tiled` | products tiled over their output: [`linear_f32`], [`syrk_accumulate`], [`symm_upper`], [`gemm_square`] |
//! | `lapack` | LAPACK `xsyevr`: [`sym_eig_top`] for the [`Syevr`] scalars |
//! | `dense` | small dense decompositions (faer), the triangular solve, [`cholqr2`] |
//!
//! **Threads.** OpenBLAS runs every call on the calling thread; eva's own kernels cut their work
//! into tiles whose shapes depend on the problem alone ([`tiles`]) and spread the tiles over
//! [`threads`] threads ([`par_tiles`]). OpenBLAS's multi-threaded calls cut a product by their
//! thread count, which changes f32 rounding (measured: 1 vs 2 threads differ in ~10 % of the
//! entries of a 640 x 1536 `sgemm`, ~3 % of an `ssyrk`'s); with fixed tiles the activations and
//! Gram products are bitwise the same whatever `--threads` and however many ranks share a node.
//! Loops over independent rows or heads ([`par_rows`], [`par_groups`]) may cut them by the
//! thread count: each row or head is computed by the same code whichever thread takes it.

mod blas;
mod dense;
mod lapack;
mod threads;
mod tiled;

pub use blas::{sgemm, Gemm};
pub use dense::{
    cholesky_lower, cholqr2, orthonormalize_householder, smallest_singular_value,
    solve_right_lower_transpose, sym_eig_desc, thin_svd_left,
};
pub use lapack::{sym_eig_top, Syevr};
pub use threads::{par_groups, par_map, par_rows, par_tiles, set_threads, threads, tiles};
pub use tiled::{gemm_square, linear_f32, symm_upper, syrk_accumulate};

use crate::{Error, Result};

/// `n` as a BLAS/LAPACK 32-bit integer, or an error naming the routine.
fn int(n: usize, what: &'static str) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::Numeric {
        op: what,
        detail: format!("dimension {n} exceeds the BLAS 32-bit limit"),
    })
}

/// Seeded standard-normal f32 values.
#[cfg(test)]
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = crate::rng::Rng::new(&[seed]);
    (0..n).map(|_| rng.normal() as f32).collect()
}
