// Tensor-level entry points of the C++ CPU backend (Python: transxnet_kernels._C,
// wrapped as torch.library custom ops in transxnet_kernels/cpp_ops.py).
// Forward only, fp32/fp64: checks and layout here, threading with
// at::parallel_for over independent planes / row blocks, the arithmetic in the
// per-ISA kernels (kernels.h) chosen once at run time.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>

#include <atomic>
#include <cmath>
#include <string>
#include <vector>

#include "kernel_api.h"

namespace transxnet {
namespace {

enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };
const char* const kIsaNames[] = {"baseline", "avx2", "avx512"};

Isa best_isa() {
#ifdef TRANSXNET_HAVE_X86_KERNELS
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::baseline;
}

std::atomic<int> g_isa{static_cast<int>(best_isa())};

template <typename T>
const KernelTable<T>& kernels() {
#ifdef TRANSXNET_HAVE_X86_KERNELS
  switch (static_cast<Isa>(g_isa.load(std::memory_order_relaxed))) {
    case Isa::avx512: return avx512::kernel_table(T());
    case Isa::avx2: return avx2::kernel_table(T());
    case Isa::baseline: break;
  }
#endif
  return base::kernel_table(T());
}

std::string kernel_isa() { return kIsaNames[g_isa.load()]; }

// Selects a kernel build the CPU supports (tests run every variant); returns the previous one.
std::string set_kernel_isa(const std::string& name) {
  for (int i = 0; i <= static_cast<int>(best_isa()); ++i) {
    if (name == kIsaNames[i]) {
      const std::string previous = kernel_isa();
      g_isa.store(i);
      return previous;
    }
  }
  TORCH_CHECK(false, "kernel ISA '", name, "' is unknown or not supported by this CPU (best: ",
              kIsaNames[static_cast<int>(best_isa())], ")");
}

void check_input(const at::Tensor& t, const at::Tensor& x, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), what, " has dtype ", t.scalar_type(), " but x has ",
              x.scalar_type());
}

void check_x_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the cpp kernels support float32 and float64, got ", x.scalar_type());
}

void check_x(const at::Tensor& x) {
  check_x_dtype(x);
  TORCH_CHECK(x.dim() == 4, "x must be [B, C, H, W]");
}

// Per-channel depthwise-conv parameters, resolved before the parallel loop.
template <typename T>
struct ChannelConv {
  const T* weight;  // [K, K]
  T bias;
  int64_t K;
};

// out[b, c] = conv(x[b, c], channels[c]) (+ the MS-FFN epilogue when scale/shift are given).
// in_scale/in_shift (ms_ffn_middle_eval): the conv input is gelu(x) * in_scale + in_shift.
template <typename T>
void run_dwconv(const at::Tensor& x, at::Tensor& out, const std::vector<ChannelConv<T>>& channels,
                const T* scale, const T* shift, const T* in_scale, const T* in_shift) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const KernelTable<T>& kt = kernels<T>();
  int64_t max_k = 1;
  for (const auto& ch : channels) max_k = std::max(max_k, ch.K);
  const int64_t scratch_size = kt.dwconv_scratch(H, W, max_k);
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(scratch_size);  // zero-filled: the shared padding border
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % C;
      const ChannelConv<T>& ch = channels[c];
      PlaneConv<T> p{xp + plane * H * W, op + plane * H * W, ch.weight, ch.bias, H, W, ch.K, max_k / 2,
                     scale != nullptr, scale ? scale[c] : T(1), shift ? shift[c] : T(0),
                     in_scale != nullptr, in_scale ? in_scale[c] : T(1), in_shift ? in_shift[c] : T(0)};
      kt.dwconv_plane(p, scratch.data());
    }
  });
}

// The layout rule (cpp_ops.py's fake impls apply the same): an input whose
// channels are unit-stride (channels_last, or a channel slice of it) runs the
// NHWC kernels and returns a channels_last tensor; any other input runs the
// NCHW kernels (after .contiguous()) and returns a contiguous tensor.
bool channels_last_input(const at::Tensor& x) { return x.size(1) > 1 && x.stride(1) == 1; }

// Kernel sizes the NHWC kernels take (their tap-row tables are fixed arrays).
constexpr int64_t kMaxNhwcKernel = 63;

at::Tensor empty_like_layout(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(channels_last_input(x) ? at::MemoryFormat::ChannelsLast
                                                                                  : at::MemoryFormat::Contiguous));
}

// A length-C per-channel table padded with zeros to whole vectors of every kernel build.
template <typename T>
std::vector<T> padded_channels(const T* values, int64_t C, T fill = T(0)) {
  std::vector<T> padded(C + kChannelPad<T>, T(0));
  for (int64_t c = 0; c < C; ++c) padded[c] = values ? values[c] : fill;
  return padded;
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Depthwise weights w[c * taps + t] of `channels` channels as the NHWC kernels read them:
// tap-major [taps][ldw], ldw = channels rounded up to whole vectors of every build, zeros past channels.
template <typename T>
std::vector<T> tap_major(const T* w, int64_t channels, int64_t taps, int64_t ldw) {
  std::vector<T> table(taps * ldw, T(0));
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t t = 0; t < taps; ++t) table[t * ldw + c] = w[c * taps + t];
  return table;
}

