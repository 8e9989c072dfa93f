// Vectorised CPU kernels, written once against at::vec::Vectorized and compiled
// per instruction set: the including file defines TRANSXNET_KERNEL_NS (and, for
// AVX2, the target pragma and CPU_CAPABILITY macros) before including this.
// Only raw pointers cross this boundary (kernel_api.h): no tensors, no
// threading, no allocation, so nothing ISA-specific leaks into shared inline code.
//
// Depthwise conv (IDConv, multi-scale depthwise, MS-FFN middle): one output
// plane at a time. The input plane is copied into a zero-padded scratch plane
// (H + 2p rows, W + 2p + VL columns) so that every tap is an unconditional
// unaligned vector load; each output row is computed in blocks of up to 4
// vectors along W held in registers, the K*K weights broadcast once per block,
// and the epilogue (bias, residual, exact GELU, folded BatchNorm) is applied in
// registers before the single store. Minimal traffic: read x once, write out once.
//
// Channels-last depthwise conv: see the section below (row ring buffer, tap-major
// weights, register blocks of 4 pixels x one channel vector).
//
// Attention (OSRA): per (batch, head) k is packed transposed ([d, M] padded to
// whole vectors) and v packed [M, d] padded; each query row computes its M
// scores in registers (broadcast q[n, j] times packed k rows), adds scale and
// bias, takes the softmax in a one-row buffer and accumulates p @ v in
// registers, normalising once at the store. The [N, M] score matrix never
// reaches memory.
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernel_api.h"

namespace transxnet {
namespace TRANSXNET_KERNEL_NS {
namespace {

using at::vec::Vectorized;

constexpr int kMaxAcc = 4;  // vectors per register block

// Local helpers instead of std::min/std::fill: a std template instantiated here
// would be a weak symbol the linker may share with baseline code.
inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
template <typename T>
inline void fill(T* begin, T* end, T value) {
  for (; begin < end; ++begin) *begin = value;
}

// Exact (erf) GELU, as torch's default: x/2 * (1 + erf(x / sqrt(2))).
// fp64 uses ATen's erf (full precision). fp32 uses a rational form fitted by
// scripts/fit_gelu_erf.py, erf(x / sqrt(2)) = x P(x^2) / Q(x^2), evaluated on x
// clamped to +-5.8 (where it exceeds 1 by 1.7e-6) and clamped to [-1, 1]: erf
// is exactly +-1 in the tails (GELU exactly x or 0) and |erf error| <= 3.7e-7
// in fp32, against 1.5e-7 for the Abramowitz-Stegun 7.1.26 form of ATen's fp32
// erf. It costs 11 FMAs and a reciprocal instead of an exp and a division:
// GELU runs twice per element in the MS-FFN middle and bounded it.
template <typename T>
inline Vectorized<T> gelu_erf(const Vectorized<T>& x) {
  const Vectorized<T> half(T(0.5)), one(T(1)), inv_sqrt2(T(0.70710678118654752440));
  return half * x * (one + (x * inv_sqrt2).erf());
}

// 1 / d to about 1 ulp: the hardware estimate refined by one Newton step (a
// vector division costs several FMAs' throughput).
inline Vectorized<float> reciprocal(const Vectorized<float>& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 r = _mm512_maskz_rcp14_ps(__mmask16(-1), d);  // maskz: no "undefined" source operand
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.f)), r);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 r = _mm256_rcp_ps(d);
  return _mm256_fmadd_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(1.f)), r);
#else
  return Vectorized<float>(1.f) / d;
#endif
}

template <>
inline Vectorized<float> gelu_erf(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  const Vec xc = at::vec::clamp(x, Vec(-5.8f), Vec(5.8f));
  const Vec v = xc * xc;
  Vec p = at::vec::fmadd(Vec(2.201084176e-10f), v, Vec(-4.406808074e-08f));
  p = at::vec::fmadd(p, v, Vec(6.584054972e-06f));
  p = at::vec::fmadd(p, v, Vec(3.511301766e-04f));
  p = at::vec::fmadd(p, v, Vec(9.085664526e-03f));
  p = at::vec::fmadd(p, v, Vec(7.286975533e-02f));
  p = at::vec::fmadd(p, v, Vec(7.978842854e-01f));
  Vec q = at::vec::fmadd(Vec(6.400325219e-05f), v, Vec(1.861072727e-03f));
  q = at::vec::fmadd(q, v, Vec(2.939036861e-02f));
  q = at::vec::fmadd(q, v, Vec(2.579930723e-01f));
  q = at::vec::fmadd(q, v, Vec(1.f));
  const Vec half_x = x * Vec(0.5f);
  const Vec erf = at::vec::clamp(xc * p * reciprocal(q), Vec(-1.f), Vec(1.f));
  return at::vec::fmadd(half_x, erf, half_x);  // x/2 + x/2 * erf(x / sqrt(2))
}

