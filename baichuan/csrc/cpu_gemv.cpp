// Weight-only int8/int4 and bf16 matrix products for the few activation rows of decoding (and up to a short
// prompt). Built on first use by baichuan/cpu_gemv.py, once per instruction set: the same source compiles to
//
//   avx2        AVX2 + FMA: 256-bit vectors, `vpmaddwd` for int8, `vpmaddubsw` for int4, bf16 widened to fp32 for
//               FMA;
//   avx512      AVX-512 F/BW/VL/DQ + VNNI: 512-bit vectors, `vpdpwssd` for int8 (multiply pairs of int16 and
//               accumulate in int32, one instruction where AVX2 needs two), `vpdpbusd` for int4 (quads of bytes);
//   avx512bf16  the above + AVX512-BF16: `vdpbf16ps` for the bf16 product; and where the CPU has AMX-BF16,
//               short bf16 prompts on its tiles (cpu_prompt_amx.cpp, checked at run time), and where it has
//               AMX-INT8, int8 batches of 5 to 16 rows (cpu_amx_int8.cpp).
//
// The loader picks the build from the CPU's features and names each after its target, so a build never runs on
// a CPU without its instructions.
//
//   int8: y[m, n] = scales[n] * sum_k w[n, k] x[m, k]; w int8 (N, K) row-major. Or with a scale per group of G
//         columns (an output head, as llama.cpp's Q8_0): y[m, n] = sum_g scales[n, g] sum_{k in g} w[n, k] x[m, k],
//         scales bf16 (N, K/G), and the activations' block is G.
//   int4: w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n], g = k / G; q packed two per byte, column 2j in the
//         low nibble and 2j+1 in the high one (N, K/2); scale and zero bf16 side by side in (K/G, N, 2).
//   bf16: y[m, n] = sum_k w[n, k] x[m, k]; w bf16 (N, K).
//
// int8: activations are quantized to int16 per block of B values (scale = block absmax / 32767, relative error
// ~1.5e-5), so each pair of products is one `vpmaddwd` (or `vpdpwssd`) on weights widened to int16, summed in int32
// within a block and in fp32 across blocks: about 3 instructions per 16 int8 weights with AVX2 and 2 per 32 with
// VNNI, against 3 per 8 for widening to fp32 and FMA, so decoding comes much closer to the memory's rate. The avx2
// tile of up to 4 activation rows widens 32 weights by three shifts where `vpmovsxbw` took two loads of 16 (the
// activations in even/odd order to match): on an AVX2-only EPYC 0.85-0.92 of the time at one row (ab_kernels).
// Activations are not quantized to int8 for `vpdpbusd`: that would add a per-row rounding error of ~4e-3, far
// above the int16 codes' and close to the int8 weights' own.
//
// int4: activations are quantized to int8 per group, as the prompt kernel `int4_matmul_int8` (cpu_prefill.cpp) and
// llama.cpp's Q4_0 x Q8_0 do, so that one `vpmaddubsw` makes 32 products where `vpmaddwd` makes 16 (avx2) and one
// `vpdpbusd` 64 where `vpdpwssd` makes 32 (AVX-512); the zero points come in through the group sums of x. On a
// Zen 3 (ab_kernels, 1.29B shapes) 21-26% faster at 4 activation rows, 2-4% at one, where the memory stream bounds
// it; on a Sapphire Rapids-class Xeon (AVX-512) 5-7% at one row and 25-34% at eight. The ~5e-3 relative rounding
// this adds per output is small beside int4 weights' own error (~8e-2 at groups of 32); bench_accuracy's own
// forward through the avx2 kernel (128-row windows): KL 1.19e-4 against 1.23e-4 with int16 activations (int4 g128,
// briefly trained model).
//
// bf16: without AVX512-BF16 each 32-bit lane of loaded weights holds two bf16, so the even one becomes an fp32 by
// a shift and the odd one by a mask, with no shuffle; x is reordered once per call to match (evens, then odds).
// All kernels split output rows over torch's own thread pool (at::parallel_for), so they never add threads to it.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512VNNI__)
#define BAICHUAN_AVX512 1
#if defined(__AVX512BF16__)
#define BAICHUAN_AVX512BF16 1
#endif
#endif

namespace baichuan_cpu_gemv {

#if defined(BAICHUAN_AVX512BF16)
constexpr const char* kTarget = "avx512bf16";
#elif defined(BAICHUAN_AVX512)
constexpr const char* kTarget = "avx512";
#else
constexpr const char* kTarget = "avx2";
#endif
// The integer type activations are rounded to for int4 weights (int8 weights always take int16 codes), and the
// chunk of values whose even columns' codes come before its odd ones' (the bytes the int4 kernel unpacks at a time,
// twice over: 64 bytes with AVX-512, 32 with AVX2).
constexpr const char* kInt4Activations = "int8";
#if defined(BAICHUAN_AVX512)
constexpr int64_t kInt4Chunk = 128;
constexpr int64_t kInt4PrefetchBytes = 16384;  // how far ahead the AVX-512 int4 tile prefetches (Int4Tile::run)
#else
constexpr int64_t kInt4Chunk = 64;
#endif

// The largest group of int8 scales for which 3 (AVX2) or 5 (AVX-512) to 8 activation rows go in the lanes of one
// accumulator (Int8Tile::run_lanes, run_quads): past it, the other tiles' reduction at each block's end costs less.
constexpr int64_t kMaxLaneBlock = 64;
constexpr int64_t kMaxBlock = 256;  // int32 safety: 256/16 vpmaddwd sums of 2 * 32767 * 128 per lane < 2^31
// Weight rows ahead that each tile prefetches: 16, then 8, now 6, each measured faster at one activation row on the
// 1.29B shapes (benchmarks/ab_kernels.py; benchmarks/README.md has the figures).
constexpr int64_t kPrefetchRows = 6;
// One activation row: one weight row at a time and no prefetch instructions (Bf16StreamTile, Int8StreamTile, the
// avx2 int8 tile's single row), where the CPU's own prefetcher follows a single stream a thread well (set by
// `set_single_stream`, cpu.py decides). The bf16 tiles and those of int8 with a scale a row; int4 ignores it.
bool single_stream = false;
constexpr int64_t kChunkRows = 64;  // rows per parallel work item: whole tiles for every R
// Least work (weight bytes x activation rows) per thread: smaller products run on the calling thread alone, where
// waking the pool would cost more than it saves (a tiny model's layers; any layer on a machine short of cores).
constexpr int64_t kMinTaskWork = 1 << 17;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The int32 sums of each block of a tile reduced into the lanes of one vector (int8 tiles; int4 with AVX2), or with
// AVX-512 a float accumulator per pair of rows, one vector of int32 block sums scaled and added per block (int4).
#if defined(BAICHUAN_AVX512)
// Lane i: the sum of the lanes of v[i] (zero for i >= N); exact, as int32 sums.
template <int N>
inline __m512i lane_sums(const __m512i (&v)[N]) {
  static_assert(N <= 16);
  constexpr int n1 = (N + 1) / 2, n2 = (n1 + 1) / 2;
  const __m512i zero = _mm512_setzero_si512();
  // a[i], each 128-bit chunk: v[2i] and v[2i+1], each summed in pairs of lanes (interleaved)
  __m512i a[n1], b[n2];
  for (int i = 0; i < n1; ++i) {
    const __m512i p = v[2 * i], q = 2 * i + 1 < N ? v[2 * i + 1] : zero;
    a[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(p, q), _mm512_unpackhi_epi32(p, q));
  }
  // b[i], each 128-bit chunk: the sums of v[4i..4i+3] over the chunk
  for (int i = 0; i < n2; ++i) {
    const __m512i p = a[2 * i], q = 2 * i + 1 < n1 ? a[2 * i + 1] : zero;
    b[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(p, q), _mm512_unpackhi_epi64(p, q));
  }
  if constexpr (n2 == 1) {
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(b[0]), _mm512_extracti64x4_epi64(b[0], 1));
    return _mm512_zextsi128_si512(_mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
  } else {
    // chunks (p's 0 + 1, p's 2 + 3, q's 0 + 1, q's 2 + 3)
    const auto pairs = [](__m512i p, __m512i q) {
      return _mm512_add_epi32(_mm512_shuffle_i32x4(p, q, 0x88), _mm512_shuffle_i32x4(p, q, 0xDD));
    };
    const __m512i c0 = pairs(b[0], b[1]);
    const __m512i c1 = n2 > 2 ? pairs(b[2], n2 > 3 ? b[3] : zero) : zero;
    return pairs(c0, c1);
  }
}

// Lane l: l / 2, the activation row of lane 2j or 2j + 1 in `Int8Tile::run_quads`.
inline __m512i lane_pairs() { return _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7); }

