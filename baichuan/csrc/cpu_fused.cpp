// The work of a decode step around the weight products, fused: RMSNorm, SwiGLU, and one call that runs a whole
// decoder layer for the few rows of a decode step (RMSNorm, the qkv product, RoPE, the write into the KV cache,
// attention of one query over the cache, the output product, the residual adds, the MLP). Built into the same
// extension as cpu_gemv*.cpp (one build per target), whose int8/int4/bf16 products it calls directly.
//
// Why: at 1.5k hidden a decode step dispatched ~80 PyTorch operations a layer besides the products (each a few
// microseconds of dispatch and allocation), about 15% of the step. Here a layer is one call.
//
// The arithmetic follows the model's own (baichuan/model.py) step by step, with every rounding to the model's
// dtype where the unfused path rounds: statistics and RoPE in fp32, the normalised row rounded to the weight's
// dtype before the weight multiplies it, silu rounded before the product with `up`, each residual add rounded.
// Attention is computed in fp32 from the cached keys/values and rounded once.

#include <ATen/ops/linear.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace baichuan_cpu_gemv {

namespace {

// How a linear layer's product runs: the same choice the layer's own forward makes (see model.py).
enum LinearKind : int64_t { kTorch = 0, kBf16 = 1, kInt8 = 2, kInt4 = 3, kAmxInt8 = 4, kAmxBf16 = 5 };

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return float(v); }
template <class T>
inline T from_float(float v) {
  return T(v);  // at::BFloat16(float) rounds to nearest even, as torch's casts do
}
// v as the dtype T would hold it, back in fp32.
template <class T>
inline float round_to(float v) {
  return to_float(from_float<T>(v));
}

// 8 values as fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <class T>
inline float dot(const float* q, const T* k, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), acc);
  float total = hsum8(acc);
  for (; i < n; ++i) total += q[i] * to_float(k[i]);
  return total;
}

// y += p * v
template <class T>
inline void axpy(float* y, float p, const T* v, int64_t n) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, load8(v + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += p * to_float(v[i]);
}

// 8 fp32 values stored as T: bf16 rounded to nearest even (NaN to a quiet NaN), as torch's casts do.
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline __m256i bf16_bits(__m256 v) {  // in the low half of each 32-bit lane
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb);
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}
inline void store8(at::BFloat16* p, __m256 v) {
  const __m256i bits = bf16_bits(v);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
// v as T would hold it, back in fp32.
inline __m256 round8(__m256 v, float) { return v; }
inline __m256 round8(__m256 v, at::BFloat16) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16)); }

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The AVX-512 builds' 16 lanes of the same steps (RMSNorm, silu_mul, RoPE): where bf16 is native, `silu_mul` on a
// prompt is arithmetic-bound (benchmarks/README.md), so twice the lanes is about half the time.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline __m512 round16(__m512 v, float) { return v; }
#if defined(__AVX512BF16__)
// One instruction rounds to nearest even where bf16 is native (a NaN stays a quiet NaN; fp32 denormals, which
// activations never are, become 0), in place of the ~8 of the integer sequence below.
inline __m256i bf16_halves16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
#else
inline __m256i bf16_halves16(__m512 v) {  // bf16_bits, 16 lanes, packed to 16 bits
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb);
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  return _mm512_cvtepi32_epi16(
      _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, _mm512_set1_epi32(0x7FC0)));
}
#endif
inline void store16(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_halves16(v));
}
inline __m512 round16(__m512 v, at::BFloat16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_halves16(v)), 16));
}
#endif

// sum = a + b, each value rounded to T (torch's add in T); sum may be a.
template <class T>
void add_row(const T* a, const T* b, T* sum, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (; i + 16 <= n; i += 16) store16(sum + i, _mm512_add_ps(load16(a + i), load16(b + i)));
#endif
  for (; i + 8 <= n; i += 8) store8(sum + i, _mm256_add_ps(load8(a + i), load8(b + i)));
  for (; i < n; ++i) sum[i] = from_float<T>(to_float(a[i]) + to_float(b[i]));
}

// A prompt's rows over the cores; a decode step's few rows (under ~16k values) on the calling thread.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, n)); }