// dst[i] = gelu(src[i]) * scale + shift for n contiguous elements (the staged conv input).
template <typename T>
inline void stage_act(const T* src, T* dst, int64_t n, const Vectorized<T>& scale, const Vectorized<T>& shift) {
  constexpr int VL = Vectorized<T>::size();
  int64_t i = 0;
  for (; i + VL <= n; i += VL) at::vec::fmadd(gelu_erf(Vectorized<T>::loadu(src + i)), scale, shift).store(dst + i);
  if (i < n) at::vec::fmadd(gelu_erf(Vectorized<T>::loadu(src + i, n - i)), scale, shift).store(dst + i, n - i);
}

// x[i] = gelu(x[i]) for n contiguous elements.
template <typename T>
void gelu_inplace(T* x, int64_t n) {
  constexpr int VL = Vectorized<T>::size();
  int64_t i = 0;
  for (; i + VL <= n; i += VL) gelu_erf(Vectorized<T>::loadu(x + i)).store(x + i);
  if (i < n) gelu_erf(Vectorized<T>::loadu(x + i, n - i)).store(x + i, n - i);
}

// out[c] = scale * sum of x[h * sh + w * sw + c] over rows [h0, h1) and columns
// [w0, w1), for c < C (channels unit-stride): a box of a channels_last map, as
// IDConv's adaptive pooling bins and its mean. Channel vectors in register blocks
// of up to kMaxAcc, each summed over the box before one store.
template <typename T>
void box_sum(const T* x, int64_t sh, int64_t sw, int64_t h0, int64_t h1, int64_t w0, int64_t w1, int64_t C,
             T scale, T* out) {
  using Vec = Vectorized<T>;
  constexpr int VL = Vec::size();
  int64_t c = 0;
  for (; c + kMaxAcc * VL <= C; c += kMaxAcc * VL) {
    Vec acc[kMaxAcc];
    for (int i = 0; i < kMaxAcc; ++i) acc[i] = Vec(T(0));
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t w = w0; w < w1; ++w) {
        const T* px = x + h * sh + w * sw + c;
        for (int i = 0; i < kMaxAcc; ++i) acc[i] = acc[i] + Vec::loadu(px + i * VL);
      }
    }
    for (int i = 0; i < kMaxAcc; ++i) (acc[i] * Vec(scale)).store(out + c + i * VL);
  }
  for (; c < C; c += VL) {
    const int64_t n = min_i64(VL, C - c);  // lanes past n load zeros and are not stored
    Vec acc(T(0));
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t w = w0; w < w1; ++w) acc = acc + Vec::loadu(x + h * sh + w * sw + c, n);
    }
    (acc * Vec(scale)).store(out + c, n);
  }
}

// Output rows [r0, r1) of a strided NHWC depthwise conv (StridedConv): per output
// pixel and channel vector, the taps inside the image accumulated in one register.
// The maps are small (OSRA reduces to ~7x7 outputs), so no staging or blocking.
template <typename T>
void strided_dwconv_rows(const StridedConv<T>& p, int64_t r0, int64_t r1) {
  using Vec = Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  for (int64_t ho = r0; ho < r1; ++ho) {
    const int64_t h0 = ho * p.stride - p.pad;
    const int64_t i0 = h0 < 0 ? -h0 : 0, i1 = min_i64(p.K, p.H - h0);
    for (int64_t wo = 0; wo < p.Wo; ++wo) {
      const int64_t w0 = wo * p.stride - p.pad;
      const int64_t j0 = w0 < 0 ? -w0 : 0, j1 = min_i64(p.K, p.W - w0);
      T* out = p.out + (ho * p.Wo + wo) * p.C;
      for (int64_t c = 0; c < p.C; c += VL) {
        const int64_t n = min_i64(VL, p.C - c);
        Vec acc = Vec::loadu(p.bias + c);
        for (int64_t i = i0; i < i1; ++i) {
          const T* x_row = p.x + (h0 + i) * p.x_sh + c;
          const T* w_row = p.weight + i * p.K * p.ldw + c;
          for (int64_t j = j0; j < j1; ++j) {
            const T* xp = x_row + (w0 + j) * p.x_sw;
            acc = at::vec::fmadd(n == VL ? Vec::loadu(xp) : Vec::loadu(xp, n), Vec::loadu(w_row + j * p.ldw), acc);
          }
        }
        if (p.gelu) acc = gelu_erf(acc);
        if (p.scale) acc = at::vec::fmadd(acc, Vec::loadu(p.scale + c), Vec::loadu(p.shift + c));
        if (n == VL) {
          acc.store(out + c);
        } else {
          acc.store(out + c, n);
        }
      }
    }
  }
}