// Lane l: l % MB, the activation row of lane r * MB + j.
template <int MB>
inline __m512i lane_rows() {
  alignas(64) static constexpr int32_t rows[16] = {0 % MB,  1 % MB,  2 % MB,  3 % MB,  4 % MB,  5 % MB,
                                                   6 % MB,  7 % MB,  8 % MB,  9 % MB,  10 % MB, 11 % MB,
                                                   12 % MB, 13 % MB, 14 % MB, 15 % MB};
  return _mm512_load_si512(rows);
}

using FloatAcc = __m512;
using IntAcc = __m512i;
inline FloatAcc acc_zero() { return _mm512_setzero_ps(); }
inline IntAcc int_zero() { return _mm512_setzero_si512(); }
inline IntAcc widen_acc(__m256i v) { return _mm512_zextsi256_si512(v); }
inline FloatAcc scale_add(IntAcc sums, float s, FloatAcc acc) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(s), acc);
}
inline float acc_sum(FloatAcc v) { return _mm512_reduce_add_ps(v); }
#else
// Lane j: the sum of the lanes of v[j] (zero for j >= MB).
template <int MB>
inline __m256i lane_sums(const __m256i (&v)[MB]) {
  const auto at = [&](int j) { return j < MB ? v[j] : _mm256_setzero_si256(); };
  const __m256i h01 = _mm256_hadd_epi32(at(0), at(1)), h23 = _mm256_hadd_epi32(at(2), at(3));
  if constexpr (MB <= 4) {
    const __m256i a = _mm256_hadd_epi32(h01, h23);
    return _mm256_zextsi128_si256(_mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1)));
  }
  const __m256i h45 = _mm256_hadd_epi32(at(4), at(5)), h67 = _mm256_hadd_epi32(at(6), at(7));
  // a: (sums of lanes 0-3 of v0..v3 | of lanes 4-7 of v0..v3), b likewise of v4..v7
  const __m256i a = _mm256_hadd_epi32(h01, h23), b = _mm256_hadd_epi32(h45, h67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}
#endif

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

// Quantized activation rows: codes (M, K), int16 for int8 weights and int8 for int4 ones, and per block of B the
// scale (and, for int4 weights, scale * sum(codes)).
struct Activations {
  at::Tensor codes, scales, sums;     // sums: for int4 weights' zero points only
  int64_t blocks;                     // per row
};

// Codes (M, K) of `type`, and scales (and sums, where asked) per block of B, for fp32 rows x (M, K); to be filled.
Activations empty_activations(const at::Tensor& x, int64_t B, at::ScalarType type, bool with_sums) {
  const int64_t M = x.size(0), K = x.size(1);
  return {at::empty({M, K}, x.options().dtype(type)), at::empty({M, K / B}, x.options()),
          with_sums ? at::empty({M, K / B}, x.options()) : at::Tensor(), K / B};
}

