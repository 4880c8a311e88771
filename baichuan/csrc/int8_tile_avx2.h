// The avx2 build's int8 decode tile (int8_tile.h includes it after the operands it reads).

#pragma once

namespace baichuan_cpu_gemv {

// kGroupScales: a compile-time choice, as a test per block cost the per-row kernel 6-15% on a Zen 3 (ab_kernels).
template <bool kGroupScales>
struct Int8Tile : Int8Operands {
  // Weight rows per tile for MB activation rows: an int32 accumulator per (weight row, activation row) plus a vector
  // per weight row, within the 16 registers.
  static constexpr int kPassRows = 8;
  // One activation row: one weight row at a time. On a Zen 3 (ab_kernels, one row, 1.29B shapes) that took 17-34%
  // less time than four rows side by side on four of five shapes, 1-4% less on 1536x4096: four streams at once per
  // core read memory worse than one (and the prefetch kPrefetchRows ahead), however few instructions each takes.
  // Group scales at 3-4 rows (`run_lanes`): two, each activation vector loaded once for both; at 5+ (`run_pairs`):
  // four, an accumulator and a broadcast each beside the activation vector they share.
  static constexpr int weight_rows(int mb) { return mb == 1 ? 1 : mb == 2 ? 2 : !kGroupScales ? 1 : mb >= 5 ? 4 : 2; }

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
      if (x_lanes) return run_pairs<R, MB>(n, m);
      for (int r = 0; r < R; ++r) run_steps<1, MB, false>(n + r, m);  // groups past kMaxLaneBlock
    } else if constexpr (kGroupScales && MB >= 3) {
      if (x_lanes && M <= 4) return run_lanes<R, MB>(n, m);
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
      else if constexpr (MB == kPassRows)
        run_full_pass<R>(n, m);
      else
        run_steps<R, MB, false>(n, m);
    }
  }

  // The 8-row pass (the one that reads interleaved codes) in a function of its own: 5-7-row passes reading them,
  // inlined into `run_all`, had their accumulators kept on the stack by GCC (objdump).
  template <int R>
  [[gnu::noinline]] void run_full_pass(int64_t n, int64_t m) const {
    run_steps<R, kPassRows, false>(n, m);
  }

  // Small groups (an 8-bit head's 32 columns) against 3 or 4 activation rows, as AVX-512's `run_quads`: the lanes
  // of one accumulator are the activation rows, so a block ends in one conversion and one multiply-add a weight row
  // where `lane_sums` took eight horizontal additions and two lane permutations a block. Lanes j and j + 4 are row
  // j's, the low and the high 8 of each 16 columns, so one `vpmovsxbw` of 16 weights serves all 8 lanes (`vpshufd`
  // picks pair q of each half) against the codes laid out to match (`rows_in_halves`), and a block first adds the
  // two halves. The 1.29B head (125696x1536, groups of 32) at 4 rows took 0.72 of the time of the tiles of one weight
  // row (ab_kernels, AVX2-only EPYC; benchmarks/README.md). The same exact int32 block sums and multiply-adds as the
  // other tiles: the same bits.
  template <int R, int MB>
  void run_lanes(int64_t n, int64_t m) const {
    constexpr int64_t kStepCols = 16;  // weights of a row a step: four pairs a lane
    const int8_t* wn = w + n * K;
    __m128 total[R];  // lane j: row m + j's sum (0.94-0.96 of the time of 256 bits at 4 rows, ab_kernels)
    for (int r = 0; r < R; ++r) total[r] = _mm_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      __m256i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
      for (int64_t k = b * B; k < (b + 1) * B; k += kStepCols) {
        if ((k & 63) == 0)
          for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(wn + (kPrefetchRows + r) * K + k), _MM_HINT_T0);
        __m256i wide[R];  // each 128-bit half: 8 weights of the row as int16
        for (int r = 0; r < R; ++r) wide[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wn + r * K + k)));
        const auto pair = [&](auto q_constant) {
          constexpr int q = decltype(q_constant)::value;
          __m256i xv = _mm256_loadu_si256((const __m256i*)(x_lanes + (k + 4 * q) * 4));
          if constexpr (R > 1) __asm__("" : "+x"(xv));  // one load for all R rows
          for (int r = 0; r < R; ++r) acc[r] = add_pair_sums(acc[r], _mm256_shuffle_epi32(wide[r], q * 0x55), xv);
        };
        pair(std::integral_constant<int, 0>{});
        pair(std::integral_constant<int, 1>{});
        pair(std::integral_constant<int, 2>{});
        pair(std::integral_constant<int, 3>{});
      }
      const float* sx = xs_by_block + b * (M + 8) + m;  // row m + j's block scale at j
      for (int r = 0; r < R; ++r) {
        const float ws = bf16_to_float(group_scales[(n + r) * blocks + b]);
        const __m128i sums = _mm_add_epi32(_mm256_castsi256_si128(acc[r]), _mm256_extracti128_si256(acc[r], 1));
        total[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(sums), _mm_mul_ps(_mm_loadu_ps(sx), _mm_set1_ps(ws)), total[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      alignas(16) float sums[4];
      _mm_store_ps(sums, total[r]);
      for (int j = 0; j < MB; ++j) y.set((m + j) * N + n + r, sums[j]);
    }
  }

  // Small groups against 5 to 8 activation rows, the lanes of each accumulator the activation rows as in
  // `run_lanes`, the codes of each pass laid out in pairs (`rows_in_lanes`: a vector holds the 8 rows' two columns
  // that one pair of weights multiplies). Each block of the R weight rows is first widened to int16 on the stack,
  // so that a pair of weights reaches all 8 lanes by a broadcast from memory (a load), where a shuffle of a widened
  // vector had taken one of the three vector ports a product (ab_kernels, the head at 8 rows: 0.85-0.95 of the
  // time, benchmarks/README.md). The same exact int32 block sums and multiply-adds: the same bits.
  template <int R, int MB>
  void run_pairs(int64_t n, int64_t m) const {
    const int8_t* wn = w + n * K;
    const int16_t* xt = x_lanes + (m / kPassRows) * K * kPassRows;  // (K / 2, 8, 2)
    alignas(32) int16_t wide[R][kMaxLaneBlock];
    __m256 total[R];  // lane j: row m + j's sum
    for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k0 = b * B;
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(wn + (kPrefetchRows + r) * K + k0), _MM_HINT_T0);
      for (int r = 0; r < R; ++r)
        for (int64_t k = 0; k < B; k += 16)
          _mm256_store_si256((__m256i*)(wide[r] + k),
                             _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wn + r * K + k0 + k))));
      __m256i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
      const int16_t* xb = xt + k0 * kPassRows;
      // B a run-time bound: unrolled for B = 32 or 64 at compile time it took 1.00-1.02 of the time, this 0.85-0.88
      for (int64_t k = 0; k < B; k += 2) {
        __m256i xv = _mm256_loadu_si256((const __m256i*)(xb + k * kPassRows));
        __asm__("" : "+x"(xv));  // one load for all R rows
        for (int r = 0; r < R; ++r) {
          int32_t pair;
          std::memcpy(&pair, wide[r] + k, sizeof(pair));
          acc[r] = add_pair_sums(acc[r], _mm256_set1_epi32(pair), xv);
          __asm__("" : "+x"(acc[r]));
        }
      }
      const float* sx = xs_by_block + b * (M + 8) + m;  // row m + j's block scale at j
      for (int r = 0; r < R; ++r) {
        const __m256 ws = _mm256_set1_ps(bf16_to_float(group_scales[(n + r) * blocks + b]));
        total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_mul_ps(_mm256_loadu_ps(sx), ws), total[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      alignas(32) float sums[8];
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

  // acc plus the pair sums of kStep products: the widened weights against the codes from xr. The split steps (1-4
  // activation rows, bound by memory) keep `vpmaddwd` and adds even with AVX-VNNI: two `vpdpwssd` a step would
  // chain on the accumulator (ab_kernels, avx2vnni at one row: 1.03-1.08 of the time, this 1.00-1.04).
  template <bool kSplit>
  static __m256i dot(__m256i acc, const __m256i (&wv)[kSplit ? 2 : 1], const int16_t* xr) {
    if constexpr (!kSplit) return add_pair_sums(acc, wv[0], _mm256_loadu_si256((const __m256i*)xr));
    const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(wv[0], _mm256_loadu_si256((const __m256i*)xr)),
                                       _mm256_madd_epi16(wv[1], _mm256_loadu_si256((const __m256i*)(xr + 16))));
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
    // A scale a row, a whole pass: the codes interleaved by 16 columns (`x_lanes`), so that every product reads
    // base + constant. Row by row, each product's load took an index register, which costs the 3-operand
    // `vpmaddwd` an extra micro-op (ab_kernels at 8 rows: 0.84-1.05 of the time, below 1 on four of five shapes;
    // benchmarks/README.md).
    constexpr bool kInterleaved = !kGroupScales && !kSplit && MB == kPassRows;
    const int16_t* xi = kInterleaved ? x_lanes + (m / kPassRows) * K * kPassRows : nullptr;
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
          for (int j = 0; j < MB; ++j)
            iacc[r * MB + j] = dot<kSplit>(iacc[r * MB + j], wv, kInterleaved ? xi + k * MB + j * 16 : x0 + j * K + k);
        }
        // each accumulator kept in its register: else GCC adds into a fresh one and copies it back, a move per
        // product (objdump: 8 of a step's 30 instructions at 8 rows). Not at 4 rows, where it cost 1-8%
        // (ab_kernels, benchmarks/README.md)
        if constexpr (R * MB >= 5)
          for (int i = 0; i < R * MB; ++i) __asm__("" : "+x"(iacc[i]));
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
    set_tile<R, MB>(sums, n, m);
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
};

}  // namespace baichuan_cpu_gemv
