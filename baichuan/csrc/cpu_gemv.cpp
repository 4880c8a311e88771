// The activation rows quantized for the int8 and int4 mat-vecs (cpu_gemv_int8.cpp, cpu_gemv_int4.cpp; gemv.h: what
// the formats share), and what this build is.

// int8: activations are quantized to int16 per block of B values (scale = block absmax / 32767, relative error
// ~1.5e-5), so each pair of products is one `vpmaddwd` (or `vpdpwssd`) on weights widened to int16, summed in int32
// within a block and in fp32 across blocks: about 3 instructions per 16 int8 weights with AVX2 and 2 per 32 with
// VNNI, against 3 per 8 for widening to fp32 and FMA, so decoding comes much closer to the memory's rate. The avx2
// tile of up to 4 activation rows widens 32 weights by three shifts where `vpmovsxbw` took two loads of 16 (the
// activations in even/odd order to match): on an AVX2-only EPYC 0.85-0.92 of the time at one row (ab_kernels).
// Activations are not quantized to int8 for `vpdpbusd`: that would add a per-row rounding error of ~4e-3, far
// above the int16 codes' and close to the int8 weights' own.

// int4: activations are quantized to int8 per group, as the prompt kernel `int4_matmul_int8` (cpu_prefill.cpp) and
// llama.cpp's Q4_0 x Q8_0 do, so that one `vpmaddubsw` makes 32 products where `vpmaddwd` makes 16 (avx2) and one
// `vpdpbusd` 64 where `vpdpwssd` makes 32 (AVX-512); the zero points come in through the group sums of x. On a
// Zen 3 (ab_kernels, 1.29B shapes) 21-26% faster at 4 activation rows, 2-4% at one, where the memory stream bounds
// it; on a Sapphire Rapids-class Xeon (AVX-512) 5-7% at one row and 25-34% at eight. The ~5e-3 relative rounding
// this adds per output is small beside int4 weights' own error (~8e-2 at groups of 32); bench_accuracy's own
// forward through the avx2 kernel (128-row windows): KL 1.19e-4 against 1.23e-4 with int16 activations (int4 g128,
// briefly trained model).

#include "gemv.h"

namespace baichuan_cpu_gemv {

#if defined(BAICHUAN_AVX512BF16)
constexpr const char* kTarget = "avx512bf16";
#elif defined(BAICHUAN_AVX512)
constexpr const char* kTarget = "avx512";
#elif defined(BAICHUAN_AVXVNNI)
constexpr const char* kTarget = "avx2vnni";
#else
constexpr const char* kTarget = "avx2";
#endif
// The integer type activations are rounded to for int4 weights (int8 weights always take int16 codes).
constexpr const char* kInt4Activations = "int8";

int64_t int8_block(int64_t K) {
  for (int64_t b = kMaxBlock; b >= 16; b /= 2)
    if (K % b == 0) return b;
  return 0;
}

// The activations' block for an int8 weight (N, K) with these scales, which it checks: the group size G for bf16
// group scales (N, K/G), else `int8_block(K)` for fp32 scales (N,), one a row.
int64_t int8_scales_block(const at::Tensor& scales, int64_t N, int64_t K) {
  if (scales.dim() == 2) {
    TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.size(0) == N && scales.size(1) > 0 &&
                    K % scales.size(1) == 0 && scales.is_contiguous(),
                "group scales: contiguous bf16 (N, K/G)");
    const int64_t B = K / scales.size(1);
    TORCH_CHECK(B % 16 == 0 && B <= kMaxBlock, "group size must be a multiple of 16 up to ", kMaxBlock, ", got ", B);
    return B;
  }
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N && scales.is_contiguous(),
              "scales: contiguous fp32 (N,) or bf16 (N, K/G)");
  const int64_t B = int8_block(K);
  TORCH_CHECK(B > 0, "K must be a multiple of 16, got ", K);
  return B;
}


