// Links the system OpenBLAS (Debian: libopenblas-dev). It provides the CBLAS symbols used by
// ndarray's `blas` feature and by `src/linalg.rs`, and `openblas_set_num_threads`.
fn main() {
    println!("cargo:rustc-link-lib=openblas");
}
