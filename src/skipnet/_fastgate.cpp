// Compiled CPU kernels of skipnet (skipnet.fastgate), float32 only, built on first use by torch.utils.cpp_extension:
// - gate_step: the recurrent gate's inference step in one call: spatial mean, the block's projection, LSTM cell,
//   output layer, sigmoid, threshold and the indices of the samples that execute the block, on the parameters as
//   they are at the call (gate_pack lays out the shared ones once per forward: nothing is cached between forwards);
// - masked_tail_forward / masked_tail_backward: Eq. 1's masked block tail (skipnet.gated._MaskedTail), each in one
//   pass over memory.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

// Instruction-set variants. Each hot loop below is written once (an always-inline "_body" function) and compiled
// three times on x86-64 (AVX-512, AVX2, baseline), once elsewhere; `g_isa` picks which runs (set_isa). The build
// uses -ffp-contract=off and no fast-math, so no variant fuses a multiply-add or reorders a sum: every variant
// computes the same float operations in the same order, and their results are bit-identical (tested).
namespace {
enum Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
int g_isa = kDefault;

bool isa_supported(int isa) {
  if (isa == kDefault) return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == kAvx2) return __builtin_cpu_supports("avx2");
  if (isa == kAvx512) return __builtin_cpu_supports("avx512f");
#endif
  return false;
}
}  // namespace

#define SKIPNET_INLINE static inline __attribute__((always_inline))
#if defined(__x86_64__) || defined(__i386__)
#define SKIPNET_VARIANTS(NAME, RET, PARAMS, ARGS)                                        \
  __attribute__((target("avx512f"))) static RET NAME##_avx512 PARAMS { return NAME##_body ARGS; } \
  __attribute__((target("avx2"))) static RET NAME##_avx2 PARAMS { return NAME##_body ARGS; }     \
  static RET NAME##_default PARAMS { return NAME##_body ARGS; }                                  \
  static RET NAME PARAMS {                                                                       \
    switch (g_isa) {                                                                             \
      case kAvx512: return NAME##_avx512 ARGS;                                                   \
      case kAvx2: return NAME##_avx2 ARGS;                                                       \
      default: return NAME##_default ARGS;                                                       \
    }                                                                                            \
  }
