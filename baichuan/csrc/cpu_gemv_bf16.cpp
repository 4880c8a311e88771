// bf16 weights against the few activation rows of decoding (gemv.h: the builds and what the formats share):
//   y[m, n] = sum_k w[n, k] x[m, k]; w bf16 (N, K).
//
// Without AVX512-BF16 each 32-bit lane of loaded weights holds two bf16, so the even one becomes an fp32 by
// a shift and the odd one by a mask, with no shuffle; x is reordered once per call to match (evens, then odds).

#include "gemv.h"

namespace baichuan_cpu_gemv {

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

}  // namespace baichuan_cpu_gemv
