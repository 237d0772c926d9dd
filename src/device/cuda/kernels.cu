// eva's CUDA kernels: everything of the forward pass and of the statistics that is not a cuBLAS
// product. Compiled by NVRTC at run time for the device's compute capability (kernels.rs), with
// `--fmad=false` so that `a * b + c` rounds twice, as the CPU reference (src/device/cpu.rs) does.
//
// Each kernel mirrors one CPU op; the comment above it names it. Activations are f32, row-major
// `[tokens, features]`; weights are f32 or bf16 (`bf16_t`, converted here by hand so that no CUDA
// header is needed); sums that the CPU takes in f64 are taken in f64 here too. Block reductions
// are shared-memory trees over a fixed block size, so every result is independent of scheduling.

typedef unsigned short bf16_t;

#define BLOCK 256
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf16_to_f32(bf16_t v) { return __uint_as_float(((unsigned int)v) << 16); }

// Round to nearest even, NaN kept quiet (as `half::bf16::from_f32` and PyTorch's `.bfloat16()`).
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// Tree sum of one value per thread over a block of BLOCK threads; every thread gets the result.
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

__device__ __forceinline__ float block_max(float v, float* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] = fmaxf(shared[threadIdx.x], shared[threadIdx.x + s]);
        __syncthreads();
    }
    float r = shared[0];
    __syncthreads();
    return r;
}

// backend::erf: Abramowitz & Stegun 7.1.26, as PyTorch's vectorized CPU kernels and eva's CPU backend.
__device__ __forceinline__ float erf_as(float x) {
    const float P = 0.3275911f;
    float ax = fabsf(x);
    float t = 1.0f / (P * ax + 1.0f);
    float r = (((1.0614054f * t + -1.4531521f) * t + 1.4214138f) * t + -0.28449674f) * t + 0.2548296f;
    float y = 1.0f - r * t * expf(-ax * ax);
    return copysignf(y, x);
}

// backend::Activation::apply. 0 silu, 1 gelu (erf), 2 gelu tanh, 3 relu.
__device__ __forceinline__ float activate(float x, int act) {
    switch (act) {
    case 0: return x / (1.0f + expf(-x));
    case 1: return 0.5f * x * (1.0f + erf_as(x * 0.70710677f));
    case 2: return 0.5f * x * (1.0f + tanhf(0.7978846f * (x + 0.044715f * x * x * x)));
    default: return fmaxf(x, 0.0f);
    }
}

// x as bf16 (the GEMM input of a bf16 linear layer).
extern "C" __global__ void cast_bf16(const float* __restrict__ x, bf16_t* __restrict__ y, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x)
        y[i] = f32_to_bf16(x[i]);
}

// Backend::embed: x[t] += table[ids[t]] (ids checked on the host). One block per token.
extern "C" __global__ void embed_f32(float* __restrict__ x, const float* __restrict__ table, const unsigned int* __restrict__ ids, int dim) {
    const float* row = table + (unsigned long long)ids[blockIdx.x] * dim;
    float* out = x + (unsigned long long)blockIdx.x * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) out[j] += row[j];
}

extern "C" __global__ void embed_bf16(float* __restrict__ x, const bf16_t* __restrict__ table, const unsigned int* __restrict__ ids, int dim) {
    const bf16_t* row = table + (unsigned long long)ids[blockIdx.x] * dim;
    float* out = x + (unsigned long long)blockIdx.x * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) out[j] += bf16_to_f32(row[j]);
}

// Backend::linear's start: every output row is the bias (cuBLAS then adds x Wᵀ with beta = 1).
extern "C" __global__ void fill_rows(float* __restrict__ y, const float* __restrict__ b, int cols) {
    float* out = y + (unsigned long long)blockIdx.x * cols;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) out[j] = b[j];
}

// Backend::add: x += y.
extern "C" __global__ void add(float* __restrict__ x, const float* __restrict__ y, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x)
        x[i] += y[i];
}