// x (M, K) as contiguous fp32: itself, or a widened copy of bf16 rows.
at::Tensor as_float(const at::Tensor& x) { return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat); }

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
Activations quantize_activations(const at::Tensor& input, int64_t B, bool split = false) {
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

// Output rows (M, N) in fp32 or bf16: y[m * N + n] = v.
struct Output {
  float* f32;
  at::BFloat16* b16;
  void set(int64_t i, float v) const {
    if (f32)
      f32[i] = v;
    else
      b16[i] = at::BFloat16(v);  // round to nearest even
  }
};

Output output_of(at::Tensor& y) {
  if (y.scalar_type() == at::kFloat) return {y.data_ptr<float>(), nullptr};
  return {nullptr, y.data_ptr<at::BFloat16>()};
}

// kGroupScales: a compile-time choice, as a test per block cost the per-row kernel 6-15% on a Zen 3 (ab_kernels).
template <bool kGroupScales>
struct Int8Tile {
  const int8_t* w;
  const float* scales;           // per row (N,), where !kGroupScales
  const uint16_t* group_scales;  // bf16 (N, blocks), one per activation block, where kGroupScales
  const int16_t* xq;
  const float* xs;
  const float* xs_by_block;  // (blocks, M + 8): xs transposed, for the tiles of several activation rows
  // Group scales of at most kMaxLaneBlock columns and 5+ activation rows: the codes of each pass of 8 rows (zero
  // past M) as (K / W, 8, W), W columns of each row in turn (`rows_in_lanes`): quads (AVX-512) or pairs (AVX2),
  // so that a vector holds the 8 rows' columns that one weight vector multiplies; AVX2, a call of 3-4 rows: the
  // codes as `rows_in_halves` lays them out; else null.
  const int16_t* x_lanes;
  Output y;
  int64_t N, K, B, blocks, M;
  // avx2: the activation codes in `quantize_activations`' split order (B a multiple of 32), so that each 32 weights
  // load as 16 lanes of two bytes and two shifts make the even ones int16, one the odd ones, where
  // `vpmovsxbw` widened 16 at a time. The same products in each block's exact int32 sum: the same bits.
  bool split = false;

  // Weight rows per tile for MB activation rows: an int32 accumulator per (weight row, activation row), up to the 16
  // lanes `lane_sums` gathers them into (AVX-512), plus a vector per weight row, within the 32 (AVX-512) or 16
  // registers.
  static constexpr int kPassRows = 8;
#if defined(BAICHUAN_AVX512)
  static constexpr int weight_rows(int mb) { return mb <= 4 ? 4 : 2; }
#else
  // One activation row: one weight row at a time. On a Zen 3 (ab_kernels, one row, 1.29B shapes) that took 17-34%
  // less time than four rows side by side on four of five shapes, 1-4% less on 1536x4096: four streams at once per
  // core read memory worse than one (and the prefetch kPrefetchRows ahead), however few instructions each takes.
  // Group scales at 3+ rows (`run_lanes`): two, each activation vector loaded once for both.
  static constexpr int weight_rows(int mb) { return mb == 1 ? 1 : mb == 2 ? 2 : mb >= 3 && kGroupScales ? 2 : 1; }
#endif

#if !defined(BAICHUAN_AVX512)
  // Rows [n, n + R) against activation rows [m, m + MB), R * MB <= 8: each weight vector is widened once for all MB.
  // At the end of each block the R * MB int32 sums are reduced into the lanes of one vector (lane r * MB + j), which
  // gathers the fp32 sums across blocks in one register where one per pair spilled at 8 rows
  // (benchmarks/ab_kernels.py, avx2 on an Emerald Rapids: 4 rows 15-19% and 8 rows 0-9% faster, 2-3 rows unchanged,
  // 1 row 0-5% slower).
  // A block sum is exact in int32 (at most 256 products of 127 * 32767) and so the same in every tile shape, so each
  // activation row gets the same bits in a batch as alone.
  template <int R, int MB>
  void run(int64_t n, int64_t m) const {
    if constexpr (kGroupScales && MB >= 5) {
      if (x_lanes) return run_lanes<R, MB, false>(n, m);
      for (int r = 0; r < R; ++r) run_steps<1, MB, false>(n + r, m);  // groups past kMaxLaneBlock
    } else if constexpr (kGroupScales && MB >= 3) {
      if (x_lanes && M <= 4) return run_lanes<R, MB, true>(n, m);
      for (int r = 0; r < R; ++r) {  // larger groups, or a batch's last pass of 3-4 rows
        if (split)
          run_steps<1, MB, true>(n + r, m);
        else
          run_steps<1, MB, false>(n + r, m);
      }
    } else {
      static_assert(R * MB <= 8 && (R == 1 || MB <= 2));
      if (split)
        run_steps<R, MB, true>(n, m);
      else
        run_steps<R, MB, false>(n, m);
    }
  }

  // Small groups (an 8-bit head's 32 columns) against 3 to 8 activation rows, as AVX-512's `run_quads`: the lanes
  // of one accumulator are the activation rows, so a block ends in one conversion and one multiply-add a weight row
  // where `lane_sums` took eight horizontal additions and two lane permutations a block. The same exact int32 block
  // sums and multiply-adds as the other tiles: the same bits.
  // - 5 to 8 rows (pairs): each pair of weights, widened, goes to all 8 lanes (`vpshufd`) against the rows' pairs
  //   (`rows_in_lanes`). The 1.29B head (125696x1536, groups of 32) at 8 rows took 0.80 of the time (ab_kernels,
  //   AVX2-only EPYC; benchmarks/README.md); with a scale a row (blocks of 256) 1.08-1.17 of it, so only groups.
  // - a call of 3 or 4 rows (kHalves): lanes j and j + 4 are row j's, the low and the high 8 of each 16 columns, so
  //   one `vpmovsxbw` of 16 weights serves all 8 lanes (`vpshufd` picks pair q of each half) against the codes laid
  //   out to match (`rows_in_halves`), and a block first adds the two halves. The head at 4 rows: 0.72 of the time.
  template <int R, int MB, bool kHalves>
  void run_lanes(int64_t n, int64_t m) const {
    constexpr int64_t kStepCols = kHalves ? 16 : 8;   // weights of a row a step: four pairs a lane
    constexpr int64_t kVectorRows = kHalves ? 4 : 8;  // activation rows a vector holds
    const int8_t* wn = w + n * K;
    const int16_t* xt = kHalves ? x_lanes : x_lanes + (m / kPassRows) * K * kPassRows;
    // lane j: row m + j's sum (128 bits for the halves: 0.94-0.96 of the time of 256 at 4 rows, ab_kernels)
    std::conditional_t<kHalves, __m128, __m256> total[R];
    for (int r = 0; r < R; ++r) {
      if constexpr (kHalves)
        total[r] = _mm_setzero_ps();
      else
        total[r] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < blocks; ++b) {
      __m256i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
      for (int64_t k = b * B; k < (b + 1) * B; k += kStepCols) {
        if ((k & 63) == 0)
          for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(wn + (kPrefetchRows + r) * K + k), _MM_HINT_T0);
        // each 128-bit half: 8 weights of the row as int16 (pairs: the same 8 in both), for the in-lane `vpshufd`
        __m256i wide[R];
        for (int r = 0; r < R; ++r) {
          const int8_t* wr = wn + r * K + k;
          if constexpr (kHalves)
            wide[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)wr));
          else
            wide[r] = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)wr)));
        }
        const auto pair = [&](auto q_constant) {
          constexpr int q = decltype(q_constant)::value;
          __m256i xv = _mm256_loadu_si256((const __m256i*)(xt + (k + kStepCols / 4 * q) * kVectorRows));
          if constexpr (R > 1) __asm__("" : "+x"(xv));  // one load for all R rows
          for (int r = 0; r < R; ++r)
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_shuffle_epi32(wide[r], q * 0x55), xv));
        };
        pair(std::integral_constant<int, 0>{});
        pair(std::integral_constant<int, 1>{});
        pair(std::integral_constant<int, 2>{});
        pair(std::integral_constant<int, 3>{});
      }
      const float* sx = xs_by_block + b * (M + 8) + m;  // row m + j's block scale at j
      for (int r = 0; r < R; ++r) {
        const float ws = bf16_to_float(group_scales[(n + r) * blocks + b]);
        if constexpr (kHalves) {
          const __m128i sums = _mm_add_epi32(_mm256_castsi256_si128(acc[r]), _mm256_extracti128_si256(acc[r], 1));
          total[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(sums), _mm_mul_ps(_mm_loadu_ps(sx), _mm_set1_ps(ws)), total[r]);
        } else {
          const __m256 scales = _mm256_mul_ps(_mm256_loadu_ps(sx), _mm256_set1_ps(ws));
          total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), scales, total[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      alignas(32) float sums[8];
      if constexpr (kHalves)
        _mm_store_ps(sums, total[r]);
      else
        _mm256_store_ps(sums, total[r]);
      for (int j = 0; j < MB; ++j) y.set((m + j) * N + n + r, sums[j]);
    }
  }

  // The products of int8 weights widened to int16 against the int16 codes, kStep columns at a time: 32 in the split
  // order (`split`), else 16 in order.
  template <bool kSplit>
  static constexpr int64_t kStep = kSplit ? 32 : 16;

  // Weight row wr's kStep columns from k as int16 lanes: the even and the odd columns (kSplit), or in order.
  template <bool kSplit>
  static void widen(const int8_t* wr, __m256i (&out)[kSplit ? 2 : 1]) {
    if constexpr (kSplit) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)wr);
      out[0] = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);
      out[1] = _mm256_srai_epi16(v, 8);
    } else {
      out[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)wr));
    }
  }

  // acc plus the pair sums of kStep products: the widened weights against the codes from xr.
  template <bool kSplit>
  static __m256i dot(__m256i acc, const __m256i (&wv)[kSplit ? 2 : 1], const int16_t* xr) {
    __m256i p = _mm256_madd_epi16(wv[0], _mm256_loadu_si256((const __m256i*)xr));
    if constexpr (kSplit)
      p = _mm256_add_epi32(p, _mm256_madd_epi16(wv[1], _mm256_loadu_si256((const __m256i*)(xr + 16))));
    return _mm256_add_epi32(acc, p);
  }

  template <int R, int MB, bool kSplit>
  void run_steps(int64_t n, int64_t m) const {
    if constexpr (kGroupScales && R == 1 && MB == 1) {
      if (B == 32) return run_groups_of_one_row<32, kSplit>(n, m);
      if (B == 64) return run_groups_of_one_row<64, kSplit>(n, m);
      return run_groups_of_one_row<0, kSplit>(n, m);
    }
    const int8_t* wn = w + n * K;
    const int16_t* x0 = xq + m * K;
    __m256 total = _mm256_setzero_ps();
    for (int64_t k0 = 0, b = 0; k0 < K; k0 += B, ++b) {
      __m256i iacc[R * MB];
      for (int i = 0; i < R * MB; ++i) iacc[i] = _mm256_setzero_si256();
      for (int64_t k = k0; k < k0 + B; k += kStep<kSplit>) {
        // a single row where `single_stream`: one stream the hardware follows (Zen 4, avx2 build, ab_kernels: 0.71-0.97
        // of the time of prefetching kPrefetchRows ahead; benchmarks/README.md)
        if ((R > 1 || MB > 1 || !single_stream) && (k & 63) == 0)
          for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(wn + (kPrefetchRows + r) * K + k), _MM_HINT_T0);
        for (int r = 0; r < R; ++r) {
          __m256i wv[kSplit ? 2 : 1];
          widen<kSplit>(wn + r * K + k, wv);
          for (int j = 0; j < MB; ++j) iacc[r * MB + j] = dot<kSplit>(iacc[r * MB + j], wv, x0 + j * K + k);
        }
      }
      // lane r * MB + j: the scale of activation row j's block b
      __m256 block_scales;
      if constexpr (MB == 1)
        block_scales = _mm256_set1_ps(xs[m * blocks + b]);
      else if constexpr (R == 1)
        block_scales = _mm256_loadu_ps(xs_by_block + b * (M + 8) + m);
      else
        block_scales = _mm256_castpd_ps(_mm256_broadcast_sd((const double*)(xs_by_block + b * (M + 8) + m)));
      if constexpr (kGroupScales) block_scales = _mm256_mul_ps(block_scales, weight_scales<R, MB>(n, b));
      total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lane_sums<R * MB>(iacc)), block_scales, total);
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, total);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) y.set((m + j) * N + n + r, sums[r * MB + j] * row_scale(n + r));
  }

  // Group scales, one weight row against one activation row: the int32 sums of 8 blocks gathered into the lanes of
  // one vector and scaled by the 8 blocks' scales at once, with the block size a compile-time constant for 32 and
  // 64 so that 8 blocks' steps unroll (a head's 125696x1536 at G = 32 had taken 1.6x as long as with one scale a
  // row on a Zen 3, ab of 2026-12-01, benchmarks/README.md).
  template <int GB, bool kSplit>
  void run_groups_of_one_row(int64_t n, int64_t m) const {
    const int64_t block = GB > 0 ? GB : B;
    const int8_t* wn = w + n * K;
    const int16_t* x0 = xq + m * K;
    const uint16_t* gs = group_scales + n * blocks;
    const float* xsm = xs + m * blocks;
    constexpr int64_t step_cols = kStep<kSplit>;
    const auto step = [&](__m256i acc, int64_t k) {
      __m256i wv[kSplit ? 2 : 1];
      widen<kSplit>(wn + k, wv);
      return dot<kSplit>(acc, wv, x0 + k);
    };
    const auto prefetch = [&](int64_t k) { _mm_prefetch((const char*)(wn + kPrefetchRows * K + k), _MM_HINT_T0); };
    __m256 total = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= blocks; b += 8) {
      const int64_t k0 = b * block;
      __m256i sums[8];
      for (int i = 0; i < 8; ++i) sums[i] = _mm256_setzero_si256();
      if constexpr (GB > 0) {
#pragma GCC unroll 32
        for (int kk = 0; kk < 8 * GB; kk += step_cols) {
          if ((kk & 63) == 0) prefetch(k0 + kk);
          sums[kk / GB] = step(sums[kk / GB], k0 + kk);
        }
      } else {
        for (int i = 0; i < 8; ++i)
          for (int64_t k = k0 + i * block; k < k0 + (i + 1) * block; k += step_cols) {
            if ((k & 63) == 0) prefetch(k);
            sums[i] = step(sums[i], k);
          }
      }
      const __m256i bits = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(gs + b))), 16);
      const __m256 scales8 = _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_loadu_ps(xsm + b));
      total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lane_sums<8>(sums)), scales8, total);
    }
    for (; b < blocks; ++b) {
      __m256i acc = _mm256_setzero_si256();
      for (int64_t k = b * block; k < (b + 1) * block; k += step_cols) {
        if ((k & 63) == 0) prefetch(k);
        acc = step(acc, k);
      }
      total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(bf16_to_float(gs[b]) * xsm[b]), total);
    }
    y.set(m * N + n, hsum(total));
  }

  // lane r * MB + j: the group scale of weight row n + r in block b
  template <int R, int MB>
  __m256 weight_scales(int64_t n, int64_t b) const {
    if constexpr (R == 1) return _mm256_set1_ps(bf16_to_float(group_scales[n * blocks + b]));
    alignas(32) float lanes[8] = {};
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) lanes[r * MB + j] = bf16_to_float(group_scales[(n + r) * blocks + b]);
    return _mm256_load_ps(lanes);
  }
