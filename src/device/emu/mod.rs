//! The emulated CUDA device's kernel executor (feature `cuda-emu`, a test device): eva's CUDA
//! kernels (`src/device/cuda/kernels.cu`, the very source NVRTC compiles) compiled for the host
//! by the system's C++ compiler and run with CUDA's execution model, so that the GPU path runs
//! where no GPU is.
//!
//! | file | role |
//! |---|---|
//! | `shim.h` | the CUDA dialect and intrinsics on the host (`threadIdx`, `__shared__`, `__syncthreads()`, bit casts, atomics) |
//! | `executor.cpp` | runs a grid: blocks in turn, each block's threads as fibers switching at barriers |
//! | `test_kernels.cu` | the executor's own test kernels (a broken barrier, races, barrier misuse) |
//! | `build.rs` (the crate's) | parses the kernels of each `.cu` and generates their trampolines and name table |
//! | [`kernels`] | the C interface, and [`kernels::launch`] by name with the runtime seam's `Arg`s |
//!
//! How CUDA's model is kept:
//! - **Threads are threads.** The threads of a block run as fibers (stackful coroutines with
//!   their own 64 KiB stacks) on the launching OS thread, each until its next `__syncthreads()`
//!   or its return, round-robin; a barrier opens when every live thread of the block waits at it.
//!   A missing barrier therefore gives the wrong result it would give on a GPU, or one of them:
//!   threads between two barriers run in linear order (x fastest), or reversed with
//!   `EVA_EMU_ORDER=reverse`, so a race shows in one order or the other.
//! - **Barrier misuse is an error** ([`kernels::Fault`]): threads that returned while others wait
//!   at a barrier, threads that wait at different `__syncthreads()` (by source line).
//! - **Shared memory** is one static copy per `__shared__` variable serving the one block in
//!   flight (blocks run one after another, launches are serialized process-wide), filled with
//!   0xFF bytes (NaN) at every block's start: a read of what no thread of the block wrote is NaN.
//! - **Arguments** arrive in 8-byte slots and are read as the kernel's parameter types: pointers
//!   and `unsigned long long` as they are, `int` and `float` from the low 32 bits; an argument of
//!   the wrong kind for its parameter is an error ([`kernels::launch`] checks them against the
//!   parameters `build.rs` read from the source).
//! - **Arithmetic** rounds as CUDA's with `--fmad=false` (`-ffp-contract=off`, IEEE division and
//!   square root); `expf`, `tanhf` are glibc's, within an ulp or two of CUDA's.
//!
//! What it cannot show: anything below the block (warps, lanes, warp-synchronous code: the shim
//! has no warp intrinsics, so kernels using them do not compile here); the memory model (every
//! write is visible at once; no caches, no reordering, so a missing `__threadfence()` or
//! `volatile` goes unseen); concurrency between blocks (they run in turn, so inter-block races and
//! atomics contention never interleave); timing, occupancy, register and shared-memory limits
//! per SM; and the driver (PTX JIT, NVRTC: the CI compiles the same source with NVRTC separately).

pub mod kernels;

pub use kernels::{launch, launch_ordered, Arg, Fault, LaunchError, Order};

/// The names of the kernels the executor holds, in `kernels.cu`'s order (the runtime checks them
/// against `cuda::kernels::NAMES` when it opens a device).
pub fn kernel_names() -> Vec<&'static str> {
    kernels::kernels().iter().map(|k| k.name).collect()
}

#[cfg(test)]
mod tests {
    use super::kernels::{self, launch, launch_ordered, launch_test_kernel, Arg, Fault, Order};
    use half::bf16;

    const BLOCK: u32 = 256;

    /// A pointer argument.
    fn p<T>(v: &[T]) -> Arg {
        Arg::U64(v.as_ptr() as u64)
    }

    fn pm<T>(v: &mut [T]) -> Arg {
        Arg::U64(v.as_mut_ptr() as u64)
    }

