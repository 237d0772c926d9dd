//! The CUDA C kernels ([`SOURCE`], `kernels.cu`), their NVRTC compilation and their launch
//! shapes.
//!
//! | item | role |
//! |---|---|
//! | [`SOURCE`], [`NAMES`] | the kernels' source and every entry point in it |
//! | [`compile`] | NVRTC to PTX for one virtual architecture (`compute_90`); no GPU needed |
//! | [`Shape`] | grid/block of each kind of launch, checked against the hardware limits |

use crate::device::error::DeviceError;
#[cfg(feature = "cuda")]
use cudarc::nvrtc::{CompileOptions, Ptx};

/// The kernels, CUDA C, self-contained (no `#include`: NVRTC needs no CUDA headers).
pub const SOURCE: &str = include_str!("kernels.cu");

/// Every `extern "C" __global__` function of [`SOURCE`].
pub const NAMES: [&str; 17] = [
    "cast_bf16",
    "embed_f32",
    "embed_bf16",
    "fill_rows",
    "add",
    "rms_norm",
    "layer_norm",
    "rope",
    "attention",
    "activate_inplace",
    "gated",
    "gather_rows",
    "scatter_add_rows",
    "shift_moments",
    "flush_f64",
    "pack_upper_f64",
    "flag_nonfinite",
];

/// Threads per block of every kernel; equals `BLOCK` in `kernels.cu` (the block reductions and
/// the attention tiles assume it).
pub const BLOCK: u32 = 256;

/// Largest head dimension the attention kernel holds (four values per thread).
pub const MAX_HEAD_DIM: usize = 4 * BLOCK as usize;

/// Rows of each f32 partial sum of the moments, as the CPU's [`crate::device::blocks::SUM_BLOCK`].
pub const SUM_BLOCK: i32 = crate::device::blocks::SUM_BLOCK as i32;

/// Blocks of a grid-stride launch at most (enough to fill any current GPU several times).
const MAX_GRID: usize = 65_535;

/// The NVRTC options: the architecture and `--fmad=false`, so that `a * b + c` is two roundings
/// as in the CPU reference (these kernels are memory-bound; the products go through cuBLAS).
#[cfg(feature = "cuda")]
pub fn options(arch: &str) -> CompileOptions {
    CompileOptions {
        fmad: Some(false),
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++14".into()],
        name: Some("eva_kernels.cu".into()),
        ..Default::default()
    }
}

/// The virtual architecture of a compute capability (`(9, 0)` → `compute_90`): PTX that the
/// driver JIT-compiles for the device at load time.
#[cfg(feature = "cuda")]
pub fn arch(major: i32, minor: i32) -> String {
    format!("compute_{major}{minor}")
}

/// Compiles [`SOURCE`] to PTX for `arch`. Needs `libnvrtc.so` (probed by the caller).
#[cfg(feature = "cuda")]
pub fn compile(arch: &str) -> Result<Ptx, DeviceError> {
    cudarc::nvrtc::compile_ptx_with_opts(SOURCE, options(arch)).map_err(|e| DeviceError::Compile {
        arch: arch.to_string(),
        detail: match e {
            cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. } => {
                format!("{:?}: {}", nvrtc.0, log.to_string_lossy())
            }
            e => format!("{e:?}"),
        },
    })
}

/// One launch's grid and block dimensions (x, y, z) and dynamic shared memory, as CUDA takes
/// them (the runtime hands them to the driver as they are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Blocks.
    pub grid_dim: (u32, u32, u32),
    /// Threads per block.
    pub block_dim: (u32, u32, u32),
    /// Dynamic shared memory per block (the kernels use static shared memory only).
    pub shared_mem_bytes: u32,
}

/// One kernel parameter: a device pointer or count (`u64`, `unsigned long long` / `T*`), a size
/// (`int`) or a scalar (`float`).
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    U64(u64),
    I32(i32),
    F32(f32),
}

impl From<u64> for Arg {
    fn from(v: u64) -> Self {
        Arg::U64(v)
    }
}

impl From<i32> for Arg {
    fn from(v: i32) -> Self {
        Arg::I32(v)
    }
}

impl From<f32> for Arg {
    fn from(v: f32) -> Self {
        Arg::F32(v)
    }
}

/// Launch shapes. Every kernel runs [`BLOCK`] threads per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// A grid-stride loop over `n` elements.
    Elements(usize),
    /// One block per row.
    Rows(usize),
    /// One thread per feature (the moments).
    Features(usize),
    /// One block per (query token, head).
    Attention { tokens: usize, heads: usize },
}