#else
  // Rows [n, n + R) against activation rows [m, m + MB), R * MB <= 16: each weight vector is widened once for all
  // MB, and each activation vector loaded once for all R. At the end of each block the R * MB int32 sums go exactly
  // into the lanes of one vector (lane r * MB + j), and into the fp32 sums by one multiply-add: the arithmetic of the
  // AVX2 tiles and of the AMX-INT8 kernel, so each activation row gets the same bits from every tile shape and build.
  // Against a float accumulator per (weight row, activation row), which left room for one weight row at eight
  // activation rows: two weight rows there took 0.55-0.99 of the time on a Zen 4 (ab_kernels, benchmarks/README.md),
  // the loads of activations, not the products, having bounded it.
  template <int R, int MB>
  void run(int64_t n, int64_t m) const {
    static_assert(R * MB <= 16);
    if constexpr (kGroupScales && MB >= 5) {
      if (x_lanes) return run_quads<R, MB>(n, m);
    }
    const int8_t* wn = w + n * K;
    __m512 total = _mm512_setzero_ps();
    // one step of 32 columns (16, zero-extended, where `narrow`)
    const auto step = [&](__m512i(&iacc)[R * MB], int64_t k, auto narrow_block) {
      constexpr bool narrow = decltype(narrow_block)::value;
      // weight rows into L2 ahead (into L1: 0-3% slower at one row, 4-6% at four; ab_kernels); not for a single
      // row (Int8StreamTile, a tile's last rows): one stream the hardware follows
      if (!(R == 1 && MB == 1) && (k & 63) == 0)
        for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(wn + (kPrefetchRows + r) * K + k), _MM_HINT_T1);
      __m512i wv[R];
      for (int r = 0; r < R; ++r) {
        const int8_t* wr = wn + r * K + k;
        if constexpr (narrow)
          wv[r] = _mm512_zextsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)wr)));
        else
          wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)wr));
      }
      for (int j = 0; j < MB; ++j) {
        const int16_t* xj = xq + (m + j) * K + k;
        __m512i xv;
        if constexpr (narrow)
          xv = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)xj));
        else
          xv = _mm512_loadu_si512(xj);
        // in a register for all R rows: else the compiler folds a load into each product, R loads where one will do
        if constexpr (R > 1) __asm__("" : "+v"(xv));
        for (int r = 0; r < R; ++r) iacc[r * MB + j] = _mm512_dpwssd_epi32(iacc[r * MB + j], wv[r], xv);
      }
    };
    for (int64_t k0 = 0, b = 0; k0 < K; k0 += B, ++b) {
      __m512i iacc[R * MB];
      for (int i = 0; i < R * MB; ++i) iacc[i] = _mm512_setzero_si512();
      int64_t k = k0;
      for (; k + 32 <= k0 + B; k += 32) step(iacc, k, std::false_type{});
      if (k < k0 + B) step(iacc, k, std::true_type{});  // a block of 16 (K an odd multiple of 16)
      total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lane_sums<R * MB>(iacc)), block_scales<R, MB>(n, m, b), total);
    }
    alignas(64) float sums[16];
    _mm512_store_ps(sums, total);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) y.set((m + j) * N + n + r, sums[r * MB + j] * row_scale(n + r));
  }

  // Small blocks (an 8-bit head's groups of 32 columns) against 5 to 8 activation rows: there the lanes of one
  // accumulator are the activation rows, each pair of lanes a row's, so that a block's sums need one shuffle where
  // `lane_sums` takes three per accumulator (and as many accumulators as rows). Each 4 weights of a row, widened, go
  // to all 8 lane pairs (`vpermq`), against the activation quads (`x_lanes`): lane 2j sums columns 4i and 4i + 1
  // of row j, lane 2j + 1 columns 4i + 2 and 4i + 3. The same exact int32 block sums, so the same bits.
  template <int R, int MB>
  void run_quads(int64_t n, int64_t m) const {
    const int8_t* wn = w + n * K;
    const int16_t* xt = x_lanes + (m / kPassRows) * K * kPassRows;
    __m512i quad[4];
    for (int q = 0; q < 4; ++q) quad[q] = _mm512_set1_epi64(q);
    __m512 total[R];
    for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      __m512i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
      for (int64_t k = b * B; k < (b + 1) * B; k += 16) {
        if ((k & 63) == 0)
          for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(wn + (kPrefetchRows + r) * K + k), _MM_HINT_T1);
        __m512i wide[R];
        for (int r = 0; r < R; ++r)
          wide[r] = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wn + r * K + k))));
        for (int q = 0; q < 4; ++q) {
          const __m512i xv = _mm512_loadu_si512(xt + (k + 4 * q) * kPassRows);
          for (int r = 0; r < R; ++r)
            acc[r] = _mm512_dpwssd_epi32(acc[r], _mm512_permutexvar_epi64(quad[q], wide[r]), xv);
        }
      }
      // lane 2j: activation row m + j's block scale, times the weight row's group scale below
      const __m512 sx =
          _mm512_permutexvar_ps(lane_pairs(), _mm512_maskz_loadu_ps((1u << MB) - 1, xs_by_block + b * (M + 8) + m));
      for (int r = 0; r < R; ++r) {
        const __m512i sums = _mm512_add_epi32(acc[r], _mm512_shuffle_epi32(acc[r], _MM_PERM_CDAB));
        const __m512 ws = _mm512_set1_ps(bf16_to_float(group_scales[(n + r) * blocks + b]));
        total[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(sx, ws), total[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      alignas(64) float sums[16];
      _mm512_store_ps(sums, total[r]);
      for (int j = 0; j < MB; ++j) y.set((m + j) * N + n + r, sums[2 * j]);
    }
  }

  // Lane r * MB + j: the scale of activation row m + j's block b, times weight row n + r's group scale there.
  template <int R, int MB>
  __m512 block_scales(int64_t n, int64_t m, int64_t b) const {
    __m512 s;
    if constexpr (MB == 1) {
      s = _mm512_set1_ps(xs[m * blocks + b]);
    } else {
      s = _mm512_maskz_loadu_ps((1u << MB) - 1, xs_by_block + b * (M + 8) + m);
      if constexpr (R > 1) s = _mm512_permutexvar_ps(lane_rows<MB>(), s);
    }
    if constexpr (kGroupScales) {
      __m512 ws = _mm512_set1_ps(bf16_to_float(group_scales[n * blocks + b]));
      for (int r = 1; r < R; ++r)  // lanes from r * MB on: row n + r's
        ws = _mm512_mask_mov_ps(ws, __mmask16(0xFFFFu << (r * MB)),
                                _mm512_set1_ps(bf16_to_float(group_scales[(n + r) * blocks + b])));
      s = _mm512_mul_ps(s, ws);
    }
    return s;
  }
#endif

  float row_scale(int64_t n) const {
    if constexpr (kGroupScales) return 1.f;
    return scales[n];
  }
};

