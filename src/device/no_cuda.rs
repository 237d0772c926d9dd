//! Twin of the CUDA backend for builds without the `cuda` feature: [`Cuda`] cannot be
//! constructed, so every dispatch path still type-checks and `--device cuda` is a typed error.
//! It implements the same traits as the real backend ([`Backend`], [`Gpu`], [`DeviceBuffer`],
//! [`GramAccumulator`], [`SketchAccumulator`]), so the compiler keeps it complete.

use super::backend::{Activation, AttentionMask, Backend, Heads, Segments};
use super::gpu::{CudaOptions, DeviceBuffer, Gpu, GramAccumulator, MomentSums, SketchAccumulator};
use super::host::HostTensor;
use crate::config::validate::DType;
use crate::{Error, Result};
use ndarray::{Array2, ArrayView2};
use std::convert::Infallible;
use std::sync::Arc;

/// An activation on the GPU: none exists in this build.
pub type CudaTensor = Infallible;

/// Uninhabited: this eva was built without CUDA.
pub enum Cuda {}

/// An activation over another library's GPU memory: none exists in this build.
pub enum BorrowedTensor {}

/// f64 values on a GPU: none exist in this build.
pub enum DeviceSums {}

/// An exact Gram on a GPU: none exists in this build.
pub enum DeviceGram {}

/// A sketch on a GPU: none exists in this build.
pub enum DeviceSketch {}

/// The error of every way into the GPU in this build.
fn not_compiled() -> Error {
    Error::NotCompiled {
        backend: "CUDA (--device cuda)",
        hint: "this eva was built without it; rebuild with `cargo build --release --features cuda` (no CUDA is needed to build; see docs/gpu.md)",
    }
}

/// Always fails in this build: `--device cuda` needs `--features cuda`.
pub fn available() -> Result<()> {
    Err(not_compiled())
}

/// Always fails in this build (see [`available`]).
pub fn device_count() -> Result<usize> {
    Err(not_compiled())
}

impl std::ops::Deref for BorrowedTensor {
    type Target = Infallible;
    fn deref(&self) -> &Infallible {
        match *self {}
    }
}

impl Gpu for Cuda {
    type Borrowed = BorrowedTensor;

    /// Always fails: rebuild with `--features cuda`.
    fn open(_: CudaOptions) -> Result<Self> {
        Err(not_compiled())
    }
    fn describe(&self) -> String {
        match *self {}
    }
    fn check(&self) -> Result<()> {
        match *self {}
    }
    fn synchronize(&self) -> Result<()> {
        match *self {}
    }
    fn to_device(&self, _: &Array2<f32>) -> Result<Infallible> {
        match *self {}
    }
    fn to_host(&self, _: &Infallible) -> Result<Array2<f32>> {
        match *self {}
    }
    fn alloc_tensor(&self, _: usize, _: usize, _: &str) -> Result<Infallible> {
        match *self {}
    }
    fn queue_finite(&self, _: &Infallible, _: String) -> Result<()> {
        match *self {}
    }
    fn settle_finite(&self) -> Result<()> {
        match *self {}
    }
    unsafe fn borrow(&self, _: u64, _: usize, _: usize) -> BorrowedTensor {
        match *self {}
    }
    fn raw_stream(&self) -> usize {
        match *self {}
    }
    fn on_low_memory(&self, _: Box<dyn Fn() + Send + Sync>) {
        match *self {}
    }
}

impl DeviceBuffer for DeviceSums {
    type Gpu = Cuda;

    fn zeros(gpu: &Arc<Cuda>, _: usize, _: &str) -> Result<Self> {
        match **gpu {}
    }
    fn len(&self) -> usize {
        match *self {}
    }
    fn gpu(&self) -> &Arc<Cuda> {
        match *self {}
    }
    fn to_host(&self) -> Result<Vec<f64>> {
        match *self {}
    }
    fn copy_from_host(&mut self, _: &[f64]) -> Result<()> {
        match *self {}
    }
}

impl GramAccumulator for DeviceGram {
    type Gpu = Cuda;
    type Sums = DeviceSums;

    fn new(gpu: &Cuda, _: &[f32], _: DType, _: usize) -> Result<Self> {
        match *gpu {}
    }
    fn dim(&self) -> usize {
        match *self {}
    }
    fn accumulate(&mut self, _: &Cuda, _: &Infallible) -> Result<()> {
        match *self {}
    }
    fn load(&mut self, _: &Cuda, _: &MomentSums, _: &[f64]) -> Result<()> {
        match *self {}
    }
    fn pack(&mut self, _: &Cuda, _: &mut DeviceSums, _: usize, _: bool) -> Result<usize> {
        match *self {}
    }
    fn apply(&self, _: &Arc<Cuda>, _: &[f64], _: usize) -> Result<DeviceSums> {
        match *self {}
    }
    fn packed(&self, _: &Arc<Cuda>) -> Result<DeviceSums> {
        match *self {}
    }
    fn snapshot(&self, _: &Cuda) -> Result<(MomentSums, Vec<f64>)> {
        match *self {}
    }
}

impl SketchAccumulator for DeviceSketch {
    type Gpu = Cuda;
    type Sums = DeviceSums;

    fn new(gpu: &Cuda, _: &[f32], _: &[f32], _: usize) -> Result<Self> {
        match *gpu {}
    }
    fn dim(&self) -> usize {
        match *self {}
    }
    fn columns(&self) -> usize {
        match *self {}
    }
    fn accumulate(&mut self, _: &Cuda, _: &Infallible) -> Result<()> {
        match *self {}
    }
    fn load(&mut self, _: &Cuda, _: &MomentSums, _: &[f64]) -> Result<()> {
        match *self {}
    }
    fn pack(&mut self, _: &Cuda, _: &mut DeviceSums, _: usize) -> Result<usize> {
        match *self {}
    }
    fn snapshot(&self, _: &Cuda) -> Result<(MomentSums, Vec<f64>)> {
        match *self {}
    }
}

impl Backend for Cuda {
    type Tensor = Infallible;
    type RopeTables = Infallible;
    type Weight = Infallible;

    fn name(&self) -> &'static str {
        match *self {}
    }
    fn weight(&self, _: &HostTensor) -> Result<Infallible> {
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
    fn reshape(&self, _: Infallible, _: usize) -> Infallible {
        match *self {}
    }
    fn rms_norm(&self, _: &Infallible, _: &Infallible, _: f32) -> Infallible {
        match *self {}
    }
    fn layer_norm(&self, _: &Infallible, _: &Infallible, _: &Infallible, _: f32) -> Infallible {
        match *self {}
    }
    fn rope_tables(&self, _: Array2<f32>, _: Array2<f32>) -> Infallible {
        match *self {}
    }
    fn rope(&self, _: &mut Infallible, _: usize, _: &Infallible) {
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
    fn gather(&self, _: &Infallible, _: &[usize]) -> Infallible {
        match *self {}
    }
    fn scatter_add(&self, _: &mut Infallible, _: &Infallible, _: &[usize], _: &[f32]) {
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
    use super::*;

    #[test]
    fn asking_for_cuda_in_a_cpu_build_is_exit_code_2() {
        let e = Cuda::open(Default::default())
            .err()
            .expect("cannot construct");
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--features cuda"), "{e}");
    }
}