#else  // one variant: the compiler's baseline for the target (NEON on aarch64)
#define SKIPNET_VARIANTS(NAME, RET, PARAMS, ARGS) \
  static RET NAME PARAMS { return NAME##_body ARGS; }
#endif

namespace {

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

// xs[0:C] = sum over the H*W positions of sample b.
SKIPNET_INLINE void spatial_sum_body(const float* __restrict__ xb, int64_t C, int64_t H, int64_t W, int64_t s1,
                                     int64_t s2, int64_t s3, float* __restrict__ xs) {
  const int64_t HW = H * W;
  std::fill(xs, xs + C, 0.0f);
  if (s1 == 1 && s3 == C && s2 == W * C) {  // channels_last: HW rows of C contiguous channels
    // 16 channels at a time in registers, over blocks of 64 rows (float error grows with 64, not with HW).
    int64_t k0 = 0;
    for (; k0 + 16 <= C; k0 += 16) {
      for (int64_t r0 = 0; r0 < HW; r0 += 64) {
        const int64_t r1 = std::min<int64_t>(HW, r0 + 64);
        float a[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t r = r0; r < r1; ++r) {
          const float* __restrict__ row = xb + r * C + k0;
          for (int j = 0; j < 16; ++j) a[j] += row[j];
        }
        for (int j = 0; j < 16; ++j) xs[k0 + j] += a[j];
      }
    }
    for (; k0 < C; ++k0) {  // channels left over (C not a multiple of 16)
      float tot = 0.0f;
      for (int64_t r = 0; r < HW; ++r) tot += xb[r * C + k0];
      xs[k0] = tot;
    }
  } else if (s3 == 1 && s2 == W && s1 == HW) {  // NCHW: one contiguous plane per channel
    for (int64_t k = 0; k < C; ++k) {
      const float* __restrict__ p = xb + k * s1;
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t r = 0;
      for (; r + 8 <= HW; r += 8)
        for (int j = 0; j < 8; ++j) part[j] += p[r + j];
      float tot = 0.0f;
      for (; r < HW; ++r) tot += p[r];
      for (int j = 0; j < 8; ++j) tot += part[j];
      xs[k] = tot;
    }
  } else {
    for (int64_t k = 0; k < C; ++k) {
      float tot = 0.0f;
      for (int64_t i = 0; i < H; ++i)
        for (int64_t j = 0; j < W; ++j) tot += xb[k * s1 + i * s2 + j * s3];
      xs[k] = tot;
    }
  }
}

// The block's projection of one sample: e[0:E] = pb + pw @ (xs / hw), pw (E, C) row-major. Each row's dot product
// runs in 8 independent partial sums (vectorised without reordering any sum: every variant rounds alike).
SKIPNET_INLINE void project_body(float* __restrict__ xs, const float* __restrict__ pw, const float* __restrict__ pb,
                                 int64_t C, int64_t E, float hw, float* __restrict__ e) {
  for (int64_t k = 0; k < C; ++k) xs[k] = xs[k] / hw;  // the spatial mean, as torch's mean: sum, then divide
  for (int64_t j = 0; j < E; ++j) {
    const float* __restrict__ row = pw + j * C;
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= C; k += 8)
      for (int q = 0; q < 8; ++q) part[q] += row[k + q] * xs[k + q];
    float tot = 0.0f;
    for (; k < C; ++k) tot += row[k] * xs[k];
    for (int q = 0; q < 8; ++q) tot += part[q];
    e[j] = pb[j] + tot;
  }
}

// One LSTM step of one sample from its input xs (C, the projection's E): the state hb, cb (hd) is updated; returns
// the logit. wp: W_ih transposed (C, 4hd); whp: W_hh transposed (hd, 4hd); bp: b_ih + b_hh.
SKIPNET_INLINE float lstm_step_body(
    const float* __restrict__ xs, float* __restrict__ hb, float* __restrict__ cb, const float* __restrict__ wp,
    const float* __restrict__ whp, const float* __restrict__ bp, const float* __restrict__ fwp, float fb, int64_t C,
    int64_t hd, float* __restrict__ gates) {
  const int64_t g4 = 4 * hd;
  std::copy(bp, bp + g4, gates);
  for (int64_t k = 0; k < C; ++k) {  // gates += xs @ w_t, row by row (contiguous, vectorised)
    const float v = xs[k];
    const float* __restrict__ row = wp + k * g4;
    for (int64_t g = 0; g < g4; ++g) gates[g] += v * row[g];
  }
  for (int64_t k = 0; k < hd; ++k) {
    const float v = hb[k];
    const float* __restrict__ row = whp + k * g4;
    for (int64_t g = 0; g < g4; ++g) gates[g] += v * row[g];
  }
  float logit = fb;
  for (int64_t k = 0; k < hd; ++k) {  // PyTorch's gate order: input, forget, cell, output
    const float cn = sigmoid(gates[hd + k]) * cb[k] + sigmoid(gates[k]) * std::tanh(gates[2 * hd + k]);
    cb[k] = cn;
    hb[k] = sigmoid(gates[3 * hd + k]) * std::tanh(cn);
    logit += fwp[k] * hb[k];
  }
  return logit;
}
SKIPNET_VARIANTS(spatial_sum, void,
                 (const float* __restrict__ xb, int64_t C, int64_t H, int64_t W, int64_t s1, int64_t s2, int64_t s3,
                  float* __restrict__ xs),
                 (xb, C, H, W, s1, s2, s3, xs))
SKIPNET_VARIANTS(project, void,
                 (float* __restrict__ xs, const float* __restrict__ pw, const float* __restrict__ pb, int64_t C,
                  int64_t E, float hw, float* __restrict__ e),
                 (xs, pw, pb, C, E, hw, e))
SKIPNET_VARIANTS(lstm_step, float,
                 (const float* __restrict__ xs, float* __restrict__ hb, float* __restrict__ cb,
                  const float* __restrict__ wp, const float* __restrict__ whp, const float* __restrict__ bp,
                  const float* __restrict__ fwp, float fb, int64_t C, int64_t hd, float* __restrict__ gates),
                 (xs, hb, cb, wp, whp, bp, fwp, fb, C, hd, gates))

}  // namespace