// Backend::rms_norm: out = w · (x / sqrt(mean(x²) + eps)), the mean of squares in f64. One block
// (BLOCK threads) per token.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ out, int d, float eps) {
    __shared__ double shared[BLOCK];
    const float* row = x + (unsigned long long)blockIdx.x * d;
    float* o = out + (unsigned long long)blockIdx.x * d;
    double acc = 0.0;
    for (int j = threadIdx.x; j < d; j += BLOCK) {
        double v = (double)row[j];
        acc += v * v;
    }
    double ms = block_sum(acc, shared) / (double)d;
    float inv = 1.0f / sqrtf((float)ms + eps);
    for (int j = threadIdx.x; j < d; j += BLOCK) o[j] = w[j] * (row[j] * inv);
}

// Backend::layer_norm and add_layer_norm: v = x (+ residual), out = (v - mean) / sqrt(var + eps)
// · w + b, mean and biased variance in f64 (two passes). `out` may be `x`: each thread reads
// back only the elements it wrote. One block per token.
extern "C" __global__ void layer_norm(const float* x, const float* __restrict__ residual, const float* __restrict__ w, const float* __restrict__ b, float* out, int d, float eps) {
    __shared__ double shared[BLOCK];
    const float* row = x + (unsigned long long)blockIdx.x * d;
    const float* res = residual ? residual + (unsigned long long)blockIdx.x * d : 0;
    float* o = out + (unsigned long long)blockIdx.x * d;
    double acc = 0.0;
    for (int j = threadIdx.x; j < d; j += BLOCK) {
        float v = row[j];
        if (res) v += res[j];
        o[j] = v;
        acc += (double)v;
    }
    double mean = block_sum(acc, shared) / (double)d;
    acc = 0.0;
    for (int j = threadIdx.x; j < d; j += BLOCK) {
        double c = (double)o[j] - mean;
        acc += c * c;
    }
    double var = block_sum(acc, shared) / (double)d;
    float inv = 1.0f / sqrtf((float)var + eps);
    float m = (float)mean;
    for (int j = threadIdx.x; j < d; j += BLOCK) o[j] = (o[j] - m) * inv * w[j] + b[j];
}

// Backend::rope, HF's rotate_half layout over the first 2·half features of each head (half =
// head_dim / 2, or fewer with partial rotary; the rest pass through): (x1, x2) = (x[i],
// x[i + half]) becomes (x1 cos - x2 sin, x2 cos + x1 sin). cos/sin are `[tokens, half]`. One
// thread per pair.
extern "C" __global__ void rope(float* __restrict__ x, const float* __restrict__ cos_t, const float* __restrict__ sin_t, int tokens, int d, int head_dim, int half) {
    int pairs_per_token = d / head_dim * half;
    unsigned long long total = (unsigned long long)tokens * pairs_per_token;
    for (unsigned long long p = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; p < total; p += (unsigned long long)gridDim.x * blockDim.x) {
        int t = (int)(p / pairs_per_token);
        int r = (int)(p % pairs_per_token);
        int head = r / half, i = r % half;
        float* h = x + (unsigned long long)t * d + (unsigned long long)head * head_dim;
        float c = cos_t[(unsigned long long)t * half + i], s = sin_t[(unsigned long long)t * half + i];
        float x1 = h[i], x2 = h[i + half];
        h[i] = x1 * c - x2 * s;
        h[i + half] = x2 * c + x1 * s;
    }
}