// out[r] = w * (x[r] * rsqrt(mean(x[r]^2) + eps)), the normalised row rounded to T first (RMSNorm.forward). With
// `residual`, x[r] + residual[r] (rounded to T) is normalised instead, and stored into `added` on the way: the residual
// add before a norm in one pass over the rows (torch's bf16 add alone: 0.15 ms a call in a 512-token prefill).
template <class T>
void rms_norm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t n, float eps, const T* residual = nullptr,
                   T* added = nullptr) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      if (residual != nullptr) {
        add_row(xr, residual + r * n, added + r * n, n);
        xr = added + r * n;
      }
      T* o = out + r * n;
      float sum = 0.0f;
      int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      // two chains of 16 lanes: one chain of FMAs waited on its own latency (a 1536-value row: ~800 cycles)
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      for (; i + 32 <= n; i += 32) {
        const __m512 v0 = load16(xr + i), v1 = load16(xr + i + 16);
        acc0 = _mm512_fmadd_ps(v0, v0, acc0);
        acc1 = _mm512_fmadd_ps(v1, v1, acc1);
      }
      sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
      __m256 acc = _mm256_setzero_ps();
      for (; i + 8 <= n; i += 8) {
        const __m256 v = load8(xr + i);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      sum += hsum8(acc);
      for (; i < n; ++i) sum += to_float(xr[i]) * to_float(xr[i]);
      const float scale = 1.0f / std::sqrt(sum / float(n) + eps);
      i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      const __m512 scale16 = _mm512_set1_ps(scale);
      for (; i + 16 <= n; i += 16)
        store16(o + i, _mm512_mul_ps(load16(w + i), round16(_mm512_mul_ps(load16(xr + i), scale16), T())));
#endif
      const __m256 scale8 = _mm256_set1_ps(scale);
      for (; i + 8 <= n; i += 8)
        store8(o + i, _mm256_mul_ps(load8(w + i), round8(_mm256_mul_ps(load8(xr + i), scale8), T())));
      for (; i < n; ++i) o[i] = from_float<T>(to_float(w[i]) * round_to<T>(to_float(xr[i]) * scale));
    }
  });
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(
      x.device().is_cpu() && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
      name, ": contiguous fp32 or bf16 on the CPU");
}

void check_norm(const at::Tensor& x, const at::Tensor& weight) {
  check_rows(x, "x");
  TORCH_CHECK(x.dim() > 0 && weight.scalar_type() == x.scalar_type() && weight.is_contiguous() &&
                  weight.dim() == 1 && weight.size(0) == x.size(-1),
              "weight: contiguous (", x.dim() ? x.size(-1) : 0, ",) in x's dtype");
}

template <class T>
at::Tensor rms_norm_of(const at::Tensor& x, const at::Tensor& weight, double eps, const T* residual = nullptr,
                       T* sum = nullptr) {
  auto out = at::empty_like(x);
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  rms_norm_rows(x.data_ptr<T>(), weight.data_ptr<T>(), out.data_ptr<T>(), rows, n, float(eps), residual, sum);
  return out;
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(x, weight);
  if (x.scalar_type() == at::kFloat) return rms_norm_of<float>(x, weight, eps);
  return rms_norm_of<at::BFloat16>(x, weight, eps);
}

// (x + residual, RMSNorm of it): a decoder layer's residual add and the norm after it.
std::vector<at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                     double eps) {
  check_norm(x, weight);
  check_rows(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "residual: x's shape and dtype");
  auto sum = at::empty_like(x);
  if (x.scalar_type() == at::kFloat)
    return {sum, rms_norm_of(x, weight, eps, residual.data_ptr<float>(), sum.data_ptr<float>())};
  return {sum, rms_norm_of(x, weight, eps, residual.data_ptr<at::BFloat16>(), sum.data_ptr<at::BFloat16>())};
}

namespace {

template <class T>
void add_rows(const T* x, const T* y, T* sum, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) add_row(x + r * n, y + r * n, sum + r * n, n);
  });
}

}  // namespace

// x + y in their dtype (fp32 or bf16, same shape), rows over the cores.
at::Tensor add(const at::Tensor& x, const at::Tensor& y) {
  check_rows(x, "x");
  check_rows(y, "y");
  TORCH_CHECK(x.dim() > 0 && x.sizes() == y.sizes() && x.scalar_type() == y.scalar_type(),
              "x and y: same shape and dtype");
  auto sum = at::empty_like(x);
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  if (x.scalar_type() == at::kFloat)
    add_rows(x.data_ptr<float>(), y.data_ptr<float>(), sum.data_ptr<float>(), rows, n);
  else
    add_rows(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), sum.data_ptr<at::BFloat16>(), rows, n);
  return sum;
}