impl Shape {
    /// The launch configuration, or `None` when there is nothing to do (no launch).
    pub fn config(self) -> Result<Option<Launch>, DeviceError> {
        let grid = |x: usize, y: usize| Launch {
            grid_dim: (x as u32, y as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let too_big = |what: &str, n: usize, max: usize| DeviceError::Unsupported {
            op: "kernel launch",
            detail: format!("{what}: at most {max}, found {n}"),
        };
        Ok(match self {
            Shape::Elements(0)
            | Shape::Rows(0)
            | Shape::Features(0)
            | Shape::Attention { tokens: 0, .. }
            | Shape::Attention { heads: 0, .. } => None,
            Shape::Elements(n) => Some(grid(n.div_ceil(BLOCK as usize).min(MAX_GRID), 1)),
            Shape::Rows(n) => {
                if n > i32::MAX as usize {
                    return Err(too_big("rows", n, i32::MAX as usize));
                }
                Some(grid(n, 1))
            }
            Shape::Features(d) => Some(grid(d.div_ceil(BLOCK as usize), 1)),
            Shape::Attention { tokens, heads } => {
                if tokens > i32::MAX as usize {
                    return Err(too_big("tokens", tokens, i32::MAX as usize));
                }
                if heads > 65_535 {
                    return Err(too_big("attention heads", heads, 65_535));
                }
                Some(grid(tokens, heads))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_listed_and_every_listed_kernel_exists() {
        let defined: Vec<&str> = SOURCE
            .split("extern \"C\" __global__ void ")
            .skip(1)
            .map(|s| s.split('(').next().expect("a name before the parameters"))
            .collect();
        let mut want = NAMES.to_vec();
        want.sort_unstable();
        let mut got = defined.clone();
        got.sort_unstable();
        assert_eq!(got, want);
        assert!(
            SOURCE.contains(&format!("#define BLOCK {BLOCK}\n")),
            "kernels.cu's BLOCK differs from kernels::BLOCK"
        );
        assert!(
            !SOURCE.contains("#include"),
            "the kernels must stay self-contained (NVRTC without CUDA headers)"
        );
    }

    #[test]
    fn launch_shapes_cover_the_work_within_limits() {
        let c = Shape::Elements(1000).config().unwrap().unwrap();
        assert_eq!((c.grid_dim, c.block_dim), ((4, 1, 1), (256, 1, 1)));
        // Grid-stride loops cap the grid; the loop covers the rest.
        let c = Shape::Elements(1 << 40).config().unwrap().unwrap();
        assert_eq!(c.grid_dim.0, 65_535);
        let c = Shape::Rows(4096).config().unwrap().unwrap();
        assert_eq!(c.grid_dim, (4096, 1, 1));
        let c = Shape::Features(257).config().unwrap().unwrap();
        assert_eq!(c.grid_dim, (2, 1, 1));
        let c = Shape::Attention {
            tokens: 12,
            heads: 9,
        }
        .config()
        .unwrap()
        .unwrap();
        assert_eq!(c.grid_dim, (12, 9, 1));
        assert!(Shape::Elements(0).config().unwrap().is_none());
        assert!(Shape::Attention {
            tokens: 3,
            heads: 0
        }
        .config()
        .unwrap()
        .is_none());
        assert!(Shape::Attention {
            tokens: 3,
            heads: 70_000
        }
        .config()
        .is_err());
        assert!(Shape::Rows(1 << 33).config().is_err());
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn options_pin_the_architecture_and_two_roundings() {
        let o = options("compute_90");
        assert_eq!(o.fmad, Some(false));
        assert!(o
            .options
            .contains(&"--gpu-architecture=compute_90".to_string()));
        assert_eq!(arch(8, 0), "compute_80");
    }

    /// Compiles every kernel with NVRTC for sm_80 (A100) and sm_90 (H100/H200) and checks that
    /// the PTX defines each entry point. NVRTC needs no GPU (`scripts/fetch-nvrtc.sh` fetches
    /// it). With `EVA_REQUIRE_NVRTC=1` (set in CI) a missing NVRTC fails the test; without it the
    /// test says loudly that it compiled nothing and passes.
    #[cfg(feature = "cuda")]
    #[test]
    fn kernels_compile_with_nvrtc_for_sm80_and_sm90_or_report_nvrtc_missing() {
        let required = std::env::var("EVA_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
        // SAFETY: the probe only tries to load the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            let msg = format!(
                "NVRTC NOT FOUND: no kernel was compiled (looked for {:?} in LD_LIBRARY_PATH={:?}); run scripts/fetch-nvrtc.sh and put the directory it prints on LD_LIBRARY_PATH",
                cudarc::get_lib_name_candidates("nvrtc"),
                std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
            );
            assert!(!required, "{msg}");
            eprintln!("{msg} (EVA_REQUIRE_NVRTC=1 makes this a failure)");
            return;
        }
        for a in ["compute_80", "compute_90"] {
            let t = std::time::Instant::now();
            let ptx = compile(a).unwrap_or_else(|e| panic!("{e}"));
            let text = ptx.to_src();
            for name in NAMES {
                assert!(
                    text.contains(&format!(".entry {name}(")),
                    "PTX for {a} lacks the entry point {name}"
                );
            }
            eprintln!(
                "NVRTC compiled {} kernels for {a} in {:.2} s ({} bytes of PTX)",
                NAMES.len(),
                t.elapsed().as_secs_f64(),
                text.len()
            );
        }
    }
}
