//! Twin of the CUDA backend for builds without the `cuda` feature: [`Cuda`] cannot be
//! constructed, so every dispatch path still type-checks and `--device cuda` is a typed error.

use super::checkpoint::HostTensor;
use super::ops::{self, Activation, AttentionMask, Heads, Segments};
use crate::stats::InputStats;
use crate::{Error, Result};
use ndarray::{Array2, ArrayView2};
use std::convert::Infallible;
use std::sync::Arc;

/// An activation on the GPU: none exists in this build.
pub type CudaTensor = Infallible;

/// An activation over another library's GPU memory: none exists in this build.
pub type BorrowedTensor = Infallible;

/// Storage type of the weight matrices on the device (`--dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DType {
    /// bfloat16 matrices.
    #[default]
    Bf16,
    /// f32 matrices.
    F32,
}

/// How to open the GPU.
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    /// Device ordinal.
    pub ordinal: usize,
    /// Weight storage.
    pub dtype: DType,
    /// The layer slice this rank holds, for out-of-memory messages.
    pub slice: String,
}

/// Always fails in this build: `--device cuda` needs `--features cuda`.
pub fn available() -> Result<()> {
    Cuda::new(CudaOptions::default()).map(|_| ())
}

/// Always fails in this build (see [`available`]).
pub fn device_count() -> Result<usize> {
    available().map(|_| 0)
}

/// Uninhabited: this eva was built without CUDA.
pub enum Cuda {}

impl Cuda {
    /// Always fails: rebuild with `--features cuda`.
    pub fn new(_opts: CudaOptions) -> Result<Self> {
        Err(Error::NotCompiled {
            backend: "CUDA (--device cuda)",
            hint: "this eva was built without it; rebuild with `cargo build --release --features cuda` (no CUDA is needed to build; see docs/gpu.md)",
        })
    }

    /// Unreachable (no value exists).
    pub fn check(&self) -> Result<()> {
        match *self {}
    }

    /// Unreachable (no value exists).
    pub fn describe(&self) -> String {
        match *self {}
    }

    /// Unreachable (no value exists).
    pub fn from_host(&self, _: &Array2<f32>) -> Result<Infallible> {
        match *self {}
    }

    /// Unreachable (no value exists).
    pub fn to_host(&self, _: &Infallible) -> Result<Array2<f32>> {
        match *self {}
    }

    /// Unreachable (no value exists).
    pub fn all_finite(&self, _: &Infallible) -> Result<bool> {
        match *self {}
    }

    /// Unreachable (no value exists).
    pub fn select(&self, _: &Infallible, _: &[usize]) -> Infallible {
        match *self {}
    }

    /// Unreachable (no value exists).
    ///
    /// # Safety
    ///
    /// None needed: it cannot be called.
    pub unsafe fn borrow(&self, _: u64, _: usize, _: usize) -> Infallible {
        match *self {}
    }

    /// Unreachable (no value exists).
    pub fn raw_stream(&self) -> usize {
        match *self {}
    }
}

/// Statistics on a GPU: none exist in this build (uninhabited).
pub enum DeviceStats {}

impl DeviceStats {
    /// Unreachable: no [`Cuda`] exists.
    pub fn new(gpu: &Arc<Cuda>, _: &InputStats) -> Result<Self> {
        match **gpu {}
    }
    /// Unreachable (no value exists).
    pub fn gpu(&self) -> &Arc<Cuda> {
        match *self {}
    }
    /// Unreachable (no value exists).
    pub fn dim(&self) -> usize {
        match *self {}
    }
    /// Unreachable (no value exists).
    pub fn sketch(&self) -> Option<&crate::stats::sketch::SketchStats> {
        match *self {}
    }
    /// Unreachable (no value exists).
    pub fn accumulate(&mut self, _: &Infallible) -> Result<()> {
        match *self {}
    }
    /// Unreachable (no value exists).
    pub fn accumulate_host(&mut self, _: ArrayView2<f32>) -> Result<()> {
        match *self {}
    }
    /// Unreachable (no value exists).
    pub fn packed_len(&self, _: bool) -> usize {
        match *self {}
    }
    /// Unreachable (no value exists).
    pub fn pack(&mut self, _: &mut DeviceSums, _: usize, _: bool) -> Result<usize> {
        match *self {}
    }
    /// Unreachable (no value exists).
    pub fn gram_apply(&self, _: ArrayView2<f64>) -> Result<DeviceSums> {
        match *self {}
    }
    /// Unreachable (no value exists).
    pub fn packed_gram(&self) -> Result<DeviceSums> {
        match *self {}
    }
    /// Unreachable (no value exists).
    pub fn to_host(&self) -> Result<InputStats> {
        match *self {}
    }
}