template <typename T>
int64_t dwconv_scratch(int64_t H, int64_t W, int64_t max_k) {
  const int64_t pad = max_k / 2;
  return (H + 2 * pad) * (W + 2 * pad + Vectorized<T>::size());
}

// One block of NACC output vectors of row y starting at column x0.
// KT > 0: kernel size known at compile time (unrolled taps); KT == 0: runtime K.
template <typename T, int KT, int NACC>
inline void conv_block(const PlaneConv<T>& p, const T* padded, int64_t ld, int64_t y, int64_t x0) {
  using Vec = Vectorized<T>;
  constexpr int VL = Vec::size();
  const int64_t K = KT > 0 ? KT : p.K;
  Vec acc[NACC];
  for (int u = 0; u < NACC; ++u) acc[u] = Vec(p.bias);
  const int64_t pad = K / 2, skip = p.max_pad - pad;  // taps start `skip` into the shared border
  const T* base = padded + (y + skip) * ld + skip + x0;
  for (int64_t i = 0; i < K; ++i) {
    const T* row = base + i * ld;
    const T* wrow = p.weight + i * K;
    for (int64_t j = 0; j < K; ++j) {
      const Vec w(wrow[j]);
      for (int u = 0; u < NACC; ++u) acc[u] = at::vec::fmadd(w, Vec::loadu(row + j + u * VL), acc[u]);
    }
  }
  T* out = p.out + y * p.W + x0;
  for (int u = 0; u < NACC; ++u) {
    Vec r = acc[u];
    if (p.ffn_epilogue) {
      const Vec residual = Vec::loadu(base + pad * ld + pad + u * VL);  // x[y, x0 + u*VL ...]
      r = at::vec::fmadd(gelu_erf(r + residual), Vec(p.scale), Vec(p.shift));
    }
    const int64_t n = min_i64(VL, p.W - x0 - u * VL);
    r.store(out + u * VL, n);
  }
}

// Calls fn(integral_constant<NACC>, offset) over `vectors` vectors in register
// blocks of kMaxAcc, the last block 1..kMaxAcc vectors.
template <typename Fn>
inline void for_each_block(int64_t vectors, int VL, Fn&& fn) {
  int64_t v = 0;
  for (; v + kMaxAcc <= vectors; v += kMaxAcc) fn(std::integral_constant<int, kMaxAcc>(), v * VL);
  switch (vectors - v) {
    case 0: break;
    case 1: fn(std::integral_constant<int, 1>(), v * VL); break;
    case 2: fn(std::integral_constant<int, 2>(), v * VL); break;
    default: fn(std::integral_constant<int, 3>(), v * VL); break;
  }
}

template <typename T, int KT>
void conv_plane_k(const PlaneConv<T>& p, const T* padded, int64_t ld) {
  constexpr int VL = Vectorized<T>::size();
  const int64_t vectors = (p.W + VL - 1) / VL;
  for (int64_t y = 0; y < p.H; ++y) {
    for_each_block(vectors, VL, [&](auto nacc, int64_t x0) {
      conv_block<T, KT, decltype(nacc)::value>(p, padded, ld, y, x0);
    });
  }
}