// Bands of rows each of B samples splits into for run_dwconv_nhwc (at least one task per thread).
int64_t wanted_bands(int64_t B, int64_t H) { return std::min(H, (at::get_num_threads() + B - 1) / B); }

// out = NHWC depthwise conv of x (channel stride 1, any pixel strides) into a
// channels_last out; make_conv(b) fills the per-sample fields (groups, bias,
// epilogue), this sets x, out, sizes. Tasks are (sample, band of rows), bands
// only as many as needed to give every thread one: a band restages its K - 1
// halo rows (ms_ffn_middle_eval: their input GELU too). Staging each sample once
// into a shared buffer instead measured slower at batch 1 on 2 threads (the
// buffer's first touch costs more than the halo rows).
template <typename T, typename MakeConv>
void run_dwconv_nhwc(const at::Tensor& x, at::Tensor& out, int64_t max_k, MakeConv&& make_conv) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (B * C * H * W == 0) return;
  const KernelTable<T>& kt = kernels<T>();
  const int64_t scratch_size = kt.dwconv_nhwc_scratch(W, C, max_k);
  const int64_t wanted = wanted_bands(B, H);
  const int64_t band_rows = (H + wanted - 1) / wanted;
  const int64_t bands = (H + band_rows - 1) / band_rows;
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, B * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(scratch_size);  // zero-filled: the padding pixels and the zero row
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / bands, r0 = task % bands * band_rows;
      NhwcConv<T> p = make_conv(b);
      p.x = xp + b * x.stride(0);
      p.x_sh = x.stride(2);
      p.x_sw = x.stride(3);
      p.out = op + b * H * W * C;
      p.H = H;
      p.W = W;
      p.C = C;
      p.max_k = max_k;
      kt.dwconv_nhwc_rows(p, r0, std::min(H, r0 + band_rows), scratch.data());
    }
  });
}

// The result in the layout the rule promises (a copy only for a channels_last
// input whose kernel is past the NHWC limit, which ran the NCHW kernels).
at::Tensor same_layout_as_input(const at::Tensor& out, const at::Tensor& x) {
  return channels_last_input(x) ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;
}

// IDConv logits of G groups as the kernels read them, from a [B, G, C] or [B, G, C, K*K]
// view (taps unit-stride): logit (b, g, c) at p[b * sample + g * group + c * channel],
// a kernel logit's K*K taps contiguous from there. idconv_forward's inputs are
// contiguous; idconv_eval's are views of its [B, G*C, K*K + 1] matmul result.
template <typename T>
struct LogitsView {
  const T* p;
  int64_t sample, group, channel;
  explicit LogitsView(const at::Tensor& t)
      : p(t.defined() ? t.const_data_ptr<T>() : nullptr),
        sample(t.defined() ? t.stride(0) : 0),
        group(t.defined() ? t.stride(1) : 0),
        channel(t.defined() ? t.stride(2) : 0) {}
  const T* at(int64_t b, int64_t g, int64_t c) const { return p + b * sample + g * group + c * channel; }
};

// softmax_g(bias_logits(b, g, c)) . bias[:, c]
template <typename T>
T mixed_bias(const LogitsView<T>& bias_logits, const T* bias, int64_t b, int64_t c, int64_t G, int64_t C) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t g = 0; g < G; ++g) mx = std::max(mx, *bias_logits.at(b, g, c));
  T sum = 0, acc = 0;
  for (int64_t g = 0; g < G; ++g) {
    const T eg = std::exp(*bias_logits.at(b, g, c) - mx);
    sum += eg;
    acc += eg * bias[g * C + c];
  }
  return acc / sum;
}

