//! The executor's C interface (`executor.cpp`, and the tables `build.rs` generates from
//! `kernels.cu`), and a launch by name over it.
//!
//! | item | role |
//! |---|---|
//! | [`launch`], [`launch_ordered`] | one grid of one of eva's kernels, its arguments checked against the kernel's parameters |
//! | [`Arg`] | one argument, as the CUDA runtime seam's `Arg`: a pointer or count, an `int`, a `float` |
//! | [`kernels`] | every kernel the executor holds, in `kernels.cu`'s order, with its parameters' kinds |
//! | [`LaunchError`], [`Fault`] | why a launch failed (the executor's error code and message) |

pub use crate::device::cuda::kernels::Arg;
use std::ffi::{c_char, c_int, c_uint, c_ulonglong, CStr, CString};
use std::fmt;
use std::sync::OnceLock;

mod ffi {
    use super::*;

    extern "C" {
        /// Launches eva's kernel `name` over `grid` blocks of `block` threads, `nargs` arguments
        /// in 8-byte slots, the thread order of `EVA_EMU_ORDER`; 0 or an error code.
        pub fn eva_emu_launch(
            name: *const c_char,
            grid: *const c_uint,
            block: *const c_uint,
            args: *const c_ulonglong,
            nargs: c_int,
        ) -> c_int;
        /// The same from table 0 (eva's kernels) or 1 (the executor's test kernels), with the
        /// thread order given: 0 forward, 1 reverse, -1 `EVA_EMU_ORDER`'s.
        pub fn eva_emu_launch_ordered(
            table: c_int,
            name: *const c_char,
            grid: *const c_uint,
            block: *const c_uint,
            args: *const c_ulonglong,
            nargs: c_int,
            order: c_int,
        ) -> c_int;
        /// Why the calling thread's last launch failed; "" when it did not.
        pub fn eva_emu_last_error() -> *const c_char;
        /// How many kernels `kernels.cu` has.
        pub fn eva_emu_kernel_count() -> c_int;
        /// Kernel `i`'s name (NULL out of range); a static string.
        pub fn eva_emu_kernel_name(i: c_int) -> *const c_char;
        /// Kernel `i`'s parameters, one letter each (`P` pointer, `U` 64-bit integer, `I` 32-bit
        /// integer, `F` float, `D` double; NULL out of range); a static string.
        pub fn eva_emu_kernel_params(i: c_int) -> *const c_char;
        /// Bytes of static shared memory of all compiled kernels together.
        pub fn eva_emu_shared_bytes() -> c_ulonglong;
    }
}

/// The 8-byte slot the executor reads for an argument: the value, or the low 32 bits (an
/// `int`'s two's complement, a `float`'s bits).
pub fn slot(a: Arg) -> u64 {
    match a {
        Arg::U64(v) => v,
        Arg::I32(v) => v as u32 as u64,
        Arg::F32(v) => v.to_bits() as u64,
    }
}

/// Whether an argument may fill a parameter of `kind` (see [`Kernel::params`]).
fn fits(a: Arg, kind: u8) -> bool {
    matches!(
        (a, kind),
        (Arg::U64(_), b'P' | b'U') | (Arg::I32(_), b'I') | (Arg::F32(_), b'F')
    )
}

/// One kernel the executor holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// Its name in `kernels.cu`.
    pub name: &'static str,
    /// Its parameters' kinds, one letter each: `P` a pointer, `U` a 64-bit integer (both filled
    /// by [`Arg::U64`]), `I` a 32-bit integer ([`Arg::I32`]), `F` a float ([`Arg::F32`]), `D` a
    /// double (none of eva's kernels takes one).
    pub params: &'static str,
}

/// Every kernel of `kernels.cu`, in the source's order.
pub fn kernels() -> &'static [Kernel] {
    static TABLE: OnceLock<Vec<Kernel>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let text = |p: *const c_char| -> &'static str {
            assert!(!p.is_null(), "the executor's table has a hole");
            // SAFETY: the table's strings are static, NUL-terminated C literals (build.rs).
            unsafe { CStr::from_ptr(p) }
                .to_str()
                .expect("kernel names are ASCII")
        };
        // SAFETY: plain reads of the generated, immutable table.
        let n = unsafe { ffi::eva_emu_kernel_count() };
        (0..n)
            .map(|i| Kernel {
                // SAFETY: as above; i is in range.
                name: text(unsafe { ffi::eva_emu_kernel_name(i) }),
                params: text(unsafe { ffi::eva_emu_kernel_params(i) }),
            })
            .collect()
    })
}

/// Bytes of static shared memory all compiled kernels declare together: what the executor fills
/// with 0xFF at the start of every block.
pub fn shared_bytes() -> u64 {
    // SAFETY: reads two linker symbols.
    unsafe { ffi::eva_emu_shared_bytes() }
}

/// What went wrong, by the executor's error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// No kernel of that name.
    UnknownKernel,
    /// Not as many arguments as the kernel has parameters.
    ArgCount,
    /// An argument of the wrong kind for its parameter (e.g. an `Arg::U64` for an `int`: on a GPU
    /// the kernel would read its parameters at the wrong offsets).
    ArgKind,
    /// A grid or block CUDA would refuse (a zero dimension, over 1024 threads per block, ...).
    Config,
    /// Threads returned while others of their block waited at `__syncthreads()`.
    BarrierAfterExit,
    /// Threads of a block waited at different `__syncthreads()`.
    BarrierDivergence,
    /// No memory for the fiber stacks.
    NoMemory,
    /// A code this side does not know.
    Other(i32),
}

