// Weight-only int8 and int4 matrix products for AVX2 CPUs, for the few activation rows of decoding (and up to
// a short prompt). Built on first use by baichuan/cpu_gemv.py.
//
//   int8: y[m, n] = scales[n] * sum_k w[n, k] x[m, k]; w int8 (N, K) row-major.
//   int4: w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n], g = k / G; q packed two per byte, column 2j in the
//         low nibble and 2j+1 in the high one (N, K/2); scale and zero bf16 side by side in (K/G, N, 2).
//
// Activations are quantized to int16 per block of B values (scale = block absmax / 32767, relative error
// ~1.5e-5), so each pair of products is one `vpmaddwd` on weights widened to int16, summed in int32 within a
// block and in fp32 across blocks: about 3 instructions per 16 int8 weights, against 3 per 8 for widening to
// fp32 and FMA, so decoding comes much closer to the memory's rate. For int4 the block is the group, and the
// zero points come in through the block sums of x.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>

namespace {

constexpr int64_t kMaxBlock = 256;  // int32 safety: 256/16 vpmaddwd sums of 2 * 32767 * 128 per lane < 2^31
constexpr int64_t kPrefetchRows = 16;
constexpr int64_t kChunkRows = 64;  // rows per parallel work item: whole tiles for every R

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

int64_t int8_block(int64_t K) {
  for (int64_t b = kMaxBlock; b >= 16; b /= 2)
    if (K % b == 0) return b;
  return 0;
}

// Quantized activation rows: int16 codes (M, K), and per block of B: the scale and scale * sum(codes).
struct Activations {
  torch::Tensor codes, scales, sums;
  int64_t blocks;  // per row
};

// lanes > 1: within each 16 * lanes values, position lanes * i + r moves to 16 * r + i, the order in which the
// int4 kernel unpacks nibbles (2: low/high nibble of each byte; 4: the four nibbles of each 16-bit lane).
Activations quantize_activations(const torch::Tensor& x, int64_t B, int lanes) {
  const int64_t M = x.size(0), K = x.size(1), nb = K / B;
  Activations a{torch::empty({M, K}, x.options().dtype(torch::kShort)), torch::empty({M, nb}, x.options()),
                torch::empty({M, nb}, x.options()), nb};
  const float* X = x.data_ptr<float>();
  int16_t* Q = a.codes.data_ptr<int16_t>();
  float* S = a.scales.data_ptr<float>();
  float* T = a.sums.data_ptr<float>();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int16_t order[64];
  for (int64_t i = 0; i < M * nb; ++i) {
    const float* p = X + i * B;  // rows are contiguous, so block i of the whole tensor is row i / nb's
    int16_t* q = Q + i * B;
    __m256 amax = _mm256_setzero_ps();
    for (int64_t k = 0; k < B; k += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(p + k)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float mx = _mm_cvtss_f32(h);
    for (int64_t k = 0; k < B; ++k)  // max_ps drops NaN; the output must not
      if (std::isnan(p[k])) mx = NAN;
    if (!std::isfinite(mx)) {  // inf or NaN in the block: NaN out (a float matmul gives inf or NaN)
      std::memset(q, 0, B * sizeof(int16_t));
      S[i] = T[i] = NAN;
      continue;
    }
    const __m256 inv = _mm256_set1_ps(mx > 0 ? 32767.0f / mx : 0.0f);
    __m256i total = _mm256_setzero_si256();
    for (int64_t k = 0; k < B; k += 16) {
      const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + k), inv));
      const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + k + 8), inv));
      total = _mm256_add_epi32(total, _mm256_add_epi32(lo, hi));
      // packs works per 128-bit lane; the permute restores the order of k.
      _mm256_storeu_si256((__m256i*)(q + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
    }
    if (lanes > 1)
      for (int64_t k = 0; k < B; k += 16 * lanes) {
        std::memcpy(order, q + k, 16 * lanes * sizeof(int16_t));
        for (int r = 0; r < lanes; ++r)
          for (int i = 0; i < 16; ++i) q[k + 16 * r + i] = order[lanes * i + r];
      }
    S[i] = mx / 32767.0f;
    T[i] = S[i] * float(hsum(total));
  }
  return a;
}

struct Int8Tile {
  const int8_t* w;
  const float* scales;
  const int16_t* xq;
  const float* xs;
  float* y;
  int64_t N, K, B, blocks;