// Codes (M, K) of `type`, and scales (and sums, where asked) per block of B, for fp32 rows x (M, K); to be filled.
Activations empty_activations(const at::Tensor& x, int64_t B, at::ScalarType type, bool with_sums) {
  const int64_t M = x.size(0), K = x.size(1);
  return {at::empty({M, K}, x.options().dtype(type)), at::empty({M, K / B}, x.options()),
          with_sums ? at::empty({M, K / B}, x.options()) : at::Tensor(), K / B};
}


// The largest |x| of n values (a multiple of 8), NaN where any is NaN (max_ps drops NaN; the output must not).
inline float block_absmax(const float* p, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(p + k)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  float mx = _mm_cvtss_f32(h);
  for (int64_t k = 0; k < n; ++k)
    if (std::isnan(p[k])) mx = NAN;
  return mx;
}

// int16 codes of x (M, K) per block of B values: the int8 kernels' activations. In order, or where `split` (B a
// multiple of 32) within each 32 columns the even ones' codes first, then the odd ones': the order in which the avx2
// tile takes an int8 weight's low and high bytes (`Int8Tile::split`).
Activations quantize_activations(const at::Tensor& input, int64_t B, bool split) {
  const at::Tensor x = as_float(input);
  const int64_t M = x.size(0), nb = x.size(1) / B;
  Activations a = empty_activations(x, B, at::kShort, false);
  const float* X = x.data_ptr<float>();
  int16_t* Q = a.codes.data_ptr<int16_t>();
  float* S = a.scales.data_ptr<float>();
  for (int64_t i = 0; i < M * nb; ++i) {
    const float* p = X + i * B;  // rows are contiguous, so block i of the whole tensor is row i / nb's
    int16_t* q = Q + i * B;
    const float mx = block_absmax(p, B);
    if (!std::isfinite(mx)) {  // inf or NaN in the block: NaN out (a float matmul gives inf or NaN)
      std::memset(q, 0, B * sizeof(int16_t));
      S[i] = NAN;
      continue;
    }
    const __m256 inv = _mm256_set1_ps(mx > 0 ? 32767.0f / mx : 0.0f);
    for (int64_t k = 0; k < B; k += 16) {
      const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + k), inv));
      const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + k + 8), inv));
      // packs works per 128-bit lane; the permute restores the order of k.
      _mm256_storeu_si256((__m256i*)(q + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
    }
    for (int64_t k = 0; split && k < B; k += 32) {
      // each 32-bit lane holds an even column's code in its low half and the next odd one's in its high half
      const __m256i v0 = _mm256_loadu_si256((const __m256i*)(q + k));
      const __m256i v1 = _mm256_loadu_si256((const __m256i*)(q + k + 16));
      const __m256i even = _mm256_packs_epi32(_mm256_srai_epi32(_mm256_slli_epi32(v0, 16), 16),
                                              _mm256_srai_epi32(_mm256_slli_epi32(v1, 16), 16));
      const __m256i odd = _mm256_packs_epi32(_mm256_srai_epi32(v0, 16), _mm256_srai_epi32(v1, 16));
      _mm256_storeu_si256((__m256i*)(q + k), _mm256_permute4x64_epi64(even, 0xD8));
      _mm256_storeu_si256((__m256i*)(q + k + 16), _mm256_permute4x64_epi64(odd, 0xD8));
    }
    S[i] = mx / 32767.0f;
  }
  return a;
}

// The int16 codes (M, K) and block scales (M, K/B) of x, for the int8 prompt kernel (cpu_prompt_int8.cpp).
std::tuple<at::Tensor, at::Tensor> int16_activations(const at::Tensor& x, int64_t B) {
  const Activations a = quantize_activations(x, B);
  return {a.codes, a.scales};
}