#if defined(BAICHUAN_AVX512)
// One weight row at a time, unprefetched, for one activation row of int8 with a scale a row where `single_stream`:
// on a Zen 4 (ab_kernels, 1.29B shapes, huge pages) 0.87-1.00 of the time of four rows prefetched 6 rows ahead in
// three runs (a first had 0.78-1.05, and 1.77 on 1536x1536); with groups of 32 (the head) 1.12, so those keep four
// (benchmarks/README.md). The same bits: the tiles' last rows already ran this way.
struct Int8StreamTile : Int8Tile<false> {
  static constexpr int weight_rows(int) { return 1; }
};
#endif

struct Int4Tile {
  const uint8_t* packed;
  const uint16_t* scales_and_zeros;
  const int8_t* xq;  // kInt4Activations
  const float* xs;
  const float* xsums;
  Output y;
  int64_t N, K, G, groups, M;

  // Weight rows per tile for MB activation rows (as for int8, and four unpacked weight vectors). AVX2 has too few
  // registers for more than 4 activation rows a pass.
#if defined(BAICHUAN_AVX512)
  static constexpr int kPassRows = 8;
  static constexpr int weight_rows(int mb) { return mb == 1 ? 4 : mb == 2 ? 2 : 1; }
#else
  static constexpr int kPassRows = 4;
  // One weight row at a time for one activation row, as the int8 tile (there the reason): on a Zen 3 19-27% less
  // time than four on four of the five 1.29B shapes, 4% less on 1536x4096.
  static constexpr int weight_rows(int mb) { return mb == 1 ? 1 : mb == 2 ? 2 : 1; }
#endif

#if defined(BAICHUAN_AVX512)
  // Groups of 128 and more: 64 bytes at a time, low nibbles (even columns) against the chunk's first 64 activations,
  // high nibbles against the next 64, each one `vpdpbusd` of 64 products (codes unsigned, activations signed; a
  // lane's int32 sum is exact). Against int16 activations and `vpdpwssd` (four per 64 bytes, and masks and shifts for
  // four nibbles a 16-bit lane): ab_kernels, 1.29B shapes on a Sapphire Rapids-class Xeon, 5-7% less time at one
  // activation row and 25-34% at eight (benchmarks/README.md).
  template <int R, int MB>
  void dot_group128(__m512i (&iacc)[R][MB], const uint8_t* pn, const uint8_t* ahead, int64_t k0, int64_t m) const {
    const int64_t row_bytes = K / 2;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int64_t k = k0; k < k0 + G; k += 128) {
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(ahead + r * row_bytes + k / 2), _MM_HINT_T1);
      for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_loadu_si512((const void*)(pn + r * row_bytes + k / 2));
        const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        for (int j = 0; j < MB; ++j) {
          const int8_t* xj = xq + (m + j) * K + k;
          iacc[r][j] = _mm512_dpbusd_epi32(iacc[r][j], lo, _mm512_loadu_si512((const void*)xj));
          iacc[r][j] = _mm512_dpbusd_epi32(iacc[r][j], hi, _mm512_loadu_si512((const void*)(xj + 64)));
        }
      }
    }
  }
#endif

  // One group's int32 sums against int8 activations, in 256-bit vectors: the avx2 build's, and the AVX-512 builds'
  // for groups that are not multiples of 128. `vpmaddubsw` multiplies 32 unsigned codes by 32 signed activation
  // bytes and adds pairs in s16 (|.| <= 2 * 15 * 127 = 3810); a group adds G / 32 <= 8 such sums per lane
  // (|.| <= 30480, exact) before one `vpmaddwd` by ones widens them to int32: about 8 instructions per 64 weights
  // where int16 activations take 14. Groups of 64 and more: 32 bytes at a time, low nibbles (even columns) against
  // the chunk's first 32 activations, high nibbles against the next 32. Odd multiples of 32: 16 bytes at a time,
  // broadcast to both halves, the upper one shifted to its high nibbles.
  template <int R, int MB, int GC>
  void dot_group_bytes(__m256i (&narrow)[R][MB], const uint8_t* pn, int64_t k0, int64_t m) const {
    const int64_t row_bytes = K / 2;
    const int64_t G = GC ? GC : this->G;
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    __m256i pairs[R][MB];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) pairs[r][j] = _mm256_setzero_si256();
    if (G % 64 == 0) {
#pragma GCC unroll 4
      for (int64_t c = 0; c < G; c += 64) {
        const int64_t k = k0 + c;
        // a prefetch per 64 bytes of codes (every other chunk), decided at compile time where G is known
        if ((GC != 0 && GC % 128 == 0) ? (c & 127) == 0 : (k & 127) == 0)
          for (int r = 0; r < R; ++r)
            _mm_prefetch((const char*)(pn + (kPrefetchRows + r) * row_bytes + k / 2), _MM_HINT_T0);
        for (int r = 0; r < R; ++r) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(pn + r * row_bytes + k / 2));
          const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
          for (int j = 0; j < MB; ++j) {
            const __m256i* xj = (const __m256i*)(xq + (m + j) * K + k);
            const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(xj)),
                                               _mm256_maddubs_epi16(hi, _mm256_loadu_si256(xj + 1)));
            pairs[r][j] = _mm256_add_epi16(pairs[r][j], s);
          }
        }
      }
    } else {
      const __m256i high_half = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
      for (int64_t k = k0; k < k0 + G; k += 32) {
        if ((k & 127) == 0)
          for (int r = 0; r < R; ++r)
            _mm_prefetch((const char*)(pn + (kPrefetchRows + r) * row_bytes + k / 2), _MM_HINT_T0);
        for (int r = 0; r < R; ++r) {
          const __m128i bytes = _mm_loadu_si128((const __m128i*)(pn + r * row_bytes + k / 2));
          const __m256i both = _mm256_broadcastsi128_si256(bytes);
          const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(both, high_half), nibble);
          for (int j = 0; j < MB; ++j)
            pairs[r][j] = _mm256_add_epi16(
                pairs[r][j], _mm256_maddubs_epi16(codes, _mm256_loadu_si256((const __m256i*)(xq + (m + j) * K + k))));
        }
      }
    }
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) narrow[r][j] = _mm256_madd_epi16(pairs[r][j], ones);
  }