// out = the IDConv depthwise conv of x with the kernels and biases mixed from the
// logits (bias_logits.p null: no bias). x is channels_last-strided (nhwc, out
// channels_last) or contiguous (out contiguous); weight [G, C, K, K] and bias
// [G, C] contiguous.
template <typename T>
void run_idconv(const at::Tensor& x, at::Tensor& out, bool nhwc, const LogitsView<T>& kernel_logits,
                const LogitsView<T>& bias_logits, const T* wp, const T* bp, int64_t G, int64_t K) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const KernelTable<T>& kt = kernels<T>();
  const int64_t KK = K * K;
  if (nhwc) {
    // Per sample: the mixed kernel tap-major [KK][ldw] and the mixed bias [C + pad].
    const int64_t ldw = round_up(C, kChannelPad<T>), bias_len = C + kChannelPad<T>;
    std::vector<T> tables(B * KK * ldw, T(0)), biases(B * bias_len, T(0));
    // Tasks (sample, channel): at batch 1 the mixing (G exponentials per tap) is a good part of a
    // late stage's call (T, stage 4: 224 channels, 7x7 pixels), so it is split among threads too.
    at::parallel_for(0, B * C, 16, [&](int64_t begin, int64_t end) {
      std::vector<T> mixed(KK);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / C, c = task % C;
        T* table = tables.data() + b * KK * ldw;
        kt.mix_kernel(kernel_logits.at(b, 0, c), wp + c * KK, G, kernel_logits.group, C * KK, KK, mixed.data());
        for (int64_t t = 0; t < KK; ++t) table[t * ldw + c] = mixed[t];
        if (bp) biases[b * bias_len + c] = mixed_bias(bias_logits, bp, b, c, G, C);
      }
    });
    std::vector<NhwcGroup<T>> groups;
    for (int64_t b = 0; b < B; ++b) groups.push_back({0, C, K, tables.data() + b * KK * ldw, ldw});
    run_dwconv_nhwc<T>(x, out, K, [&](int64_t b) {
      NhwcConv<T> p{};
      p.groups = &groups[b];
      p.num_groups = 1;
      p.bias = biases.data() + b * bias_len;
      return p;
    });
  } else {
    const int64_t scratch_size = kt.dwconv_scratch(H, W, K);
    const T* xp = x.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(scratch_size), mixed(KK);  // scratch zero-filled: the padding border
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t b = plane / C, c = plane % C;
        kt.mix_kernel(kernel_logits.at(b, 0, c), wp + c * KK, G, kernel_logits.group, C * KK, KK, mixed.data());
        const T conv_bias = bp ? mixed_bias(bias_logits, bp, b, c, G, C) : T(0);
        PlaneConv<T> p{xp + plane * H * W, op + plane * H * W, mixed.data(), conv_bias, H, W, K, K / 2,
                       false, T(1), T(0), false, T(1), T(0)};
        kt.dwconv_plane(p, scratch.data());
      }
    });
  }
}

// The IDConv conv of x_in in the layout rule's output layout: kernel_logits a
// [B, G, C, K*K] view with unit-stride taps, bias_logits a [B, G, C] view (or
// undefined, with bias: no bias), weight [G, C, K, K] and bias [G, C] contiguous.
at::Tensor idconv_conv(const at::Tensor& x_in, const at::Tensor& kernel_logits, const at::Tensor& bias_logits,
                       const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t G = weight.size(0), K = weight.size(-1);
  const bool nhwc = channels_last_input(x_in) && K <= kMaxNhwcKernel;
  const at::Tensor x = nhwc ? x_in : x_in.contiguous();
  at::Tensor out = nhwc ? empty_like_layout(x_in) : at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "idconv_cpp", [&] {
    using T = scalar_t;
    run_idconv<T>(x, out, nhwc, LogitsView<T>(kernel_logits), LogitsView<T>(bias_logits),
                  weight.const_data_ptr<T>(), bias.defined() ? bias.const_data_ptr<T>() : nullptr, G, K);
  });
  return same_layout_as_input(out, x_in);
}

void check_idconv_weights(const at::Tensor& weight, const at::Tensor& x) {
  check_input(weight, x, "weight");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == weight.size(3),
              "weight must be [G, C, K, K]");
  TORCH_CHECK(weight.size(-1) % 2 == 1, "the kernel size must be odd");
}

at::Tensor idconv_forward(const at::Tensor& x_in, const at::Tensor& kernel_logits_in, const at::Tensor& weight_in,
                          const std::optional<at::Tensor>& bias_logits_in, const std::optional<at::Tensor>& bias_in) {
  check_x(x_in);
  check_input(kernel_logits_in, x_in, "kernel_logits");
  check_idconv_weights(weight_in, x_in);
  TORCH_CHECK(bias_logits_in.has_value() == bias_in.has_value(), "pass both bias_logits and bias, or neither");
  const at::Tensor logits = kernel_logits_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t B = x_in.size(0), C = x_in.size(1);
  const int64_t G = weight.size(0), K = weight.size(-1);
  TORCH_CHECK(logits.sizes() == at::IntArrayRef({B, G, C, K, K}), "kernel_logits must be [B, G, C, K, K]");
  at::Tensor bias_logits, bias;
  if (bias_in.has_value()) {
    check_input(*bias_logits_in, x_in, "bias_logits");
    check_input(*bias_in, x_in, "bias");
    bias_logits = bias_logits_in->contiguous();
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.sizes() == at::IntArrayRef({G, C}) && bias_logits.sizes() == at::IntArrayRef({B, G, C}),
                "bias must be [G, C] and bias_logits [B, G, C]");
  }
  return idconv_conv(x_in, logits.view({B, G, C, K * K}), bias_logits, weight, bias);
}

at::Tensor gelu_(at::Tensor x);