// Activation rows quantized to int8 for the int4 kernels, per group of G values as `int4_matmul_int8`
// (cpu_prefill.cpp) quantizes prompts: codes round(x * 127 / amax) (nearest, ties to even), scale amax / 127 and
// scale * sum(codes). Within each chunk of `chunk` values (64 or 128; 32 where G is an odd multiple of 32), the
// codes of the even columns come first, then the odd ones': the order in which the kernel unpacks the low and high
// nibbles of chunk / 2 bytes.
Activations quantize_activations_int8(const at::Tensor& input, int64_t G, int64_t chunk) {
  const at::Tensor x = as_float(input);
  const int64_t M = x.size(0), groups = x.size(1) / G;
  Activations a = empty_activations(x, G, at::kChar, true);
  const float* X = x.data_ptr<float>();
  int8_t* Q = a.codes.data_ptr<int8_t>();
  float* S = a.scales.data_ptr<float>();
  float* T = a.sums.data_ptr<float>();
  // packs of 4 vectors leave 4-byte pieces in the order 0a 1a 2a 3a | 0b 1b 2b 3b (a, b the 128-bit halves)
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  // within each 128-bit lane: its 8 even bytes, then its 8 odd ones
  const __m256i evens_first = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8,
                                               10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t i = 0; i < M * groups; ++i) {
    const float* p = X + i * G;  // rows are contiguous, so group i of the whole tensor is row i / groups's
    int8_t* q = Q + i * G;
    const float mx = block_absmax(p, G);
    if (!std::isfinite(mx)) {  // inf or NaN in the group: NaN out (a float matmul gives inf or NaN)
      std::memset(q, 0, G);
      S[i] = T[i] = NAN;
      continue;
    }
    const __m256 inv = _mm256_set1_ps(mx > 0 ? 127.0f / mx : 0.0f);
    __m256i total = _mm256_setzero_si256();
    // 32 values from p + k as codes: the 16 even columns', then the 16 odd ones'.
    const auto split32 = [&](int64_t k) {
      __m256i v[4];
      for (int t = 0; t < 4; ++t) {
        v[t] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + k + 8 * t), inv));
        total = _mm256_add_epi32(total, v[t]);
      }
      // |v| <= 127: the saturating packs change nothing.
      const __m256i bytes = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3])), order);
      // 8-byte pieces even0 odd0 | even1 odd1 -> even0 even1 odd0 odd1
      return _mm256_permute4x64_epi64(_mm256_shuffle_epi8(bytes, evens_first), 0xD8);
    };
    if (G % 128 == 0 && chunk == 128) {
      for (int64_t k = 0; k < G; k += 128) {
        const __m256i a = split32(k), b = split32(k + 32), c = split32(k + 64), d = split32(k + 96);
        _mm256_storeu_si256((__m256i*)(q + k), _mm256_permute2x128_si256(a, b, 0x20));
        _mm256_storeu_si256((__m256i*)(q + k + 32), _mm256_permute2x128_si256(c, d, 0x20));
        _mm256_storeu_si256((__m256i*)(q + k + 64), _mm256_permute2x128_si256(a, b, 0x31));
        _mm256_storeu_si256((__m256i*)(q + k + 96), _mm256_permute2x128_si256(c, d, 0x31));
      }
    } else if (G % 64 == 0) {
      for (int64_t k = 0; k < G; k += 64) {
        const __m256i first = split32(k), second = split32(k + 32);
        _mm256_storeu_si256((__m256i*)(q + k), _mm256_permute2x128_si256(first, second, 0x20));
        _mm256_storeu_si256((__m256i*)(q + k + 32), _mm256_permute2x128_si256(first, second, 0x31));
      }
    } else {
      for (int64_t k = 0; k < G; k += 32) _mm256_storeu_si256((__m256i*)(q + k), split32(k));
    }
    S[i] = mx / 127.0f;
    T[i] = S[i] * float(hsum(total));
  }
  return a;
}


// The setting before (what the Python loader chose, for its test).
bool set_single_stream(bool on) { return std::exchange(single_stream, on); }

const char* build_target() { return kTarget; }
const char* int4_activations() { return kInt4Activations; }

}  // namespace baichuan_cpu_gemv
