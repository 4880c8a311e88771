// int8 weights against the few activation rows of decoding (gemv.h: the builds and what the formats share;
// cpu_gemv.cpp: the activations' int16 codes):
//   y[m, n] = scales[n] * sum_k w[n, k] x[m, k]; w int8 (N, K) row-major. Or with a scale per group of G columns (an
//   output head, as llama.cpp's Q8_0): y[m, n] = sum_g scales[n, g] sum_{k in g} w[n, k] x[m, k], scales bf16
//   (N, K/G), and the activations' block is G.

#include "gemv.h"

namespace baichuan_cpu_gemv {

// The largest group of int8 scales for which 3 (AVX2) or 5 (AVX-512) to 8 activation rows go in the lanes of one
// accumulator (Int8Tile::run_lanes, run_quads): past it, the other tiles' reduction at each block's end costs less.
constexpr int64_t kMaxLaneBlock = 64;

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

}  // namespace baichuan_cpu_gemv