  // Rows [n, n + R) against activation rows [m, m + MB): each weight vector is widened once for all MB.
  template <int R, int MB>
  void run(int64_t n, int64_t m) const {
    const int8_t* wn = w + n * K;
    __m256 facc[R][MB];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) facc[r][j] = _mm256_setzero_ps();
    for (int64_t k0 = 0, b = 0; k0 < K; k0 += B, ++b) {
      __m256i iacc[R][MB];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < MB; ++j) iacc[r][j] = _mm256_setzero_si256();
      for (int64_t k = k0; k < k0 + B; k += 16) {
        if ((k & 63) == 0)
          for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(wn + (kPrefetchRows + r) * K + k), _MM_HINT_T0);
        __m256i xv[MB];
        for (int j = 0; j < MB; ++j) xv[j] = _mm256_loadu_si256((const __m256i*)(xq + (m + j) * K + k));
        for (int r = 0; r < R; ++r) {
          const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wn + r * K + k)));
          for (int j = 0; j < MB; ++j) iacc[r][j] = _mm256_add_epi32(iacc[r][j], _mm256_madd_epi16(wv, xv[j]));
        }
      }
      for (int j = 0; j < MB; ++j) {
        const __m256 s = _mm256_set1_ps(xs[(m + j) * blocks + b]);
        for (int r = 0; r < R; ++r) facc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r][j]), s, facc[r][j]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) y[(m + j) * N + n + r] = hsum(facc[r][j]) * scales[n + r];
  }
};

struct Int4Tile {
  const uint8_t* packed;
  const uint16_t* scales_and_zeros;
  const int16_t* xq;
  const float* xs;
  const float* xsums;
  float* y;
  int64_t N, K, G, groups;

  // Groups of 64 and more: each 16-bit lane of 32 bytes holds four nibbles, unpacked by masks and shifts alone.
  template <int R, int MB>
  void dot_group64(__m256i (&iacc)[R][MB], const uint8_t* pn, int64_t k0, int64_t m) const {
    const int64_t row_bytes = K / 2;
    const __m256i nibble = _mm256_set1_epi16(0x000F);
    for (int64_t k = k0; k < k0 + G; k += 64) {
      if ((k & 127) == 0)
        for (int r = 0; r < R; ++r)
          _mm_prefetch((const char*)(pn + (kPrefetchRows + r) * row_bytes + k / 2), _MM_HINT_T0);
      __m256i xv[MB][4];
      for (int j = 0; j < MB; ++j)
        for (int t = 0; t < 4; ++t) xv[j][t] = _mm256_loadu_si256((const __m256i*)(xq + (m + j) * K + k + 16 * t));
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(pn + r * row_bytes + k / 2));
        const __m256i q0 = _mm256_and_si256(v, nibble);
        const __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(v, 8), nibble);
        const __m256i q3 = _mm256_srli_epi16(v, 12);
        for (int j = 0; j < MB; ++j) {
          const __m256i s01 = _mm256_add_epi32(_mm256_madd_epi16(q0, xv[j][0]), _mm256_madd_epi16(q1, xv[j][1]));
          const __m256i s23 = _mm256_add_epi32(_mm256_madd_epi16(q2, xv[j][2]), _mm256_madd_epi16(q3, xv[j][3]));
          iacc[r][j] = _mm256_add_epi32(iacc[r][j], _mm256_add_epi32(s01, s23));
        }
      }
    }
  }

  // Groups of 32: 16 bytes at a time, low and high nibbles widened to 16 bits.
  template <int R, int MB>
  void dot_group32(__m256i (&iacc)[R][MB], const uint8_t* pn, int64_t k0, int64_t m) const {
    const int64_t row_bytes = K / 2;
    const __m128i nibble = _mm_set1_epi8(0x0F);
    for (int64_t k = k0; k < k0 + G; k += 32) {
      if ((k & 127) == 0)
        for (int r = 0; r < R; ++r)
          _mm_prefetch((const char*)(pn + (kPrefetchRows + r) * row_bytes + k / 2), _MM_HINT_T0);
      __m256i even[MB], odd[MB];
      for (int j = 0; j < MB; ++j) {
        even[j] = _mm256_loadu_si256((const __m256i*)(xq + (m + j) * K + k));
        odd[j] = _mm256_loadu_si256((const __m256i*)(xq + (m + j) * K + k + 16));
      }
      for (int r = 0; r < R; ++r) {
        const __m128i bytes = _mm_loadu_si128((const __m128i*)(pn + r * row_bytes + k / 2));
        const __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, nibble));
        const __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
        for (int j = 0; j < MB; ++j)
          iacc[r][j] = _mm256_add_epi32(
              iacc[r][j], _mm256_add_epi32(_mm256_madd_epi16(lo, even[j]), _mm256_madd_epi16(hi, odd[j])));
      }
    }
  }

  template <int R, int MB>
  void run(int64_t n, int64_t m) const {
    const uint8_t* pn = packed + n * (K / 2);
    __m256 facc[R][MB];
    float zero_terms[R][MB];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) {
        facc[r][j] = _mm256_setzero_ps();
        zero_terms[r][j] = 0.0f;
      }
    for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, ++g) {
      __m256i iacc[R][MB];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < MB; ++j) iacc[r][j] = _mm256_setzero_si256();
      if (G % 64 == 0)
        dot_group64<R, MB>(iacc, pn, k0, m);
      else
        dot_group32<R, MB>(iacc, pn, k0, m);
      const uint16_t* sz = scales_and_zeros + (g * N + n) * 2;
      for (int r = 0; r < R; ++r) {
        const float scale = bf16_to_float(sz[2 * r]), zero = bf16_to_float(sz[2 * r + 1]);
        for (int j = 0; j < MB; ++j) {
          const int64_t block = (m + j) * groups + g;
          facc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r][j]), _mm256_set1_ps(scale * xs[block]), facc[r][j]);
          zero_terms[r][j] += (zero - 8.0f * scale) * xsums[block];
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) y[(m + j) * N + n + r] = hsum(facc[r][j]) + zero_terms[r][j];
  }
};