namespace {

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

// exp8 and exp16's constants: the clamp, log2(e), ln 2 in two parts, the polynomial's coefficients (highest first).
constexpr float kExpMin = -87.0f, kExpMax = 88.8f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// e^x, within ~1 ulp of expf: Cody-Waite reduction by ln 2 and Cephes' degree-6 polynomial; the power of two applied
// in two halves, so that e^x overflows to inf above ln(FLT_MAX) as expf does. Below -87 it may return 0 or a
// denormal-free tiny value, where expf returns denormals: silu's 1 + e^-g does not see the difference. NaN stays NaN.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(kExpMin), _mm256_min_ps(_mm256_set1_ps(kExpMax), x));  // NaN: second operand
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 y = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpPoly[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_cvtps_epi32(n);
  const __m256i e1 = _mm256_srai_epi32(e, 1), e2 = _mm256_sub_epi32(e, e1);
  const __m256i bias = _mm256_set1_epi32(127);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e1, bias), 23)));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e2, bias), 23)));
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
inline __m512 exp16(__m512 x) {  // exp8, 16 lanes
  x = _mm512_max_ps(_mm512_set1_ps(kExpMin), _mm512_min_ps(_mm512_set1_ps(kExpMax), x));
  const __m512 n =
      _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 y = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpPoly[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);  // y * 2^n in one step, inf past the top as the two halves give it
}
#endif

}  // namespace

// p[j] = e^((s[j] - max(s)) * scale) rounded to bf16 for j < n, and the sum of the values before rounding: a row of
// softmax's numerators for cpu_attention_amx.cpp. Masked 16-lane tails: a scalar one cost as much as the rest.
float softmax_numerators(const float* s, int64_t n, float scale, at::BFloat16* p) {
  float total = 0.0f;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const auto tail = [n](int64_t j) { return __mmask16(n - j >= 16 ? 0xFFFF : (1u << (n - j)) - 1); };
  __m512 top16 = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16)
    top16 = _mm512_mask_max_ps(top16, tail(j), top16, _mm512_maskz_loadu_ps(tail(j), s + j));
  const __m512 scale16 = _mm512_set1_ps(scale), shift16 = _mm512_set1_ps(_mm512_reduce_max_ps(top16) * scale);
  __m512 sum16 = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 valid = tail(j);
    const __m512 e = exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(valid, s + j), scale16, shift16));
    sum16 = _mm512_mask_add_ps(sum16, valid, sum16, e);
    _mm256_mask_storeu_epi16(p + j, valid, bf16_halves16(e));
  }
  total = _mm512_reduce_add_ps(sum16);
#else
  const float top = n > 0 ? *std::max_element(s, s + n) : 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float e = std::exp(s[j] * scale - top * scale);
    total += e;
    p[j] = at::BFloat16(e);
  }
#endif
  return total;
}

namespace {

// silu(gate) * up, silu rounded to T first (F.silu(gate) * up); vectorised, and a prompt's rows over the cores (a
// scalar loop on one thread took 12x torch's time at 512 rows: benchmarks/README.md).
template <class T>
void silu_mul_rows(const T* gate, const T* up, T* out, int64_t n) {
  at::parallel_for(0, (n + 7) / 8, 2048, [&](int64_t b0, int64_t b1) {
    const int64_t end = std::min(n, b1 * 8);
    int64_t i = b0 * 8;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    for (; i + 16 <= end; i += 16) {
      const __m512 g = load16(gate + i);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
      const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
      store16(out + i, _mm512_mul_ps(round16(s, T()), load16(up + i)));
    }
#endif
    for (; i + 8 <= end; i += 8) {
      const __m256 g = load8(gate + i);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
      const __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
      store8(out + i, _mm256_mul_ps(round8(s, T()), load8(up + i)));
    }
    for (; i < end; ++i) out[i] = from_float<T>(round_to<T>(silu(to_float(gate[i]))) * to_float(up[i]));
  });
}

}  // namespace

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  check_rows(gate, "gate");
  check_rows(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(), "gate and up: same shape, dtype");
  auto out = at::empty_like(gate);
  if (gate.scalar_type() == at::kFloat)
    silu_mul_rows(gate.data_ptr<float>(), up.data_ptr<float>(), out.data_ptr<float>(), gate.numel());
  else
    silu_mul_rows(gate.data_ptr<at::BFloat16>(), up.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(),
                  gate.numel());
  return out;
}