// The shared parameters of the recurrent gate in the layout gate_step reads, as one float32 run: W_ih transposed
// (E, 4Hd), b_ih + b_hh (4Hd), W_hh transposed (Hd, 4Hd), the output layer's first row (Hd) and bias (1). Made once
// per forward from the parameters as they are then (float32 CPU, as the input gate_step takes).
at::Tensor gate_pack(const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh,
                     const at::Tensor& fc_w, const at::Tensor& fc_b) {
  const int64_t g4 = w_ih.size(0), E = w_ih.size(1), hd = w_hh.size(1);
  TORCH_CHECK(w_ih.dim() == 2 && w_hh.dim() == 2 && g4 == 4 * hd && w_hh.size(0) == g4 && b_ih.numel() == g4 &&
                  b_hh.numel() == g4 && fc_w.dim() == 2 && fc_w.size(1) == hd && fc_w.size(0) >= 1 &&
                  fc_b.numel() == fc_w.size(0),
              "gate_pack: LSTM cell and output layer shapes");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&w_ih, &w_hh, &b_ih, &b_hh, &fc_w, &fc_b})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "gate_pack: the gate's parameters must be float32 CPU tensors, like its input");
  const auto f = [](const at::Tensor& t) { return t.contiguous(); };
  const at::Tensor wi = f(w_ih), wh = f(w_hh), bi = f(b_ih), bh = f(b_hh), fw = f(fc_w), fbt = f(fc_b);
  at::Tensor pack = at::empty({E * g4 + g4 + hd * g4 + hd + 1}, at::TensorOptions().dtype(at::kFloat));
  float* o = pack.data_ptr<float>();
  const float *wip = wi.data_ptr<float>(), *whp = wh.data_ptr<float>(), *bip = bi.data_ptr<float>();
  const float *bhp = bh.data_ptr<float>(), *fwp = fw.data_ptr<float>();
  for (int64_t k = 0; k < E; ++k)
    for (int64_t g = 0; g < g4; ++g) *o++ = wip[g * E + k];
  for (int64_t g = 0; g < g4; ++g) *o++ = bip[g] + bhp[g];
  for (int64_t k = 0; k < hd; ++k)
    for (int64_t g = 0; g < g4; ++g) *o++ = whp[g * hd + k];
  for (int64_t k = 0; k < hd; ++k) *o++ = fwp[k];
  *o = fbt.data_ptr<float>()[0];
  return pack;
}

// Gate `col` for every sample of x (B, C, H, W). hc (2, B, Hd) is the LSTM state (h, c), updated in place. proj_w
// (E, C) and proj_b (E) are the block's projection, shared gate_pack's layout of the LSTM cell and output layer. Writes
// the logit and p = sigmoid(logit) into column `col` of zp[0] and zp[1] (each B, N), and into idx (B,) int64 the
// samples with p >= threshold (in float, as a float tensor compares with a Python number), in order. Returns their
// count.
int64_t gate_step(const at::Tensor& x, at::Tensor& hc, const at::Tensor& proj_w, const at::Tensor& proj_b,
                  const at::Tensor& shared, at::Tensor& zp, at::Tensor& idx, int64_t col, double threshold) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "gate_step: float32 CPU x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(hc.dim() == 3 && zp.dim() == 3 && idx.dim() == 1, "gate_step: buffer shapes");
  const int64_t hd = hc.size(2), g4 = 4 * hd, n = zp.size(2);
  TORCH_CHECK(hc.is_contiguous() && zp.is_contiguous() && shared.is_contiguous() && idx.is_contiguous(),
              "gate_step: contiguous buffers");
  TORCH_CHECK(hc.scalar_type() == at::kFloat && zp.scalar_type() == at::kFloat && shared.scalar_type() == at::kFloat &&
                  idx.scalar_type() == at::kLong,
              "gate_step: buffer dtypes (float32 state and outputs, int64 indices)");
  TORCH_CHECK(proj_w.scalar_type() == at::kFloat && proj_b.scalar_type() == at::kFloat && proj_w.device().is_cpu() &&
                  proj_b.device().is_cpu(),
              "gate_step: the gate's projection must be float32 CPU parameters, like its input");
  const at::Tensor pw = proj_w.contiguous(), pbt = proj_b.contiguous();
  const int64_t E = pw.dim() == 2 ? pw.size(0) : -1;
  TORCH_CHECK(E > 0 && pw.size(1) == C && pbt.numel() == E, "gate_step: the projection's shape (E, C) and bias (E)");
  TORCH_CHECK(shared.numel() == E * g4 + g4 + hd * g4 + hd + 1 && hc.size(0) == 2 && hc.size(1) == B &&
                  zp.size(0) == 2 && zp.size(1) == B && 0 <= col && col < n && idx.numel() >= B,
              "gate_step: parameter pack or buffer shapes");
  const float* xp = x.data_ptr<float>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);
  float* hp = hc.data_ptr<float>();
  float* cp = hp + B * hd;
  const float* pwp = pw.data_ptr<float>();
  const float* pbp = pbt.data_ptr<float>();
  const float* wp = shared.data_ptr<float>();
  const float* bp = wp + E * g4;
  const float* whp = bp + g4;
  const float* fwp = whp + hd * g4;
  const float fb = fwp[hd];
  float* zz = zp.data_ptr<float>() + col;
  float* pp = zz + B * n;
  const float t = static_cast<float>(threshold);
  const float hw = static_cast<float>(H * W);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, C * H * W));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(C + E + g4);
    float* xs = buf.data();
    float* e = xs + C;
    float* gates = e + E;
    for (int64_t b = b0; b < b1; ++b) {
      spatial_sum(xp + b * s0, C, H, W, s1, s2, s3, xs);
      project(xs, pwp, pbp, C, E, hw, e);
      const float logit = lstm_step(e, hp + b * hd, cp + b * hd, wp, whp, bp, fwp, fb, E, hd, gates);
      zz[b * n] = logit;
      pp[b * n] = sigmoid(logit);
    }
  });
  int64_t* ip = idx.data_ptr<int64_t>();
  int64_t k = 0;
  for (int64_t b = 0; b < B; ++b)
    if (pp[b * n] >= t) ip[k++] = b;
  return k;
}

