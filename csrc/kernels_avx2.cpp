// The kernels built for AVX2 + FMA (x86-64 with GCC/Clang), used when the CPU
// has them (ops.cpp checks at run time). Headers with shared inline code come
// before the target pragma, so they compile for the baseline as everywhere
// else; after it, only ATen's vector classes (in their own CPU_CAPABILITY
// inline namespace, as in ATen's per-ISA kernel builds) and our kernels (in an
// anonymous namespace) are compiled for AVX2.
#include "kernel_api.h"
#ifdef TRANSXNET_HAVE_AVX2_KERNELS
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include <ATen/cpu/vec/intrinsics.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/irange.h>

// push/pop: code the compiler generates at the end of the file (static
// initialisers of the headers above) must stay baseline, as it runs on every CPU.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// GCC's target pragma enables the instructions but not the feature macros that
// sleef.h (included by ATen's 256-bit vectors) tests to declare its AVX2 entry points.
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