// Backend::attention over packed sequences, tiled (flash-attention style): a block takes
// `q_tile` consecutive query tokens of one head (blockIdx.y) and walks their keys in tiles of
// `k_tile`, staged in shared memory (keys, then values, in one buffer), with an exact online
// softmax per query (running max and sum, the output rescaled per tile). Query i's keys are those
// of its own sequence [seq_start, seq_end), cut to [i + 1 - window, i] when causal (window < 0:
// no window; window 0: no key at all, and the output 0), as cpu::softmax_rows. Scores `scale · q·k`, soft-capped to `softcap · tanh(s / softcap)` when
// softcap > 0; masked keys are never touched (weight exactly 0, as on the CPU). GQA: query head h
// reads key/value head h / (heads / kv_heads).
//
// Each value is computed by one thread in a fixed order (the dot products over head_dim, the
// softmax over a tile's keys, the weighted sum of values), and every shared value is read only
// after a barrier: the result does not depend on how the threads are scheduled. The tile sizes
// (kernels.rs, attention_tiles) keep q_tile·head_dim ≤ ATT_Q, k_tile·(head_dim + 1) ≤ ATT_KV and
// both tiles ≤ ATT_T: 37 KB of static shared memory, under the 48 KB every GPU gives a block.
// Rows of the key/value tile are padded to head_dim + 1 floats and rows of the weights to ATT_T + 1,
// so that the threads of a warp read distinct banks.
#define ATT_T 32
#define ATT_Q 4096
#define ATT_KV 4160
#define ATT_ACC (ATT_Q / BLOCK)
extern "C" __global__ void attention(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, float* __restrict__ out,
                                     const int* __restrict__ seq_start, const int* __restrict__ seq_end, int tokens, int heads, int kv_heads,
                                     int head_dim, int ldq, int ldk, int ldv, float scale, float softcap, int causal, int window, int q_tile, int k_tile) {
    __shared__ float qs[ATT_Q];                // the queries, [q_tile][head_dim]
    __shared__ float kvs[ATT_KV];              // a tile of keys, then of values, [k_tile][head_dim + 1]
    __shared__ float p[ATT_T * (ATT_T + 1)];   // scores, then weights, [q_tile][ATT_T + 1]
    __shared__ float row_max[ATT_T], row_sum[ATT_T], rescale[ATT_T];
    __shared__ int key_lo[ATT_T], key_hi[ATT_T];
    const int head = blockIdx.y, kv = head / (heads / kv_heads);
    const int q0 = blockIdx.x * q_tile, nq = min(q_tile, tokens - q0), ld = head_dim + 1, lp = ATT_T + 1;
    const unsigned long long qcol = (unsigned long long)head * head_dim, kvcol = (unsigned long long)kv * head_dim;

    // Phase 1: the queries, each one's key range, the softmax state.
    for (int e = threadIdx.x; e < nq * head_dim; e += BLOCK)
        qs[e] = q[(unsigned long long)(q0 + e / head_dim) * ldq + qcol + e % head_dim];
    if (threadIdx.x < nq) {
        int i = q0 + threadIdx.x;
        int lo = seq_start[i], hi = seq_end[i];
        if (causal) {
            hi = i + 1;
            if (window >= 0) lo = max(lo, i + 1 - window);
        }
        key_lo[threadIdx.x] = lo;
        key_hi[threadIdx.x] = max(lo, hi);
        row_max[threadIdx.x] = NEG_INF;
        row_sum[threadIdx.x] = 0.0f;
    }
    __syncthreads();
    // The keys any query of the tile sees: [first, last).
    int first = 0x7fffffff, last = 0;
    for (int r = 0; r < nq; r++) {
        if (key_lo[r] < key_hi[r]) {
            first = min(first, key_lo[r]);
            last = max(last, key_hi[r]);
        }
    }
    float acc[ATT_ACC];
    for (int c = 0; c < ATT_ACC; c++) acc[c] = 0.0f;

    for (int base = first; base < last; base += k_tile) {
        const int nk = min(k_tile, last - base);
        // Phase 2: the tile's keys.
        for (int e = threadIdx.x; e < nk * head_dim; e += BLOCK)
            kvs[(e / head_dim) * ld + e % head_dim] = k[(unsigned long long)(base + e / head_dim) * ldk + kvcol + e % head_dim];
        __syncthreads();
        // Phase 3: scores of (query r, key c), -inf where masked.
        for (int e = threadIdx.x; e < nq * nk; e += BLOCK) {
            int r = e / nk, c = e % nk, key = base + c;
            float s = NEG_INF;
            if (key >= key_lo[r] && key < key_hi[r]) {
                const float* qr = qs + r * head_dim;
                const float* kc = kvs + c * ld;
                float dot = 0.0f;
                for (int j = 0; j < head_dim; j++) dot += qr[j] * kc[j];
                s = scale * dot;
                if (softcap > 0.0f) s = tanhf(s / softcap) * softcap;
            }
            p[r * lp + c] = s;
        }
        __syncthreads();
        // Phase 4: per query, the new running max, the tile's weights and the rescale of what
        // came before (a query with no key yet keeps max -inf and sum 0); meanwhile the values.
        if (threadIdx.x < nq) {
            int r = threadIdx.x;
            float m = row_max[r], m_new = m;
            for (int c = 0; c < nk; c++) m_new = fmaxf(m_new, p[r * lp + c]);
            float sum = 0.0f;
            for (int c = 0; c < nk; c++) {
                float s = p[r * lp + c];
                float w = s == NEG_INF ? 0.0f : expf(s - m_new);
                p[r * lp + c] = w;
                sum += w;
            }
            float alpha = m_new == NEG_INF ? 1.0f : expf(m - m_new); // 0 on a query's first keys
            row_sum[r] = row_sum[r] * alpha + sum;
            row_max[r] = m_new;
            rescale[r] = alpha;
        }
        for (int e = threadIdx.x; e < nk * head_dim; e += BLOCK)
            kvs[(e / head_dim) * ld + e % head_dim] = v[(unsigned long long)(base + e / head_dim) * ldv + kvcol + e % head_dim];
        __syncthreads();
        // Phase 5: each thread's outputs (query r, feature j) += weights · values.
        for (int c = 0; c < ATT_ACC; c++) {
            int e = threadIdx.x + c * BLOCK;
            if (e < nq * head_dim) {
                int r = e / head_dim, j = e % head_dim;
                float a = acc[c] * rescale[r];
                for (int t = 0; t < nk; t++) a += p[r * lp + t] * kvs[t * ld + j];
                acc[c] = a;
            }
        }
        __syncthreads();
    }
    // Phase 6: divide by the softmax sums (0 for a query without keys).
    for (int c = 0; c < ATT_ACC; c++) {
        int e = threadIdx.x + c * BLOCK;
        if (e < nq * head_dim) {
            int r = e / head_dim, j = e % head_dim;
            float l = row_sum[r];
            float inv = l > 0.0f ? 1.0f / l : 0.0f;
            out[(unsigned long long)(q0 + r) * heads * head_dim + qcol + j] = acc[c] * inv;
        }
    }
}