template <typename T>
void dwconv_plane(const PlaneConv<T>& p, T* scratch) {
  constexpr int VL = Vectorized<T>::size();
  const int64_t ld = p.W + 2 * p.max_pad + VL;
  for (int64_t y = 0; y < p.H; ++y) {
    T* dst = scratch + (y + p.max_pad) * ld + p.max_pad;
    if (p.input_act) {
      stage_act(p.x + y * p.W, dst, p.W, Vectorized<T>(p.in_scale), Vectorized<T>(p.in_shift));
    } else {
      std::memcpy(dst, p.x + y * p.W, sizeof(T) * p.W);
    }
  }
  switch (p.K) {
    case 1: conv_plane_k<T, 1>(p, scratch, ld); break;
    case 3: conv_plane_k<T, 3>(p, scratch, ld); break;
    case 5: conv_plane_k<T, 5>(p, scratch, ld); break;
    case 7: conv_plane_k<T, 7>(p, scratch, ld); break;
    case 9: conv_plane_k<T, 9>(p, scratch, ld); break;
    default: conv_plane_k<T, 0>(p, scratch, ld); break;
  }
}

// ---- Channels-last depthwise conv ----------------------------------------
// Input rows are staged (copied, or turned into y = gelu(x) * s + t) into a
// ring of max_k row buffers of (W + 2 * max_pad) pixels * C channels with zero
// pixels left and right, plus one all-zero row standing in for rows outside
// the image; so every tap is an unconditional full-vector load and each input
// row is staged once per call. The output pixel's channels are computed in
// register blocks of up to kMaxAcc vectors per group; the weights are tap-major
// [K*K][channels], one vector load per tap and vector.

template <typename T>
inline int64_t nhwc_row_len(int64_t W, int64_t C, int64_t max_k) {
  return (W + 2 * (max_k / 2)) * C + kChannelPad<T>;  // the pad: a last full vector may read past C
}

template <typename T>
int64_t dwconv_nhwc_scratch(int64_t W, int64_t C, int64_t max_k) {
  return (max_k + 1) * nhwc_row_len<T>(W, C, max_k);
}

template <typename T>
inline void stage_nhwc_row(const NhwcConv<T>& p, int64_t h, T* dst) {
  using Vec = Vectorized<T>;
  constexpr int VL = Vec::size();
  const int64_t C = p.C;
  const T* src = p.x + h * p.x_sh;
  for (int64_t w = 0; w < p.W; ++w, src += p.x_sw, dst += C) {
    if (!p.in_scale) {
      std::memcpy(dst, src, sizeof(T) * C);
      continue;
    }
    int64_t c = 0;
    for (; c + VL <= C; c += VL)
      at::vec::fmadd(gelu_erf(Vec::loadu(src + c)), Vec::loadu(p.in_scale + c), Vec::loadu(p.in_shift + c))
          .store(dst + c);
    if (c < C)
      at::vec::fmadd(gelu_erf(Vec::loadu(src + c, C - c)), Vec::loadu(p.in_scale + c), Vec::loadu(p.in_shift + c))
          .store(dst + c, C - c);
  }
}

// NACC channel vectors from absolute channel c of output pixel w, group g.
// rows[i]: the staged input row of tap row i (already offset to pixel w and
// the group's first tap column).
template <typename T, int KT, int NACC>
inline void nhwc_block(const NhwcConv<T>& p, const NhwcGroup<T>& g, const T* const* rows, int64_t w_off,
                       int64_t c, T* out_pixel, const T* residual) {
  using Vec = Vectorized<T>;
  constexpr int VL = Vec::size();
  const int64_t K = KT > 0 ? KT : g.K, C = p.C;
  const int64_t cc = c - g.c0;
  Vec acc[NACC];
  for (int u = 0; u < NACC; ++u) acc[u] = Vec::loadu(p.bias + c + u * VL);
  for (int64_t i = 0; i < K; ++i) {
    const T* row = rows[i] + w_off + c;
    const T* wrow = g.weight + i * K * g.ldw + cc;
    for (int64_t j = 0; j < K; ++j) {
      for (int u = 0; u < NACC; ++u)
        acc[u] = at::vec::fmadd(Vec::loadu(wrow + j * g.ldw + u * VL), Vec::loadu(row + j * C + u * VL), acc[u]);
    }
  }
  for (int u = 0; u < NACC; ++u) {
    Vec r = acc[u];
    const int64_t ch = c + u * VL;
    if (p.scale) {
      r = at::vec::fmadd(gelu_erf(r + Vec::loadu(residual + ch)), Vec::loadu(p.scale + ch), Vec::loadu(p.shift + ch));
    }
    const int64_t n = min_i64(VL, g.c1 - ch);
    r.store(out_pixel + ch, n);
  }
}

