//! What can go wrong on a GPU, with the names users need: the library that is missing and where
//! it was looked for, the CUDA/cuBLAS/NVRTC status by name, and for out-of-memory the layer slice
//! and the bytes it needed.

use std::fmt;

/// A failure of the CUDA backend. Converted into [`crate::Error`] at the module boundary: a
/// missing library or device is a usage error (exit code 2), the rest device errors (exit code 1).
#[derive(Clone, Debug, thiserror::Error)]
pub enum DeviceError {
    /// A shared library cudarc loads at run time is absent.
    #[error("--device cuda: {what} was not found: looked for {names} in LD_LIBRARY_PATH ({ld_library_path}) and the system's library directories{hint}")]
    Missing {
        /// Which library, in words (`the CUDA driver library`).
        what: &'static str,
        /// The file names tried, in order.
        names: String,
        /// `LD_LIBRARY_PATH` as this process saw it.
        ld_library_path: String,
        /// What usually provides it.
        hint: &'static str,
    },
    /// The driver loaded but reports no GPU (or the requested ordinal is not there).
    #[error("--device cuda: {0}")]
    NoDevice(String),
    /// A CUDA driver call failed.
    #[error("CUDA {op} failed: {name}")]
    Driver {
        /// What was being done.
        op: &'static str,
        /// The `CUresult` name (`CUDA_ERROR_ILLEGAL_ADDRESS`).
        name: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS {op} failed: {name}")]
    Blas {
        /// What was being done.
        op: &'static str,
        /// The `cublasStatus_t` name.
        name: String,
    },
    /// NVRTC could not compile the kernels.
    #[error("NVRTC could not compile eva's kernels for {arch}: {detail}")]
    Compile {
        /// `compute_90`, ...
        arch: String,
        /// The compiler's log.
        detail: String,
    },
    /// The device has not enough free memory.
    #[error("out of GPU memory on device {device} while {what} for {slice}: it needed {needed} more ({free} free of {total}); hold fewer blocks per GPU with --pp, or use --estimator sketch (its statistics are d·(k+q) instead of d² per input)")]
    OutOfMemory {
        /// Device ordinal.
        device: usize,
        /// What was being allocated (`uploading weights`, `a forward pass of 4096 tokens`).
        what: String,
        /// The layer slice this rank holds (`blocks 0..30 of 30`).
        slice: String,
        /// Bytes requested.
        needed: Bytes,
        /// Free bytes when it failed.
        free: Bytes,
        /// Device memory.
        total: Bytes,
    },
    /// A shape the kernels do not handle.
    #[error("{op}: {detail}")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// Expected and found.
        detail: String,
    },
}

impl From<DeviceError> for crate::Error {
    fn from(e: DeviceError) -> Self {
        match e {
            DeviceError::Missing { .. } | DeviceError::NoDevice(_) => {
                crate::Error::Usage(e.to_string())
            }
            e => crate::Error::Device(e.to_string()),
        }
    }
}

/// A byte count printed in binary units (`1.50 GiB`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub usize);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut u = 0;
        while v >= 1024.0 && u + 1 < UNITS.len() {
            v /= 1024.0;
            u += 1;
        }
        if u == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{v:.2} {}", UNITS[u])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_print_in_binary_units() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(1536).to_string(), "1.50 KiB");
        assert_eq!(Bytes(3 << 30).to_string(), "3.00 GiB");
    }

    #[test]
    fn missing_library_is_a_usage_error_naming_where_it_looked() {
        let e = DeviceError::Missing {
            what: "cuBLAS",
            names: "libcublas.so, libcublas.so.13".into(),
            ld_library_path: "/opt/x".into(),
            hint: "",
        };
        let e: crate::Error = e.into();
        assert_eq!(e.exit_code(), 2);
        let msg = e.to_string();
        assert!(
            msg.contains("libcublas.so.13") && msg.contains("/opt/x"),
            "{msg}"
        );
    }

    #[test]
    fn out_of_memory_names_the_slice_and_suggests_pp_or_sketch() {
        let e = DeviceError::OutOfMemory {
            device: 0,
            what: "uploading weights".into(),
            slice: "blocks 0..30 of 30".into(),
            needed: Bytes(2 << 30),
            free: Bytes(1 << 30),
            total: Bytes(80 << 30),
        };
        let msg = crate::Error::from(e).to_string();
        for want in [
            "blocks 0..30 of 30",
            "2.00 GiB",
            "--pp",
            "--estimator sketch",
        ] {
            assert!(msg.contains(want), "{msg} lacks {want}");
        }
    }
}
