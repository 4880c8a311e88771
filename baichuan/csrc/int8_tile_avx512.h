// The AVX-512 builds' int8 decode tile (int8_tile.h includes it after the operands it reads).

#pragma once

namespace baichuan_cpu_gemv {

// kGroupScales: a compile-time choice, as a test per block cost the per-row kernel 6-15% on a Zen 3 (ab_kernels).
template <bool kGroupScales>
struct Int8Tile : Int8Operands {
  // Weight rows per tile for MB activation rows: an int32 accumulator per (weight row, activation row), up to the 16
  // lanes `lane_sums` gathers them into, plus a vector per weight row, within the 32 registers.
  static constexpr int kPassRows = 8;
  static constexpr int weight_rows(int mb) { return mb <= 4 ? 4 : 2; }

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
    set_tile<R, MB>(sums, n, m);
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
};

// One weight row at a time, unprefetched, for one activation row of int8 with a scale a row where `single_stream`:
// on a Zen 4 (ab_kernels, 1.29B shapes, huge pages) 0.87-1.00 of the time of four rows prefetched 6 rows ahead in
// three runs (a first had 0.78-1.05, and 1.77 on 1536x1536); with groups of 32 (the head) 1.12, so those keep four
// (benchmarks/README.md). The same bits: the tiles' last rows already ran this way.
struct Int8StreamTile : Int8Tile<false> {
  static constexpr int weight_rows(int) { return 1; }
};

}  // namespace baichuan_cpu_gemv