namespace {

// One row of D values of x (in T) rotated at one position: x * cos + rotate_half(x) * sin in fp32, each value rounded
// to T (position.py's `_apply_rotary` on the model's dtype), stored as O (T, the cache's dtype, or fp32).
template <class T, class O>
inline void rotate_row(const T* x, const float* c, const float* s, int64_t D, O* o) {
  const int64_t half = D / 2;
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (; i + 16 <= half; i += 16) {
    const __m512 x1 = load16(x + i), x2 = load16(x + half + i);
    const __m512 neg2 = _mm512_sub_ps(_mm512_setzero_ps(), x2);
    const __m512 lo =
        _mm512_add_ps(_mm512_mul_ps(x1, _mm512_loadu_ps(c + i)), _mm512_mul_ps(neg2, _mm512_loadu_ps(s + i)));
    const __m512 hi = _mm512_add_ps(_mm512_mul_ps(x2, _mm512_loadu_ps(c + half + i)),
                                    _mm512_mul_ps(x1, _mm512_loadu_ps(s + half + i)));
    store16(o + i, round16(lo, T()));
    store16(o + half + i, round16(hi, T()));
  }
#endif
  for (; i + 8 <= half; i += 8) {
    const __m256 x1 = load8(x + i), x2 = load8(x + half + i);
    const __m256 neg2 = _mm256_sub_ps(_mm256_setzero_ps(), x2);  // rotate_half: (-x[half:], x[:half])
    const __m256 lo =
        _mm256_add_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + i)), _mm256_mul_ps(neg2, _mm256_loadu_ps(s + i)));
    const __m256 hi = _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + half + i)),
                                    _mm256_mul_ps(x1, _mm256_loadu_ps(s + half + i)));
    store8(o + i, round8(lo, T()));
    store8(o + half + i, round8(hi, T()));
  }
  for (; i < half; ++i) {
    const float x1 = to_float(x[i]), x2 = to_float(x[half + i]);
    const float lo = x1 * c[i] + -x2 * s[i], hi = x2 * c[half + i] + x1 * s[half + i];
    o[i] = O(round_to<T>(lo));
    o[half + i] = O(round_to<T>(hi));
  }
}

// RoPE over a prompt's queries or keys (position.py's `RoPE.rotate`): x (B, H, T, D) fp32/bf16, any strides with
// contiguous rows (a view of the qkv product); positions (T,) shared by the batch or (B, T), int64; cos/sin: fp32
// (S, D) tables. Returns x rotated, in x's dtype, contiguous.
// One pass over x where the modules' ops made ~8 (casts, index, cat, neg, two products, a sum): benchmarks/README.md.
template <class T>
void rope_rows(const at::Tensor& x, const int64_t* pos, bool per_row, const float* cos, const float* sin,
               at::Tensor& out) {
  const int64_t B = x.size(0), H = x.size(1), T_ = x.size(2), D = x.size(3);
  const int64_t sb = x.stride(0), sh = x.stride(1), st = x.stride(2);
  const T* X = x.data_ptr<T>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, B * H * T_, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * T_), h = (r / T_) % H, t = r % T_;
      const int64_t p = per_row ? pos[b * T_ + t] : pos[t];
      rotate_row(X + b * sb + h * sh + t * st, cos + p * D, sin + p * D, D, O + r * D);
    }
  });
}

}  // namespace

at::Tensor rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x: fp32 or bf16 (B, H, T, D) on the CPU with contiguous rows");
  const int64_t B = x.size(0), T_ = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, "x: an even head size");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == D && cos.sizes() == sin.sizes(),
              "cos, sin: contiguous fp32 (S, D)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  ((positions.dim() == 1 && positions.size(0) == T_) ||
                   (positions.dim() == 2 && positions.size(0) == B && positions.size(1) == T_)),
              "positions: contiguous int64 (T,) or (B, T)");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < positions.numel(); ++i)
    TORCH_CHECK(pos[i] >= 0 && pos[i] < cos.size(0), "position ", pos[i], " is outside the tables");
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.scalar_type() == at::kFloat)
    rope_rows<float>(x, pos, positions.dim() == 2, cos.data_ptr<float>(), sin.data_ptr<float>(), out);
  else
    rope_rows<at::BFloat16>(x, pos, positions.dim() == 2, cos.data_ptr<float>(), sin.data_ptr<float>(), out);
  return out;
}