    /// Deterministic pseudo-random values in [-1, 1) (xorshift).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn grid(x: usize) -> (u32, u32, u32) {
        (x as u32, 1, 1)
    }

    const THREADS: (u32, u32, u32) = (BLOCK, 1, 1);

    #[test]
    fn the_executor_holds_every_kernel_of_kernels_cu_in_order() {
        let source = include_str!("../cuda/kernels.cu");
        let defined: Vec<&str> = source
            .split("extern \"C\" __global__ void ")
            .skip(1)
            .map(|s| s.split('(').next().expect("a name"))
            .collect();
        let held: Vec<&str> = kernels::kernels().iter().map(|k| k.name).collect();
        assert_eq!(held, defined);
        // The parameters as the host pushes them (device/cuda/mod.rs, gram.rs).
        let params = |name: &str| {
            kernels::kernels()
                .iter()
                .find(|k| k.name == name)
                .expect("held")
                .params
        };
        assert_eq!(params("cast_bf16"), "PPU");
        assert_eq!(params("rms_norm"), "PPPIF");
        assert_eq!(params("layer_norm"), "PPPPPIF");
        assert_eq!(params("attention"), "PPPPPPIIIIIIIFFIIII");
        assert_eq!(params("shift_moments"), "PPPPPIII");
        assert_eq!(params("add_moments"), "PPPII");
        assert_eq!(params("activate_inplace"), "PUI");
        // rms_norm's, layer_norm's and attention's shared arrays, all in the poisoned section.
        assert!(
            kernels::shared_bytes() >= (2 * 8 * 256 + 4 * (4096 + 4160 + 32 * 33 + 5 * 32)) as u64
        );
    }

    #[test]
    fn add_and_cast_bf16_cover_n_elements_with_a_grid_stride_loop() {
        let n = 100_003;
        let y = values(n, 1);
        // A grid that covers n in one pass and one that must stride (7 blocks).
        for blocks in [n.div_ceil(BLOCK as usize), 7] {
            let mut x = values(n, 2);
            let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
            // SAFETY: x and y hold n values.
            unsafe {
                launch(
                    "add",
                    grid(blocks),
                    THREADS,
                    &[pm(&mut x), p(&y), Arg::U64(n as u64)],
                )
            }
            .unwrap();
            assert_eq!(x, want, "{blocks} blocks");
        }
        let mut x = values(n, 3);
        x[..12].copy_from_slice(&[
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            f32::MAX,
            f32::MIN_POSITIVE / 3.0,
            1.0 + 1.0 / 256.0,           // a tie: to even (1.0)
            1.0 + 3.0 / 256.0,           // a tie: to even (up)
            f32::from_bits(0x7f80_0001), // a signaling NaN: quieted
            65504.0,
            -3.0e38,
        ]);
        let mut out = vec![0u16; n];
        for blocks in [n.div_ceil(BLOCK as usize), 7] {
            out.fill(0xdead);
            // SAFETY: x and out hold n values.
            unsafe {
                launch(
                    "cast_bf16",
                    grid(blocks),
                    THREADS,
                    &[p(&x), pm(&mut out), Arg::U64(n as u64)],
                )
            }
            .unwrap();
            let want: Vec<u16> = x.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
            assert_eq!(out, want, "{blocks} blocks");
        }
    }

    #[test]
    fn rms_norm_matches_an_f64_reference_to_f32_rounding_and_is_order_independent() {
        let eps = 1e-6_f32;
        for d in [7usize, 256, 1000] {
            let rows = 5;
            let x: Vec<f32> = values(rows * d, d as u64).iter().map(|v| v * 3.0).collect();
            let w = values(d, 7 * d as u64);
            let mut outs = Vec::new();
            for order in [Order::Forward, Order::Reverse] {
                let mut out = vec![f32::NAN; rows * d];
                // SAFETY: x, out hold rows·d values, w d.
                unsafe {
                    launch_ordered(
                        "rms_norm",
                        grid(rows),
                        THREADS,
                        &[
                            p(&x),
                            p(&w),
                            pm(&mut out),
                            Arg::I32(d as i32),
                            Arg::F32(eps),
                        ],
                        order,
                    )
                }
                .unwrap();
                outs.push(out);
            }
            assert_eq!(
                outs[0], outs[1],
                "d = {d}: the thread order changed the result"
            );
            for r in 0..rows {
                let row = &x[r * d..(r + 1) * d];
                let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                for j in 0..d {
                    let want = w[j] as f64 * row[j] as f64 * inv;
                    let got = outs[0][r * d + j] as f64;
                    assert!(
                        (got - want).abs() <= 4.0 * f32::EPSILON as f64 * want.abs() + 1e-30,
                        "d = {d}, row {r}, {j}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// layer_norm and add_layer_norm (with a residual, in place: `out` is `x`): two block
    /// reductions in a row, so the barrier after each one's result matters.
    #[test]
    fn layer_norm_matches_an_f64_reference_in_place_and_with_a_residual() {
        let eps = 1e-5_f32;
        for d in [5usize, 384, 700] {
            let rows = 4;
            let x0: Vec<f32> = values(rows * d, 3 * d as u64)
                .iter()
                .map(|v| v * 4.0 + 1.0)
                .collect();
            let res = values(rows * d, 5 * d as u64);
            let w = values(d, 11 * d as u64);
            let b = values(d, 13 * d as u64);
            for residual in [false, true] {
                let mut outs = Vec::new();
                for order in [Order::Forward, Order::Reverse] {
                    let mut x = x0.clone();
                    let px = pm(&mut x);
                    let pr = if residual { p(&res) } else { Arg::U64(0) };
                    // SAFETY: x (also the output) and res hold rows·d values, w and b d.
                    unsafe {
                        launch_ordered(
                            "layer_norm",
                            grid(rows),
                            THREADS,
                            &[px, pr, p(&w), p(&b), px, Arg::I32(d as i32), Arg::F32(eps)],
                            order,
                        )
                    }
                    .unwrap();
                    outs.push(x);
                }
                assert_eq!(
                    outs[0], outs[1],
                    "d = {d}: the thread order changed the result"
                );
                for r in 0..rows {
                    let v: Vec<f64> = (0..d)
                        .map(|j| {
                            let mut v = x0[r * d + j];
                            if residual {
                                v += res[r * d + j];
                            }
                            v as f64
                        })
                        .collect();
                    let mean = v.iter().sum::<f64>() / d as f64;
                    let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / d as f64;
                    for j in 0..d {
                        let want =
                            (v[j] - mean) / (var + eps as f64).sqrt() * w[j] as f64 + b[j] as f64;
                        let got = outs[0][r * d + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "d = {d}, residual {residual}, row {r}, {j}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn flush_pack_upper_and_gather_rows_move_every_value() {
        let n = 70_001;
        let part = values(n, 11);
        let mut acc: Vec<f64> = values(n, 12).iter().map(|v| *v as f64 * 1e3).collect();
        let want: Vec<f64> = acc.iter().zip(&part).map(|(a, b)| a + *b as f64).collect();
        // SAFETY: n values each.
        unsafe {
            launch(
                "flush_f64",
                grid(n.div_ceil(256)),
                THREADS,
                &[p(&part), pm(&mut acc), Arg::U64(n as u64)],
            )
        }
        .unwrap();
        assert_eq!(acc, want);

        for d in [1usize, 37, 300] {
            let g: Vec<f64> = (0..d * d).map(|i| i as f64 + 0.5).collect();
            let mut packed = vec![f64::NAN; d * (d + 1) / 2];
            // SAFETY: g is d×d, packed d(d+1)/2.
            unsafe {
                launch(
                    "pack_upper_f64",
                    grid(d),
                    THREADS,
                    &[p(&g), pm(&mut packed), Arg::I32(d as i32)],
                )
            }
            .unwrap();
            let want: Vec<f64> = (0..d)
                .flat_map(|i| (i..d).map(move |j| (i * d + j) as f64 + 0.5))
                .collect();
            assert_eq!(packed, want, "d = {d}");
        }

        let d = 300;
        let x = values(10 * d, 13);
        let keep: Vec<i32> = vec![9, 0, 3, 3, 7];
        let mut out = vec![f32::NAN; keep.len() * d];
        // SAFETY: x has 10 rows of d, out keep.len() rows, keep's rows exist.
        unsafe {
            launch(
                "gather_rows",
                grid(keep.len()),
                THREADS,
                &[p(&x), p(&keep), pm(&mut out), Arg::I32(d as i32)],
            )
        }
        .unwrap();
        let want: Vec<f32> = keep
            .iter()
            .flat_map(|r| x[*r as usize * d..(*r as usize + 1) * d].to_vec())
            .collect();
        assert_eq!(out, want);
    }

    #[test]
    fn shift_moments_and_first_nonfinite_match_their_definitions() {
        let (rows, d, block) = (100usize, 300usize, 32i32);
        let x: Vec<f32> = values(rows * d, 21).iter().map(|v| v * 5.0).collect();
        let c = values(d, 22);
        for as_bf16 in [false, true] {
            let mut y32 = vec![f32::NAN; rows * d];
            let mut y16 = vec![0xffffu16; rows * d];
            let mut sum = vec![1.0f64; d];
            let mut sq = vec![2.0f64; d];
            let (py32, py16) = if as_bf16 {
                (Arg::U64(0), pm(&mut y16))
            } else {
                (pm(&mut y32), Arg::U64(0))
            };
            // Row blocks of `block` rows, the last one short: (⌈d/256⌉, 4) blocks.
            let blocks = rows.div_ceil(block as usize);
            let mut part = vec![f32::NAN; 2 * blocks * d];
            // SAFETY: x and the chosen y hold rows·d values, c, sum and sq d, part 2·blocks·d.
            unsafe {
                launch(
                    "shift_moments",
                    (d.div_ceil(256) as u32, blocks as u32, 1),
                    THREADS,
                    &[
                        p(&x),
                        p(&c),
                        py32,
                        py16,
                        pm(&mut part),
                        Arg::I32(rows as i32),
                        Arg::I32(d as i32),
                        Arg::I32(block),
                    ],
                )
            }
            .unwrap();
            // SAFETY: part holds 2·blocks·d values, sum and sq d.
            unsafe {
                launch(
                    "add_moments",
                    grid(d.div_ceil(256)),
                    THREADS,
                    &[
                        p(&part),
                        pm(&mut sum),
                        pm(&mut sq),
                        Arg::I32(blocks as i32),
                        Arg::I32(d as i32),
                    ],
                )
            }
            .unwrap();
            for j in 0..d {
                let (mut s64, mut q64) = (1.0f64, 2.0f64);
                for r0 in (0..rows).step_by(block as usize) {
                    let (mut s, mut q) = (0.0f32, 0.0f32);
                    for r in r0..rows.min(r0 + block as usize) {
                        let mut y = x[r * d + j] - c[j];
                        if as_bf16 {
                            let b = bf16::from_f32(y);
                            assert_eq!(y16[r * d + j], b.to_bits());
                            y = b.to_f32();
                        } else {
                            assert_eq!(y32[r * d + j], y);
                        }
                        s += y;
                        q += y * y;
                    }
                    s64 += s as f64;
                    q64 += q as f64;
                }
                assert_eq!((sum[j], sq[j]), (s64, q64), "feature {j}, bf16 {as_bf16}");
            }
        }

        // first_nonfinite keeps the smallest seq << 40 | index << 2 | class over its launches.
        let n = 5000;
        let first = |x: &[f32], seq: u64, word: &mut [u64; 1]| {
            // SAFETY: n values, one word.
            unsafe {
                launch(
                    "first_nonfinite",
                    grid(3),
                    THREADS,
                    &[p(x), Arg::U64(n as u64), Arg::U64(seq), pm(word)],
                )
            }
            .unwrap()
        };
        let cases: [(&[(usize, f32)], u64); 5] = [
            (&[], u64::MAX),
            (&[(4321, f32::NAN)], 4321 << 2),
            (&[(4321, f32::INFINITY)], 4321 << 2 | 1),
            (&[(4321, f32::NEG_INFINITY)], 4321 << 2 | 2),
            // The first in row-major order, whichever thread of the grid stride saw it.
            (
                &[
                    (4999, f32::NAN),
                    (1000, f32::INFINITY),
                    (7, f32::NEG_INFINITY),
                ],
                7 << 2 | 2,
            ),
        ];
        for (bad, want) in cases {
            let mut x = values(n, 23);
            for &(i, v) in bad {
                x[i] = v;
            }
            for seq in [0u64, 3] {
                let mut word = [u64::MAX];
                first(&x, seq, &mut word);
                let want = if want == u64::MAX {
                    want
                } else {
                    seq << 40 | want
                };
                assert_eq!(word[0], want, "{bad:?}, seq {seq}");
            }
        }
        // Over several checks the earliest failing one wins, wherever its value is.
        let (mut late, mut early) = (values(n, 24), values(n, 25));
        late[3] = f32::NAN;
        early[4000] = f32::INFINITY;
        let mut word = [u64::MAX];
        first(&values(n, 26), 0, &mut word);
        first(&late, 2, &mut word);
        first(&early, 1, &mut word);
        assert_eq!(word[0], 1 << 40 | 4000 << 2 | 1);
    }

    /// One attention problem: packed sequences, heads, and the kernel's mask arguments.
    struct Attn {
        lengths: &'static [usize],
        heads: usize,
        kv_heads: usize,
        hd: usize,
        /// 1 causal, 0 bidirectional.
        causal: i32,
        /// Keys per causal window; -1 none.
        window: i32,
        /// 0: none.
        softcap: f32,
    }

    impl Attn {
        fn tokens(&self) -> usize {
            self.lengths.iter().sum()
        }

        /// The kernel's output in the given thread order, for q, k, v of
        /// [`values`] (seeds 31, 32, 33).
        fn run(&self, order: Order) -> Vec<f32> {
            let (tokens, ldq, ldk) = (self.tokens(), self.heads * self.hd, self.kv_heads * self.hd);
            let (q, k, v) = (
                values(tokens * ldq, 31),
                values(tokens * ldk, 32),
                values(tokens * ldk, 33),
            );
            let (start, end) = self.bounds();
            let (q_tile, k_tile) = crate::device::cuda::kernels::attention_tiles(self.hd);
            let mut out = vec![f32::NAN; tokens * ldq];
            // SAFETY: the buffers hold what the shapes above imply.
            unsafe {
                launch_ordered(
                    "attention",
                    (tokens.div_ceil(q_tile) as u32, self.heads as u32, 1),
                    THREADS,
                    &[
                        p(&q),
                        p(&k),
                        p(&v),
                        pm(&mut out),
                        p(&start),
                        p(&end),
                        Arg::I32(tokens as i32),
                        Arg::I32(self.heads as i32),
                        Arg::I32(self.kv_heads as i32),
                        Arg::I32(self.hd as i32),
                        Arg::I32(ldq as i32),
                        Arg::I32(ldk as i32),
                        Arg::I32(ldk as i32),
                        Arg::F32(self.scale()),
                        Arg::F32(self.softcap),
                        Arg::I32(self.causal),
                        Arg::I32(self.window),
                        Arg::I32(q_tile as i32),
                        Arg::I32(k_tile as i32),
                    ],
                    order,
                )
            }
            .unwrap();
            out
        }

        fn scale(&self) -> f32 {
            1.0 / (self.hd as f32).sqrt()
        }

        /// Each token's sequence, as `cuda::segment_bounds` gives it.
        fn bounds(&self) -> (Vec<i32>, Vec<i32>) {
            let (mut start, mut end, mut s0) = (Vec::new(), Vec::new(), 0);
            for &n in self.lengths {
                start.extend(std::iter::repeat_n(s0 as i32, n));
                end.extend(std::iter::repeat_n((s0 + n) as i32, n));
                s0 += n;
            }
            (start, end)
        }

        /// Softmax attention in f64, each query over its keys (none: 0).
        fn reference(&self) -> Vec<f64> {
            let (tokens, hd) = (self.tokens(), self.hd);
            let (ldq, ldk) = (self.heads * hd, self.kv_heads * hd);
            let (q, k, v) = (
                values(tokens * ldq, 31),
                values(tokens * ldk, 32),
                values(tokens * ldk, 33),
            );
            let (start, end) = self.bounds();
            let mut out = vec![0.0f64; tokens * ldq];
            for i in 0..tokens {
                let (mut lo, mut hi) = (start[i] as usize, end[i] as usize);
                if self.causal == 1 {
                    hi = i + 1;
                    if self.window >= 0 {
                        lo = lo.max((i + 1).saturating_sub(self.window as usize));
                    }
                }
                for h in 0..self.heads {
                    let kv = h / (self.heads / self.kv_heads);
                    let scores: Vec<f64> = (lo..hi)
                        .map(|key| {
                            let s = (0..hd)
                                .map(|j| {
                                    q[i * ldq + h * hd + j] as f64
                                        * k[key * ldk + kv * hd + j] as f64
                                })
                                .sum::<f64>()
                                * self.scale() as f64;
                            match self.softcap as f64 {
                                0.0 => s,
                                cap => (s / cap).tanh() * cap,
                            }
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let l: f64 = e.iter().sum();
                    for j in 0..hd {
                        out[(i * self.heads + h) * hd + j] = (lo..hi)
                            .zip(&e)
                            .map(|(key, w)| w * v[key * ldk + kv * hd + j] as f64)
                            .sum::<f64>()
                            / l.max(f64::MIN_POSITIVE);
                    }
                }
            }
            out
        }
    }

    /// The tiled attention against softmax attention in f64: packed sequences (empty, one token,
    /// and one of several key tiles), GQA, causal with no window, windows of 0 (no key: output
    /// 0), 1 and 100, bidirectional, soft-capping; head_dim 40, 128 (Llama), 256 (Gemma, smaller
    /// tiles) and 1024 (the largest, tiles of 4); the same bits in either thread order.
    #[test]
    fn attention_matches_an_f64_reference_over_several_tiles() {
        let packed: &[usize] = &[70, 0, 1, 31, 9];
        let mut cases = Vec::new();
        for (causal, window, softcap) in [
            (1, -1, 0.0f32),
            (1, 0, 0.0),
            (1, 1, 0.0),
            (1, 100, 0.0),
            (0, -1, 0.0),
            (1, 33, 1.5),
            (0, -1, 0.5),
        ] {
            cases.push(Attn {
                lengths: packed,
                heads: 4,
                kv_heads: 2,
                hd: 40,
                causal,
                window,
                softcap,
            });
        }
        for (hd, lengths) in [
            (128usize, &[37usize, 33][..]),
            (256, &[20, 19][..]),
            (1024, &[6, 5][..]),
        ] {
            for (causal, window, softcap) in [(1, -1, 0.0f32), (1, 5, 0.0), (0, -1, 50.0)] {
                cases.push(Attn {
                    lengths,
                    heads: 2,
                    kv_heads: 1,
                    hd,
                    causal,
                    window,
                    softcap,
                });
            }
        }
        for a in &cases {
            let what = format!(
                "head_dim {} causal {} window {} softcap {}",
                a.hd, a.causal, a.window, a.softcap
            );
            let got = a.run(Order::Forward);
            let reversed = a.run(Order::Reverse);
            assert!(
                got.iter()
                    .zip(&reversed)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{what}: the thread order changed the result"
            );
            let want = a.reference();
            let mut worst = 0.0f64;
            for (n, (g, w)) in got.iter().zip(&want).enumerate() {
                let err = (*g as f64 - w).abs();
                worst = worst.max(err);
                // Values in [-1, 1): f32 scores and sums over at most 110 keys and 1024 features (errors
                // seen: up to 4e-7).
                assert!(err < 2e-6, "{what}: value {n}: {g} vs {w}");
            }
            if a.window == 0 {
                assert!(got.iter().all(|&g| g == 0.0), "{what}: no key, no output");
            }
            eprintln!("{what}: max error {worst:.1e}");
        }
    }

    /// kernels.cu's block reduction is right; the same without its inner barrier is wrong, and a
    /// race between barriers shows in one thread order or the other.
    #[test]
    fn a_missing_barrier_gives_a_wrong_result() {
        let blocks = 4;
        let x: Vec<f64> = (0..blocks * 256).map(|i| (i % 97) as f64 + 1.0).collect();
        let want: Vec<f64> = x.chunks(256).map(|c| c.iter().sum()).collect();
        for order in [Order::Forward, Order::Reverse] {
            let mut out = vec![0.0f64; blocks];
            // SAFETY: x holds blocks·256 values, out blocks.
            unsafe {
                launch_test_kernel(
                    "sum_blocks",
                    grid(blocks),
                    THREADS,
                    &[p(&x), pm(&mut out), Arg::I32(0)],
                    order,
                )
            }
            .unwrap();
            assert_eq!(out, want, "{order:?}");
        }
        let mut out = vec![0.0f64; blocks];
        // SAFETY: as above.
        unsafe {
            launch_test_kernel(
                "sum_blocks",
                grid(blocks),
                THREADS,
                &[p(&x), pm(&mut out), Arg::I32(1)],
                Order::Forward,
            )
        }
        .unwrap();
        for b in 0..blocks {
            assert_ne!(out[b], want[b], "block {b}: the racy reduction was right");
        }

        // Reading the left neighbour's slot without a barrier: right in forward order (the
        // neighbour ran first), NaN (unwritten shared memory) in reverse.
        let x: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let want: Vec<f32> = (0..256).map(|i| (i as f32 - 1.0).max(0.0)).collect();
        let mut fwd = vec![0.0f32; 256];
        let mut rev = vec![0.0f32; 256];
        // SAFETY: 256 values each.
        unsafe {
            launch_test_kernel(
                "left_neighbour",
                grid(1),
                THREADS,
                &[p(&x), pm(&mut fwd)],
                Order::Forward,
            )
            .unwrap();
            launch_test_kernel(
                "left_neighbour",
                grid(1),
                THREADS,
                &[p(&x), pm(&mut rev)],
                Order::Reverse,
            )
            .unwrap();
        }
        assert_eq!(fwd, want);
        assert!(rev[1..].iter().all(|v| v.is_nan()), "{:?}", &rev[..4]);
    }

    #[test]
    fn barrier_misuse_is_an_error_naming_the_barrier() {
        let mut out = vec![0.0f32; 256];
        // SAFETY: 256 values.
        let e = unsafe {
            launch_test_kernel(
                "exit_before_barrier",
                grid(2),
                THREADS,
                &[pm(&mut out), Arg::I32(100)],
                Order::Forward,
            )
        }
        .unwrap_err();
        assert_eq!(e.fault, Fault::BarrierAfterExit, "{e}");
        assert!(
            e.message
                .contains("156 of 256 threads returned while 100 wait"),
            "{e}"
        );
        assert!(e.message.contains("test_kernels.cu:"), "{e}");
        // All threads at the barrier: fine.
        // SAFETY: as above.
        unsafe {
            launch_test_kernel(
                "exit_before_barrier",
                grid(2),
                THREADS,
                &[pm(&mut out), Arg::I32(256)],
                Order::Forward,
            )
        }
        .unwrap();
        assert!(out.iter().all(|v| *v == 1.0));

        // SAFETY: as above.
        let e = unsafe {
            launch_test_kernel(
                "divergent_barriers",
                grid(1),
                THREADS,
                &[pm(&mut out)],
                Order::Forward,
            )
        }
        .unwrap_err();
        assert_eq!(e.fault, Fault::BarrierDivergence, "{e}");
        assert!(
            e.message.contains("128 at") && e.message.contains("different __syncthreads()"),
            "{e}"
        );
    }

    #[test]
    fn shared_memory_starts_every_block_as_nan() {
        let blocks = 3;
        let mut out = vec![0.0f32; blocks * 256];
        // SAFETY: blocks·256 values.
        unsafe {
            launch_test_kernel(
                "read_unwritten",
                grid(blocks),
                THREADS,
                &[pm(&mut out), Arg::I32(256)],
                Order::Forward,
            )
        }
        .unwrap();
        assert!(out
            .iter()
            .enumerate()
            .all(|(i, v)| *v == ((i / 256) * 1000 + i % 256) as f32));
        // Now only half the slots are written: the other half is NaN in every block, not what
        // the previous block left there.
        // SAFETY: as above.
        unsafe {
            launch_test_kernel(
                "read_unwritten",
                grid(blocks),
                THREADS,
                &[pm(&mut out), Arg::I32(128)],
                Order::Forward,
            )
        }
        .unwrap();
        for (i, v) in out.iter().enumerate() {
            let (b, t) = (i / 256, i % 256);
            if t < 128 {
                assert_eq!(*v, (b * 1000 + t) as f32);
            } else {
                assert!(v.is_nan(), "block {b} thread {t}: {v}");
            }
        }
    }

    #[test]
    fn threads_see_their_coordinates_and_arguments_their_types() {
        let (g, b) = ((3u32, 2u32, 2u32), (4u32, 3u32, 2u32));
        let total = (g.0 * g.1 * g.2 * b.0 * b.1 * b.2) as usize;
        let mut out = vec![u32::MAX; 4 * total + 6];
        // SAFETY: 4 values per thread and 6 more.
        unsafe {
            launch_test_kernel(
                "coordinates",
                g,
                b,
                &[pm(&mut out), Arg::U64(total as u64)],
                Order::Reverse,
            )
        }
        .unwrap();
        let per_block = (b.0 * b.1 * b.2) as usize;
        for gi in 0..total {
            let (blk, t) = (gi / per_block, gi % per_block);
            let (tx, ty, tz) = (
                t as u32 % b.0,
                (t as u32 / b.0) % b.1,
                t as u32 / (b.0 * b.1),
            );
            let (bx, by, bz) = (
                blk as u32 % g.0,
                (blk as u32 / g.0) % g.1,
                blk as u32 / (g.0 * g.1),
            );
            assert_eq!(
                out[4 * gi..4 * gi + 4],
                [
                    t as u32,
                    blk as u32,
                    tx | ty << 10 | tz << 20,
                    bx | by << 10 | bz << 20
                ],
                "thread {gi}"
            );
        }
        assert_eq!(out[4 * total..], [b.0, b.1, b.2, g.0, g.1, g.2]);

        let mut s = [0.0f64; 6];
        // SAFETY: 6 values.
        unsafe {
            launch_test_kernel(
                "scalars",
                grid(1),
                (32, 1, 1),
                &[
                    pm(&mut s),
                    Arg::I32(-5),
                    Arg::I32(-1),
                    Arg::F32(1.5),
                    Arg::U64(1 << 40),
                    Arg::U64((-2.25f64).to_bits()),
                    Arg::U64((-7i64) as u64),
                ],
                Order::Forward,
            )
        }
        .unwrap();
        assert_eq!(
            s,
            [-5.0, u32::MAX as f64, 1.5, (1u64 << 40) as f64, -2.25, -7.0]
        );

        let pred: Vec<i32> = (0..256).map(|i| (i % 3 == 0) as i32).collect();
        let mut votes = vec![-1i32; 3 * 256];
        // SAFETY: 256 predicates, 3 results each.
        unsafe {
            launch_test_kernel(
                "vote",
                grid(1),
                THREADS,
                &[p(&pred), pm(&mut votes)],
                Order::Forward,
            )
        }
        .unwrap();
        assert!(
            votes.chunks(3).all(|v| v == [86, 0, 1]),
            "{:?}",
            &votes[..3]
        );
    }

    #[test]
    fn locals_survive_many_barriers() {
        let (blocks, threads, rounds) = (3usize, 200usize, 50);
        let mut out = vec![0u64; blocks * threads];
        // SAFETY: one value per thread.
        unsafe {
            launch_test_kernel(
                "keeps_locals",
                grid(blocks),
                (threads as u32, 1, 1),
                &[pm(&mut out), Arg::I32(rounds)],
                Order::Forward,
            )
        }
        .unwrap();
        for t in 0..threads {
            let mut mix = 0u64;
            let mut f = t as f64 * 0.5;
            for r in 0..rounds as usize {
                let other = (t + r) % threads;
                mix = mix
                    .wrapping_mul(31)
                    .wrapping_add(other as u64 + 1 + r as u64);
                f = f * 1.0000001 + 1.0;
            }
            for b in 0..blocks {
                assert_eq!(out[b * threads + t], mix ^ f as u64, "block {b} thread {t}");
            }
        }
    }

    #[test]
    fn bad_launches_are_errors_not_crashes() {
        let x = vec![0.0f32; 4];
        let a = [p(&x), p(&x), Arg::U64(0)];
        // SAFETY: every launch below is refused before it runs (n = 0 would touch nothing).
        unsafe {
            assert_eq!(
                launch("no_such_kernel", grid(1), THREADS, &a)
                    .unwrap_err()
                    .fault,
                Fault::UnknownKernel
            );
            assert_eq!(
                launch("add", grid(1), THREADS, &a[..2]).unwrap_err().fault,
                Fault::ArgCount
            );
            let e = launch("add", grid(1), THREADS, &[p(&x), p(&x), Arg::I32(4)]).unwrap_err();
            assert_eq!(e.fault, Fault::ArgKind, "{e}");
            assert!(e.message.contains("argument 2 is I32(4)"), "{e}");
            for (g, b) in [
                ((0, 1, 1), THREADS),
                (grid(1), (2048, 1, 1)),
                (grid(1), (32, 32, 2)),
                (grid(1), (1, 1, 65)),
            ] {
                let e = launch("add", g, b, &a).unwrap_err();
                assert_eq!(e.fault, Fault::Config, "{g:?} {b:?}: {e}");
            }
            // The C entry point checks the count itself.
            assert_eq!(
                kernels::launch_plain("add", [1, 1, 1], [256, 1, 1], &[0, 0]),
                2
            );
            assert_eq!(
                kernels::launch_plain("nope", [1, 1, 1], [256, 1, 1], &[]),
                1
            );
            assert_eq!(
                kernels::launch_plain("add", [1, 1, 1], [256, 1, 1], &[0, 0, 0]),
                0
            );
        }
    }

    /// CPU time of the calling thread (a launch runs on it): unlike the wall clock, not
    /// inflated by other processes on a shared machine or by other tests' launches, which the
    /// executor's lock serializes with this one.
    fn thread_cpu_seconds() -> f64 {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: writes the timespec.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        assert_eq!(rc, 0);
        t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
    }

    /// 4096 blocks of 256 threads through 10 barriers each (rms_norm's block_sum: 11.5 million
    /// fiber resumptions), the cost the emulated suite pays per launch of a reduction over 4096
    /// rows: well under a second of CPU.
    #[test]
    fn a_launch_of_a_million_threads_with_barriers_takes_well_under_a_second() {
        let (rows, d) = (4096usize, 256usize);
        let x = values(rows * d, 41);
        let w = values(d, 42);
        let mut out = vec![0.0f32; rows * d];
        let (mut cpu, mut wall) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..3 {
            let (c, t) = (thread_cpu_seconds(), std::time::Instant::now());
            // SAFETY: rows·d values, w d.
            unsafe {
                launch(
                    "rms_norm",
                    grid(rows),
                    THREADS,
                    &[
                        p(&x),
                        p(&w),
                        pm(&mut out),
                        Arg::I32(d as i32),
                        Arg::F32(1e-6),
                    ],
                )
            }
            .unwrap();
            cpu = cpu.min(thread_cpu_seconds() - c);
            wall = wall.min(t.elapsed().as_secs_f64());
        }
        let n = rows * d;
        let mut y = values(n, 43);
        let c = thread_cpu_seconds();
        // SAFETY: n values each.
        unsafe {
            launch(
                "add",
                grid(rows),
                THREADS,
                &[pm(&mut y), p(&x), Arg::U64(n as u64)],
            )
        }
        .unwrap();
        let plain = thread_cpu_seconds() - c;
        eprintln!(
            "emulated launches of {rows} x {BLOCK} threads: rms_norm (10 barriers) {:.0} ms CPU, {:.0} ms wall (best of 3); add (no barrier) {:.0} ms CPU",
            cpu * 1e3,
            wall * 1e3,
            plain * 1e3
        );
        assert!(
            cpu < 1.0,
            "rms_norm over {rows} rows took {cpu:.2} s of CPU"
        );
    }
}