#if !defined(BAICHUAN_AVX512)
  // Rows [n, n + R) against activation rows [m, m + MB), R * MB <= 4. Each pair keeps its group sums in an 8-lane
  // fp32 vector (converted, scaled by weight scale x activation scale, added) and its zero-point term in a float,
  // reduced once at the end: a conversion, a broadcast and an FMA a group beside a few scalar operations on its
  // scales, where reducing each group's int32 sums across lanes first (`vphaddd`s, an extract) and the 4-lane fp32
  // work after took about as many instructions as the group's products. The group size is a compile-time constant
  // for 32, 64 and 128, so a group's chunks and prefetches unroll with no branches. Both measured on a Zen 3
  // (ab_kernels, one activation row, 1.29B shapes): the 8-lane sums 5-10% less time, then the unrolling 18-25% less
  // on four shapes (benchmarks/README.md); at 4 and 8 rows 1-7% more time than the lane-reduced sums, which this
  // accepts for batch 1's sake.
  // The fp32 operations are the same in every tile shape, so each activation row gets the same bits in a batch as
  // alone.
  template <int R, int MB>
  void run(int64_t n, int64_t m) const {
    if (G == 128) return run_groups<R, MB, 128>(n, m);
    if (G == 64) return run_groups<R, MB, 64>(n, m);
    if (G == 32) return run_groups<R, MB, 32>(n, m);
    run_groups<R, MB, 0>(n, m);
  }
  template <int R, int MB, int GC>
  void run_groups(int64_t n, int64_t m) const {
    static_assert(R * MB <= 4);
    const uint8_t* pn = packed + n * (K / 2);
    __m256 acc[R][MB];
    float zero_total[R][MB];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) {
        acc[r][j] = _mm256_setzero_ps();
        zero_total[r][j] = 0.0f;
      }
    for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, ++g) {
      const uint16_t* sz = scales_and_zeros + (g * N + n) * 2;
      // 16 rows ahead: the next 64-byte line of this group's scales (a stream of stride N, 4 bytes a row), where
      // kPrefetchRows ahead mostly fell in the line being read (ab_kernels, Zen 3: the lm_head 3% less time)
      _mm_prefetch((const char*)(sz + 2 * 16), _MM_HINT_T0);
      __m256i narrow[R][MB];
      dot_group_bytes<R, MB, GC>(narrow, pn, k0, m);
      for (int r = 0; r < R; ++r) {
        const float scale = bf16_to_float(sz[2 * r]), zero = bf16_to_float(sz[2 * r + 1]);
        for (int j = 0; j < MB; ++j) {
          const int64_t block = (m + j) * groups + g;
          acc[r][j] =
              _mm256_fmadd_ps(_mm256_cvtepi32_ps(narrow[r][j]), _mm256_set1_ps(scale * xs[block]), acc[r][j]);
          zero_total[r][j] = std::fma(zero - 8.0f * scale, xsums[block], zero_total[r][j]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) y.set((m + j) * N + n + r, hsum(acc[r][j]) + zero_total[r][j]);
  }
#else
  template <int R, int MB>
  void run(int64_t n, int64_t m) const {
    const uint8_t* pn = packed + n * (K / 2);
    // Rows ahead that dot_group128 prefetches, into L2: about 16 KB, at least 3 rows (22 of 1536 columns, 8 of
    // 4096). On a Zen 4 (ab_kernels, one activation row, 1.29B shapes) 0.49-0.78 of the time of the 4.5 KB into L1
    // tuned on a Sapphire Rapids-class Xeon, where 16 KB into L2 had streamed about the same (20.0-22.6 GB/s against
    // 19-22; benchmarks/README.md). Computed once here: a distance worked out in the loop cost 2-5%.
    const uint8_t* ahead = pn + std::max<int64_t>(3, (kInt4PrefetchBytes + K / 2 - 1) / (K / 2)) * (K / 2);
    FloatAcc facc[R][MB];
    float zero_terms[R][MB];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) {
        facc[r][j] = acc_zero();
        zero_terms[r][j] = 0.0f;
      }
    for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, ++g) {
      const uint16_t* sz = scales_and_zeros + (g * N + n) * 2;
      // Each group's scales are a stream of their own (stride N rows), K / G of them beside the weights'.
      _mm_prefetch((const char*)(sz + 2 * kPrefetchRows), _MM_HINT_T0);
      IntAcc iacc[R][MB];
      if (G % 128 == 0) {
        for (int r = 0; r < R; ++r)
          for (int j = 0; j < MB; ++j) iacc[r][j] = int_zero();
        dot_group128<R, MB>(iacc, pn, ahead, k0, m);
      } else {
        __m256i narrow[R][MB];
        dot_group_bytes<R, MB, 0>(narrow, pn, k0, m);
        for (int r = 0; r < R; ++r)
          for (int j = 0; j < MB; ++j) iacc[r][j] = widen_acc(narrow[r][j]);
      }
      for (int r = 0; r < R; ++r) {
        const float scale = bf16_to_float(sz[2 * r]), zero = bf16_to_float(sz[2 * r + 1]);
        for (int j = 0; j < MB; ++j) {
          const int64_t block = (m + j) * groups + g;
          facc[r][j] = scale_add(iacc[r][j], scale * xs[block], facc[r][j]);
          zero_terms[r][j] += (zero - 8.0f * scale) * xsums[block];
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) y.set((m + j) * N + n + r, acc_sum(facc[r][j]) + zero_terms[r][j]);
  }
#endif
};

// --- bf16 -------------------------------------------------------------------------------------------------------

#if defined(BAICHUAN_AVX512BF16)
constexpr int64_t kBf16Step = 32;  // bf16 values per vdpbf16ps
// Rows the tile prefetches ahead: at least this many bytes (12 rows of 1536 columns; 4096 columns stay at
// kPrefetchRows). On weights on huge pages, 5-7% less time at one activation row and 8-10% at eight than
// kPrefetchRows on four of the 1.29B shapes, 1-2% on 1536x4096; on 4 KiB pages within 1% but the head's 3% less
// (ab_kernels, Sapphire Rapids-class Xeon; benchmarks/README.md). The widening tile stays at kPrefetchRows: 1-5%
// more time there.
constexpr int64_t kBf16PrefetchBytes = 36 * 1024;

// x (M, K) rounded to bf16 (itself where it is bf16 already), in order.
at::Tensor prepare_bf16_activations(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 ? x : x.to(at::kBFloat16);
}

struct Bf16Tile {
  const uint16_t* w;
  const uint16_t* x;
  Output y;
  int64_t N, K;

  // Weight rows per tile for MB activation rows: 2 accumulators per (weight row, activation row), one vector per
  // activation row and per weight row.
  static constexpr int kPassRows = 8;
  static constexpr int weight_rows(int mb) { return mb <= 2 ? 4 : mb <= 4 ? 2 : 1; }

  template <int R, int MB>
  void run(int64_t n, int64_t m) const {
    const uint16_t* wn = w + n * K;
    // Two accumulators per pair of rows: vdpbf16ps has a latency of several cycles.
    __m512 acc[R][MB][2];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) acc[r][j][0] = acc[r][j][1] = _mm512_setzero_ps();
    const int64_t full = K - K % kBf16Step;
    const uint16_t* ahead = wn + std::max<int64_t>(kPrefetchRows, kBf16PrefetchBytes / (2 * K)) * K;
    int64_t k = 0;
    for (; k + 2 * kBf16Step <= full; k += 2 * kBf16Step) {
      // both lines of the 128 bytes a row takes this step (one of them only: 6-8% slower at 1536 columns), into L2
      // (into L1: 1-3% slower at one row, 6-14% at four; ab_kernels, benchmarks/README.md). A single row, as
      // Bf16StreamTile reads them (or a tile's last rows), is one stream the hardware follows.
      if constexpr (R > 1 || MB > 1)
        for (int r = 0; r < R; ++r) {
          _mm_prefetch((const char*)(ahead + r * K + k), _MM_HINT_T1);
          _mm_prefetch((const char*)(ahead + r * K + k + kBf16Step), _MM_HINT_T1);
        }
      for (int h = 0; h < 2; ++h) {
        __m512bh xv[MB];
        for (int j = 0; j < MB; ++j) xv[j] = (__m512bh)_mm512_loadu_si512((const void*)(x + (m + j) * K + k + 32 * h));
        for (int r = 0; r < R; ++r) {
          const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void*)(wn + r * K + k + 32 * h));
          for (int j = 0; j < MB; ++j) acc[r][j][h] = _mm512_dpbf16_ps(acc[r][j][h], wv, xv[j]);
        }
      }
    }
    if (k < K) {  // up to 63 values left: masked loads read nothing past the row
      for (int h = 0; h < 2 && k < K; ++h, k += kBf16Step) {
        const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
        __m512bh xv[MB];
        for (int j = 0; j < MB; ++j) xv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + (m + j) * K + k);
        for (int r = 0; r < R; ++r) {
          const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, wn + r * K + k);
          for (int j = 0; j < MB; ++j) acc[r][j][h] = _mm512_dpbf16_ps(acc[r][j][h], wv, xv[j]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j)
        y.set((m + j) * N + n + r, _mm512_reduce_add_ps(_mm512_add_ps(acc[r][j][0], acc[r][j][1])));
  }
};

