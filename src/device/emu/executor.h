// The emulated device's kernel executor: the interface between the kernel tables that build.rs
// generates (one per compiled .cu source) and the scheduler of executor.cpp.
#pragma once

extern "C" {

// One kernel of a source: its name, its parameters' kinds (one letter each: 'P' a pointer, 'U'
// an unsigned long long, 'I' an int or unsigned int, 'F' a float, 'D' a double) and a trampoline
// that calls it with its arguments taken from 8-byte slots (pointers and unsigned long long as
// they are, int and float from the low 32 bits, double as the 64 bits).
struct EvaEmuKernel {
    const char* name;
    const char* params;
    int nparams;
    void (*run)(const unsigned long long* args);
};

// The tables build.rs generates: eva's kernels (kernels.cu) and the executor's own test kernels
// (test_kernels.cu).
extern const EvaEmuKernel eva_emu_kernels[];
extern const int eva_emu_kernels_len;
extern const EvaEmuKernel eva_emu_test_kernels[];
extern const int eva_emu_test_kernels_len;

} // extern "C"