// IDConv in eval mode from its input, for the accelerated model's CPU inference
// at small batches, where the ~13 torch calls between the input and
// idconv_forward cost more than their arithmetic: the pooled map (adaptive
// average pooling to K x K, PyTorch's bins) and the mean as one [B, K*K + 1, C]
// matrix, read from x in one pass of box sums; proj (its 1x1 conv + BatchNorm,
// GELU, 1x1 conv: reduce_weight [R, C], reduce_bias [R], expand_weight [G*C, R],
// expand_bias [G*C]) as two matmuls, the second producing [B, G*C, K*K + 1],
// whose rows are each (group, channel)'s K*K kernel logits and its bias logit,
// the layout the mixing reads; then the conv as idconv_forward.
at::Tensor idconv_eval(const at::Tensor& x_in, const at::Tensor& reduce_weight, const at::Tensor& reduce_bias,
                       const at::Tensor& expand_weight, const at::Tensor& expand_bias, const at::Tensor& weight_in,
                       const at::Tensor& bias_in) {
  check_x(x_in);
  check_idconv_weights(weight_in, x_in);
  const at::Tensor weight = weight_in.contiguous();
  const int64_t B = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t G = weight.size(0), K = weight.size(-1), KK = K * K;
  TORCH_CHECK(H > 0 && W > 0, "idconv_eval pools the input: H and W must be positive");
  const struct {
    const at::Tensor& t;
    const char* what;
  } params[] = {{reduce_weight, "reduce_weight"}, {reduce_bias, "reduce_bias"}, {expand_weight, "expand_weight"},
                {expand_bias, "expand_bias"},     {bias_in, "bias"}};
  for (const auto& param : params) check_input(param.t, x_in, param.what);
  const int64_t R = reduce_weight.size(0);
  TORCH_CHECK(reduce_weight.sizes() == at::IntArrayRef({R, C}) && reduce_bias.sizes() == at::IntArrayRef({R}),
              "reduce_weight must be [R, C] and reduce_bias [R]");
  TORCH_CHECK(expand_weight.sizes() == at::IntArrayRef({G * C, R}) && expand_bias.sizes() == at::IntArrayRef({G * C}),
              "expand_weight must be [G*C, R] and expand_bias [G*C]");
  TORCH_CHECK(bias_in.sizes() == at::IntArrayRef({G, C}), "bias must be [G, C]");
  const at::Tensor bias = bias_in.contiguous();
  // The pooling reads channel vectors: an input without unit-stride channels is copied once.
  const at::Tensor xs = channels_last_input(x_in) ? x_in : x_in.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor pooled = at::empty({B, KK + 1, C}, x_in.options());
  AT_DISPATCH_FLOATING_TYPES(x_in.scalar_type(), "idconv_eval_pool", [&] {
    using T = scalar_t;
    const KernelTable<T>& kt = kernels<T>();
    const T* xp = xs.const_data_ptr<T>();
    T* pp = pooled.mutable_data_ptr<T>();
    const int64_t sb = xs.stride(0), sh = xs.stride(2), sw = xs.stride(3);
    // The bins tile the map exactly when K divides H and W: the mean is then the bins' mean. Otherwise bins
    // overlap, and each task also sums its share of whole rows (row i*H/K up to (i+1)*H/K) for the mean.
    const bool tiled = H % K == 0 && W % K == 0;
    std::vector<T> row_sums(tiled ? 0 : B * K * C);
    // Tasks: (sample, row of bins). Below ~32K elements a task group, the calling thread runs it alone.
    const int64_t task_elems = ((H + K - 1) / K + 1) * W * C;
    at::parallel_for(0, B * K, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, task_elems)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t task = begin; task < end; ++task) {
                         const int64_t b = task / K, i = task % K;
                         const T* xb = xp + b * sb;
                         const int64_t h0 = i * H / K, h1 = ((i + 1) * H + K - 1) / K;
                         for (int64_t j = 0; j < K; ++j) {
                           const int64_t w0 = j * W / K, w1 = ((j + 1) * W + K - 1) / K;
                           kt.box_sum(xb, sh, sw, h0, h1, w0, w1, C, T(1) / T((h1 - h0) * (w1 - w0)),
                                      pp + (b * (KK + 1) + i * K + j) * C);
                         }
                         if (!tiled) {
                           kt.box_sum(xb, sh, sw, i * H / K, (i + 1) * H / K, 0, W, C, T(1),
                                      row_sums.data() + (b * K + i) * C);
                         }
                       }
                     });
    for (int64_t b = 0; b < B; ++b) {
      T* mean = pp + (b * (KK + 1) + KK) * C;
      const T* parts = tiled ? pp + b * (KK + 1) * C : row_sums.data() + b * K * C;
      const int64_t num_parts = tiled ? KK : K;
      const T scale = tiled ? T(1) / T(KK) : T(1) / T(H * W);
      for (int64_t c = 0; c < C; ++c) {
        T sum = 0;
        for (int64_t part = 0; part < num_parts; ++part) sum += parts[part * C + c];
        mean[c] = sum * scale;
      }
    }
  });
  at::Tensor hidden = at::addmm(reduce_bias, pooled.view({B * (KK + 1), C}), reduce_weight.t());
  transxnet::gelu_(hidden);  // qualified: ADL would also find at::gelu_
  const at::Tensor logits =
      at::baddbmm(expand_bias.view({1, G * C, 1}), expand_weight.expand({B, G * C, R}),
                  hidden.view({B, KK + 1, R}).transpose(1, 2))
          .contiguous();  // [B, G*C, KK + 1]
  // Each (group, channel) row: its K*K kernel logits, then its bias logit.
  return idconv_conv(x_in, logits.narrow(2, 0, KK).view({B, G, C, KK}), logits.select(2, KK).view({B, G, C}),
                     weight, bias);
}

// Contiguous copies of the group weights/biases and the per-channel table pointing into them.
struct MultiscaleParams {
  std::vector<at::Tensor> weights, biases;
  std::vector<int64_t> first_channel;
};

