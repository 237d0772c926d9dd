// The emulated device's kernel executor: runs a grid of one of the kernels that build.rs compiled
// for the host (kernels.cu through shim.h) with CUDA's execution model.
//
// - Blocks run one after another (z, y, x order, x fastest) on the launching OS thread, under a
//   process-wide mutex: launches from several threads are serialized, so the one static copy of
//   each `__shared__` variable serves the one block in flight.
// - The threads of a block are fibers: each has its own stack (a persistent pool of 64 KiB
//   stacks, each above a guard page) and runs until its next `__syncthreads()` or its return,
//   then switches directly to the next thread of the round (a few instructions of assembly that
//   save rbx, rbp, r12-r15, rsp, MXCSR and the x87 control word: no system call per switch).
//   A round runs every live thread once, in linear thread order (x fastest), or in reverse with
//   `EVA_EMU_ORDER=reverse`, so a race between barriers gives a different result in the other
//   order. When every live thread of a round waits at a barrier, the barrier opens and the next
//   round starts.
// - Barrier misuse is an error of the launch, not a hang or a lucky result: threads that returned
//   while others wait at a barrier (undefined on hardware), and threads that wait at different
//   `__syncthreads()` call sites (source file and line) in the same round.
// - At the start of every block the whole shared-memory section is filled with 0xFF bytes (NaN as
//   f32/f64): CUDA does not clear shared memory, and a read of what no thread wrote shows as NaN.
//
// x86-64 SysV only (the switch is assembly); another architecture fails to compile here.

#include "executor.h"
#include "shim.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__)
#error "eva's emulated CUDA device switches fibers with x86-64 assembly: build cuda-emu on x86-64"
#endif

namespace eva_emu {
uint3 thread_idx;
uint3 block_idx;
dim3 block_dim;
dim3 grid_dim;
} // namespace eva_emu

// ---- the context switch -------------------------------------------------------------------------
// eva_emu_switch(save, to): pushes the callee-saved registers and the floating-point control words
// on the current stack, stores the stack pointer in *save, loads `to` (a stack pointer that an
// earlier switch stored, or a fresh fiber frame) and pops the same from there. Returns on the
// other stack. The control words (MXCSR, x87) are loaded only when they differ from the current
// ones: ldmxcsr and fldcw stall the pipeline, and the kernels never change them.
// eva_emu_fiber_entry: where a fresh fiber's first switch returns to; calls r13(r12) with the stack
// 16-byte aligned (the frame puts the fiber and its main function in r12 and r13). The main
// function never returns.
__asm__(R"(
    .pushsection .text
    .globl eva_emu_switch
    .hidden eva_emu_switch
    .type eva_emu_switch, @function
    .p2align 4
eva_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw (%rsp)
    movq %rsp, (%rdi)
    movq %rsp, %rax
    movq %rsi, %rsp
    movl 8(%rax), %ecx
    cmpl 8(%rsp), %ecx
    je 1f
    ldmxcsr 8(%rsp)
1:
    movw (%rax), %cx
    cmpw (%rsp), %cx
    je 2f
    fldcw (%rsp)
2:
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size eva_emu_switch, .-eva_emu_switch

    .globl eva_emu_fiber_entry
    .hidden eva_emu_fiber_entry
    .type eva_emu_fiber_entry, @function
    .p2align 4
eva_emu_fiber_entry:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size eva_emu_fiber_entry, .-eva_emu_fiber_entry
    .popsection
)");

extern "C" void eva_emu_switch(void** save, void* to);
extern "C" void eva_emu_fiber_entry();

// The shared-memory section (shim.h's `__shared__`); the linker defines its bounds. Weak: a build
// whose kernels declare no shared memory has no such section.
extern "C" char __start_eva_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_eva_shared[] __attribute__((weak, visibility("hidden")));

