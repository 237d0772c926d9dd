//! Captured activations as the layers above receive them, wherever the backend computed them:
//! the rows of one layer input ([`Rows`]), a pipeline stage's hidden state ([`Hidden`]), and the
//! [`Capture`] of a backend's activation (on a GPU the rows stay on it).

use super::backend::Backend;
use super::cpu::Cpu;
use super::cuda::{Cuda, CudaTensor};
use super::gpu::{Gpu, NonFinite};
use crate::Result;
use ndarray::{Array2, ArrayView2, CowArray, Ix2};
use std::sync::Arc;

/// The captured rows (`tokens x dim`, f32) of one unique input: a host matrix, or a buffer on
/// the GPU that ran the forward pass (`--device cuda`), which the device statistics take as it is.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    /// Rows in host memory (the CPU forward pass, activation files, synthetic data).
    Host(ArrayView2<'a, f32>),
    /// Rows on `gpu` (row-major `[tokens, dim]`).
    Device { gpu: &'a Cuda, x: &'a CudaTensor },
}

impl<'a> Rows<'a> {
    /// Token rows.
    pub fn nrows(&self) -> usize {
        match self {
            Rows::Host(x) => x.nrows(),
            Rows::Device { gpu, x } => gpu.tokens(x),
        }
    }

    /// Features.
    pub fn ncols(&self) -> usize {
        match self {
            Rows::Host(x) => x.ncols(),
            Rows::Device { gpu, x } => gpu.dim(x),
        }
    }

    /// The rows in host memory: a view of host rows, a copy of device rows.
    pub fn to_host(&self) -> Result<CowArray<'a, f32, Ix2>> {
        match *self {
            Rows::Host(x) => Ok(CowArray::from(x)),
            Rows::Device { gpu, x } => Ok(CowArray::from(gpu.to_host(x)?)),
        }
    }

    /// [`check_finite`] wherever the rows are. On a GPU the check is queued and `context` is
    /// taken now: the verdict comes with [`Gpu::settle_finite`], which the engine asks for
    /// before the agreement that ends its read (so a GPU capture never waits for the device).
    pub fn check_finite(&self, context: impl FnOnce() -> String) -> Result<()> {
        match *self {
            Rows::Host(x) => check_finite(x, context),
            Rows::Device { gpu, x } => gpu.queue_finite(x, context()),
        }
    }
}

/// What one pipeline stage hands the next for a pass: the hidden state after its last block
/// (`tokens x hidden`, f32), where the stage computed it, so that `--device cuda` stages pass it
/// GPU to GPU (the engine's `Wire::send_hidden`).
pub enum Hidden {
    /// In host memory (the CPU forward pass).
    Host(ndarray::Array2<f32>),
    /// On `gpu`, the GPU that ran the stage's forward pass (`--device cuda`).
    Device { gpu: Arc<Cuda>, x: CudaTensor },
}

impl Hidden {
    /// The hidden state in host memory (a copy of one on a GPU).
    pub fn into_host(self) -> Result<ndarray::Array2<f32>> {
        match self {
            Hidden::Host(h) => Ok(h),
            Hidden::Device { gpu, x } => gpu.to_host(&x),
        }
    }

    /// The hidden state on `gpu` (an upload of one in host memory).
    pub fn into_device(self, gpu: &Cuda) -> Result<CudaTensor> {
        match self {
            Hidden::Host(h) => gpu.to_device(&h),
            Hidden::Device { x, .. } => Ok(x),
        }
    }
}

/// The kept rows of one activation: the activation itself when every row is kept, else a
/// gathered copy, on the host or on the GPU that computed it.
pub enum Captured<'a> {
    /// Host rows (borrowed when every row is kept).
    Host(CowArray<'a, f32, Ix2>),
    /// Every row of an activation on `gpu`.
    Device { gpu: &'a Cuda, x: &'a CudaTensor },
    /// The kept rows, gathered on `gpu`.
    Gathered { gpu: &'a Cuda, x: CudaTensor },
}

impl Captured<'_> {
    /// The rows, for the statistics.
    pub fn rows(&self) -> Rows<'_> {
        match self {
            Captured::Host(x) => Rows::Host(x.view()),
            Captured::Device { gpu, x } => Rows::Device { gpu, x },
            Captured::Gathered { gpu, x } => Rows::Device { gpu, x },
        }
    }
}

/// A backend whose activations the statistics can take: where they are, without a copy when
/// every row is kept.
pub trait Capture: Backend {
    /// The token rows `keep` (in order) of `x`; `keep` lists every row when nothing is masked.
    fn capture<'a>(&'a self, x: &'a Self::Tensor, keep: &[usize]) -> Captured<'a>;
}

impl Capture for Cpu {
    fn capture<'a>(&'a self, x: &'a Array2<f32>, keep: &[usize]) -> Captured<'a> {
        if keep.len() == x.nrows() {
            Captured::Host(CowArray::from(x.view()))
        } else {
            Captured::Host(CowArray::from(self.gather(x, keep)))
        }
    }
}

impl Capture for Cuda {
    // Without the `cuda` feature no device tensor exists, so the gather is dead code there.
    #[cfg_attr(not(eva_gpu), allow(unreachable_code))]
    fn capture<'a>(&'a self, x: &'a CudaTensor, keep: &[usize]) -> Captured<'a> {
        if keep.len() == self.tokens(x) {
            Captured::Device { gpu: self, x }
        } else {
            Captured::Gathered {
                gpu: self,
                x: self.gather(x, keep),
            }
        }
    }
}

/// Fails on the first NaN or infinity in `rows`, naming where it came from.
pub fn check_finite(rows: ArrayView2<f32>, context: impl FnOnce() -> String) -> Result<()> {
    // Fast path: an OR over exponent bits (all ones = NaN or infinity) vectorizes.
    let nonfinite = |v: &f32| ((v.to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32;
    let any = match rows.as_slice() {
        Some(s) => s.iter().fold(0, |a, v| a | nonfinite(v)),
        None => rows.iter().fold(0, |a, v| a | nonfinite(v)),
    };
    if any == 0 {
        return Ok(());
    }
    if let Some(((token, feature), &value)) = rows.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(NonFinite {
            what: context(),
            value,
            token,
            feature,
        }
        .into_error());
    }
    Ok(())
}