#else
#if defined(BAICHUAN_AVX512)
constexpr int64_t kBf16Step = 32;  // bf16 values per 512-bit load
using Bf16Vec = __m512;
inline __m512 fma_vec(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
inline __m512 zero_vec() { return _mm512_setzero_ps(); }
inline __m512 load_vec(const float* p) { return _mm512_loadu_ps(p); }
inline float sum_vec(__m512 v) { return _mm512_reduce_add_ps(v); }
// The even bf16 of each 32-bit lane as fp32 (a shift), and the odd one (a mask).
inline void widen_pairs(const uint16_t* p, __m512& even, __m512& odd) {
  const __m512i v = _mm512_loadu_si512((const void*)p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
}
#else
constexpr int64_t kBf16Step = 16;  // bf16 values per 256-bit load
using Bf16Vec = __m256;
inline __m256 fma_vec(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline __m256 zero_vec() { return _mm256_setzero_ps(); }
inline __m256 load_vec(const float* p) { return _mm256_loadu_ps(p); }
inline float sum_vec(__m256 v) { return hsum(v); }
inline void widen_pairs(const uint16_t* p, __m256& even, __m256& odd) {
  __m256i v = _mm256_loadu_si256((const __m256i*)p);
  // one load for both: else GCC folds it into each of the two operations
  __asm__("" : "+x"(v));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xFFFF0000u))));
}
#endif

// x (M, K) as fp32 with each whole step of kBf16Step values split into its even-indexed values, then its odd ones
// (the order widen_pairs gives the weights in); the last K % kBf16Step values stay in place.
at::Tensor prepare_bf16_activations(const at::Tensor& input) {
  const at::Tensor x = as_float(input);
  const int64_t M = x.size(0), K = x.size(1), full = K - K % kBf16Step, half = kBf16Step / 2;
  at::Tensor out = at::empty_like(x);
  const float* X = x.data_ptr<float>();
  float* O = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* p = X + m * K;
    float* q = O + m * K;
    for (int64_t k = 0; k < full; k += kBf16Step)
      for (int64_t i = 0; i < half; ++i) {
        q[k + i] = p[k + 2 * i];
        q[k + half + i] = p[k + 2 * i + 1];
      }
    for (int64_t k = full; k < K; ++k) q[k] = p[k];
  }
  return out;
}

struct Bf16Tile {
  const uint16_t* w;
  const float* x;
  Output y;
  int64_t N, K;

  static constexpr int kPassRows = 8;
#if defined(BAICHUAN_AVX512)
  static constexpr int weight_rows(int mb) { return mb == 1 ? 4 : mb == 2 ? 2 : 1; }
  static constexpr int kSweepRows = 8;
#else
  // 16 registers: two weight rows against up to 4 activation rows (10 vector loads per 16 FMAs, where one weight
  // row against 4 loads 9 per 8); 8 rows are two sweeps of 4 over the same two weight rows, the second finding
  // them in L1. bench_kernels, avx2 build on an Emerald Rapids: 4 rows at 3.1-3.3x the rows/s of one row (was
  // 1.9-2.7x); 8 rows unchanged at ~3.5x, bound by the FMAs (8 rows of fp32 FMA per weight).
  static constexpr int weight_rows(int mb) { return mb == 1 ? 4 : 2; }
  static constexpr int kSweepRows = 4;
#endif

  template <int R, int MB>
  void run(int64_t n, int64_t m) const {
    if constexpr (MB > kSweepRows) {
      run<R, kSweepRows>(n, m);
      return run<R, MB - kSweepRows>(n, m + kSweepRows);
    }
    constexpr int64_t half = kBf16Step / 2;
    // Even and odd halves in two accumulators (two independent chains per pair of rows) where there are few pairs;
    // one where there are enough pairs for the FMA units (and too few registers for two each).
    constexpr int H = R * MB >= 6 ? 1 : 2;
    // Few activation rows: x first, then each weight row widened as it is used. More: the weight rows widened
    // first and each x vector loaded as it is used, so x is loaded once a step and no more than ~13 are live.
    constexpr bool weights_first = MB > 2;
    const uint16_t* wn = w + n * K;
    Bf16Vec acc[R][MB][H];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j)
        for (int h = 0; h < H; ++h) acc[r][j][h] = zero_vec();
    const int64_t full = K - K % kBf16Step;
    for (int64_t k = 0; k < full; k += kBf16Step) {
      // Several activation rows: into L2 only (benchmarks/ab_kernels.py, 8 rows, avx2 on an Emerald Rapids: 3-6%
      // faster than into L1, which their fp32 rows fill). A single row, as Bf16StreamTile reads them (or a tile's
      // last rows), is one stream the hardware follows.
      if ((R > 1 || MB > 1) && (k & 31) == 0)
        for (int r = 0; r < R; ++r)
          _mm_prefetch((const char*)(wn + (kPrefetchRows + r) * K + k), MB > 1 ? _MM_HINT_T1 : _MM_HINT_T0);
      if constexpr (weights_first) {
        Bf16Vec even[R], odd[R];
        for (int r = 0; r < R; ++r) widen_pairs(wn + r * K + k, even[r], odd[r]);
        for (int j = 0; j < MB; ++j) {
          // each x vector in a register for all R weight rows: else GCC folds a load into each product, R loads
          // where one will do (ab_kernels, avx2, AMD EPYC family 23: 0.89-0.95 of the time at 8 rows)
          Bf16Vec xe = load_vec(x + (m + j) * K + k);
          if constexpr (R > 1) __asm__("" : "+v"(xe));
          for (int r = 0; r < R; ++r) acc[r][j][0] = fma_vec(even[r], xe, acc[r][j][0]);
          Bf16Vec xo = load_vec(x + (m + j) * K + k + half);
          if constexpr (R > 1) __asm__("" : "+v"(xo));
          for (int r = 0; r < R; ++r) acc[r][j][H - 1] = fma_vec(odd[r], xo, acc[r][j][H - 1]);
        }
      } else {
        Bf16Vec xe[MB], xo[MB];
        for (int j = 0; j < MB; ++j) {
          xe[j] = load_vec(x + (m + j) * K + k);
          xo[j] = load_vec(x + (m + j) * K + k + half);
        }
        for (int r = 0; r < R; ++r) {
          Bf16Vec even, odd;
          widen_pairs(wn + r * K + k, even, odd);
          for (int j = 0; j < MB; ++j) {
            acc[r][j][0] = fma_vec(even, xe[j], acc[r][j][0]);
            acc[r][j][H - 1] = fma_vec(odd, xo[j], acc[r][j][H - 1]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) {
        float total = H == 2 ? sum_vec(acc[r][j][0]) + sum_vec(acc[r][j][H - 1]) : sum_vec(acc[r][j][0]);
        for (int64_t k = full; k < K; ++k) total += bf16_to_float(wn[r * K + k]) * x[(m + j) * K + k];
        y.set((m + j) * N + n + r, total);
      }
  }
};
#endif

// One weight row at a time with no prefetch instructions, for one activation row where `single_stream`: on a
// Zen 4 (ab_kernels, 1.29B shapes, weights on huge pages) 0.73-0.98 of the time of four rows prefetched 36 KB ahead
// (vdpbf16ps), 0.71-0.98 of four rows prefetched kPrefetchRows ahead in the avx2 build's widening tile; on an
// AVX2-only AMD EPYC 1.11-1.26 of the latter, so cpu.py leaves it off there (benchmarks/README.md). The same sums
// in the same order: the same bits.
struct Bf16StreamTile : Bf16Tile {
  static constexpr int weight_rows(int) { return 1; }
};

template <int R, int MB, class Tile>
void run_rows(const Tile& tile, int64_t n0, int64_t n1, int64_t m) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) tile.template run<R, MB>(n, m);
  for (; n < n1; ++n) tile.template run<1, MB>(n, m);
}

// One pass of mb <= MB activation rows over output rows [n0, n1): each weight row is read once for all of them,
// in tiles of the weight rows the tile type picks for mb (fewer as there are more activation rows, so the
// accumulators stay in registers).
template <int MB, class Tile>
void run_pass(const Tile& tile, int64_t n0, int64_t n1, int64_t m, int64_t mb) {
  if constexpr (MB > 1) {
    if (mb < MB) return run_pass<MB - 1>(tile, n0, n1, m, mb);
  }
  run_rows<Tile::weight_rows(MB), MB>(tile, n0, n1, m);
}

// Output rows in parallel chunks; activation rows in passes of up to Tile::kPassRows (batched decoding reads
// each weight once per step). Where M needs more passes, the later ones find the chunk's weights in L2.
template <class Tile>
void run_all(const Tile& tile, int64_t N, int64_t M, int64_t row_bytes) {
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, kChunkRows * row_bytes * M));
  at::parallel_for(0, (N + kChunkRows - 1) / kChunkRows, grain, [&](int64_t c0, int64_t c1) {
    const int64_t n0 = c0 * kChunkRows, n1 = std::min(N, c1 * kChunkRows);
    for (int64_t m = 0; m < M;) {
      const int64_t mb = std::min<int64_t>(M - m, Tile::kPassRows);
      run_pass<Tile::kPassRows>(tile, n0, n1, m, mb);
      m += mb;
    }
  });
}