MultiscaleParams multiscale_params(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                   const std::vector<at::Tensor>& biases) {
  TORCH_CHECK(!weights.empty() && weights.size() == biases.size(), "need one bias per weight");
  MultiscaleParams p;
  int64_t c0 = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    check_input(weights[i], x, "weights[i]");
    check_input(biases[i], x, "biases[i]");
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 4 && w.size(1) == 1 && w.size(2) == w.size(3) && w.size(2) % 2 == 1,
                "weights[", i, "] must be [c_i, 1, k, k] with odd k");
    TORCH_CHECK(biases[i].dim() == 1 && biases[i].size(0) == w.size(0), "biases[", i, "] must be [c_i]");
    p.weights.push_back(w.contiguous());
    p.biases.push_back(biases[i].contiguous());
    p.first_channel.push_back(c0);
    c0 += w.size(0);
  }
  TORCH_CHECK(c0 == x.size(1), "the groups cover ", c0, " channels but x has ", x.size(1));
  return p;
}

template <typename T>
std::vector<ChannelConv<T>> channel_table(const MultiscaleParams& p) {
  std::vector<ChannelConv<T>> channels;
  for (size_t i = 0; i < p.weights.size(); ++i) {
    const int64_t ci = p.weights[i].size(0), K = p.weights[i].size(2);
    const T* w = p.weights[i].const_data_ptr<T>();
    const T* b = p.biases[i].const_data_ptr<T>();
    for (int64_t c = 0; c < ci; ++c) channels.push_back({w + c * K * K, b[c], K});
  }
  return channels;
}

// The multi-scale depthwise conv in either layout; scale/shift (length C, or
// nullptr) add the MS-FFN epilogue, in_scale/in_shift the staged input activation.
// overwrite_input: the result may take x's storage where that is safe: the NHWC
// kernels, x dense channels_last, and each sample one band (one task reads
// input rows only below the output rows it has written, and its staged copies
// of the rows around them; bands of one sample would read each other's rows).
template <typename T>
at::Tensor multiscale_forward(const at::Tensor& x_in, const MultiscaleParams& params, const T* scale, const T* shift,
                              const T* in_scale, const T* in_shift, bool overwrite_input = false) {
  int64_t max_k = 1;
  for (const auto& w : params.weights) max_k = std::max(max_k, w.size(2));
  const bool nhwc = channels_last_input(x_in) && max_k <= kMaxNhwcKernel;
  const at::Tensor x = nhwc ? x_in : x_in.contiguous();
  const int64_t C = x.size(1);
  if (!nhwc) {
    at::Tensor out = at::empty(x.sizes(), x.options());
    run_dwconv<T>(x, out, channel_table<T>(params), scale, shift, in_scale, in_shift);
    return same_layout_as_input(out, x_in);
  }
  const bool in_place = overwrite_input && x_in.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                        wanted_bands(x_in.size(0), x_in.size(2)) == 1;
  at::Tensor out = in_place ? x_in : empty_like_layout(x_in);
  // Per group the weights tap-major [k*k][ldw]; per channel bias and affine tables, padded.
  std::vector<std::vector<T>> tables;
  std::vector<NhwcGroup<T>> groups;
  std::vector<T> bias(C + kChannelPad<T>, T(0));
  for (size_t i = 0; i < params.weights.size(); ++i) {
    const int64_t ci = params.weights[i].size(0), k = params.weights[i].size(2), c0 = params.first_channel[i];
    const int64_t ldw = round_up(ci, kChannelPad<T>);
    const T* w = params.weights[i].const_data_ptr<T>();
    const T* b = params.biases[i].const_data_ptr<T>();
    for (int64_t c = 0; c < ci; ++c) bias[c0 + c] = b[c];
    tables.push_back(tap_major(w, ci, k * k, ldw));
    groups.push_back({c0, c0 + ci, k, nullptr, ldw});
  }
  for (size_t i = 0; i < groups.size(); ++i) groups[i].weight = tables[i].data();
  const std::vector<T> scale_p = padded_channels(scale, C), shift_p = padded_channels(shift, C);
  const std::vector<T> in_scale_p = padded_channels(in_scale, C), in_shift_p = padded_channels(in_shift, C);
  run_dwconv_nhwc<T>(x, out, max_k, [&](int64_t) {
    NhwcConv<T> p{};
    p.groups = groups.data();
    p.num_groups = static_cast<int64_t>(groups.size());
    p.bias = bias.data();
    p.scale = scale ? scale_p.data() : nullptr;
    p.shift = scale ? shift_p.data() : nullptr;
    p.in_scale = in_scale ? in_scale_p.data() : nullptr;
    p.in_shift = in_scale ? in_shift_p.data() : nullptr;
    return p;
  });
  return out;
}

at::Tensor multiscale_dwconv_forward(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                     const std::vector<at::Tensor>& biases) {
  check_x(x);
  const MultiscaleParams params = multiscale_params(x, weights, biases);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multiscale_dwconv_cpp", [&] {
    return multiscale_forward<scalar_t>(x, params, nullptr, nullptr, nullptr, nullptr);
  });
}

