// Links the system OpenBLAS (Debian: libopenblas-dev). It provides the CBLAS symbols used by
// ndarray's `blas` feature and by `src/linalg/`, LAPACK's `xsyevr`, and `openblas_set_num_threads`.
//
// `eva_gpu` is set when the CUDA backend is compiled: on cudarc (feature `cuda`) or on the
// emulated device (feature `cuda-emu`), two implementations of one runtime seam.
fn main() {
    println!("cargo:rustc-link-lib=openblas");
    println!("cargo::rustc-check-cfg=cfg(eva_gpu)");
    let cuda = std::env::var_os("CARGO_FEATURE_CUDA").is_some();
    let emu = std::env::var_os("CARGO_FEATURE_CUDA_EMU").is_some();
    if cuda && emu {
        panic!("features `cuda` and `cuda-emu` are two implementations of the GPU runtime seam: enable one");
    }
    if cuda || emu {
        println!("cargo:rustc-cfg=eva_gpu");
    }
}
