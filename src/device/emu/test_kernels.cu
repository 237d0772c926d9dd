// The emulated device's own test kernels (src/device/emu/mod.rs's tests), compiled like
// kernels.cu with shim.h: a correct and a broken copy of kernels.cu's block reduction, races,
// barrier misuse, and the plumbing (coordinates, arguments, shared memory). Never compiled for a
// GPU.

#define BLOCK 256

// kernels.cu's block_sum, as it is.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] = shared[threadIdx.x] + shared[threadIdx.x + s];
        __syncthreads();
    }
    T r = shared[0];
    __syncthreads();
    return r;
}

// The same without the barrier inside the tree: a thread reads its partner's partial sum before
// the partner wrote it.
template <typename T>
__device__ __forceinline__ T block_sum_racy(T v, T* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] = shared[threadIdx.x] + shared[threadIdx.x + s];
    }
    T r = shared[0];
    __syncthreads();
    return r;
}

// out[block] = the sum of x[block·BLOCK .. (block+1)·BLOCK), through block_sum or its broken copy.
extern "C" __global__ void sum_blocks(const double* __restrict__ x, double* __restrict__ out, int racy) {
    __shared__ double shared[BLOCK];
    double v = x[(unsigned long long)blockIdx.x * BLOCK + threadIdx.x];
    double r = racy ? block_sum_racy(v, shared) : block_sum(v, shared);
    if (threadIdx.x == 0) out[blockIdx.x] = r;
}

// Each thread publishes x[t] and reads its left neighbour's without a barrier between: right only
// when the neighbour happens to run first.
extern "C" __global__ void left_neighbour(const float* __restrict__ x, float* __restrict__ out) {
    __shared__ float shared[BLOCK];
    unsigned t = threadIdx.x;
    shared[t] = x[t];
    out[t] = t > 0 ? shared[t - 1] : 0.0f;
}

// Threads from `keep` on return before the barrier the others wait at.
extern "C" __global__ void exit_before_barrier(float* __restrict__ out, int keep) {
    __shared__ float shared[BLOCK];
    if ((int)threadIdx.x >= keep) return;
    shared[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = shared[0];
}

// The two halves of the block wait at different barriers.
extern "C" __global__ void divergent_barriers(float* __restrict__ out) {
    if (threadIdx.x < BLOCK / 2) {
        out[threadIdx.x] = 1.0f;
        __syncthreads();
    } else {
        out[threadIdx.x] = 2.0f;
        __syncthreads();
    }
}

// Threads below `written` write their shared slot; every thread reads its own back after a
// barrier: the others read what no thread of this block wrote.
extern "C" __global__ void read_unwritten(float* __restrict__ out, int written) {
    __shared__ float shared[BLOCK];
    if ((int)threadIdx.x < written) shared[threadIdx.x] = (float)(blockIdx.x * 1000 + threadIdx.x);
    __syncthreads();
    out[(unsigned long long)blockIdx.x * blockDim.x + threadIdx.x] = shared[threadIdx.x];
}

// Every thread's coordinates: out[4 · global linear thread + (0..3)] = linear thread in block,
// linear block, packed threadIdx (x | y << 10 | z << 20), packed blockIdx (x | y << 10 | z << 20),
// and out[0..6] of the first thread also get blockDim and gridDim after the 4 coordinates
// (out has room for 6 more values at its end: the caller's last 6 slots).
extern "C" __global__ void coordinates(unsigned int* __restrict__ out, unsigned long long total) {
    unsigned long long t = threadIdx.x + blockDim.x * (threadIdx.y + (unsigned long long)blockDim.y * threadIdx.z);
    unsigned long long b = blockIdx.x + gridDim.x * (blockIdx.y + (unsigned long long)gridDim.y * blockIdx.z);
    unsigned long long g = b * blockDim.x * blockDim.y * blockDim.z + t;
    out[4 * g + 0] = (unsigned int)t;
    out[4 * g + 1] = (unsigned int)b;
    out[4 * g + 2] = threadIdx.x | threadIdx.y << 10 | threadIdx.z << 20;
    out[4 * g + 3] = blockIdx.x | blockIdx.y << 10 | blockIdx.z << 20;
    if (g == 0) {
        unsigned int* dims = out + 4 * total;
        dims[0] = blockDim.x;
        dims[1] = blockDim.y;
        dims[2] = blockDim.z;
        dims[3] = gridDim.x;
        dims[4] = gridDim.y;
        dims[5] = gridDim.z;
    }
}

// Every kind of argument slot, written back as it arrived.
extern "C" __global__ void scalars(double* __restrict__ out, int i, unsigned int u, float f, unsigned long long n, double d, long long l) {
    if (threadIdx.x != 0) return;
    out[0] = (double)i;
    out[1] = (double)u;
    out[2] = (double)f;
    out[3] = (double)n;
    out[4] = d;
    out[5] = (double)l;
}

// __syncthreads_count/and/or of pred[t]: out[3t..3t+3].
extern "C" __global__ void vote(const int* __restrict__ pred, int* __restrict__ out) {
    unsigned t = threadIdx.x;
    int p = pred[t];
    int c = __syncthreads_count(p);
    int a = __syncthreads_and(p);
    int o = __syncthreads_or(p);
    out[3 * t] = c;
    out[3 * t + 1] = a;
    out[3 * t + 2] = o;
}

// Locals that live across many barriers (callee-saved registers and the fiber's stack): each
// thread's running value through `rounds` barriers, with the block rotating a shared word.
extern "C" __global__ void keeps_locals(unsigned long long* __restrict__ out, int rounds) {
    __shared__ unsigned long long word[BLOCK];
    unsigned long long mine = threadIdx.x + 1, mix = 0;
    double f = threadIdx.x * 0.5;
    for (int r = 0; r < rounds; r++) {
        word[threadIdx.x] = mine + r;
        __syncthreads();
        mix = mix * 31 + word[(threadIdx.x + r) % blockDim.x];
        f = f * 1.0000001 + 1.0;
        __syncthreads();
    }
    out[(unsigned long long)blockIdx.x * blockDim.x + threadIdx.x] = mix ^ (unsigned long long)f;
}
