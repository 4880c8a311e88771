// int4 weights against the few activation rows of decoding (gemv.h: the builds and what the formats share;
// cpu_gemv.cpp: the activations' int8 codes):
//   w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n], g = k / G; q packed two per byte, column 2j in the low nibble
//   and 2j+1 in the high one (N, K/2); scale and zero bf16 side by side in (K/G, N, 2).

#include "gemv.h"

namespace baichuan_cpu_gemv {

// The chunk of values whose even columns' codes come before its odd ones' (the bytes the int4 kernel unpacks at a
// time, twice over: 64 bytes with AVX-512, 32 with AVX2).
#if defined(BAICHUAN_AVX512)
constexpr int64_t kInt4Chunk = 128;
constexpr int64_t kInt4PrefetchBytes = 16384;  // how far ahead the AVX-512 int4 tile prefetches (Int4Tile::run)
#else
constexpr int64_t kInt4Chunk = 64;
#endif

struct Int4Tile {
  const uint8_t* packed;
  const uint16_t* scales_and_zeros;
  const int8_t* xq;  // int8 codes (`int4_activations`)
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
          acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(narrow[r][j]), _mm256_set1_ps(scale * xs[block]), acc[r][j]);
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

}  // namespace baichuan_cpu_gemv