// A [C] per-channel tensor as a vector of T.
template <typename T>
std::vector<T> channel_vector(const at::Tensor& t, int64_t C, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.numel() == C, what, " must be a CPU tensor of ", C, " elements");
  const at::Tensor c = t.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const T* p = c.const_data_ptr<T>();
  return std::vector<T>(p, p + C);
}

// Eval BatchNorm(GELU(multiscale_dwconv(x) + x)), the BatchNorm folded into
// per-channel scale = w / sqrt(var + eps), shift = b - mean * scale (in fp64).
at::Tensor ms_ffn_middle_forward(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                 const std::vector<at::Tensor>& biases, const std::optional<at::Tensor>& norm_weight,
                                 const std::optional<at::Tensor>& norm_bias, const at::Tensor& running_mean,
                                 const at::Tensor& running_var, double eps) {
  check_x(x);
  const int64_t C = x.size(1);
  const MultiscaleParams params = multiscale_params(x, weights, biases);
  auto as_f64 = [&](const std::optional<at::Tensor>& t, double fill, const char* what) {
    if (!t.has_value()) return std::vector<double>(C, fill);
    return channel_vector<double>(*t, C, what);
  };
  const std::vector<double> m = as_f64(running_mean, 0.0, "running_mean");
  const std::vector<double> v = as_f64(running_var, 1.0, "running_var");
  const std::vector<double> g = as_f64(norm_weight, 1.0, "norm_weight");
  const std::vector<double> b = as_f64(norm_bias, 0.0, "norm_bias");
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_ffn_middle_cpp", [&] {
    using T = scalar_t;
    std::vector<T> scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      const double s = g[c] / std::sqrt(v[c] + eps);
      scale[c] = static_cast<T>(s);
      shift[c] = static_cast<T>(b[c] - m[c] * s);
    }
    return multiscale_forward<T>(x, params, scale.data(), shift.data(), nullptr, nullptr);
  });
}

// GELU(multiscale_dwconv(y) + y) * output_scale + output_shift with
// y = GELU(x) * input_scale + input_shift computed while staging the conv input;
// overwrite_input as in multiscale_forward.
at::Tensor ms_ffn_middle_eval(const at::Tensor& x, const at::Tensor& input_scale, const at::Tensor& input_shift,
                              const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
                              const at::Tensor& output_scale, const at::Tensor& output_shift, bool overwrite_input) {
  check_x(x);
  const int64_t C = x.size(1);
  const MultiscaleParams params = multiscale_params(x, weights, biases);
  for (const at::Tensor* t : {&input_scale, &input_shift, &output_scale, &output_shift})
    check_input(*t, x, "input/output scale and shift");
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_ffn_middle_eval_cpp", [&] {
    using T = scalar_t;
    const std::vector<T> in_scale = channel_vector<T>(input_scale, C, "input_scale");
    const std::vector<T> in_shift = channel_vector<T>(input_shift, C, "input_shift");
    const std::vector<T> scale = channel_vector<T>(output_scale, C, "output_scale");
    const std::vector<T> shift = channel_vector<T>(output_shift, C, "output_shift");
    return multiscale_forward<T>(x, params, scale.data(), shift.data(), in_scale.data(), in_shift.data(),
                                 overwrite_input);
  });
}

at::Tensor ms_ffn_middle_eval_forward(const at::Tensor& x, const at::Tensor& input_scale,
                                      const at::Tensor& input_shift, const std::vector<at::Tensor>& weights,
                                      const std::vector<at::Tensor>& biases, const at::Tensor& output_scale,
                                      const at::Tensor& output_shift) {
  return ms_ffn_middle_eval(x, input_scale, input_shift, weights, biases, output_scale, output_shift, false);
}

// ms_ffn_middle_eval_forward whose result takes x's storage where that is safe (multiscale_forward), for x a
// fresh tensor no one else reads: a fresh result would be a first touch of new pages, at batch 16 a page
// fault per 4 KB (TransXNet-S stage 1: 77 MB, ~19 ms of a 75 ms call).
at::Tensor ms_ffn_middle_eval_overwriting(const at::Tensor& x, const at::Tensor& input_scale,
                                          const at::Tensor& input_shift, const std::vector<at::Tensor>& weights,
                                          const std::vector<at::Tensor>& biases, const at::Tensor& output_scale,
                                          const at::Tensor& output_shift) {
  return ms_ffn_middle_eval(x, input_scale, input_shift, weights, biases, output_scale, output_shift, true);
}

