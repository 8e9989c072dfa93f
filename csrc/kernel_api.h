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
  // Input staging: the conv input is y = gelu(x) * in_scale + in_shift (fc1's GELU
  // and BatchNorm, ms_ffn_middle_eval) instead of x; the zero padding pads y.
  bool input_act;
  T in_scale, in_shift;
};

// Channels-last (NHWC) depthwise conv. Per-channel tables (weights per group,
// bias, scale, shift) are padded with zeros to whole 64-byte vectors, the widest
// any kernel build loads, so every channel-vector load is a full one.
template <typename T>
constexpr int64_t kChannelPad = 64 / sizeof(T);

// Channels [c0, c1) sharing one kernel size K.
template <typename T>
struct NhwcGroup {
  int64_t c0, c1, K;
  const T* weight;  // [K*K][ldw]: tap-major, ldw = (c1 - c0) rounded up to kChannelPad, zeros past c1 - c0
  int64_t ldw;
};

// One sample: out[h, w, c] = conv over the groups (padding K/2) + bias[c], then
// the optional MS-FFN epilogue gelu(conv + bias + y) * scale + shift, where the
// conv input y is x or, with in_scale, gelu(x) * in_scale + in_shift.
template <typename T>
struct NhwcConv {
  const T* x; int64_t x_sh, x_sw;  // x[h, w, c] = x[h * x_sh + w * x_sw + c]
  T* out;                          // [H, W, C] contiguous
  int64_t H, W, C;
  const NhwcGroup<T>* groups; int64_t num_groups;
  int64_t max_k;
  const T* bias;                      // [C + kChannelPad]
  const T* scale; const T* shift;     // nullptr: no epilogue, else [C + kChannelPad]
  const T* in_scale; const T* in_shift;  // nullptr: y = x, else [C + kChannelPad]
};

// One (batch, head) of softmax(q k^T * scale + bias) v, for query rows [n0, n1).
template <typename T>
struct AttentionHead {
  const T* q; int64_t q_sn, q_sd;           // q[n, j] = q[n * q_sn + j * q_sd]
  const T* k; int64_t k_sm, k_sd;
  const T* v; int64_t v_sm, v_sd;
  const T* bias; int64_t bias_sn, bias_sm;  // nullptr: no bias
  T* out; int64_t out_sn, out_sd;           // out[n, j] = out[n * out_sn + j * out_sd]
  int64_t M, d;
  T scale;
};

// Output rows of one sample of a strided depthwise conv (OSRA's spatial reduction),
// channels_last: out[ho, wo, c] = epilogue(bias[c] + sum_{i,j} weight[i*K + j][c] *
// x[ho*stride - pad + i, wo*stride - pad + j, c]), zero padding; epilogue: gelu if
// gelu, then * scale + shift if scale is given.
template <typename T>
struct StridedConv {
  const T* x; int64_t x_sh, x_sw;  // x[h, w, c] = x[h * x_sh + w * x_sw + c]
  T* out;                          // [Ho, Wo, C] contiguous
  int64_t H, W, C, Ho, Wo, K, stride, pad;
  const T* weight;                 // [K*K][ldw] tap-major, zeros past C
  int64_t ldw;
  const T* bias;                   // [C + kChannelPad]
  bool gelu;
  const T* scale; const T* shift;  // nullptr: no affine, else [C + kChannelPad]
};

template <typename T>
struct KernelTable {
  // Elements of (zero-filled) scratch dwconv_plane needs for kernels up to max_k.
  int64_t (*dwconv_scratch)(int64_t H, int64_t W, int64_t max_k);
  void (*dwconv_plane)(const PlaneConv<T>& p, T* scratch);
  // IDConv kernel mixing: out[t] = sum_g softmax_g(logits[g * logit_g_stride + t]) * weight[g * weight_g_stride + t].
  void (*mix_kernel)(const T* logits, const T* weight, int64_t G, int64_t logit_g_stride, int64_t weight_g_stride,
                     int64_t KK, T* out);
  // Elements of (zero-filled) scratch dwconv_nhwc_rows needs: max_k staged input rows plus a zero row.
  int64_t (*dwconv_nhwc_scratch)(int64_t W, int64_t C, int64_t max_k);
  // Output rows [r0, r1) of one NHWC sample. The scratch is zero-filled once; calls with
  // the same W, C and max_k may reuse it (only the interior of the staged rows is rewritten).
  void (*dwconv_nhwc_rows)(const NhwcConv<T>& p, int64_t r0, int64_t r1, T* scratch);
  // Elements of scratch one attention_rows call needs.
  int64_t (*attention_scratch)(int64_t M, int64_t d);
  void (*attention_rows)(const AttentionHead<T>& a, int64_t n0, int64_t n1, T* scratch);
  // x[i] = gelu(x[i]) (exact erf form) for n contiguous elements.
  void (*gelu_inplace)(T* x, int64_t n);
  void (*strided_dwconv_rows)(const StridedConv<T>& p, int64_t r0, int64_t r1);
  // out[c] = scale * sum over rows [h0, h1) and columns [w0, w1) of x[h * sh + w * sw + c], c < C.
  void (*box_sum)(const T* x, int64_t sh, int64_t sw, int64_t h0, int64_t h1, int64_t w0, int64_t w1, int64_t C,
                  T scale, T* out);
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