void check_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  x.is_contiguous() && x.device().is_cpu(),
              "x: contiguous fp32 or bf16 (M, K) on the CPU");
}

// Per-block values of the activation rows (M, blocks) as (blocks, M + 8), zero past row M, where the int8 tiles
// load those of several rows at once; an undefined tensor (no operation dispatched) where no tile reads them.
at::Tensor by_block(const at::Tensor& values) {
  const int64_t M = values.size(0), blocks = values.size(1);
  if (M == 1) return {};
  at::Tensor out = at::zeros({blocks, M + 8}, values.options());
  const float* S = values.data_ptr<float>();
  float* O = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) O[b * (M + 8) + m] = S[m * blocks + b];
  return out;
}

// int16 codes (M, K) in passes of 8 rows (zero past M), each as (K / W, 8, W): `Int8Tile::x_lanes`.
at::Tensor rows_in_lanes(const at::Tensor& codes, int64_t W) {
  const int64_t M = codes.size(0), runs = codes.size(1) / W;
  at::Tensor out = at::zeros({(M + 7) / 8, runs, 8, W}, codes.options());
  const int16_t* in = codes.data_ptr<int16_t>();
  int16_t* o = out.data_ptr<int16_t>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < runs; ++i)
      std::memcpy(o + (((m / 8) * runs + i) * 8 + m % 8) * W, in + (m * runs + i) * W, W * sizeof(int16_t));
  return out;
}

#if !defined(BAICHUAN_AVX512)
// int16 codes of 3 or 4 rows (M, K) as (K / 16, 4, 2, 4, 2), zero past M: for each 16 columns and pair q, the 4 rows'
// columns 2q and 2q + 1, then their columns 8 + 2q and 9 + 2q (`Int8Tile::run_lanes`).
at::Tensor rows_in_halves(const at::Tensor& codes) {
  const int64_t M = codes.size(0), K = codes.size(1);
  at::Tensor out = at::zeros({K / 16, 4, 2, 4, 2}, codes.options());
  const int16_t* in = codes.data_ptr<int16_t>();
  int16_t* o = out.data_ptr<int16_t>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K / 16; ++c)
      for (int64_t q = 0; q < 4; ++q)
        for (int64_t h = 0; h < 2; ++h)
          std::memcpy(o + (((c * 4 + q) * 2 + h) * 4 + m) * 2, in + m * K + c * 16 + h * 8 + 2 * q,
                      2 * sizeof(int16_t));
  return out;
}
#endif

const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  check_activations(x);
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight: contiguous int8 (N, K)");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "weight has ", weight.size(1), " columns, x has ", K);
  const bool grouped = scales.dim() == 2;
  const int64_t B = int8_scales_block(scales, N, K);
#if defined(BAICHUAN_AVX512)
  const bool split = false;
#else
  // 3-4 rows against small groups: `run_lanes`, over codes in order
  const bool halves = grouped && B <= kMaxLaneBlock && (M == 3 || M == 4);
  // not from 5 rows, where the split steps took 1.19-1.24 of the time (ab_kernels, 8 rows; benchmarks/README.md)
  const bool split = B % 32 == 0 && M <= 4 && !halves;
#endif
  const Activations a = quantize_activations(x, B, split);
  auto y = at::empty({M, N}, x.options());
  const at::Tensor xs_by_block = by_block(a.scales);
  const int8_t* w = weight.data_ptr<int8_t>();
  const int16_t* xq = a.codes.data_ptr<int16_t>();
  const float *xs = a.scales.data_ptr<float>(), *xs_by_block_data = data_or_null(xs_by_block);
  if (grouped) {
    const auto* group_scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
#if defined(BAICHUAN_AVX512)
    const at::Tensor x_lanes = B <= kMaxLaneBlock && M >= 5 ? rows_in_lanes(a.codes, 4) : at::Tensor();
#else
    const at::Tensor x_lanes = halves                         ? rows_in_halves(a.codes)
                               : B <= kMaxLaneBlock && M >= 5 ? rows_in_lanes(a.codes, 2)
                                                              : at::Tensor();
#endif
    const int16_t* lanes = x_lanes.defined() ? x_lanes.data_ptr<int16_t>() : nullptr;
    run_all(Int8Tile<true>{w, nullptr, group_scales, xq, xs, xs_by_block_data, lanes, output_of(y), N, K, B, a.blocks,
                           M, split},
            N, M, K);
  } else {
    const Int8Tile<false> tile{w, scales.data_ptr<float>(), nullptr, xq, xs, xs_by_block_data, nullptr, output_of(y),
                               N, K, B, a.blocks, M, split};
#if defined(BAICHUAN_AVX512)
    if (M == 1 && single_stream) {
      run_all(Int8StreamTile{tile}, N, M, K);
      return y;
    }
#endif
    run_all(tile, N, M, K);
  }
  return y;
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                     int64_t group_size) {
  check_activations(x);
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(
      packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.size(1) * 2 == K,
      "packed: contiguous uint8 (N, K/2)");
  TORCH_CHECK(group_size % 32 == 0 && group_size <= kMaxBlock && K % group_size == 0,
              "group size must be a multiple of 32 up to ", kMaxBlock, " dividing K, got ", group_size);
  const int64_t groups = K / group_size;
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.dim() == 3 && scales_and_zeros.size(0) == groups && scales_and_zeros.size(1) == N &&
                  scales_and_zeros.size(2) == 2,
              "scales_and_zeros: contiguous bf16 (K/group_size, N, 2)");
  const Activations a = quantize_activations_int8(x, group_size, kInt4Chunk);
  auto y = at::empty({M, N}, x.options());
  const Int4Tile tile{packed.data_ptr<uint8_t>(),
                      reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<at::BFloat16>()),
                      a.codes.data_ptr<int8_t>(),
                      a.scales.data_ptr<float>(),
                      a.sums.data_ptr<float>(),
                      output_of(y),
                      N,
                      K,
                      group_size,
                      groups,
                      M};
  run_all(tile, N, M, K / 2);
  return y;
}

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& weight) {
  check_activations(x);
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "weight: contiguous bf16 (N, K)");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "weight has ", weight.size(1), " columns, x has ", K);
  const at::Tensor xp = prepare_bf16_activations(x);
  auto y = at::empty({M, N}, x.options());
  const Bf16Tile tile{reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()),
#if defined(BAICHUAN_AVX512BF16)
                      reinterpret_cast<const uint16_t*>(xp.data_ptr<at::BFloat16>()),
#else
                      xp.data_ptr<float>(),
#endif
                      output_of(y), N, K};
  if (M == 1 && single_stream) {
    run_all(Bf16StreamTile{tile}, N, M, 2 * K);
    return y;
  }
  run_all(tile, N, M, 2 * K);
  return y;
}

// The setting before (what the Python loader chose, for its test).
bool set_single_stream(bool on) { return std::exchange(single_stream, on); }

const char* build_target() { return kTarget; }
const char* int4_activations() { return kInt4Activations; }

}  // namespace baichuan_cpu_gemv