at::Tensor osra_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& bias_in, double scale) {
  TORCH_CHECK(q.device().is_cpu() && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              "q must be a float32/float64 CPU tensor");
  check_input(k, q, "k");
  check_input(v, q, "v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [B, h, L, d]");
  const int64_t B = q.size(0), h = q.size(1), N = q.size(2), d = q.size(3), M = k.size(2);
  TORCH_CHECK(k.sizes() == at::IntArrayRef({B, h, M, d}) && v.sizes() == k.sizes(), "k and v must be [B, h, M, d]");
  TORCH_CHECK(M > 0, "attention over zero keys is undefined");
  at::Tensor bias;
  if (bias_in.has_value()) {
    check_input(*bias_in, q, "bias");
    // Broadcast dims get stride 0, so any bias layout is read in place.
    bias = bias_in->expand({B, h, N, M});
  }
  // q's dimension order, dense (empty_like; the fake impl does the same): the
  // model's q is a transposed channels_last conv output, and this layout makes
  // its transpose + reshape back to [B, C, H, W] a free view.
  at::Tensor out = at::empty_like(q);
  constexpr int64_t kRowsPerTask = 128;
  const int64_t row_blocks = (N + kRowsPerTask - 1) / kRowsPerTask;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "osra_attention_cpp", [&] {
    using T = scalar_t;
    const KernelTable<T>& kt = kernels<T>();
    const int64_t scratch_size = kt.attention_scratch(M, d);
    const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
    const T* bp = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, B * h * row_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(scratch_size);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / row_blocks, rb = task % row_blocks;
        const int64_t b = bh / h, hh = bh % h;
        AttentionHead<T> a{qp + b * q.stride(0) + hh * q.stride(1), q.stride(2), q.stride(3),
                           kp + b * k.stride(0) + hh * k.stride(1), k.stride(2), k.stride(3),
                           vp + b * v.stride(0) + hh * v.stride(1), v.stride(2), v.stride(3),
                           bp ? bp + b * bias.stride(0) + hh * bias.stride(1) : nullptr,
                           bp ? bias.stride(2) : 0, bp ? bias.stride(3) : 0,
                           op + b * out.stride(0) + hh * out.stride(1), out.stride(2), out.stride(3),
                           M, d, static_cast<T>(scale)};
        const int64_t n0 = rb * kRowsPerTask;
        kt.attention_rows(a, n0, std::min(N, n0 + kRowsPerTask), scratch.data());
      }
    });
  });
  return out;
}

// x = gelu(x) in place (exact erf form), for a dense CPU tensor in any dimension
// order: its elements are one contiguous run from data_ptr. For the accelerated
// model's CPU inference, where torch's fp32 GELU runs oneDNN's eltwise primitive,
// whose set-up and OpenMP region cost more than small maps' arithmetic.
at::Tensor gelu_(at::Tensor x) {
  check_x_dtype(x);
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "gelu_ needs a dense tensor (any dimension order)");
  // Elements per task: below it a call runs on the calling thread (no parallel region).
  constexpr int64_t kGeluGrain = 16384;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gelu_cpp", [&] {
    scalar_t* p = x.mutable_data_ptr<scalar_t>();
    const KernelTable<scalar_t>& kt = kernels<scalar_t>();
    at::parallel_for(0, x.numel(), kGeluGrain,
                     [&](int64_t begin, int64_t end) { kt.gelu_inplace(p + begin, end - begin); });
  });
  return x;
}

// OSRA's spatial reduction for CPU inference: a depthwise conv (weight [C, 1, K, K],
// bias [C]) with stride and zero padding, then optionally gelu and a per-channel
// affine map * scale + shift (the reduction's folded BatchNorms). Any input layout
// (channels_last is read in place); a channels_last result. oneDNN runs these small
// strided depthwise convs at ~50 us a call at batch 1 whatever their size.
at::Tensor strided_dwconv_forward(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
                                  int64_t stride, int64_t padding, bool gelu, const std::optional<at::Tensor>& scale,
                                  const std::optional<at::Tensor>& shift) {
  check_x(x_in);
  check_input(weight_in, x_in, "weight");
  check_input(bias_in, x_in, "bias");
  const int64_t B = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  TORCH_CHECK(weight_in.dim() == 4 && weight_in.size(0) == C && weight_in.size(1) == 1 &&
                  weight_in.size(2) == weight_in.size(3),
              "weight must be [C, 1, K, K]");
  TORCH_CHECK(bias_in.dim() == 1 && bias_in.size(0) == C, "bias must be [C]");
  TORCH_CHECK(stride >= 1 && padding >= 0, "stride must be >= 1 and padding >= 0");
  TORCH_CHECK(scale.has_value() == shift.has_value(), "pass both scale and shift, or neither");
  const int64_t K = weight_in.size(2);
  TORCH_CHECK(H + 2 * padding >= K && W + 2 * padding >= K, "the padded input is smaller than the kernel");
  const int64_t Ho = (H + 2 * padding - K) / stride + 1, Wo = (W + 2 * padding - K) / stride + 1;
  const at::Tensor x = channels_last_input(x_in) ? x_in : x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor out = at::empty({B, C, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "strided_dwconv_cpp", [&] {
    using T = scalar_t;
    const int64_t KK = K * K, ldw = round_up(C, kChannelPad<T>);
    const std::vector<T> table = tap_major(weight.const_data_ptr<T>(), C, KK, ldw);
    const std::vector<T> bias = padded_channels(channel_vector<T>(bias_in, C, "bias").data(), C);
    std::vector<T> scale_table, shift_table;
    if (scale.has_value()) {
      check_input(*scale, x, "scale");
      check_input(*shift, x, "shift");
      scale_table = padded_channels(channel_vector<T>(*scale, C, "scale").data(), C);
      shift_table = padded_channels(channel_vector<T>(*shift, C, "shift").data(), C);
    }
    const T* xp = x.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    const KernelTable<T>& kt = kernels<T>();
    // Rows per task: about 2^18 multiply-adds, so a small reduction runs on the calling thread.
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, Wo * KK * C));
    at::parallel_for(0, B * Ho, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end;) {
        const int64_t b = task / Ho, r0 = task % Ho, r1 = std::min(Ho, r0 + (end - task));
        StridedConv<T> p{xp + b * x.stride(0), x.stride(2), x.stride(3), op + b * Ho * Wo * C, H, W, C, Ho, Wo, K,
                         stride, padding, table.data(), ldw, bias.data(), gelu,
                         scale_table.empty() ? nullptr : scale_table.data(),
                         shift_table.empty() ? nullptr : shift_table.data()};
        kt.strided_dwconv_rows(p, r0, r1);
        task += r1 - r0;
      }
    });
  });
  return out;
}

