// The kernels built for AVX2 + FMA (x86-64 with GCC/Clang), used when the CPU
// has them (ops.cpp checks at run time). Only ATen's vector classes (in their
// own CPU_CAPABILITY inline namespace, as in ATen's per-ISA kernel builds) and
// our kernels (anonymous namespace) are compiled for AVX2.
#include "kernel_api.h"
#ifdef TRANSXNET_HAVE_X86_KERNELS
#include "isa_baseline_headers.h"

// push/pop: code the compiler generates at the end of the file (static
// initialisers of the headers above) must stay baseline, as it runs on every CPU.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// The target pragma enables the instructions but not the feature macros that
// sleef.h (included by ATen's vectors) tests to declare its AVX2 entry points.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define TRANSXNET_KERNEL_NS avx2
#include "kernels.h"
#pragma GCC pop_options
#endif