// kPixels output pixels w0.. of one channel vector c (compile-time kernel KT):
// per tap row the KT weight vectors stay in registers and each of the
// KT + kPixels - 1 input vectors of the row is loaded once and used by every
// (pixel, tap) pair that reads it, so the loop is FMA-bound, not load-bound.
constexpr int kPixels = 4;

template <typename T, int KT>
inline void nhwc_pixel_block(const NhwcConv<T>& p, const NhwcGroup<T>& g, const T* const* rows, int64_t w_off,
                             int64_t c, T* out_pixel, const T* residual) {
  using Vec = Vectorized<T>;
  constexpr int VL = Vec::size();
  const int64_t C = p.C, cc = c - g.c0;
  Vec acc[kPixels];
  const Vec bias = Vec::loadu(p.bias + c);
#pragma GCC unroll 8
  for (int q = 0; q < kPixels; ++q) acc[q] = bias;
#pragma GCC unroll 16
  for (int i = 0; i < KT; ++i) {
    const T* row = rows[i] + w_off + c;
    const T* wrow = g.weight + i * KT * g.ldw + cc;
    Vec wv[KT];
#pragma GCC unroll 16
    for (int j = 0; j < KT; ++j) wv[j] = Vec::loadu(wrow + j * g.ldw);
#pragma GCC unroll 16
    for (int t = 0; t < KT + kPixels - 1; ++t) {
      const Vec xv = Vec::loadu(row + t * C);
#pragma GCC unroll 8
      for (int q = 0; q < kPixels; ++q) {
        const int j = t - q;
        if (j >= 0 && j < KT) acc[q] = at::vec::fmadd(wv[j], xv, acc[q]);
      }
    }
  }
  const int64_t n = min_i64(VL, g.c1 - c);
#pragma GCC unroll 8
  for (int q = 0; q < kPixels; ++q) {
    Vec r = acc[q];
    if (p.scale) {
      r = at::vec::fmadd(gelu_erf(r + Vec::loadu(residual + q * C + c)), Vec::loadu(p.scale + c),
                         Vec::loadu(p.shift + c));
    }
    r.store(out_pixel + q * C + c, n);
  }
}

template <typename T, int KT>
void nhwc_group_row(const NhwcConv<T>& p, const NhwcGroup<T>& g, T* const* ring, const T* zero_row, int64_t r,
                    int64_t max_pad, T* out_row) {
  constexpr int VL = Vectorized<T>::size();
  const int64_t K = KT > 0 ? KT : g.K, pad = K / 2, C = p.C;
  const T* rows[64];
  for (int64_t i = 0; i < K; ++i) {
    const int64_t h = r - pad + i;
    rows[i] = (h >= 0 && h < p.H) ? ring[h % p.max_k] : zero_row;
  }
  const T* center = ring[r % p.max_k] + max_pad * C;  // pixel 0 of the input row r
  const int64_t vectors = (g.c1 - g.c0 + VL - 1) / VL;
  int64_t w = 0;
  if (KT > 0) {
    for (; w + kPixels <= p.W; w += kPixels) {
      const int64_t w_off = (w + max_pad - pad) * C;
      for (int64_t v = 0; v < vectors; ++v) {
        nhwc_pixel_block<T, (KT > 0 ? KT : 1)>(p, g, rows, w_off, g.c0 + v * VL, out_row + w * C, center + w * C);
      }
    }
  }
  for (; w < p.W; ++w) {
    const int64_t w_off = (w + max_pad - pad) * C;
    T* out_pixel = out_row + w * C;
    const T* residual = center + w * C;
    for_each_block(vectors, VL, [&](auto nacc, int64_t c_off) {
      nhwc_block<T, KT, decltype(nacc)::value>(p, g, rows, w_off, g.c0 + c_off, out_pixel, residual);
    });
  }
}

