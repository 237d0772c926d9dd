//! The accumulation blocks by which the CPU and the GPU round their sums alike: rows per f32
//! product before it is added in f64, rows per f32 partial sum of the feature sums.

/// Rows per BLAS call: bounds scratch memory and the length of each f32 product sum.
pub const CHUNK_ROWS: usize = 4096;

/// Rows per f32 partial sum of the feature sums before it is added in f64.
pub const SUM_BLOCK: usize = 256;
