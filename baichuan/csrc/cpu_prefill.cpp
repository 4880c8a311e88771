// Prompt-sized (prefill) products of the int8/int4 layers: past `cpu_gemv.MAX_ROWS` activation rows the weight is
// dequantized into a buffer in the compute dtype (bf16 where the activations are bf16 and the CPU multiplies bf16
// natively, fp32 otherwise), up to `PREFILL_TILE_BYTES` of output rows at a time (a whole layer but a large
// vocabulary's head), and each such tile is one call of torch's (oneDNN's) GEMM (`baichuan/quant/kernels.py`,
// `prefill_matmul`). A prompt reuses every weight hundreds of times, so the GEMM runs out of arithmetic, not
// memory, and dequantizing once per product costs a few percent of it. This file only dequantizes, one pass over
// the codes with 256-bit vectors (every build has AVX2): a torch expression of the same takes several passes and
// cost as much as the GEMM itself on int4.
//
//   int8: w[n, k] = q[n, k] * scales[n].
//   int4: w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n], g = k / G; q packed two per byte, column 2j in the
//         low nibble (N, K/2); scale and zero bf16 side by side in (K/G, N, 2): `quantize.Int4Linear`'s layout.
//
// bf16 outputs are rounded to nearest even from the fp32 value, as torch's .to(torch.bfloat16) rounds.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cstring>

namespace baichuan_cpu_gemv {
namespace {

constexpr int64_t kMinTaskValues = 1 << 16;  // weights dequantized per parallel task, at least

inline float bf16_value(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t bf16_round(float f) {  // weights are finite: no NaN case
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

inline void store8(uint16_t* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r =
      _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  // Each lane holds its bf16 in the low 16 bits (0..65535), so the saturating pack changes nothing.
  _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

inline void store1(float* p, float v) { *p = v; }
inline void store1(uint16_t* p, float v) { *p = bf16_round(v); }

template <class T>
void int8_rows(const int8_t* w, const float* scales, T* out, int64_t rows, int64_t K) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kMinTaskValues / K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* p = w + r * K;
      T* o = out + r * K;
      const __m256 s = _mm256_set1_ps(scales[r]);
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        const __m128i b = _mm_loadu_si128((const __m128i*)(p + k));
        store8(o + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), s));
        store8(o + k + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), s));
      }
      for (; k < K; ++k) store1(o + k, float(p[k]) * scales[r]);
    }
  });
}

// 8 codes (the low 8 bytes of c) -> 8 weights.
inline __m256 dequant8(__m128i c, __m256 scale, __m256 offset) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), scale, offset);
}

template <class T>
void int4_rows(const uint8_t* packed, const uint16_t* sz, T* out, int64_t n0, int64_t rows, int64_t N, int64_t K,
               int64_t G) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kMinTaskValues / K), [&](int64_t r0, int64_t r1) {
    const __m128i nibble = _mm_set1_epi8(0x0F);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = n0 + r;
      const uint8_t* p = packed + n * (K / 2);
      T* o = out + r * K;
      for (int64_t g = 0; g < K / G; ++g) {
        const float scale = bf16_value(sz[(g * N + n) * 2]), zero = bf16_value(sz[(g * N + n) * 2 + 1]);
        const __m256 s = _mm256_set1_ps(scale), c = _mm256_set1_ps(zero - 8.0f * scale);
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {  // 16 bytes: 32 codes
          const __m128i b = _mm_loadu_si128((const __m128i*)(p + k / 2));
          const __m128i lo = _mm_and_si128(b, nibble), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nibble);
          const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);  // in column order
          store8(o + k, dequant8(first, s, c));
          store8(o + k + 8, dequant8(_mm_srli_si128(first, 8), s, c));
          store8(o + k + 16, dequant8(second, s, c));
          store8(o + k + 24, dequant8(_mm_srli_si128(second, 8), s, c));
        }
      }
    }
  });
}

void check_out(const torch::Tensor& out, int64_t start, int64_t N, int64_t K) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.device().is_cpu() &&
                  (out.scalar_type() == torch::kFloat || out.scalar_type() == torch::kBFloat16),
              "out: contiguous fp32 or bf16 (rows, K) on the CPU");
  TORCH_CHECK(out.size(1) == K, "out has ", out.size(1), " columns, the weight ", K);
  TORCH_CHECK(start >= 0 && start + out.size(0) <= N, "rows ", start, "..", start + out.size(0), " of ", N);
}

// Rows [start, start + out.size(0)) of an int8 weight (N, K), times their fp32 scales, into out.
void dequantize_int8(const torch::Tensor& weight, const torch::Tensor& scales, int64_t start, torch::Tensor out) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kChar && weight.is_contiguous(),
              "weight: contiguous int8 (N, K)");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.numel() == N && scales.is_contiguous(),
              "scales: contiguous fp32 (N,)");
  check_out(out, start, N, K);
  const int8_t* w = weight.data_ptr<int8_t>() + start * K;
  const float* s = scales.data_ptr<float>() + start;
  if (out.scalar_type() == torch::kFloat)
    int8_rows(w, s, out.data_ptr<float>(), out.size(0), K);
  else
    int8_rows(w, s, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), out.size(0), K);
}

// Rows [start, start + out.size(0)) of a group-wise int4 weight in `Int4Linear`'s plain layout, into out.
void dequantize_int4(const torch::Tensor& packed, const torch::Tensor& scales_and_zeros, int64_t group_size,
                     int64_t start, torch::Tensor out) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kByte && packed.is_contiguous(),
              "packed: contiguous uint8 (N, K/2)");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
              "group size must be a multiple of 32 dividing K, got ", group_size);
  TORCH_CHECK(scales_and_zeros.scalar_type() == torch::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.dim() == 3 && scales_and_zeros.size(0) == K / group_size &&
                  scales_and_zeros.size(1) == N && scales_and_zeros.size(2) == 2,
              "scales_and_zeros: contiguous bf16 (K/group_size, N, 2)");
  check_out(out, start, N, K);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const uint16_t* sz = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<at::BFloat16>());
  if (out.scalar_type() == torch::kFloat)
    int4_rows(p, sz, out.data_ptr<float>(), start, out.size(0), N, K, group_size);
  else
    int4_rows(p, sz, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), start, out.size(0), N, K,
              group_size);
}

}  // namespace

void register_prefill(pybind11::module_& m) {
  m.def("dequantize_int8", &dequantize_int8,
        "rows [start, start + out.size(0)) of int8 weight (N, K) times fp32 scales (N,) into out (fp32 or bf16)");
  m.def("dequantize_int4", &dequantize_int4,
        "rows [start, start + out.size(0)) of int4 packed (N, K/2), bf16 scales_and_zeros (K/G, N, 2) into out");
}

}  // namespace baichuan_cpu_gemv
