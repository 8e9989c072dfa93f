// The kernels built for AVX-512 (F, BW, VL, DQ: what ATen's 512-bit vectors
// need), used when the CPU has them (ops.cpp checks at run time). Same scheme
// as kernels_avx2.cpp.
#include "kernel_api.h"
#ifdef TRANSXNET_HAVE_X86_KERNELS
#include "isa_baseline_headers.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define TRANSXNET_KERNEL_NS avx512
#include "kernels.h"
#pragma GCC pop_options
#endif