template <typename T>
void dwconv_nhwc_rows(const NhwcConv<T>& p, int64_t r0, int64_t r1, T* scratch) {
  const int64_t max_pad = p.max_k / 2, C = p.C;
  const int64_t len = nhwc_row_len<T>(p.W, C, p.max_k);
  const T* zero_row = scratch;
  T* ring[64];
  for (int64_t i = 0; i < p.max_k; ++i) ring[i] = scratch + (i + 1) * len;
  int64_t staged = r0 - max_pad < 0 ? 0 : r0 - max_pad;  // next input row to stage
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t need = min_i64(p.H, r + max_pad + 1);  // rows [.., r + max_pad] staged
    for (; staged < need; ++staged) stage_nhwc_row(p, staged, ring[staged % p.max_k] + max_pad * C);
    T* out_row = p.out + r * p.W * C;
    for (int64_t gi = 0; gi < p.num_groups; ++gi) {
      const NhwcGroup<T>& g = p.groups[gi];
      switch (g.K) {
        case 1: nhwc_group_row<T, 1>(p, g, ring, zero_row, r, max_pad, out_row); break;
        case 3: nhwc_group_row<T, 3>(p, g, ring, zero_row, r, max_pad, out_row); break;
        case 5: nhwc_group_row<T, 5>(p, g, ring, zero_row, r, max_pad, out_row); break;
        case 7: nhwc_group_row<T, 7>(p, g, ring, zero_row, r, max_pad, out_row); break;
        case 9: nhwc_group_row<T, 9>(p, g, ring, zero_row, r, max_pad, out_row); break;
        default: nhwc_group_row<T, 0>(p, g, ring, zero_row, r, max_pad, out_row); break;
      }
    }
  }
}

template <typename T>
void mix_kernel(const T* logits, const T* weight, int64_t G, int64_t logit_g_stride, int64_t weight_g_stride,
                int64_t KK, T* out) {
  using Vec = Vectorized<T>;
  constexpr int VL = Vec::size();
  for (int64_t t = 0; t < KK; t += VL) {
    const int64_t n = min_i64(VL, KK - t);
    Vec mx = Vec::loadu(logits + t, n);
    for (int64_t g = 1; g < G; ++g) mx = at::vec::maximum(mx, Vec::loadu(logits + g * logit_g_stride + t, n));
    Vec sum(T(0)), acc(T(0));
    for (int64_t g = 0; g < G; ++g) {
      const Vec e = (Vec::loadu(logits + g * logit_g_stride + t, n) - mx).exp();
      sum = sum + e;
      acc = at::vec::fmadd(e, Vec::loadu(weight + g * weight_g_stride + t, n), acc);
    }
    // Lanes past n (zero-filled loads) are never stored.
    (acc / sum).store(out + t, n);
  }
}

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

template <typename T>
int64_t attention_scratch(int64_t M, int64_t d) {
  constexpr int VL = Vectorized<T>::size();
  const int64_t Mp = round_up(M, VL), dp = round_up(d, VL);
  return d * Mp + M * dp + 2 * Mp + dp;
}

// scores[m] = (sum_j q[j] * kT[j, m]) * scale + bias[m] for NACC vectors of m from m0.
template <typename T, int NACC>
inline void score_block(const AttentionHead<T>& a, const T* qrow, const T* kT, int64_t Mp,
                        const T* bias_row, T* scores, int64_t m0) {
  using Vec = Vectorized<T>;
  constexpr int VL = Vec::size();
  Vec acc[NACC];
  for (int u = 0; u < NACC; ++u) acc[u] = Vec(T(0));
  for (int64_t j = 0; j < a.d; ++j) {
    const Vec qj(qrow[j * a.q_sd]);
    const T* krow = kT + j * Mp + m0;
    for (int u = 0; u < NACC; ++u) acc[u] = at::vec::fmadd(qj, Vec::loadu(krow + u * VL), acc[u]);
  }
  const Vec scale(a.scale);
  for (int u = 0; u < NACC; ++u) {
    Vec s = acc[u] * scale;
    if (bias_row) {
      const int64_t m = m0 + u * VL;  // the last vector may run past M (a.M): load only what exists
      s = s + (m + VL <= a.M ? Vec::loadu(bias_row + m) : Vec::loadu(bias_row + m, a.M - m));
    }
    s.store(scores + m0 + u * VL);
  }
}

template <typename T, int NACC>
inline void pv_block(const T* probs, int64_t M, const T* vp, int64_t dp, T inv_sum, T* out, int64_t d, int64_t j0) {
  using Vec = Vectorized<T>;
  constexpr int VL = Vec::size();
  Vec acc[NACC];
  for (int u = 0; u < NACC; ++u) acc[u] = Vec(T(0));
  for (int64_t m = 0; m < M; ++m) {
    const Vec pm(probs[m]);
    const T* vrow = vp + m * dp + j0;
    for (int u = 0; u < NACC; ++u) acc[u] = at::vec::fmadd(pm, Vec::loadu(vrow + u * VL), acc[u]);
  }
  for (int u = 0; u < NACC; ++u) {
    const int64_t n = min_i64(VL, d - j0 - u * VL);
    if (n <= 0) break;
    (acc[u] * Vec(inv_sum)).store(out + j0 + u * VL, n);
  }
}