namespace {

constexpr size_t STACK_BYTES = 64 * 1024;
constexpr unsigned MAX_THREADS = 1024; // CUDA's threads per block
constexpr unsigned STACKS_PER_MAP = 64;

enum : int {
    OK = 0,
    UNKNOWN_KERNEL = 1,
    BAD_ARG_COUNT = 2,
    BAD_CONFIG = 3,
    BARRIER_AFTER_EXIT = 4,
    BARRIER_DIVERGENCE = 5,
    NO_MEMORY = 6,
};

enum : int { RUNNABLE, WAITING, DONE };

struct Fiber {
    void* sp;
    char* stack_hi; // one past the top of its stack, 16-byte aligned
    uint3 idx;
    int state;
};

struct Site {
    const char* file;
    int line;
    unsigned threads;
};

// Everything about the launch in flight (guarded by `lock`).
struct State {
    Fiber fibers[MAX_THREADS];
    unsigned order[MAX_THREADS];
    unsigned stacks = 0; // fibers that have a stack
    unsigned n = 0;      // threads per block of this launch
    unsigned cursor = 0; // next position in `order` of this round
    Fiber* current = nullptr;
    void* main_sp = nullptr; // the launching thread's context while a block runs
    const EvaEmuKernel* kernel = nullptr;
    const unsigned long long* args = nullptr;
    // The round's barrier: who waits where, the predicate count, the result of the last one.
    unsigned waiting = 0, exited = 0;
    Site site{}, other{};
    int mode = 0, pred_count = 0, result = 0;
    unsigned barriers = 0; // barriers passed in this block
    int error = OK;
    uint16_t fpu_cw = 0;
    uint32_t mxcsr = 0;
};

State g;
pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
int default_order = -1; // -1: not read from EVA_EMU_ORDER yet
thread_local char message[1024];

void set_message(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void set_message(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
}

// Gives fibers [g.stacks, need) their stacks: STACKS_PER_MAP at a time, one mapping each, with a
// PROT_NONE guard page below every stack so that an overflow faults instead of corrupting.
bool grow_stacks(unsigned need) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t slot = STACK_BYTES + page;
    while (g.stacks < need) {
        unsigned count = STACKS_PER_MAP;
        if (count > MAX_THREADS - g.stacks) count = MAX_THREADS - g.stacks;
        void* base = mmap(nullptr, slot * count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (base == MAP_FAILED) return false;
        for (unsigned i = 0; i < count; i++) {
            char* lo = (char*)base + i * slot;
            mprotect(lo, page, PROT_NONE);
            g.fibers[g.stacks + i].stack_hi = lo + slot;
        }
        g.stacks += count;
    }
    return true;
}

void fiber_main(Fiber* f);

// A fresh frame at the top of the fiber's stack, laid out as eva_emu_switch pops it: control
// words, r15, r14, r13 (main), r12 (fiber), rbx, rbp, the return address (the entry stub); after
// the `ret` the stack pointer is 16-byte aligned, as a `call` wants it.
void start_fiber(Fiber* f) {
    uint64_t* s = (uint64_t*)f->stack_hi - 2;
    *--s = (uint64_t)(uintptr_t)&eva_emu_fiber_entry;
    *--s = 0;                                // rbp
    *--s = 0;                                // rbx
    *--s = (uint64_t)(uintptr_t)f;           // r12
    *--s = (uint64_t)(uintptr_t)&fiber_main; // r13
    *--s = 0;                                // r14
    *--s = 0;                                // r15
    s -= 2;
    memcpy((char*)s, &g.fpu_cw, 2);
    memcpy((char*)s + 8, &g.mxcsr, 4);
    f->sp = s;
    f->state = RUNNABLE;
}

// Ends a round whose every live thread now waits at a barrier, or that found an error.
bool close_round() {
    if (g.exited > 0) {
        g.error = BARRIER_AFTER_EXIT;
        set_message("kernel %s, block (%u,%u,%u): %u of %u threads returned while %u wait at __syncthreads() (%s:%d, barrier %u of the block): undefined on a GPU",
                    g.kernel->name, eva_emu::block_idx.x, eva_emu::block_idx.y, eva_emu::block_idx.z, g.exited, g.n, g.waiting,
                    g.site.file, g.site.line, g.barriers + 1);
        return false;
    }
    if (g.other.threads > 0) {
        g.error = BARRIER_DIVERGENCE;
        set_message("kernel %s, block (%u,%u,%u): threads wait at different __syncthreads(): %u at %s:%d, %u at %s:%d (barrier %u of the block)",
                    g.kernel->name, eva_emu::block_idx.x, eva_emu::block_idx.y, eva_emu::block_idx.z, g.site.threads, g.site.file,
                    g.site.line, g.other.threads, g.other.file, g.other.line, g.barriers + 1);
        return false;
    }
    switch (g.mode) {
    case 1: g.result = g.pred_count; break;
    case 2: g.result = g.pred_count == (int)g.waiting; break;
    case 3: g.result = g.pred_count > 0; break;
    default: g.result = 0;
    }
    for (unsigned i = 0; i < g.n; i++)
        if (g.fibers[i].state == WAITING) g.fibers[i].state = RUNNABLE;
    g.waiting = 0;
    g.pred_count = 0;
    g.site = Site{};
    g.other = Site{};
    g.barriers++;
    g.cursor = 0;
    return true;
}

// Leaves the current context (a fiber that waits or returned, or the launching thread at the
// start of a block) for the next runnable thread of the round; at the end of a round opens the
// barrier and goes on with the next round; when the block is over (every thread returned, or an
// error) returns to the launching thread. Returns when `save`'s context is resumed.
void switch_next(void** save) {
    for (;;) {
        while (g.cursor < g.n) {
            Fiber* f = &g.fibers[g.order[g.cursor++]];
            if (f->state != RUNNABLE) continue;
            Fiber* from = g.current;
            g.current = f;
            eva_emu::thread_idx = f->idx;
            if (save == &f->sp && from == f) return; // a block of one thread: it goes on
            eva_emu_switch(save, f->sp);
            return;
        }
        if (g.waiting == 0 || !close_round()) {
            g.current = nullptr;
            eva_emu_switch(save, g.main_sp);
            return;
        }
    }
}

void fiber_main(Fiber* f) {
    g.kernel->run(g.args);
    f->state = DONE;
    g.exited++;
    switch_next(&f->sp);
    __builtin_trap(); // a finished fiber is never resumed
}

// Runs the grid; the caller holds `lock` and has checked the configuration.
int run_grid(const EvaEmuKernel* k, const unsigned grid[3], const unsigned block[3], const unsigned long long* args, bool reverse) {
    const unsigned n = block[0] * block[1] * block[2];
    if (!grow_stacks(n)) {
        set_message("kernel %s: no memory for %u fiber stacks", k->name, n);
        return NO_MEMORY;
    }
    g.n = n;
    g.kernel = k;
    g.args = args;
    eva_emu::grid_dim = dim3{grid[0], grid[1], grid[2]};
    eva_emu::block_dim = dim3{block[0], block[1], block[2]};
    for (unsigned i = 0; i < n; i++) {
        g.fibers[i].idx = uint3{i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])};
        g.order[i] = reverse ? n - 1 - i : i;
    }
    __asm__ __volatile__("fnstcw %0" : "=m"(g.fpu_cw));
    __asm__ __volatile__("stmxcsr %0" : "=m"(g.mxcsr));
    char* shared = __start_eva_shared;
    const size_t shared_bytes = shared ? (size_t)(__stop_eva_shared - __start_eva_shared) : 0;
    for (unsigned bz = 0; bz < grid[2]; bz++)
        for (unsigned by = 0; by < grid[1]; by++)
            for (unsigned bx = 0; bx < grid[0]; bx++) {
                eva_emu::block_idx = uint3{bx, by, bz};
                if (shared_bytes) memset(shared, 0xff, shared_bytes);
                for (unsigned i = 0; i < n; i++) start_fiber(&g.fibers[i]);
                g.cursor = 0;
                g.waiting = g.exited = 0;
                g.pred_count = 0;
                g.site = Site{};
                g.other = Site{};
                g.barriers = 0;
                g.error = OK;
                g.current = nullptr;
                switch_next(&g.main_sp);
                if (g.error != OK) return g.error;
            }
    return OK;
}

