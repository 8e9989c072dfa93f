// Raw-pointer interface between the tensor-level ops (ops.cpp, built for the
// baseline ISA) and the vectorised kernels (kernels.h), which are compiled once
// per instruction set (kernels_default.cpp, kernels_avx2.cpp) and picked at run
// time (AVX-512, else AVX2 + FMA, else the compiler's baseline). This header includes no ATen so it can sit on either side.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define TRANSXNET_HAVE_X86_KERNELS 1
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
  // Scratch layout: zero border of max_pad on every side, shared by all planes a
  // thread runs (kernel sizes may differ per channel), so only the interior is
  // rewritten per plane. The caller zero-fills the scratch once.
  int64_t max_pad;
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
  // Elements of (zero-filled) scratch dwconv_plane needs for kernels up to max_k.
  int64_t (*dwconv_scratch)(int64_t H, int64_t W, int64_t max_k);
  void (*dwconv_plane)(const PlaneConv<T>& p, T* scratch);
  // IDConv kernel mixing: out[t] = sum_g softmax_g(logits[g * g_stride + t]) * weight[g * g_stride + t].
  void (*mix_kernel)(const T* logits, const T* weight, int64_t G, int64_t g_stride, int64_t KK, T* out);
  // Elements of scratch one attention_rows call needs.
  int64_t (*attention_scratch)(int64_t M, int64_t d);
  void (*attention_rows)(const AttentionHead<T>& a, int64_t n0, int64_t n1, T* scratch);
};

namespace base {
const KernelTable<float>& kernel_table(float);
const KernelTable<double>& kernel_table(double);
}  // namespace base

#ifdef TRANSXNET_HAVE_X86_KERNELS
namespace avx2 {
const KernelTable<float>& kernel_table(float);
const KernelTable<double>& kernel_table(double);
}  // namespace avx2
namespace avx512 {
const KernelTable<float>& kernel_table(float);
const KernelTable<double>& kernel_table(double);
}  // namespace avx512
#endif

}  // namespace transxnet
