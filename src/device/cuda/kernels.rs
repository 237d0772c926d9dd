//! The CUDA C kernels ([`SOURCE`], `kernels.cu`), their NVRTC compilation and their launch
//! shapes.
//!
//! | item | role |
//! |---|---|
//! | [`SOURCE`], [`NAMES`] | the kernels' source and every entry point in it |
//! | [`compile`] | NVRTC to PTX for one virtual architecture (`compute_90`); no GPU needed |
//! | [`target`], [`compile_cubin`], [`supported_archs`] | what `Runtime::open` loads: a CUBIN for the device's `sm_XY` (or the nearest older one of its major version this NVRTC knows), PTX only for a device newer than this NVRTC |
//! | [`Shape`] | grid/block of each kind of launch, checked against the hardware limits |

use crate::device::error::DeviceError;
#[cfg(feature = "cuda")]
use cudarc::nvrtc::{CompileOptions, Ptx};

/// The kernels, CUDA C, self-contained (no `#include`: NVRTC needs no CUDA headers).
pub const SOURCE: &str = include_str!("kernels.cu");

/// Every `extern "C" __global__` function of [`SOURCE`].
pub const NAMES: [&str; 18] = [
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
    "add_moments",
    "flush_f64",
    "pack_upper_f64",
    "first_nonfinite",
];

/// Threads per block of every kernel; equals `BLOCK` in `kernels.cu` (the block reductions and
/// the attention tiles assume it).
pub const BLOCK: u32 = 256;

/// Largest head dimension the attention kernel holds (a tile of four queries then fills its
/// shared memory).
pub const MAX_HEAD_DIM: usize = 4 * BLOCK as usize;

/// The attention kernel's shared-memory budget, as `ATT_T`, `ATT_Q` and `ATT_KV` in kernels.cu:
/// tiles of at most `ATT_T` queries and keys, `q_tile · head_dim ≤ ATT_Q` query values and
/// `k_tile · (head_dim + 1) ≤ ATT_KV` key (then value) values.
pub const ATT_T: usize = 32;
const ATT_Q: usize = 4096;
const ATT_KV: usize = 4160;

/// The attention kernel's tiles for `head_dim` (1 to [`MAX_HEAD_DIM`]): queries per block and
/// keys per step, as many as the shared memory holds, at most [`ATT_T`] each (head_dim 128: 32
/// and 32; 256: 16 and 16; 1024: 4 and 4).
pub fn attention_tiles(head_dim: usize) -> (usize, usize) {
    assert!(
        (1..=MAX_HEAD_DIM).contains(&head_dim),
        "attention_tiles: head_dim {head_dim} outside 1..={MAX_HEAD_DIM}"
    );
    (
        (ATT_Q / head_dim).min(ATT_T),
        (ATT_KV / (head_dim + 1)).min(ATT_T),
    )
}

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

/// What to compile the kernels to for a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Machine code for a real architecture (`sm_90`), loaded as it is: no driver JIT, so a
    /// driver older than the NVRTC loads it (PTX of a newer NVRTC it refuses with
    /// `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`).
    Cubin(String),
    /// PTX for a virtual architecture (`compute_90`), JIT-compiled by the driver: only for a
    /// device newer than every architecture this NVRTC knows (such a driver is newer too).
    Ptx(String),
}

/// What to compile for a device of compute capability `(major, minor)` with an NVRTC that
/// supports the real architectures `supported` (as `nvrtcGetSupportedArchs`: 75, 80, 90, ...). A
/// CUBIN runs on devices of its major version and a minor at least its own, so: the highest
/// supported architecture of the device's major version not above it; else, for a device newer
/// than them all, PTX of the highest; else (a device older than this NVRTC supports) an error.
pub fn target(capability: (i32, i32), supported: &[i32]) -> Result<Target, DeviceError> {
    let dev = capability.0 * 10 + capability.1;
    let same_major = supported
        .iter()
        .filter(|&&a| a / 10 == capability.0 && a <= dev)
        .max();
    if let Some(a) = same_major {
        return Ok(Target::Cubin(format!("sm_{a}")));
    }
    match supported.iter().max() {
        Some(&top) if top < dev => Ok(Target::Ptx(format!("compute_{top}"))),
        _ => Err(DeviceError::Unsupported {
            op: "NVRTC",
            detail: format!(
                "it compiles for {:?}, none of which runs on this sm_{dev} device; use the NVRTC of a CUDA that supports it",
                supported.iter().map(|a| format!("sm_{a}")).collect::<Vec<_>>()
            ),
        }),
    }
}