// Backward of lerp(s, relu(r + s), w) per sample (skipnet.gated._MaskedTail) in one pass over memory, where the
// eager form makes five. Inputs: grad (and grad_executed, or an empty tensor) the gradients of the two outputs;
// executed = relu(r + s); shortcut = s; w (B,) float32. All 4-D tensors have the same strides and hold each
// sample as one dense run of n elements (checked by the caller). Writes, per element,
//   g_r = executed > 0 ? grad * w + grad_executed : 0,   g_s = g_r + grad * (1 - w),
// and per sample g_g[b] = sum(grad * (executed - shortcut)) when need_g.
namespace {
SKIPNET_INLINE float tail_sample_body(
    const float* __restrict__ gr, const float* __restrict__ ge, const float* __restrict__ ex,
    const float* __restrict__ sc, float* __restrict__ out_r, float* __restrict__ out_s, int64_t n, float w,
    bool need_g) {
  const float v = 1.0f - w;
  float acc[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) {
      const float g = gr[i + j], e = ex[i + j];
      if (need_g) acc[j] += g * (e - sc[i + j]);
      const float r = e > 0.0f ? g * w + (ge ? ge[i + j] : 0.0f) : 0.0f;
      out_r[i + j] = r;
      out_s[i + j] = r + g * v;
    }
  }
  float tot = 0.0f;
  for (; i < n; ++i) {
    const float g = gr[i], e = ex[i];
    if (need_g) tot += g * (e - sc[i]);
    const float r = e > 0.0f ? g * w + (ge ? ge[i] : 0.0f) : 0.0f;
    out_r[i] = r;
    out_s[i] = r + g * v;
  }
  for (int j = 0; j < 16; ++j) tot += acc[j];
  return tot;
}
SKIPNET_VARIANTS(tail_sample, float,
                 (const float* __restrict__ gr, const float* __restrict__ ge, const float* __restrict__ ex,
                  const float* __restrict__ sc, float* __restrict__ out_r, float* __restrict__ out_s, int64_t n,
                  float w, bool need_g),
                 (gr, ge, ex, sc, out_r, out_s, n, w, need_g))
}  // namespace

void masked_tail_backward(const at::Tensor& grad, const at::Tensor& grad_executed, const at::Tensor& executed,
                          const at::Tensor& shortcut, const at::Tensor& w, at::Tensor& g_r, at::Tensor& g_s,
                          at::Tensor& g_g, bool need_g) {
  const int64_t B = executed.size(0), n = executed.numel() / std::max<int64_t>(1, B), s0 = executed.stride(0);
  TORCH_CHECK(executed.scalar_type() == at::kFloat && w.numel() == B && w.is_contiguous(), "masked_tail: float32");
  const bool has_ge = grad_executed.defined() && grad_executed.numel() > 0;
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&grad, &shortcut, &g_r, &g_s})
    TORCH_CHECK(t->strides() == executed.strides() && t->scalar_type() == at::kFloat, "masked_tail: layouts");
  TORCH_CHECK(!has_ge || grad_executed.strides() == executed.strides(), "masked_tail: grad_executed layout");
  const float* gp = grad.data_ptr<float>();
  const float* gep = has_ge ? grad_executed.data_ptr<float>() : nullptr;
  const float* ep = executed.data_ptr<float>();
  const float* sp = shortcut.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* rp = g_r.data_ptr<float>();
  float* op = g_s.data_ptr<float>();
  float* gg = need_g ? g_g.data_ptr<float>() : nullptr;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * s0;
      const float d = tail_sample(gp + o, gep ? gep + o : nullptr, ep + o, sp + o, rp + o, op + o, n, wp[b], need_g);
      if (need_g) gg[b] = d;
    }
  });
}

