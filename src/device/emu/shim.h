// eva's CUDA shim: what `kernels.cu` needs to compile as host C++17 (g++, `-ffp-contract=off`)
// and to run under the emulated device's executor (executor.cpp). Not a CUDA header: only the
// dialect and the intrinsics eva's kernels use, each with CUDA's semantics for finite inputs.
//
// How the CUDA model maps onto the host (see executor.cpp for the scheduler):
// - A launch runs its blocks one after another on the launching OS thread; the threads of a block
//   run as fibers (stackful coroutines), round-robin, each until its next `__syncthreads()` or its
//   return. `threadIdx`, `blockIdx`, `blockDim`, `gridDim` are globals the scheduler sets before
//   it resumes a fiber, so every thread sees its own.
// - `__shared__` variables are `static`, placed in the section `eva_shared`: one copy, which
//   serves the one block in flight; the executor fills the whole section with 0xFF bytes (NaN as
//   f32/f64, -1 as integers) at the start of every block, so reading what no thread wrote shows.
// - Atomics are plain read-modify-writes: fibers never interleave inside one, and launches are
//   serialized process-wide.
//
// Arithmetic: CUDA compiles eva's kernels with `--fmad=false` and IEEE division and square root
// (NVRTC's defaults, no fast math); g++ with `-ffp-contract=off` on x86-64 SSE gives the same
// roundings for +, -, *, /, sqrtf and all conversions. The transcendental functions (`expf`,
// `tanhf`, ...) are glibc's, which may differ from CUDA's by an ulp or two (CUDA documents
// expf at 2 ulp, tanhf at 2 ulp); results through them agree to that, not bit for bit.
//
// Not emulated (a kernel using them fails to compile here, by design): warp-level intrinsics
// (`__shfl_sync`, `__ballot_sync`, `__activemask`, ...), cooperative groups, textures, dynamic
// parallelism, `__constant__` memory.
#pragma once

#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstring>

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};

namespace eva_emu {
// The current thread's coordinates, set by the executor before it resumes a fiber.
extern uint3 thread_idx;
extern uint3 block_idx;
extern dim3 block_dim;
extern dim3 grid_dim;
// The block barrier; `line`/`file` name the `__syncthreads()` call site, so that threads waiting
// at different barriers are reported. `pred`/`mode` serve `__syncthreads_count/and/or`.
int barrier(const char* file, int line, int pred, int mode);
} // namespace eva_emu

#define threadIdx (::eva_emu::thread_idx)
#define blockIdx (::eva_emu::block_idx)
#define blockDim (::eva_emu::block_dim)
#define gridDim (::eva_emu::grid_dim)
#define warpSize 32

#define __global__ __attribute__((visibility("hidden")))
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
// `__restrict__` is a g++ keyword already.
#define __shared__ static __attribute__((section("eva_shared")))

#define __syncthreads() ((void)::eva_emu::barrier(__FILE__, __LINE__, 0, 0))
#define __syncthreads_count(p) (::eva_emu::barrier(__FILE__, __LINE__, (p) != 0, 1))
#define __syncthreads_and(p) (::eva_emu::barrier(__FILE__, __LINE__, (p) != 0, 2))
#define __syncthreads_or(p) (::eva_emu::barrier(__FILE__, __LINE__, (p) != 0, 3))
// Fibers switch only at barriers, so every write is visible to the others at once; a fence only
// has to stop the compiler from moving memory accesses across it.
#define __threadfence() __asm__ __volatile__("" ::: "memory")
#define __threadfence_block() __asm__ __volatile__("" ::: "memory")

// ---- bit reinterpretation -------------------------------------------------------------------
static inline float __int_as_float(int v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
static inline float __uint_as_float(unsigned int v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
static inline int __float_as_int(float f) {
    int v;
    std::memcpy(&v, &f, 4);
    return v;
}
static inline unsigned int __float_as_uint(float f) {
    unsigned int v;
    std::memcpy(&v, &f, 4);
    return v;
}
static inline double __longlong_as_double(long long v) {
    double d;
    std::memcpy(&d, &v, 8);
    return d;
}
static inline long long __double_as_longlong(double d) {
    long long v;
    std::memcpy(&v, &d, 8);
    return v;
}

// ---- integer min/max (CUDA's overloads; the float ones are fminf/fmaxf) ----------------------
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
static inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

// ---- float math -----------------------------------------------------------------------------
// fmaxf/fminf/fabsf/copysignf/sqrtf/floorf/... come from <cmath> (C99, same as CUDA: fmaxf
// returns the other operand when one is NaN; sqrtf is correctly rounded as CUDA's default
// -prec-sqrt=true). expf/tanhf/logf/... are glibc's (within CUDA's ulp bounds, not identical).
// CUDA's rsqrtf is an approximation (2 ulp); here it is the correctly rounded 1/sqrt.
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
// The fast intrinsics: CUDA's are less accurate than these; a kernel compiled without fast math
// that calls them still gets an approximation on the GPU, so results agree only within that.
// (glibc's math.h declares its own __expf/__logf: macros, so as not to redeclare them.)
#define __expf(x) expf(x)
#define __logf(x) logf(x)
static inline float __fdividef(float a, float b) { return a / b; }

// ---- atomics (see the top: plain read-modify-writes are atomic here) -------------------------
template <typename T, typename U> static inline T atomicAdd(T* p, U u) {
    T v = (T)u, old = *p;
    *p = old + v;
    return old;
}
template <typename T, typename U> static inline T atomicSub(T* p, U u) {
    T v = (T)u, old = *p;
    *p = old - v;
    return old;
}
template <typename T, typename U> static inline T atomicExch(T* p, U u) {
    T v = (T)u, old = *p;
    *p = v;
    return old;
}
template <typename T, typename U> static inline T atomicMax(T* p, U u) {
    T v = (T)u, old = *p;
    if (v > old) *p = v;
    return old;
}
template <typename T, typename U> static inline T atomicMin(T* p, U u) {
    T v = (T)u, old = *p;
    if (v < old) *p = v;
    return old;
}
template <typename T, typename U, typename V> static inline T atomicCAS(T* p, U compare, V u) {
    T v = (T)u;
    T old = *p;
    if (old == (T)compare) *p = v;
    return old;
}
template <typename T, typename U> static inline T atomicOr(T* p, U u) {
    T v = (T)u, old = *p;
    *p = old | v;
    return old;
}
template <typename T, typename U> static inline T atomicAnd(T* p, U u) {
    T v = (T)u, old = *p;
    *p = old & v;
    return old;
}
template <typename T, typename U> static inline T atomicXor(T* p, U u) {
    T v = (T)u, old = *p;
    *p = old ^ v;
    return old;
}