/// The real architectures this NVRTC compiles for (`nvrtcGetSupportedArchs`), ascending.
#[cfg(feature = "cuda")]
pub fn supported_archs() -> Result<Vec<i32>, DeviceError> {
    use cudarc::nvrtc::sys;
    let err = |e: cudarc::nvrtc::result::NvrtcError| DeviceError::Compile {
        arch: "any".into(),
        detail: format!("nvrtcGetSupportedArchs: {:?}", e.0),
    };
    let mut n: std::ffi::c_int = 0;
    // SAFETY: writes one int.
    unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }
        .result()
        .map_err(err)?;
    let mut archs = vec![0 as std::ffi::c_int; n.max(0) as usize];
    // SAFETY: `archs` holds the `n` ints NVRTC writes.
    unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .map_err(err)?;
    archs.sort_unstable();
    Ok(archs)
}

/// Compiles [`SOURCE`] to a CUBIN for the real architecture `arch` (`sm_90`), with the options
/// of [`options`]. A failure of NVRTC's builtins (`NVRTC_ERROR_BUILTIN_OPERATION_FAILURE`: it
/// could not load `libnvrtc-builtins.so.X.Y`, which it needs next to `libnvrtc.so`) says so.
#[cfg(feature = "cuda")]
pub fn compile_cubin(arch: &str) -> Result<Vec<u8>, DeviceError> {
    use cudarc::nvrtc::{result, sys};
    use std::ffi::CString;
    let fail = |detail: String| DeviceError::Compile {
        arch: arch.to_string(),
        detail,
    };
    let src = CString::new(SOURCE).expect("no NUL in kernels.cu");
    let name = CString::new("eva_kernels.cu").expect("no NUL");
    let prog = result::create_program(&src, Some(&name)).map_err(|e| fail(format!("{:?}", e.0)))?;
    let flags = [
        format!("--gpu-architecture={arch}"),
        "--fmad=false".into(),
        "--std=c++14".into(),
    ];
    // SAFETY: `prog` is a program just created; it is destroyed once, below.
    let built = unsafe { result::compile_program(prog, &flags) }
        .map_err(|e| {
            if e.0 == sys::nvrtcResult::NVRTC_ERROR_BUILTIN_OPERATION_FAILURE {
                return fail(format!(
                    "{:?}: NVRTC could not load its builtins library ({}), which must lie next to libnvrtc.so on LD_LIBRARY_PATH ({:?})",
                    e.0,
                    builtins_name(),
                    std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
                ));
            }
            // SAFETY: the program exists; the log is a NUL-terminated string.
            let log = unsafe { result::get_program_log(prog) }
                .map(|l| unsafe { std::ffi::CStr::from_ptr(l.as_ptr()) }.to_string_lossy().into_owned())
                .unwrap_or_default();
            fail(format!("{:?}: {log}", e.0))
        })
        .and_then(|()| {
            let mut size = 0usize;
            // SAFETY: writes one size.
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| fail(format!("nvrtcGetCUBINSize: {:?}", e.0)))?;
            let mut cubin = vec![0u8; size];
            // SAFETY: `cubin` holds the `size` bytes NVRTC writes.
            unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut std::ffi::c_char) }
                .result()
                .map_err(|e| fail(format!("nvrtcGetCUBIN: {:?}", e.0)))?;
            Ok(cubin)
        });
    // SAFETY: created above, not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    built
}

