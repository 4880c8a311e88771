// The shared parts of our weight-only mat-vec kernels for the few activation rows of decoding (and up to a short
// prompt), one source a weight format: cpu_gemv_int8.cpp, cpu_gemv_int4.cpp, cpu_gemv_bf16.cpp, with the activation
// quantization and the build's facts in cpu_gemv.cpp. Built on first use by baichuan/cpu_gemv.py, once per
// instruction set: the same sources compile to
//
//   avx2        AVX2 + FMA: 256-bit vectors, `vpmaddwd` for int8, `vpmaddubsw` for int4, bf16 widened to fp32 for
//               FMA;
//   avx2vnni    the above + AVX-VNNI (Alder Lake and later Intel cores without AVX-512, Sapphire Rapids, Zen 5):
//               int8's `vpmaddwd` and add in one `vpdpwssd` (`add_pair_sums`);
//   avx512      AVX-512 F/BW/VL/DQ + VNNI: 512-bit vectors, `vpdpwssd` for int8 (multiply pairs of int16 and
//               accumulate in int32, one instruction where AVX2 needs two), `vpdpbusd` for int4 (quads of bytes);
//   avx512bf16  the above + AVX512-BF16: `vdpbf16ps` for the bf16 product; and where the CPU has AMX-BF16,
//               short bf16 prompts on its tiles (cpu_prompt_amx.cpp, checked at run time), and where it has
//               AMX-INT8, int8 batches of 5 to 16 rows (cpu_amx_int8.cpp).
//
// The loader picks the build from the CPU's features and names each after its target, so a build never runs on
// a CPU without its instructions.
//
// All kernels split output rows over torch's own thread pool (at::parallel_for), so they never add threads to it.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
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
#elif defined(__AVXVNNI__)
#define BAICHUAN_AVXVNNI 1
#endif

namespace baichuan_cpu_gemv {

constexpr int64_t kMaxBlock = 256;  // int32 safety: 256/16 vpmaddwd sums of 2 * 32767 * 128 per lane < 2^31
// Weight rows ahead that each tile prefetches: 16, then 8, now 6, each measured faster at one activation row on the
// 1.29B shapes (benchmarks/ab_kernels.py; benchmarks/README.md has the figures).
constexpr int64_t kPrefetchRows = 6;
// One activation row: one weight row at a time and no prefetch instructions (Bf16StreamTile, Int8StreamTile, the
// avx2 int8 tile's single row), where the CPU's own prefetcher follows a single stream a thread well (set by
// `set_single_stream`, cpu.py decides). The bf16 tiles and those of int8 with a scale a row; int4 ignores it.
inline bool single_stream = false;
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

// acc plus the sums of adjacent pairs of int16 products of a and b, in int32: one `vpdpwssd` where the build has
// AVX-VNNI, else `vpmaddwd` and an add, which on AVX2 bound the int8 tiles of several activation rows (three vector
// ports, benchmarks/README.md). Exact in int32 either way: the same bits.
inline __m256i add_pair_sums(__m256i acc, __m256i a, __m256i b) {
#if defined(BAICHUAN_AVXVNNI)
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
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

// Quantized activation rows: codes (M, K), int16 for int8 weights and int8 for int4 ones, and per block of B the
// scale (and, for int4 weights, scale * sum(codes)).
struct Activations {
  at::Tensor codes, scales, sums;  // sums: for int4 weights' zero points only
  int64_t blocks;                  // per row
};

// cpu_gemv.cpp: the activation rows quantized for the int8 and int4 tiles, and the int8 weights' block.
int64_t int8_block(int64_t K);
Activations quantize_activations(const at::Tensor& input, int64_t B, bool split = false);
Activations quantize_activations_int8(const at::Tensor& input, int64_t G, int64_t chunk);

// x (M, K) as contiguous fp32: itself, or a widened copy of bf16 rows.
inline at::Tensor as_float(const at::Tensor& x) { return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat); }

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

inline Output output_of(at::Tensor& y) {
  if (y.scalar_type() == at::kFloat) return {y.data_ptr<float>(), nullptr};
  return {nullptr, y.data_ptr<at::BFloat16>()};
}

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

// Chunks [c0, c1) of output rows; activation rows in passes of up to Tile::kPassRows (batched decoding reads each
// weight once per step). Where M needs more passes, the later ones find the chunks' weights in L2.
template <class Tile>
void run_chunks(const Tile& tile, int64_t N, int64_t M, int64_t c0, int64_t c1) {
  const int64_t n0 = c0 * kChunkRows, n1 = std::min(N, c1 * kChunkRows);
  for (int64_t m = 0; m < M;) {
    const int64_t mb = std::min<int64_t>(M - m, Tile::kPassRows);
    run_pass<Tile::kPassRows>(tile, n0, n1, m, mb);
    m += mb;
  }
}

// Activation rows from which the threads claim chunks as they go, rather than one contiguous share each: the
// products are then bound by arithmetic, and a vCPU of a shared VM that runs slower for a while holds the others
// back (ab_kernels at 8 rows, avx2: 0.77-1.00 of the time; at one row, bound by memory, within noise).
constexpr int64_t kClaimedChunksMinRows = 5;

// Output rows in parallel chunks of kChunkRows.
template <class Tile>
void run_all(const Tile& tile, int64_t N, int64_t M, int64_t row_bytes) {
  const int64_t chunks = (N + kChunkRows - 1) / kChunkRows;
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, kChunkRows * row_bytes * M));
  const int64_t threads = at::get_num_threads();
  if (M < kClaimedChunksMinRows || threads < 2 || grain > 1 || chunks < 4 * threads) {
    at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) { run_chunks(tile, N, M, c0, c1); });
    return;
  }
  // guided: each claim a share of the chunks left, so claims shrink toward the end and the threads finish together
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t take = std::max<int64_t>(1, (chunks - next.load(std::memory_order_relaxed)) / (2 * threads));
      const int64_t c0 = next.fetch_add(take, std::memory_order_relaxed);
      if (c0 >= chunks) break;
      run_chunks(tile, N, M, c0, std::min(chunks, c0 + take));
    }
  });
}

inline void check_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  x.is_contiguous() && x.device().is_cpu(),
              "x: contiguous fp32 or bf16 (M, K) on the CPU");
}

}  // namespace baichuan_cpu_gemv