namespace {

at::Tensor linear(const at::Tensor& x, int64_t kind, const at::Tensor& a, const at::Tensor& b, int64_t group) {
  switch (kind) {
    case kBf16:
      return bf16_gemv(x, a);
    case kInt8:
      return int8_gemv(x, a, b);
    case kInt4:
      return int4_gemv(x, a, b, group);
    case kAmxInt8:
      return amx_int8_int16_matmul(x, a, b);
    case kAmxBf16:
      return amx_bf16_matmul(x, a);
    default:
      return at::linear(x, a);
  }
}

// The model's dtype T and the cache's C.
template <class T, class C>
struct LayerStep {
  int64_t B, H, D, dim;
  const float* cos;  // (S, D) fp32 tables
  const float* sin;
  C* k_cache;  // this layer's (B, H, S, D) with strides
  C* v_cache;
  int64_t sb, sh, ss;  // cache strides of batch, head, position (the last is 1)
  const int64_t* pos;  // (B,) position of each row's token

  // qkv (B, 3 * dim) in T -> q rotated (B, H, D) fp32 as T holds it; k rotated and v written into the cache.
  void rope_and_store(const T* qkv, float* q) const {
    for (int64_t b = 0; b < B; ++b) {
      const float* c = cos + pos[b] * D;
      const float* s = sin + pos[b] * D;
      for (int64_t h = 0; h < H; ++h) {
        const T* qh = qkv + b * 3 * dim + h * D;
        const T* kh = qh + dim;
        const T* vh = kh + dim;
        rotate_row(qh, c, s, D, q + (b * H + h) * D);
        rotate_row(kh, c, s, D, k_cache + b * sb + h * sh + pos[b] * ss);
        C* vo = v_cache + b * sb + h * sh + pos[b] * ss;
        for (int64_t i = 0; i < D; ++i) vo[i] = C(to_float(vh[i]));
      }
    }
  }

  // y (B, dim) in T: each row's query against its cached positions 0..pos[b].
  void attend(const float* q, T* y) const {
    const float scale = 1.0f / std::sqrt(float(D));
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) longest = std::max(longest, pos[b] + 1);
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, longest * D));
    at::parallel_for(0, B * H, grain, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores(longest), acc(D);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / H, h = i % H, S = pos[b] + 1;
        const float* qi = q + i * D;
        const C* keys = k_cache + b * sb + h * sh;
        const C* values = v_cache + b * sb + h * sh;
        float top = -INFINITY;
        for (int64_t j = 0; j < S; ++j) {
          scores[j] = dot(qi, keys + j * ss, D) * scale;
          top = std::max(top, scores[j]);
        }
        float total = 0.0f;
        for (int64_t j = 0; j < S; ++j) total += scores[j] = std::exp(scores[j] - top);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = 0; j < S; ++j) axpy(acc.data(), scores[j] / total, values + j * ss, D);
        T* yo = y + b * dim + h * D;
        for (int64_t d = 0; d < D; ++d) yo[d] = from_float<T>(acc[d]);
      }
    });
  }
};

template <class T, class C>
at::Tensor run_layer(const at::Tensor& x_in, const at::Tensor& norm1, const at::Tensor& norm2, double eps,
                     const std::vector<at::Tensor>& weights, const std::vector<int64_t>& kinds,
                     const std::vector<int64_t>& groups, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const std::vector<int64_t>& pos, const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads) {
  const int64_t B = x_in.size(0), dim = x_in.size(-1), D = dim / n_heads;
  const at::Tensor x2 = x_in.reshape({B, dim});
  auto lin = [&](const at::Tensor& h, int i) {
    at::Tensor y = linear(h, kinds[i], weights[2 * i], weights[2 * i + 1], groups[i]);
    return y.is_contiguous() ? y : y.contiguous();
  };

  // attention
  at::Tensor h = at::empty_like(x2);
  rms_norm_rows(x2.data_ptr<T>(), norm1.data_ptr<T>(), h.data_ptr<T>(), B, dim, float(eps));
  const at::Tensor qkv = lin(h, 0);  // (B, 3 * dim)
  at::Tensor q = at::empty({B, n_heads, D}, x2.options().dtype(at::kFloat));
  const LayerStep<T, C> step{B,
                             n_heads,
                             D,
                             dim,
                             cos.data_ptr<float>(),
                             sin.data_ptr<float>(),
                             k_cache.data_ptr<C>(),
                             v_cache.data_ptr<C>(),
                             k_cache.stride(0),
                             k_cache.stride(1),
                             k_cache.stride(2),
                             pos.data()};
  step.rope_and_store(qkv.data_ptr<T>(), q.data_ptr<float>());
  at::Tensor y = at::empty_like(x2);
  step.attend(q.data_ptr<float>(), y.data_ptr<T>());
  const at::Tensor o = lin(y, 1);
  at::Tensor x = x2.clone();
  add_row(x.data_ptr<T>(), o.data_ptr<T>(), x.data_ptr<T>(), B * dim);  // x += o

  // MLP
  rms_norm_rows(x.data_ptr<T>(), norm2.data_ptr<T>(), h.data_ptr<T>(), B, dim, float(eps));
  const at::Tensor gate = lin(h, 2);
  const at::Tensor up = lin(h, 3);
  at::Tensor act = at::empty_like(gate);
  silu_mul_rows(gate.data_ptr<T>(), up.data_ptr<T>(), act.data_ptr<T>(), gate.numel());
  const at::Tensor down = lin(act, 4);
  add_row(x.data_ptr<T>(), down.data_ptr<T>(), x.data_ptr<T>(), B * dim);
  return x.view(x_in.sizes());
}

}  // namespace