template <int R, int MB, class Tile>
void run_rows(const Tile& tile, int64_t n0, int64_t n1, int64_t m) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) tile.template run<R, MB>(n, m);
  for (; n < n1; ++n) tile.template run<1, MB>(n, m);
}

// Rows in parallel chunks; activation rows 4 at a time (fewer weight rows per tile as there are more activation
// rows, so the int32 accumulators stay in registers).
template <class Tile>
void run_all(const Tile& tile, int64_t N, int64_t M) {
  at::parallel_for(0, (N + kChunkRows - 1) / kChunkRows, 1, [&](int64_t c0, int64_t c1) {
    const int64_t n0 = c0 * kChunkRows, n1 = std::min(N, c1 * kChunkRows);
    for (int64_t m = 0; m < M;) {
      switch (std::min<int64_t>(M - m, 4)) {
        case 4: run_rows<1, 4>(tile, n0, n1, m); m += 4; break;
        case 3: run_rows<1, 3>(tile, n0, n1, m); m += 3; break;
        case 2: run_rows<2, 2>(tile, n0, n1, m); m += 2; break;
        default: run_rows<4, 1>(tile, n0, n1, m); m += 1; break;
      }
    }
  });
}

void check_activations(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x: contiguous fp32 (M, K) on the CPU");
}

}  // namespace

torch::Tensor int8_gemv(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales) {
  check_activations(x);
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kChar && weight.is_contiguous(),
              "weight: contiguous int8 (N, K)");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "weight has ", weight.size(1), " columns, x has ", K);
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.numel() == N && scales.is_contiguous(),
              "scales: contiguous fp32 (N,)");
  const int64_t B = int8_block(K);
  TORCH_CHECK(B > 0, "K must be a multiple of 16, got ", K);
  const Activations a = quantize_activations(x, B, 1);
  auto y = torch::empty({M, N}, x.options());
  const Int8Tile tile{weight.data_ptr<int8_t>(), scales.data_ptr<float>(), a.codes.data_ptr<int16_t>(),
                      a.scales.data_ptr<float>(), y.data_ptr<float>(), N, K, B, a.blocks};
  run_all(tile, N, M);
  return y;
}

torch::Tensor int4_gemv(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales_and_zeros,
                        int64_t group_size) {
  check_activations(x);
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kByte && packed.is_contiguous() &&
                  packed.size(1) * 2 == K,
              "packed: contiguous uint8 (N, K/2)");
  TORCH_CHECK(group_size % 32 == 0 && group_size <= kMaxBlock && K % group_size == 0,
              "group size must be a multiple of 32 up to ", kMaxBlock, " dividing K, got ", group_size);
  const int64_t groups = K / group_size;
  TORCH_CHECK(scales_and_zeros.scalar_type() == torch::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.dim() == 3 && scales_and_zeros.size(0) == groups &&
                  scales_and_zeros.size(1) == N && scales_and_zeros.size(2) == 2,
              "scales_and_zeros: contiguous bf16 (K/group_size, N, 2)");
  const Activations a = quantize_activations(x, group_size, group_size % 64 == 0 ? 4 : 2);
  auto y = torch::empty({M, N}, x.options());
  const Int4Tile tile{packed.data_ptr<uint8_t>(),
                      reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<at::BFloat16>()),
                      a.codes.data_ptr<int16_t>(),
                      a.scales.data_ptr<float>(),
                      a.sums.data_ptr<float>(),
                      y.data_ptr<float>(),
                      N,
                      K,
                      group_size,
                      groups};
  run_all(tile, N, M);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_gemv", &int8_gemv, "(x @ weight.T) * scales, int8 weight (N, K), fp32 x (M, K)");
  m.def("int4_gemv", &int4_gemv, "x @ w.T for group-wise int4 w, packed (N, K/2), fp32 x (M, K)");
}