/// The file name of this NVRTC's builtins library (`libnvrtc-builtins.so.13.0`).
#[cfg(feature = "cuda")]
fn builtins_name() -> String {
    let (mut major, mut minor): (std::ffi::c_int, std::ffi::c_int) = (0, 0);
    // SAFETY: writes two ints.
    match unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result() {
        Ok(()) => format!("libnvrtc-builtins.so.{major}.{minor}"),
        Err(_) => "libnvrtc-builtins.so.X.Y".into(),
    }
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
    /// One thread per (feature, block of rows): `d` features, `blocks` row blocks.
    FeatureBlocks { d: usize, blocks: usize },
    /// One block per (tile of `q_tile` query tokens, head).
    Attention {
        tokens: usize,
        heads: usize,
        q_tile: usize,
    },
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
            | Shape::FeatureBlocks { d: 0, .. }
            | Shape::FeatureBlocks { blocks: 0, .. }
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
            Shape::FeatureBlocks { d, blocks } => {
                if blocks > 65_535 {
                    return Err(too_big("row blocks of the moments", blocks, 65_535));
                }
                Some(grid(d.div_ceil(BLOCK as usize), blocks))
            }
            Shape::Attention {
                tokens,
                heads,
                q_tile,
            } => {
                if tokens > i32::MAX as usize {
                    return Err(too_big("tokens", tokens, i32::MAX as usize));
                }
                if heads > 65_535 {
                    return Err(too_big("attention heads", heads, 65_535));
                }
                Some(grid(tokens.div_ceil(q_tile.max(1)), heads))
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
        let c = Shape::FeatureBlocks {
            d: 4096,
            blocks: 16,
        }
        .config()
        .unwrap()
        .unwrap();
        assert_eq!(c.grid_dim, (16, 16, 1));
        assert!(Shape::FeatureBlocks { d: 8, blocks: 0 }
            .config()
            .unwrap()
            .is_none());
        assert!(Shape::FeatureBlocks {
            d: 8,
            blocks: 70_000
        }
        .config()
        .is_err());
        let c = Shape::Attention {
            tokens: 70,
            heads: 9,
            q_tile: 32,
        }
        .config()
        .unwrap()
        .unwrap();
        assert_eq!(c.grid_dim, (3, 9, 1));
        assert!(Shape::Elements(0).config().unwrap().is_none());
        assert!(Shape::Attention {
            tokens: 3,
            heads: 0,
            q_tile: 32,
        }
        .config()
        .unwrap()
        .is_none());
        assert!(Shape::Attention {
            tokens: 3,
            heads: 70_000,
            q_tile: 32,
        }
        .config()
        .is_err());
        assert!(Shape::Rows(1 << 33).config().is_err());
    }

    /// Bytes of the `.shared` arrays PTX declares for kernel `name` (NVRTC names a kernel's
    /// `__shared__` variables `_ZZ<len><name>E<var>`).
    #[cfg(feature = "cuda")]
    fn static_shared_bytes(ptx: &str, name: &str) -> usize {
        let prefix = format!("_ZZ{}{name}E", name.len());
        ptx.lines()
            .filter(|l| l.trim_start().starts_with(".shared") && l.contains(&prefix))
            .map(|l| {
                let n = l.rsplit('[').next().and_then(|t| t.split(']').next());
                let n: usize = n
                    .and_then(|t| t.parse().ok())
                    .unwrap_or_else(|| panic!("a size in {l}"));
                let width = [
                    (".b64", 8),
                    (".f64", 8),
                    (".b32", 4),
                    (".f32", 4),
                    (".u32", 4),
                    (".s32", 4),
                ]
                .iter()
                .find(|(t, _)| l.contains(t))
                .map_or(1, |&(_, w)| w);
                n * width
            })
            .sum()
    }

    #[test]
    fn the_target_is_a_cubin_of_the_devices_major_version_else_ptx_for_newer_devices() {
        let supported = [75, 80, 86, 87, 89, 90, 100, 120];
        let t = |cap| target(cap, &supported);
        assert_eq!(t((9, 0)).unwrap(), Target::Cubin("sm_90".into()));
        assert_eq!(t((8, 0)).unwrap(), Target::Cubin("sm_80".into()));
        // No sm_88 here: sm_87's CUBIN runs on it (same major, lower minor).
        assert_eq!(t((8, 8)).unwrap(), Target::Cubin("sm_87".into()));
        assert_eq!(t((10, 3)).unwrap(), Target::Cubin("sm_100".into()));
        // Newer than this NVRTC: the driver JIT-compiles the newest PTX it has.
        assert_eq!(t((13, 0)).unwrap(), Target::Ptx("compute_120".into()));
        let e = t((6, 0)).unwrap_err().to_string();
        assert!(e.contains("sm_60") && e.contains("sm_75"), "{e}");
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
            for name in NAMES {
                let bytes = static_shared_bytes(&text, name);
                assert!(
                    bytes <= 48 * 1024,
                    "{name} declares {bytes} bytes of static shared memory for {a}: more than the 48 KB a block may have"
                );
                if name == "attention" {
                    eprintln!("{a}: attention holds {bytes} bytes of static shared memory");
                    assert!(
                        bytes > 32 * 1024,
                        "the attention tiles were found in the PTX"
                    );
                }
            }
            eprintln!(
                "NVRTC compiled {} kernels for {a} in {:.2} s ({} bytes of PTX)",
                NAMES.len(),
                t.elapsed().as_secs_f64(),
                text.len()
            );
        }
        let archs = supported_archs().unwrap_or_else(|e| panic!("{e}"));
        for (cap, want) in [((8, 0), "sm_80"), ((9, 0), "sm_90")] {
            assert_eq!(
                target(cap, &archs).unwrap(),
                Target::Cubin(want.into()),
                "{archs:?}"
            );
            let t = std::time::Instant::now();
            let cubin = compile_cubin(want).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&cubin[..4], b"\x7fELF", "a CUBIN is an ELF image");
            for name in NAMES {
                let sym = format!("{name}\0");
                assert!(
                    cubin.windows(sym.len()).any(|w| w == sym.as_bytes()),
                    "the {want} CUBIN lacks the kernel {name}"
                );
            }
            eprintln!(
                "NVRTC compiled a {want} CUBIN in {:.2} s ({} bytes); this NVRTC supports {archs:?}",
                t.elapsed().as_secs_f64(),
                cubin.len()
            );
        }
    }
}