// One decoder layer for the B rows of a decode step (one token each). x (B, 1, dim) fp32 or bf16; norms in x's
// dtype; weights: two tensors per product (W_pack, o_proj, gate_proj, up_proj, down_proj), the second undefined
// where the kind needs none; k_cache/v_cache: this layer's (B, H, S, D) in x's dtype (or bf16 for fp32 x), last
// dimension contiguous; pos: each row's position (its keys and values land there; it attends to 0..pos);
// cos/sin: RoPE's fp32 (S', D) tables covering every pos.
at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& norm1, const at::Tensor& norm2, double eps,
                        const std::vector<at::Tensor>& weights, const std::vector<int64_t>& kinds,
                        const std::vector<int64_t>& groups, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const std::vector<int64_t>& pos, const at::Tensor& cos, const at::Tensor& sin,
                        int64_t n_heads) {
  check_rows(x, "x");
  const auto dtype = x.scalar_type();
  const int64_t B = x.size(0), dim = x.size(-1);
  TORCH_CHECK(x.numel() == B * dim, "x: (B, 1, dim)");
  TORCH_CHECK(n_heads > 0 && dim % n_heads == 0 && (dim / n_heads) % 2 == 0, "dim / n_heads: even head size");
  const int64_t D = dim / n_heads;
  for (const auto& w : {norm1, norm2})
    TORCH_CHECK(w.scalar_type() == dtype && w.is_contiguous() && w.numel() == dim, "norm weights: (dim,) in x's dtype");
  TORCH_CHECK(weights.size() == 10 && kinds.size() == 5 && groups.size() == 5, "five products, two tensors each");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides() &&
                  k_cache.size(0) == B && k_cache.size(1) == n_heads && k_cache.size(3) == D &&
                  k_cache.stride(3) == 1 && k_cache.scalar_type() == v_cache.scalar_type() &&
                  k_cache.device().is_cpu(),
              "k_cache, v_cache: (B, H, S, D) with contiguous rows");
  TORCH_CHECK(int64_t(pos.size()) == B, "one position per row");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == D && cos.sizes() == sin.sizes(),
              "cos, sin: contiguous fp32 (S, D)");
  for (const int64_t p : pos)
    TORCH_CHECK(p >= 0 && p < k_cache.size(2) && p < cos.size(0), "position ", p, " is outside the cache or tables");
  const auto cache = k_cache.scalar_type();
  if (dtype == at::kFloat && cache == at::kFloat)
    return run_layer<float, float>(x, norm1, norm2, eps, weights, kinds, groups, k_cache, v_cache, pos, cos, sin,
                                   n_heads);
  if (dtype == at::kFloat && cache == at::kBFloat16)
    return run_layer<float, at::BFloat16>(x, norm1, norm2, eps, weights, kinds, groups, k_cache, v_cache, pos, cos,
                                          sin, n_heads);
  TORCH_CHECK(cache == dtype, "the cache holds fp32 x in fp32 or bf16, bf16 x in bf16");
  return run_layer<at::BFloat16, at::BFloat16>(x, norm1, norm2, eps, weights, kinds, groups, k_cache, v_cache, pos,
                                               cos, sin, n_heads);
}

}  // namespace baichuan_cpu_gemv
