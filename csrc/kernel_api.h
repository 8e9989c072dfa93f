// Raw-pointer interface between the tensor-level ops (ops.cpp, built for the
// baseline ISA) and the vectorised kernels (kernels.h), which are compiled once
// per instruction set (kernels_default.cpp, kernels_avx2.cpp) and picked at run
// time. This header includes no ATen so it can sit on either side.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define TRANSXNET_HAVE_AVX2_KERNELS 1
#endif

namespace transxnet {

// One depthwise-conv output plane: out = conv(x, weight, padding K/2) + bias,
// or, with ffn_epilogue, out = gelu(conv + bias + x) * scale + shift
// (the MS-FFN middle with eval BatchNorm folded into scale/shift).
template <typename T>
struct PlaneConv {
  const T* x;       // [H, W] contiguous
  T* out;           // [H, W] contiguous
  const T* weight;  // [K, K] contiguous
  T bias;
  int64_t H, W, K;
  bool ffn_epilogue;
  T scale, shift;
};

// One (batch, head) of softmax(q k^T * scale + bias) v, for query rows [n0, n1).
template <typename T>
struct AttentionHead {
  const T* q; int64_t q_sn, q_sd;           // q[n, j] = q[n * q_sn + j * q_sd]
  const T* k; int64_t k_sm, k_sd;
  const T* v; int64_t v_sm, v_sd;
  const T* bias; int64_t bias_sn, bias_sm;  // nullptr: no bias
  T* out;                                   // [N, d] contiguous
  int64_t M, d;
  T scale;
};

template <typename T>
struct KernelTable {
  // Elements of scratch one dwconv_plane call needs.
  int64_t (*dwconv_scratch)(int64_t H, int64_t W, int64_t K);
  void (*dwconv_plane)(const PlaneConv<T>& p, T* scratch);
  // Elements of scratch one attention_rows call needs.
  int64_t (*attention_scratch)(int64_t M, int64_t d);
  void (*attention_rows)(const AttentionHead<T>& a, int64_t n0, int64_t n1, T* scratch);
};

namespace base {
const KernelTable<float>& kernel_table(float);
const KernelTable<double>& kernel_table(double);
}  // namespace base

#ifdef TRANSXNET_HAVE_AVX2_KERNELS
namespace avx2 {
const KernelTable<float>& kernel_table(float);
const KernelTable<double>& kernel_table(double);
}  // namespace avx2
#endif

}  // namespace transxnet