// Backend::activate: x = act(x).
extern "C" __global__ void activate_inplace(float* __restrict__ x, unsigned long long n, int act) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x)
        x[i] = activate(x[i], act);
}

// Backend::gated: out = act(gate) ⊙ up.
extern "C" __global__ void gated(const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ out, unsigned long long n, int act) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = activate(gate[i], act) * up[i];
}

// Backend::rows: out[r] = x[keep[r]]. One block per kept row.
extern "C" __global__ void gather_rows(const float* __restrict__ x, const int* __restrict__ keep, float* __restrict__ out, int d) {
    const float* src = x + (unsigned long long)keep[blockIdx.x] * d;
    float* dst = out + (unsigned long long)blockIdx.x * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) dst[j] = src[j];
}

// A mixture-of-experts block (Backend::scatter_add): out[idx[i]] += y[i] * w[i], one block per
// row of y; the indices do not repeat, so no two blocks write one row. The product is rounded
// before the sum, as PyTorch's index_add_(0, idx, y * w).
extern "C" __global__ void scatter_add_rows(float* __restrict__ out, const float* __restrict__ y, const int* __restrict__ idx, const float* __restrict__ w, int d) {
    float* dst = out + (unsigned long long)idx[blockIdx.x] * d;
    const float* src = y + (unsigned long long)blockIdx.x * d;
    float wi = w[blockIdx.x];
    for (int j = threadIdx.x; j < d; j += blockDim.x) dst[j] = dst[j] + src[j] * wi;
}

