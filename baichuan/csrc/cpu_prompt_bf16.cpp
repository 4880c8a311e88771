// Prompt-sized products of bf16 weights for the avx2 target, where bf16 is not native. torch's own bf16 GEMM runs
// at ~10 GFLOP/s a core there, so `model.Linear` multiplied an fp32 copy of each weight (torch's fp32 GEMM, MKL's):
// a copy written and read again for every product. Here each task widens 128 output columns of the weight, 256
// inputs at a time, into a buffer that stays in L2, and multiplies it by fp32 FMAs in tiles of 6 activation rows x
// 16 columns (12 accumulators, 2 weight vectors and a broadcast: 15 of the 16 registers), the classic register
// tile of AVX2 GEMMs. The products are those of the fp32 GEMM on the widened weight (bf16 widens to fp32
// exactly); only the order of the fp32 additions differs, input after input here.
//
//   out (M, N) = x (M, K) @ weight (N, K).T, x fp32 or bf16 (widened first), out in x's dtype (bf16 rounded to
//   nearest even from the fp32 sums, as torch's .to(torch.bfloat16) rounds).

#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace baichuan_cpu_gemv {
namespace {

constexpr int64_t kTileRows = 6;       // activation rows of a tile
constexpr int64_t kStripCols = 16;     // output columns of a tile: two vectors of 8
constexpr int64_t kChunkInputs = 256;  // inputs widened at a time: a strip's 16 KB stays in L1 for every row
constexpr int64_t kBlockCols = 128;    // output columns a task widens (fewer where that leaves threads idle)

// rows x 16 outputs: c (+)= a (rows, lda) [0, kc) @ strip [kc][16]; the first chunk of inputs stores, the
// others add to what the earlier ones stored.
template <int R>
void tile(const float* a, int64_t lda, const float* strip, float* c, int64_t ldc, int64_t kc, bool first) {
  __m256 acc[2 * R];  // fully unrolled below, so the array lives in registers
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
    acc[2 * i] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc);
    acc[2 * i + 1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc + 8);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_loadu_ps(strip + kStripCols * k), w1 = _mm256_loadu_ps(strip + kStripCols * k + 8);
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) {
      const __m256 x = _mm256_broadcast_ss(a + i * lda + k);
      acc[2 * i] = _mm256_fmadd_ps(x, w0, acc[2 * i]);
      acc[2 * i + 1] = _mm256_fmadd_ps(x, w1, acc[2 * i + 1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
    _mm256_storeu_ps(c + i * ldc, acc[2 * i]);
    _mm256_storeu_ps(c + i * ldc + 8, acc[2 * i + 1]);
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t, bool);
constexpr TileFn kTiles[kTileRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

inline __m256 widen8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// The 8 x 8 transpose of r (r[i] lane j -> r[j] lane i).
inline void transpose8(__m256 (&r)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// 16 weight rows w (stride K), inputs [0, kc) (kc a multiple of 8) -> strip [kc][16] fp32.
void widen_strip(const uint16_t* w, int64_t K, int64_t kc, float* strip) {
  for (int64_t k = 0; k < kc; k += 8) {
    __m256 lo[8], hi[8];
    for (int j = 0; j < 8; ++j) {
      lo[j] = widen8(w + j * K + k);
      hi[j] = widen8(w + (8 + j) * K + k);
    }
    transpose8(lo);
    transpose8(hi);
    for (int i = 0; i < 8; ++i) {
      _mm256_storeu_ps(strip + (k + i) * kStripCols, lo[i]);
      _mm256_storeu_ps(strip + (k + i) * kStripCols + 8, hi[i]);
    }
  }
}

}  // namespace

at::Tensor bf16_matmul(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "bf16_matmul takes x (M, K) and weight (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "bf16_matmul: x must be fp32 or bf16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "bf16_matmul: the weight must be bf16, got ",
              weight.scalar_type());
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "bf16_matmul: x and the weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "bf16_matmul: x has ", K, " inputs, the weight ", weight.size(1));
  TORCH_CHECK(N % kStripCols == 0 && K % 8 == 0, "bf16_matmul: outputs must be a multiple of 16 and inputs of 8, "
              "got N=", N, ", K=", K);
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor out = at::empty({M, N}, xf.options());
  if (M == 0 || N == 0) return out.to(x.scalar_type());
  if (K == 0) return out.zero_().to(x.scalar_type());

  const float* X = xf.data_ptr<float>();
  const uint16_t* W = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  float* Y = out.data_ptr<float>();
  int64_t width = kBlockCols;
  while (width > kStripCols && N / width < 2 * at::get_num_threads()) width /= 2;
  at::parallel_for(0, (N + width - 1) / width, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> block(width * kChunkInputs);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * width, cols = std::min(width, N - n0);
      for (int64_t k0 = 0; k0 < K; k0 += kChunkInputs) {
        const int64_t kc = std::min(kChunkInputs, K - k0);
        for (int64_t s = 0; s < cols; s += kStripCols)
          widen_strip(W + (n0 + s) * K + k0, K, kc, block.data() + s * kChunkInputs);
        for (int64_t m = 0; m < M; m += kTileRows) {
          const TileFn run = kTiles[std::min(kTileRows, M - m)];
          for (int64_t s = 0; s < cols; s += kStripCols)
            run(X + m * K + k0, K, block.data() + s * kChunkInputs, Y + m * N + n0 + s, N, kc, k0 == 0);
        }
      }
    }
  });
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace baichuan_cpu_gemv
