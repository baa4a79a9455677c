// Portability macros shared by the CPU kernels, the CUDA kernels and the SIMT harness.
#pragma once

#if defined(__CUDACC__)
#define FL_HD __host__ __device__ __forceinline__
#else
#define FL_HD inline
#endif

// The CPU kernels are compiled once per instruction set (DEFAULT, AVX2, AVX512), each
// translation unit with its own compiler flags. Everything they instantiate from csrc/common
// must then live in a per-ISA inline namespace, or the linker would be free to keep the
// AVX512 copy of an inline function and call it from the DEFAULT kernels on a CPU without
// AVX512 (an ODR violation that ends in SIGILL).
#if defined(CPU_CAPABILITY)
#define FL_ISA_NAMESPACE_BEGIN inline namespace CPU_CAPABILITY {
#define FL_ISA_NAMESPACE_END }
#else
#define FL_ISA_NAMESPACE_BEGIN
#define FL_ISA_NAMESPACE_END
#endif
