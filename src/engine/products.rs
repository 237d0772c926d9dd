//! The distributed Gram products: a stage leader's `Σ_r G_r·Q` ([`apply`]) and summed Gram
//! ([`gram`]) over Grams that stay on their ranks, each rank multiplying its own (on the host, or
//! on its GPU with an all-reduce there); the stage's other ranks [`serve`] the leader's commands
//! ([`super::messages`]).

use super::accounting::Wire;
use super::messages::{send, Command};
use crate::device::gpu::DeviceBuffer;
use crate::stats::exact::{pack_upper, unpack_upper};
use crate::stats::InputStats;
use crate::{Error, Result};
use ndarray::{Array2, ArrayView2};

/// This rank's part of `Σ_r G_r·Q` for `input`, summed over the stage: host Grams by `dsymm`
/// and a host all-reduce, Grams on a GPU by cuBLAS `dsymm` there and an all-reduce of the
/// products in GPU memory (NCCL), copied to the host for the leader's iteration.
fn gram_product(
    stage: &Wire,
    stats: &[Option<InputStats>],
    input: usize,
    q: ArrayView2<f64>,
) -> Result<Array2<f64>> {
    match stats.get(input) {
        Some(Some(InputStats::Exact(e))) => {
            let mut z = e.gram_apply(q)?;
            stage.all_reduce_sum(z.as_slice_mut().expect("owned standard layout"))?;
            Ok(z)
        }
        Some(Some(InputStats::Device(x))) if x.sketch().is_none() => {
            let mut z = x.gram_apply(q)?;
            stage.all_reduce_device(&mut z)?;
            Ok(Array2::from_shape_vec(q.dim(), z.to_host()?).expect("d x m products"))
        }
        _ => Err(not_exact(input)),
    }
}

/// The upper triangle of `input`'s Gram, packed row by row, summed over the stage (on the GPU
/// for device statistics).
fn summed_gram(stage: &Wire, stats: &[Option<InputStats>], input: usize) -> Result<Vec<f64>> {
    match stats.get(input) {
        Some(Some(InputStats::Exact(e))) => {
            let mut packed = Vec::new();
            pack_upper(e.gram(), e.dim(), &mut packed);
            stage.all_reduce_sum(&mut packed)?;
            Ok(packed)
        }
        Some(Some(InputStats::Device(x))) if x.sketch().is_none() => {
            let mut packed = x.packed_gram()?;
            stage.all_reduce_device(&mut packed)?;
            packed.to_host()
        }
        _ => Err(not_exact(input)),
    }
}

fn not_exact(input: usize) -> Error {
    Error::Comm(format!("the stage leader asked for Gram products of input {input}, which has no exact statistics on this rank"))
}

/// Stage leader: `Σ_r G_r·Q` for `input` over the stage, every rank multiplying its own Gram.
pub fn apply(
    stage: &Wire,
    stats: &[Option<InputStats>],
    input: usize,
    q: ArrayView2<f64>,
) -> Result<Array2<f64>> {
    if stage.comm.size() > 1 {
        send(
            stage,
            &Command::Apply {
                input,
                q: q.to_owned(),
            },
        )?;
    }
    gram_product(stage, stats, input, q)
}

/// Stage leader: the summed Gram (upper triangle) of `input`.
pub fn gram(stage: &Wire, stats: &[Option<InputStats>], input: usize) -> Result<Vec<f64>> {
    if stage.comm.size() > 1 {
        send(stage, &Command::Gram { input })?;
    }
    let d = stats
        .get(input)
        .and_then(|s| s.as_ref())
        .map_or(0, |s| s.dim());
    let packed = summed_gram(stage, stats, input)?;
    let mut g = vec![0.0; d * d];
    unpack_upper(&packed, d, &mut g);
    Ok(g)
}

/// The stage's other ranks: serve the stage leader's products until `Done` or an abort.
pub fn serve(stage: &Wire, stats: &[Option<InputStats>]) -> Result<()> {
    loop {
        let mut buf = Vec::new();
        stage.broadcast(&mut buf, 0)?;
        match Command::decode(&buf)? {
            Command::Apply { input, q } => {
                gram_product(stage, stats, input, q.view())?;
            }
            Command::Gram { input } => {
                summed_gram(stage, stats, input)?;
            }
            Command::Done => return Ok(()),
            Command::Abort(msg) => {
                return Err(Error::Comm(format!("the stage leader failed: {msg}")))
            }
        }
    }
}