// Forward of the masked tail: executed = relu(r + s), written into r, and out = lerp(s, executed, w) per sample
// (torch.lerp's formula: exact at w = 0 and w = 1), in one pass. Same layout conditions as the backward.
namespace {
SKIPNET_INLINE void tail_forward_sample_body(float* __restrict__ r, const float* __restrict__ s,
                                             float* __restrict__ out, int64_t n, float w) {
  // A gate of exactly 0 or 1 selects a branch (skipnet.executors._mix): lerp's 0 * inf would make a NaN where the
  // other branch overflowed.
  if (w == 0.0f || w == 1.0f) {
    const bool take = w == 1.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float a = r[i] + s[i], e = a > 0.0f ? a : (a != a ? a : 0.0f);
      r[i] = e;
      out[i] = take ? e : s[i];
    }
  } else if (w < 0.5f) {
    for (int64_t i = 0; i < n; ++i) {
      const float a = r[i] + s[i], e = a > 0.0f ? a : (a != a ? a : 0.0f);
      r[i] = e;
      out[i] = s[i] + w * (e - s[i]);
    }
  } else {
    const float v = 1.0f - w;
    for (int64_t i = 0; i < n; ++i) {
      const float a = r[i] + s[i], e = a > 0.0f ? a : (a != a ? a : 0.0f);
      r[i] = e;
      out[i] = e - (e - s[i]) * v;
    }
  }
}
SKIPNET_VARIANTS(tail_forward_sample, void,
                 (float* __restrict__ r, const float* __restrict__ s, float* __restrict__ out, int64_t n, float w),
                 (r, s, out, n, w))
}  // namespace

void masked_tail_forward(at::Tensor& residual, const at::Tensor& shortcut, const at::Tensor& w, at::Tensor& out) {
  const int64_t B = residual.size(0), n = residual.numel() / std::max<int64_t>(1, B), s0 = residual.stride(0);
  TORCH_CHECK(residual.scalar_type() == at::kFloat && w.numel() == B && w.is_contiguous(), "masked_tail: float32");
  TORCH_CHECK(shortcut.strides() == residual.strides() && out.strides() == residual.strides(), "masked_tail: layouts");
  float* rp = residual.data_ptr<float>();
  const float* sp = shortcut.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) tail_forward_sample(rp + b * s0, sp + b * s0, op + b * s0, n, wp[b]);
  });
}

// The variants this CPU can run, by name, fastest first ("default" always).
std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
#if defined(__x86_64__) || defined(__i386__)
  if (isa_supported(kAvx512)) out.push_back("avx512");
  if (isa_supported(kAvx2)) out.push_back("avx2");
#endif
  out.push_back("default");
  return out;
}

// Select the variant every kernel runs from now on (process-wide). An unknown name, or one the CPU cannot run,
// is refused (running it would die of an illegal instruction).
void set_isa(const std::string& name) {
  int isa = name == "avx512" ? kAvx512 : name == "avx2" ? kAvx2 : name == "default" ? kDefault : -1;
  TORCH_CHECK(isa >= 0, "unknown kernel variant '", name, "' (avx512, avx2 or default)");
  TORCH_CHECK(isa_supported(isa), "this CPU cannot run the '", name, "' kernel variant");
  g_isa = isa;
}

std::string current_isa() { return g_isa == kAvx512 ? "avx512" : g_isa == kAvx2 ? "avx2" : "default"; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported_isas", &supported_isas, "the instruction-set variants this CPU can run, fastest first");
  m.def("set_isa", &set_isa, "select the instruction-set variant of every kernel");
  m.def("current_isa", &current_isa, "the selected instruction-set variant");
  m.def("gate_pack", &gate_pack, "the recurrent gate's shared parameters in gate_step's layout (see _fastgate.cpp)");
  m.def("gate_step", &gate_step, "one recurrent-gate inference step (see _fastgate.cpp)");
  m.def("masked_tail_forward", &masked_tail_forward, "forward of the masked block tail (see _fastgate.cpp)");
  m.def("masked_tail_backward", &masked_tail_backward, "backward of the masked block tail (see _fastgate.cpp)");
}