// The module's dict `name` (an interned string), borrowed: nn.Module keeps _parameters, _buffers and
// _modules in its instance __dict__, read here directly (a getattr first searches the class hierarchy).
PyObject* module_dict(py::handle module, PyObject* name) {
  PyObject* attrs = PyObject_GenericGetDict(module.ptr(), nullptr);
  if (attrs == nullptr) throw py::error_already_set();
  PyObject* dict = PyDict_GetItemWithError(attrs, name);
  Py_DECREF(attrs);  // the module keeps its __dict__, and the __dict__ the entry, alive
  if (dict == nullptr && PyErr_Occurred()) throw py::error_already_set();
  TORCH_CHECK(dict != nullptr && PyDict_Check(dict), "module.", PyUnicode_AsUTF8(name), " is not a dict");
  return dict;
}

// Storage address and version counter of every parameter and buffer of a module
// tree (nn.Module's _parameters, _buffers and _modules dicts, walked depth first),
// as bytes: what the accelerated model's CPU inference compares once per forward
// to know its folded weights are current (transxnet/fused.py, state_fingerprint).
// ~0.25 ms for TransXNet-T's 960 modules and 1508 tensors, against ~1.2 ms for the
// same walk in Python. Raises RuntimeError for an inference-mode tensor, which has
// no version counter.
py::bytes state_fingerprint(py::handle model) {
  static PyObject* const kParameters = PyUnicode_InternFromString("_parameters");
  static PyObject* const kBuffers = PyUnicode_InternFromString("_buffers");
  static PyObject* const kModules = PyUnicode_InternFromString("_modules");
  std::vector<int64_t> words;
  std::vector<py::handle> stack{model};
  while (!stack.empty()) {
    const py::handle module = stack.back();
    stack.pop_back();
    for (PyObject* name : {kParameters, kBuffers}) {
      PyObject* dict = module_dict(module, name);
      PyObject *key, *value;
      Py_ssize_t pos = 0;
      while (PyDict_Next(dict, &pos, &key, &value)) {
        if (value == Py_None) continue;
        TORCH_CHECK(THPVariable_Check(value), "module.", PyUnicode_AsUTF8(name), " holds a non-tensor");
        const at::Tensor& t = THPVariable_Unpack(value);
        TORCH_CHECK(!t.is_inference(), "an inference-mode tensor has no version counter");
        words.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
        words.push_back(static_cast<int64_t>(t._version()));
      }
    }
    PyObject* children = module_dict(module, kModules);
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(children, &pos, &key, &value)) {
      if (value != Py_None) stack.push_back(value);  // borrowed: the tree holds them during the walk
    }
  }
  return py::bytes(reinterpret_cast<const char*>(words.data()), words.size() * sizeof(int64_t));
}

}  // namespace
}  // namespace transxnet

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "TransXNet fused CPU kernels (forward, fp32/fp64)";
  m.def("idconv_forward", &transxnet::idconv_forward);
  m.def("idconv_eval", &transxnet::idconv_eval,
        "IDConv in eval mode from its input: pooling, proj as two matmuls (its BatchNorm folded), the conv");
  m.def("multiscale_dwconv_forward", &transxnet::multiscale_dwconv_forward);
  m.def("ms_ffn_middle_forward", &transxnet::ms_ffn_middle_forward);
  m.def("ms_ffn_middle_eval_forward", &transxnet::ms_ffn_middle_eval_forward);
  m.def("ms_ffn_middle_eval_overwriting", &transxnet::ms_ffn_middle_eval_overwriting,
        "ms_ffn_middle_eval_forward whose result may take x's storage (x is then overwritten)");
  m.def("osra_attention_forward", &transxnet::osra_attention_forward);
  m.def("strided_dwconv_forward", &transxnet::strided_dwconv_forward);
  m.def("state_fingerprint", &transxnet::state_fingerprint,
        "storage address and version counter of every parameter and buffer of a module tree, as bytes");
  m.def("gelu_", &transxnet::gelu_, "x = gelu(x) in place (exact erf form; dense float32/float64 CPU tensor)");
  m.def("kernel_isa", &transxnet::kernel_isa, "instruction set of the kernels in use: avx512, avx2 or baseline");
  m.def("set_kernel_isa", &transxnet::set_kernel_isa,
        "use the kernels built for this instruction set (one the CPU supports); returns the previous one");
}