bool check_config(const char* name, const unsigned grid[3], const unsigned block[3]) {
    const unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || threads == 0 || grid[0] > 0x7fffffffu || grid[1] > 65535 ||
        grid[2] > 65535 || block[0] > 1024 || block[1] > 1024 || block[2] > 64 || threads > MAX_THREADS) {
        set_message("kernel %s: invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u) (CUDA allows grid x < 2^31, y, z < "
                    "65536; block x, y <= 1024, z <= 64, at most 1024 threads; none zero)",
                    name, grid[0], grid[1], grid[2], block[0], block[1], block[2]);
        return false;
    }
    return true;
}

int launch(const EvaEmuKernel* table, int len, const char* name, const unsigned grid[3], const unsigned block[3],
           const unsigned long long* args, int nargs, int order) {
    message[0] = 0;
    if (!name) {
        set_message("no kernel name");
        return UNKNOWN_KERNEL;
    }
    const EvaEmuKernel* k = nullptr;
    for (int i = 0; i < len; i++)
        if (strcmp(table[i].name, name) == 0) k = &table[i];
    if (!k) {
        set_message("no kernel named \"%s\"", name);
        return UNKNOWN_KERNEL;
    }
    if (nargs != k->nparams || (nargs > 0 && !args)) {
        set_message("kernel %s takes %d arguments (%s), %d given", name, k->nparams, k->params, nargs);
        return BAD_ARG_COUNT;
    }
    if (!grid || !block || !check_config(name, grid, block)) {
        if (!grid || !block) set_message("kernel %s: no grid or block dimensions", name);
        return BAD_CONFIG;
    }
    pthread_mutex_lock(&lock);
    if (default_order < 0) {
        const char* v = getenv("EVA_EMU_ORDER");
        default_order = v && strcmp(v, "reverse") == 0 ? 1 : 0;
    }
    const bool reverse = order < 0 ? default_order == 1 : order == 1;
    const int rc = run_grid(k, grid, block, args, reverse);
    pthread_mutex_unlock(&lock);
    return rc;
}

} // namespace