template <typename T>
void attention_rows(const AttentionHead<T>& a, int64_t n0, int64_t n1, T* scratch) {
  using Vec = Vectorized<T>;
  constexpr int VL = Vec::size();
  const int64_t M = a.M, d = a.d;
  const int64_t Mp = round_up(M, VL), dp = round_up(d, VL);
  T* kT = scratch;            // [d, Mp]
  T* vp = kT + d * Mp;        // [M, dp]
  T* scores = vp + M * dp;    // [Mp]
  T* bias_buf = scores + Mp;  // [Mp], bias row gathered when not unit-stride
  T* out_buf = bias_buf + Mp;  // [dp], output row before a strided scatter
  for (int64_t j = 0; j < d; ++j) {
    for (int64_t m = 0; m < M; ++m) kT[j * Mp + m] = a.k[m * a.k_sm + j * a.k_sd];
    fill(kT + j * Mp + M, kT + (j + 1) * Mp, T(0));
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < d; ++j) vp[m * dp + j] = a.v[m * a.v_sm + j * a.v_sd];
    fill(vp + m * dp + d, vp + (m + 1) * dp, T(0));
  }
  fill(bias_buf, bias_buf + Mp, T(0));
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t n = n0; n < n1; ++n) {
    const T* qrow = a.q + n * a.q_sn;
    const T* bias_row = nullptr;
    if (a.bias) {
      bias_row = a.bias + n * a.bias_sn;
      if (a.bias_sm != 1) {
        for (int64_t m = 0; m < M; ++m) bias_buf[m] = bias_row[m * a.bias_sm];
        bias_row = bias_buf;
      }
    }
    for_each_block(Mp / VL, VL, [&](auto nacc, int64_t m0) {
      score_block<T, decltype(nacc)::value>(a, qrow, kT, Mp, bias_row, scores, m0);
    });
    for (int64_t m = M; m < Mp; ++m) scores[m] = neg_inf;
    Vec vmax(neg_inf);
    for (int64_t m = 0; m < Mp; m += VL) vmax = at::vec::maximum(vmax, Vec::loadu(scores + m));
    T row_max = neg_inf;
    {
      T lanes[VL];
      vmax.store(lanes);
      for (int l = 0; l < VL; ++l) row_max = lanes[l] > row_max ? lanes[l] : row_max;
    }
    Vec vsum(T(0));
    for (int64_t m = 0; m < Mp; m += VL) {
      const Vec e = (Vec::loadu(scores + m) - Vec(row_max)).exp_u20();  // fp32: within 2 ulp
      e.store(scores + m);
      vsum = vsum + e;
    }
    T row_sum = 0;
    {
      T lanes[VL];
      vsum.store(lanes);
      for (int l = 0; l < VL; ++l) row_sum += lanes[l];
    }
    T* out = a.out + n * a.out_sn;
    const T inv_sum = T(1) / row_sum;
    // Unit-stride rows are stored in place; otherwise into out_buf, then scattered.
    T* row_out = a.out_sd == 1 ? out : out_buf;
    for_each_block(dp / VL, VL, [&](auto nacc, int64_t j0) {
      pv_block<T, decltype(nacc)::value>(scores, M, vp, dp, inv_sum, row_out, d, j0);
    });
    if (a.out_sd != 1) {
      for (int64_t j = 0; j < d; ++j) out[j * a.out_sd] = out_buf[j];
    }
  }
}

template <typename T>
const KernelTable<T>& table() {
  static const KernelTable<T> t{&dwconv_scratch<T>,      &dwconv_plane<T>,    &mix_kernel<T>,
                                &dwconv_nhwc_scratch<T>, &dwconv_nhwc_rows<T>, &attention_scratch<T>,
                                &attention_rows<T>,      &gelu_inplace<T>,     &strided_dwconv_rows<T>,
                                &box_sum<T>};
  return t;
}

}  // namespace

const KernelTable<float>& kernel_table(float) { return table<float>(); }
const KernelTable<double>& kernel_table(double) { return table<double>(); }

}  // namespace TRANSXNET_KERNEL_NS
}  // namespace transxnet