/// f64 values on a GPU: none exist in this build (uninhabited).
pub enum DeviceSums {}

impl DeviceSums {
    /// Unreachable: no [`Cuda`] exists.
    pub fn zeros(gpu: &Arc<Cuda>, _: usize, _: &str) -> Result<Self> {
        match **gpu {}
    }
    /// Unreachable (no value exists).
    pub fn len(&self) -> usize {
        match *self {}
    }
    /// Unreachable (no value exists).
    pub fn is_empty(&self) -> bool {
        match *self {}
    }
    /// Unreachable (no value exists).
    pub fn gpu(&self) -> &Arc<Cuda> {
        match *self {}
    }
    /// Unreachable (no value exists).
    pub fn to_host(&self) -> Result<Vec<f64>> {
        match *self {}
    }
    /// Unreachable (no value exists).
    pub fn copy_from_host(&mut self, _: &[f64]) -> Result<()> {
        match *self {}
    }
}

impl ops::Backend for Cuda {
    type Tensor = Infallible;
    type Weight = Infallible;

    fn name(&self) -> &'static str {
        match *self {}
    }
    fn weight(&self, _: &HostTensor) -> Result<Infallible> {
        match *self {}
    }
    fn weight_shape<'a>(&self, _: &'a Infallible) -> &'a [usize] {
        match *self {}
    }
    fn zeros(&self, _: usize, _: usize) -> Infallible {
        match *self {}
    }
    fn embed(&self, _: &mut Infallible, _: &Infallible, _: &[u32], _: &str) -> Result<()> {
        match *self {}
    }
    fn linear(&self, _: &Infallible, _: &Infallible, _: Option<&Infallible>) -> Infallible {
        match *self {}
    }
    fn add(&self, _: &mut Infallible, _: &Infallible) {
        match *self {}
    }
    fn rms_norm(&self, _: &Infallible, _: &Infallible, _: f32) -> Infallible {
        match *self {}
    }
    fn layer_norm(&self, _: &Infallible, _: &Infallible, _: &Infallible, _: f32) -> Infallible {
        match *self {}
    }
    fn rope(&self, _: &mut Infallible, _: usize, _: &Array2<f32>, _: &Array2<f32>) {
        match *self {}
    }
    fn attention(
        &self,
        _: &Infallible,
        _: &Infallible,
        _: &Infallible,
        _: Heads,
        _: &Segments,
        _: AttentionMask,
    ) -> Infallible {
        match *self {}
    }
    fn activate(&self, _: &mut Infallible, _: Activation) {
        match *self {}
    }
    fn gated(&self, _: &Infallible, _: &Infallible, _: Activation) -> Infallible {
        match *self {}
    }
    fn rows(&self, _: &Infallible, _: &[usize]) -> Array2<f32> {
        match *self {}
    }
    fn host_view<'a>(&self, _: &'a Infallible) -> Option<ArrayView2<'a, f32>> {
        match *self {}
    }
    fn dim(&self, _: &Infallible) -> usize {
        match *self {}
    }
    fn tokens(&self, _: &Infallible) -> usize {
        match *self {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn asking_for_cuda_in_a_cpu_build_is_exit_code_2() {
        let e = super::Cuda::new(Default::default())
            .err()
            .expect("cannot construct");
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--features cuda"), "{e}");
    }
}