int eva_emu::barrier(const char* file, int line, int pred, int mode) {
    Fiber* f = g.current;
    if (g.waiting == 0) {
        g.site = Site{file, line, 0};
        g.mode = mode;
    }
    if (g.site.line == line && (g.site.file == file || strcmp(g.site.file, file) == 0)) {
        g.site.threads++;
    } else {
        if (g.other.threads == 0) g.other = Site{file, line, 0};
        g.other.threads++;
    }
    g.waiting++;
    g.pred_count += pred;
    f->state = WAITING;
    switch_next(&f->sp);
    return g.result;
}

extern "C" {

// Launches eva's kernel `name` (kernels.cu) over `grid` blocks of `block` threads with `nargs`
// arguments in 8-byte slots, in the thread order of EVA_EMU_ORDER. 0 on success, else an error
// code (eva_emu_last_error says what): 1 no such kernel, 2 wrong argument count, 3 invalid
// configuration, 4 threads returned while others wait at a barrier, 5 threads at different
// barriers, 6 no memory for the fiber stacks.
int eva_emu_launch(const char* name, const unsigned grid[3], const unsigned block[3], const unsigned long long* args, int nargs) {
    return launch(eva_emu_kernels, eva_emu_kernels_len, name, grid, block, args, nargs, -1);
}

// The same for eva's kernels (table 0) or the executor's test kernels (table 1), with the thread
// order given: 0 forward, 1 reverse, -1 EVA_EMU_ORDER's.
int eva_emu_launch_ordered(int table, const char* name, const unsigned grid[3], const unsigned block[3], const unsigned long long* args,
                           int nargs, int order) {
    if (table == 1) return launch(eva_emu_test_kernels, eva_emu_test_kernels_len, name, grid, block, args, nargs, order);
    return launch(eva_emu_kernels, eva_emu_kernels_len, name, grid, block, args, nargs, order);
}

// Why the last launch of the calling thread failed ("" when it did not).
const char* eva_emu_last_error(void) { return message; }

// eva's kernels, in kernels.cu's order: how many, each one's name and its parameters' kinds (one
// letter a parameter, see executor.h); NULL out of range.
int eva_emu_kernel_count(void) { return eva_emu_kernels_len; }
const char* eva_emu_kernel_name(int i) { return i >= 0 && i < eva_emu_kernels_len ? eva_emu_kernels[i].name : nullptr; }
const char* eva_emu_kernel_params(int i) { return i >= 0 && i < eva_emu_kernels_len ? eva_emu_kernels[i].params : nullptr; }

// The bytes of static shared memory all compiled kernels declare together (filled at every block's start).
unsigned long long eva_emu_shared_bytes(void) {
    return __start_eva_shared ? (unsigned long long)(__stop_eva_shared - __start_eva_shared) : 0;
}

} // extern "C"
