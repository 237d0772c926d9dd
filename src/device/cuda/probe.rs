//! Which CUDA libraries load, checked before any cudarc call (cudarc panics on a missing one).

use super::runtime::driver;
use crate::device::error::DeviceError;

/// A library cudarc loads dynamically: its cudarc name, what it is, and what provides it.
struct Lib {
    name: &'static str,
    what: &'static str,
    hint: &'static str,
    present: unsafe fn() -> bool,
}

const LIBS: [Lib; 3] = [
    Lib { name: "cuda", what: "the CUDA driver library", hint: " (it comes with the NVIDIA driver; none is installed, or this machine has no GPU)", present: cudarc::driver::sys::is_culib_present },
    Lib { name: "nvrtc", what: "NVRTC (CUDA's runtime compiler)", hint: " (pip's nvidia-cuda-nvrtc or the CUDA toolkit; a `libnvrtc.so` symlink in a directory on LD_LIBRARY_PATH serves any version)", present: cudarc::nvrtc::sys::is_culib_present },
    Lib { name: "cublas", what: "cuBLAS", hint: " (pip's nvidia-cublas or the CUDA toolkit; this eva was built for the CUDA version in CUDARC_CUDA_VERSION at build time, see docs/gpu.md)", present: cudarc::cublas::sys::is_culib_present },
];

/// The file names cudarc tries for a library, in order.
pub fn candidates(name: &str) -> Vec<String> {
    cudarc::get_lib_name_candidates(name)
}

/// `Ok` when the driver, NVRTC and cuBLAS all load; otherwise the first missing one, named
/// with the file names tried and `LD_LIBRARY_PATH`.
pub fn libraries() -> Result<(), DeviceError> {
    for lib in &LIBS {
        // SAFETY: the probe only tries to load the shared library (libloading).
        if !unsafe { (lib.present)() } {
            return Err(missing(lib.what, lib.name, lib.hint));
        }
    }
    Ok(())
}

/// The number of GPUs the driver sees (at least one), after [`libraries`].
pub fn devices() -> Result<usize, DeviceError> {
    libraries()?;
    let visible = || std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into());
    let count = cudarc::driver::CudaContext::device_count().map_err(|e| match e.0 {
        cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => DeviceError::NoDevice(format!(
            "the CUDA driver loaded but found no GPU (CUDA_VISIBLE_DEVICES={})",
            visible()
        )),
        _ => driver("driver initialization")(e),
    })?;
    if count <= 0 {
        return Err(DeviceError::NoDevice(format!(
            "the CUDA driver loaded but found no GPU (CUDA_VISIBLE_DEVICES={})",
            visible()
        )));
    }
    Ok(count as usize)
}

/// The error for a missing library.
pub fn missing(what: &'static str, name: &str, hint: &'static str) -> DeviceError {
    let mut seen = std::collections::HashSet::new();
    let names: Vec<String> = candidates(name)
        .into_iter()
        .filter(|n| seen.insert(n.clone()))
        .collect();
    DeviceError::Missing {
        what,
        names: names.join(", "),
        ld_library_path: std::env::var("LD_LIBRARY_PATH").unwrap_or_else(|_| "unset".into()),
        hint,
    }
}