// Statistics (stats::Moments::add_shifted): y = x - c, and per feature Σy, Σy² added to the f64
// moments. As on the CPU, the sums run in f32 over blocks of `sum_block` rows, in row order, and
// each block's partial sum is added in f64, in row order. Two kernels: `shift_moments` over a
// grid of (⌈d/BLOCK⌉, ⌈rows/sum_block⌉) blocks, thread (j, b) shifting feature j of row block b
// (coalesced across features) and writing its two f32 sums to part[b·d + j] and
// part[(nb + b)·d + j] (nb = gridDim.y); then `add_moments`, one thread per feature, adding the
// nb partial sums in order. With `y_bf16` set, the shifted rows are rounded to bf16 (the Gram's
// input) and the moments sum the rounded values, so that the Gram and the sums describe the same
// rows.
extern "C" __global__ void shift_moments(const float* __restrict__ x, const float* __restrict__ c, float* __restrict__ y_f32, bf16_t* __restrict__ y_bf16,
                                         float* __restrict__ part, int rows, int d, int sum_block) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    int nb = gridDim.y, b = blockIdx.y;
    int r0 = b * sum_block, r1 = min(rows, r0 + sum_block);
    float cj = c[j];
    float s = 0.0f, q = 0.0f;
    for (int r = r0; r < r1; r++) {
        unsigned long long at = (unsigned long long)r * d + j;
        float yv = x[at] - cj;
        if (y_bf16) {
            bf16_t bv = f32_to_bf16(yv);
            y_bf16[at] = bv;
            yv = bf16_to_f32(bv);
        } else {
            y_f32[at] = yv;
        }
        s += yv;
        q += yv * yv;
    }
    part[(unsigned long long)b * d + j] = s;
    part[(unsigned long long)(nb + b) * d + j] = q;
}

// The second half of the moments (see shift_moments): sum[j] += Σ_b part[b·d + j] and
// sum_sq[j] += Σ_b part[(blocks + b)·d + j], each partial widened to f64 and added in row-block
// order. One thread per feature.
extern "C" __global__ void add_moments(const float* __restrict__ part, double* __restrict__ sum, double* __restrict__ sum_sq, int blocks, int d) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    double s64 = sum[j], q64 = sum_sq[j];
    for (int b = 0; b < blocks; b++) {
        s64 += (double)part[(unsigned long long)b * d + j];
        q64 += (double)part[(unsigned long long)(blocks + b) * d + j];
    }
    sum[j] = s64;
    sum_sq[j] = q64;
}

// The flush of an f32 product accumulator into its f64 accumulator: acc += part.
extern "C" __global__ void flush_f64(const float* __restrict__ part, double* __restrict__ acc, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x)
        acc[i] += (double)part[i];
}

// The fused all-reduce's packing of an exact Gram (stats::exact::pack_upper on the device): the
// upper triangle of the row-major d x d `g`, row by row, into `out` (d(d+1)/2 values; row i
// starts at i·d − i(i−1)/2). One block per row.
extern "C" __global__ void pack_upper_f64(const double* __restrict__ g, double* __restrict__ out, int d) {
    unsigned long long i = blockIdx.x;
    unsigned long long start = i * d - i * (i - 1) / 2;
    for (int j = (int)i + threadIdx.x; j < d; j += blockDim.x) out[start + (j - i)] = g[i * d + j];
}

// device::rows::Rows::check_finite on the device, deferred: records the first NaN or infinite
// value of the n values (exponent bits all ones, as the CPU's test) in *first as
// seq << 40 | index << 2 | class (0 NaN, 1 +inf, 2 -inf), keeping the smallest such word, so that
// one word read after many launches names the earliest failing check (seq) and its first value.
// *first holds ~0 while nothing was found; index < 2^38 (the caller checks).
extern "C" __global__ void first_nonfinite(const float* __restrict__ x, unsigned long long n, unsigned long long seq, unsigned long long* __restrict__ first) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned int b = __float_as_uint(x[i]);
        if ((b & 0x7f800000u) == 0x7f800000u) {
            unsigned long long cls = (b & 0x007fffffu) ? 0ull : ((b >> 31) ? 2ull : 1ull);
            atomicMin(first, (seq << 40) | (i << 2) | cls);
            return;  // this thread's later values have larger indices
        }
    }
}