impl Fault {
    fn from_code(code: i32) -> Self {
        match code {
            1 => Fault::UnknownKernel,
            2 => Fault::ArgCount,
            3 => Fault::Config,
            4 => Fault::BarrierAfterExit,
            5 => Fault::BarrierDivergence,
            6 => Fault::NoMemory,
            c => Fault::Other(c),
        }
    }
}

/// A failed launch: the fault and the executor's message (kernel, block, barrier sites).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchError {
    pub fault: Fault,
    pub message: String,
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "emulated kernel launch: {}", self.message)
    }
}

impl std::error::Error for LaunchError {}

/// Thread order within a block between barriers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// `EVA_EMU_ORDER=reverse` reverses, anything else is forward (read once per process).
    FromEnv,
    /// Thread 0 first.
    Forward,
    /// The last thread first.
    Reverse,
}

impl Order {
    fn code(self) -> c_int {
        match self {
            Order::FromEnv => -1,
            Order::Forward => 0,
            Order::Reverse => 1,
        }
    }
}

/// Launches eva's kernel `name` over `grid` blocks of `block` threads (CUDA's (x, y, z)), the
/// threads of a block in `EVA_EMU_ORDER`'s order, and returns when the grid has run.
///
/// # Safety
///
/// As a CUDA launch: every pointer argument must be valid for every access the kernel makes
/// through it for these arguments and this grid (the executor runs the kernel's code on host
/// memory as it is), and no other thread may touch that memory until the launch returns.
pub unsafe fn launch(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    args: &[Arg],
) -> Result<(), LaunchError> {
    launch_ordered(name, grid, block, args, Order::FromEnv)
}

/// [`launch`] with the thread order given.
///
/// # Safety
///
/// As [`launch`].
pub unsafe fn launch_ordered(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    args: &[Arg],
    order: Order,
) -> Result<(), LaunchError> {
    if let Some(k) = kernels().iter().find(|k| k.name == name) {
        check_kinds(k, args)?;
    }
    raw_launch(0, name, grid, block, args, order)
}

/// One of the executor's own test kernels (`test_kernels.cu`), whose parameter kinds are not
/// checked here.
///
/// # Safety
///
/// As [`launch`].
#[cfg(test)]
pub(crate) unsafe fn launch_test_kernel(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    args: &[Arg],
    order: Order,
) -> Result<(), LaunchError> {
    raw_launch(1, name, grid, block, args, order)
}

fn check_kinds(k: &Kernel, args: &[Arg]) -> Result<(), LaunchError> {
    if args.len() != k.params.len() {
        return Err(LaunchError {
            fault: Fault::ArgCount,
            message: format!(
                "kernel {} takes {} arguments ({}), {} given",
                k.name,
                k.params.len(),
                k.params,
                args.len()
            ),
        });
    }
    for (i, (a, kind)) in args.iter().zip(k.params.bytes()).enumerate() {
        if !fits(*a, kind) {
            return Err(LaunchError {
                fault: Fault::ArgKind,
                message: format!(
                    "kernel {}: argument {i} is {a:?}, the parameter is {} ({})",
                    k.name, kind as char, k.params
                ),
            });
        }
    }
    Ok(())
}

/// # Safety
///
/// As [`launch`].
unsafe fn raw_launch(
    table: c_int,
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    args: &[Arg],
    order: Order,
) -> Result<(), LaunchError> {
    let fail = |fault, message: String| LaunchError { fault, message };
    let Ok(cname) = CString::new(name) else {
        return Err(fail(
            Fault::UnknownKernel,
            format!("no kernel named {name:?}"),
        ));
    };
    let nargs = c_int::try_from(args.len())
        .map_err(|_| fail(Fault::ArgCount, format!("{} arguments", args.len())))?;
    let slots: Vec<c_ulonglong> = args.iter().map(|&a| slot(a)).collect();
    let grid = [grid.0, grid.1, grid.2];
    let block = [block.0, block.1, block.2];
    // SAFETY: the name is NUL-terminated, the dimension arrays hold 3 values and the slots
    // `nargs`; what the kernel does with the slots is the caller's contract.
    let rc = unsafe {
        if table == 0 && order == Order::FromEnv {
            ffi::eva_emu_launch(
                cname.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                slots.as_ptr(),
                nargs,
            )
        } else {
            ffi::eva_emu_launch_ordered(
                table,
                cname.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                slots.as_ptr(),
                nargs,
                order.code(),
            )
        }
    };
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: a thread-local NUL-terminated buffer, written by this thread's launch just now.
    let message = unsafe { CStr::from_ptr(ffi::eva_emu_last_error()) }
        .to_string_lossy()
        .into_owned();
    Err(fail(Fault::from_code(rc), message))
}

/// The plain entry point, as the runtime will call it, for a test that it is the same launch.
#[cfg(test)]
pub(crate) unsafe fn launch_plain(
    name: &str,
    grid: [u32; 3],
    block: [u32; 3],
    slots: &[u64],
) -> i32 {
    let cname = CString::new(name).expect("no NUL");
    // SAFETY: as raw_launch.
    unsafe {
        ffi::eva_emu_launch(
            cname.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            slots.as_ptr(),
            slots.len() as c_int,
        )
    }
}
