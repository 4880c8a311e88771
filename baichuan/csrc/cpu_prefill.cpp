// Prompt-sized (prefill) products of the int8/int4 layers: past `cpu_gemv.MAX_ROWS` activation rows the weight is
// dequantized into a buffer in the compute dtype (bf16 where the activations are bf16 and the CPU multiplies bf16
// natively, fp32 otherwise), up to `PREFILL_TILE_BYTES` of output rows at a time (a whole layer but a large
// vocabulary's head), and each such tile is one call of torch's (oneDNN's) GEMM (`baichuan/quant/kernels.py`,
// `prefill_matmul`; the avx2 build's int8 prompts take cpu_prompt_int8.cpp instead). A prompt reuses every weight
// hundreds of times, so the GEMM runs out of arithmetic, not memory, and dequantizing once per product costs a few
// percent of it. The dequantizing is one pass over the
// codes with 256-bit vectors (every build has AVX2): a torch expression of the same takes several passes and
// cost as much as the GEMM itself on int4. Every build also has an int4 x int8 GEMM for bf16 and fp32 prompts
// (`int4_matmul_int8`, below), which multiplies the codes themselves by activations quantized to int8: with VNNI
// `vpdpbusd` in the AVX-512 builds, with `vpmaddubsw` in the avx2 one (which takes the bf16 int4 prompts that ran
// on the decode kernel where bf16 is emulated, as on a Zen 3, and on a dequantized bf16 GEMM elsewhere; fp32
// prompts ran on the dequantized fp32 GEMM or, on a Zen 3, on the decode kernel).
//
//   int8: w[n, k] = q[n, k] * scales[n].
//   int4: w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n], g = k / G; q packed two per byte, column 2j in the
//         low nibble (N, K/2); scale and zero bf16 side by side in (K/G, N, 2): `quantize.Int4Linear`'s layout.
//
// bf16 outputs are rounded to nearest even from the fp32 value, as torch's .to(torch.bfloat16) rounds.

#include <immintrin.h>

#include <cstring>
#include <vector>

#include "kernels.h"

namespace baichuan_cpu_gemv {
namespace {

constexpr int64_t kMinTaskValues = 1 << 16;  // weights dequantized per parallel task, at least

inline float bf16_value(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t bf16_round(float f) {  // weights are finite: no NaN case
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

inline void store8(uint16_t* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r =
      _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  // Each lane holds its bf16 in the low 16 bits (0..65535), so the saturating pack changes nothing.
  _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

inline void store1(float* p, float v) { *p = v; }
inline void store1(uint16_t* p, float v) { *p = bf16_round(v); }

template <class T>
void int8_rows(const int8_t* w, const float* scales, T* out, int64_t rows, int64_t K) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kMinTaskValues / K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* p = w + r * K;
      T* o = out + r * K;
      const __m256 s = _mm256_set1_ps(scales[r]);
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        const __m128i b = _mm_loadu_si128((const __m128i*)(p + k));
        store8(o + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), s));
        store8(o + k + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), s));
      }
      for (; k < K; ++k) store1(o + k, float(p[k]) * scales[r]);
    }
  });
}

// 8 codes (the low 8 bytes of c) -> 8 weights.
inline __m256 dequant8(__m128i c, __m256 scale, __m256 offset) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), scale, offset);
}

template <class T>
void int4_rows(const uint8_t* packed, const uint16_t* sz, T* out, int64_t n0, int64_t rows, int64_t N, int64_t K,
               int64_t G) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kMinTaskValues / K), [&](int64_t r0, int64_t r1) {
    const __m128i nibble = _mm_set1_epi8(0x0F);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = n0 + r;
      const uint8_t* p = packed + n * (K / 2);
      T* o = out + r * K;
      for (int64_t g = 0; g < K / G; ++g) {
        const float scale = bf16_value(sz[(g * N + n) * 2]), zero = bf16_value(sz[(g * N + n) * 2 + 1]);
        const __m256 s = _mm256_set1_ps(scale), c = _mm256_set1_ps(zero - 8.0f * scale);
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {  // 16 bytes: 32 codes
          const __m128i b = _mm_loadu_si128((const __m128i*)(p + k / 2));
          const __m128i lo = _mm_and_si128(b, nibble), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nibble);
          const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);  // in column order
          store8(o + k, dequant8(first, s, c));
          store8(o + k + 8, dequant8(_mm_srli_si128(first, 8), s, c));
          store8(o + k + 16, dequant8(second, s, c));
          store8(o + k + 24, dequant8(_mm_srli_si128(second, 8), s, c));
        }
      }
    }
  });
}

void check_out(const at::Tensor& out, int64_t start, int64_t N, int64_t K) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.device().is_cpu() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "out: contiguous fp32 or bf16 (rows, K) on the CPU");
  TORCH_CHECK(out.size(1) == K, "out has ", out.size(1), " columns, the weight ", K);
  TORCH_CHECK(start >= 0 && start + out.size(0) <= N, "rows ", start, "..", start + out.size(0), " of ", N);
}

}  // namespace

// Rows [start, start + out.size(0)) of an int8 weight (N, K), times their fp32 scales, into out.
void dequantize_int8(const at::Tensor& weight, const at::Tensor& scales, int64_t start, at::Tensor out) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight: contiguous int8 (N, K)");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N && scales.is_contiguous(),
              "scales: contiguous fp32 (N,)");
  check_out(out, start, N, K);
  const int8_t* w = weight.data_ptr<int8_t>() + start * K;
  const float* s = scales.data_ptr<float>() + start;
  if (out.scalar_type() == at::kFloat)
    int8_rows(w, s, out.data_ptr<float>(), out.size(0), K);
  else
    int8_rows(w, s, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), out.size(0), K);
}

// Rows [start, start + out.size(0)) of a group-wise int4 weight in `Int4Linear`'s plain layout, into out.
void dequantize_int4(const at::Tensor& packed, const at::Tensor& scales_and_zeros, int64_t group_size, int64_t start,
                     at::Tensor out) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed: contiguous uint8 (N, K/2)");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
              "group size must be a multiple of 32 dividing K, got ", group_size);
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.dim() == 3 && scales_and_zeros.size(0) == K / group_size &&
                  scales_and_zeros.size(1) == N && scales_and_zeros.size(2) == 2,
              "scales_and_zeros: contiguous bf16 (K/group_size, N, 2)");
  check_out(out, start, N, K);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const uint16_t* sz = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<at::BFloat16>());
  if (out.scalar_type() == at::kFloat)
    int4_rows(p, sz, out.data_ptr<float>(), start, out.size(0), N, K, group_size);
  else
    int4_rows(p, sz, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), start, out.size(0), N, K,
              group_size);
}

namespace {

// int4 weights times int8 activations, for bf16 and fp32 prompts (every build). Each activation row's group g of G values
// is quantized symmetrically, xq = round(x * 127 / amax), with scale xs = amax / 127 and sum sq = sum(xq). Then,
// with c = zero - 8 * scale (so w = q * scale + c),
//   y[m, n] = sum_g xs[m, g] * (scale[g, n] * dot_g(q[n], xq[m]) + c[g, n] * sq[m, g]),
// where dot_g, of unsigned codes 0..15 and signed int8 values over one group, is exact in int32 (|dot| <= 1905 G).
// Each task repacks 64 output columns' codes to one byte a code, laid [K/4][64 columns][4 codes], so that one
// load gives a vector of columns x 4 inputs against a broadcast of 4 inputs of one row, and runs every activation
// row past them, a group at a time, in tiles of a few rows x a few vectors of columns.
//   AVX-512 (VNNI): `vpdpbusd` adds the 4 byte products of each 32-bit lane into it: 64 a vector, twice the
//     multiply-adds per instruction of bf16's `vdpbf16ps`. Tiles of 4 rows x 4 vectors of 16 columns.
//   AVX2: `vpmaddubsw` (u8 x s8 -> pairs summed in s16) gives 32 products an instruction, and its pair sums,
//     |.| <= 2 * 15 * 127 = 3810, are added up in s16 over 32 inputs (8 of them, |.| <= 30480 < 32767, exact)
//     before one `vpmaddwd` by ones widens them to int32: 2 instructions (maddubs + add) per 32 products where
//     widening after every product takes 3. Tiles of 4 rows x 2 vectors of 8 columns: 8 s16 sums, 2 weight
//     vectors, the broadcast and a product in 12 of the 16 registers. A tile covers whole groups, up to 256
//     inputs, and adds their shares up in registers before it writes out (in L2) once.
// Both builds quantize alike and do the same fp32 arithmetic on the same int32 dots, group by group, so they give
// the same outputs.

constexpr int64_t kBlockCols = 64;  // output columns a task repacks and works on

// A tile function: rows of xq x columns of the repacked block, `count` groups (see each build's int4_tile).
using TileFn = void (*)(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t K, int64_t groups, int64_t G,
                        int64_t count, const uint8_t* wb, const float* ws, const float* wc, int64_t width,
                        float* out, int64_t ldo);

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr int64_t kTileRows = 4;
constexpr int64_t kVectorCols = 16;  // columns of one vector of int32 sums
constexpr int64_t kTileCols = 64;    // columns of one tile (at most: the block's tail may be narrower)
constexpr int64_t kTileInputs = 1;   // inputs a tile call covers, at least: one group

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

template <class T>
void quantize_activations(const T* x, int8_t* xq, float* xs, int32_t* xsum, int64_t M, int64_t K, int64_t G) {
  const int64_t groups = K / G;
  at::parallel_for(0, M, std::max<int64_t>(1, kMinTaskValues / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t g = 0; g < groups; ++g) {
        const T* p = x + m * K + g * G;
        __m512 amax = _mm512_setzero_ps();
        for (int64_t k = 0; k < G; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(p + k)));
        const float a = _mm512_reduce_max_ps(amax);
        const float inv = a > 0.0f ? 127.0f / a : 0.0f;
        xs[m * groups + g] = a / 127.0f;
        const __m512 vinv = _mm512_set1_ps(inv);
        __m512i sum = _mm512_setzero_si512();
        for (int64_t k = 0; k < G; k += 16) {
          const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16(p + k), vinv));  // nearest, ties to even
          sum = _mm512_add_epi32(sum, q);
          _mm_storeu_si128((__m128i*)(xq + m * K + g * G + k), _mm512_cvtepi32_epi8(q));
        }
        xsum[m * groups + g] = _mm512_reduce_add_epi32(sum);
      }
    }
  });
}

// R activation rows x C vectors of 16 columns, one group g: out[r, 16 c + j] += that group's share (row stride ldo).
// wb, ws and wc point at the group's codes, scales and offsets in the repacked block.
template <int R, int C>
void int4_tile(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t K, int64_t groups, int64_t G,
               int64_t /* count: always 1 (kTileInputs) */, const uint8_t* wb, const float* ws, const float* wc,
               int64_t width, float* out, int64_t ldo) {
  __m512i dot[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) dot[r][c] = _mm512_setzero_si512();
  for (int64_t k = 0; k < G; k += 4) {
    const uint8_t* w = wb + k * width;  // (k / 4) * width * 4
    __m512i wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_si512((const void*)(w + c * 64));
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, xq + r * K + k, sizeof four);
      const __m512i xv = _mm512_set1_epi32(four);
      for (int c = 0; c < C; ++c) dot[r][c] = _mm512_dpbusd_epi32(dot[r][c], wv[c], xv);
    }
  }
  for (int c = 0; c < C; ++c) {
    const __m512 s = _mm512_loadu_ps(ws + c * 16), z = _mm512_loadu_ps(wc + c * 16);
    for (int r = 0; r < R; ++r) {
      const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][c]), s,
                                       _mm512_mul_ps(z, _mm512_set1_ps(float(xsum[r * groups]))));
      float* o = out + r * ldo + c * 16;
      _mm512_storeu_ps(o, _mm512_fmadd_ps(t, _mm512_set1_ps(xs[r * groups]), _mm512_loadu_ps(o)));
    }
  }
}


template <int R>
TileFn tile_for(int64_t vectors) {
  switch (vectors) {
    case 1: return &int4_tile<R, 1>;
    case 2: return &int4_tile<R, 2>;
    case 3: return &int4_tile<R, 3>;
    default: return &int4_tile<R, 4>;
  }
}

#else  // AVX2
constexpr int64_t kTileRows = 4;
constexpr int64_t kVectorCols = 8;
constexpr int64_t kTileCols = 16;  // every tile is whole: N and so every block's width are multiples of 16
// Inputs a tile call covers (whole groups, at least one): the sums stay in registers across its groups, and its
// codes (256 x 64 bytes of the block) in L1.
constexpr int64_t kTileInputs = 256;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

inline float reduce_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline int32_t reduce_add(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 1)));
}

// As the AVX-512 one, 32 values at a time (G is a multiple of 32).
template <class T>
void quantize_activations(const T* x, int8_t* xq, float* xs, int32_t* xsum, int64_t M, int64_t K, int64_t G) {
  const int64_t groups = K / G;
  at::parallel_for(0, M, std::max<int64_t>(1, kMinTaskValues / K), [&](int64_t m0, int64_t m1) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    // packs of 4 vectors leave 4-byte pieces in the order 0a 1a 2a 3a | 0b 1b 2b 3b (a, b the 128-bit halves)
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t g = 0; g < groups; ++g) {
        const T* p = x + m * K + g * G;
        __m256 amax = _mm256_setzero_ps();
        for (int64_t k = 0; k < G; k += 8) amax = _mm256_max_ps(amax, _mm256_and_ps(load8(p + k), magnitude));
        const float a = reduce_max(amax);
        const float inv = a > 0.0f ? 127.0f / a : 0.0f;
        xs[m * groups + g] = a / 127.0f;
        const __m256 vinv = _mm256_set1_ps(inv);
        __m256i sum = _mm256_setzero_si256();
        for (int64_t k = 0; k < G; k += 32) {
          __m256i q[4];
          for (int i = 0; i < 4; ++i) {
            q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(load8(p + k + 8 * i), vinv));  // nearest, ties to even
            sum = _mm256_add_epi32(sum, q[i]);
          }
          // |q| <= 127: the saturating packs change nothing.
          const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
          _mm256_storeu_si256((__m256i*)(xq + m * K + g * G + k), _mm256_permutevar8x32_epi32(bytes, order));
        }
        xsum[m * groups + g] = reduce_add(sum);
      }
    }
  });
}

// R activation rows x C vectors of 8 columns, `count` groups from g on: out[r, 8 c + j] += those groups' shares
// (row stride ldo), added group after group as the AVX-512 tile adds them, but in registers (or L1) rather than
// in out (L2) between groups. wb, ws and wc point at group g's codes, scales and offsets in the repacked block.
template <int R, int C>
void int4_tile(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t K, int64_t groups, int64_t G,
               int64_t count, const uint8_t* wb, const float* ws, const float* wc, int64_t width, float* out,
               int64_t ldo) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_loadu_ps(out + r * ldo + c * 8);
  for (int64_t j = 0; j < count; ++j) {
    const int8_t* xg = xq + j * G;
    const uint8_t* wg = wb + j * G * width;
    __m256i dot[R][C];
    for (int64_t k0 = 0; k0 < G; k0 += 32) {
      __m256i pairs[R][C];  // s16 sums of 32 inputs' products, exact (see above)
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) pairs[r][c] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const int64_t k = k0 + 4 * i;
        const uint8_t* w = wg + k * width;  // (k / 4) * width * 4
        __m256i wv[C];
        for (int c = 0; c < C; ++c) wv[c] = _mm256_loadu_si256((const __m256i*)(w + c * 32));
        for (int r = 0; r < R; ++r) {
          int32_t four;
          std::memcpy(&four, xg + r * K + k, sizeof four);
          const __m256i xv = _mm256_set1_epi32(four);
          for (int c = 0; c < C; ++c) {
            pairs[r][c] = _mm256_add_epi16(pairs[r][c], _mm256_maddubs_epi16(wv[c], xv));
            // Each sum in a register of its own, added to in turn: without this the compiler re-associates the 8
            // adds of the unrolled loop into a tree that keeps every product live and spills most of them.
            asm("" : "+x"(pairs[r][c]));
          }
        }
      }
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) {
          const __m256i d = _mm256_madd_epi16(pairs[r][c], ones);
          dot[r][c] = k0 == 0 ? d : _mm256_add_epi32(dot[r][c], d);
        }
    }
    for (int c = 0; c < C; ++c) {
      const __m256 s = _mm256_loadu_ps(ws + j * width + c * 8), z = _mm256_loadu_ps(wc + j * width + c * 8);
      for (int r = 0; r < R; ++r) {
        const __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][c]), s,
                                         _mm256_mul_ps(z, _mm256_set1_ps(float(xsum[r * groups + j]))));
        acc[r][c] = _mm256_fmadd_ps(t, _mm256_set1_ps(xs[r * groups + j]), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + r * ldo + c * 8, acc[r][c]);
}


template <int R>
TileFn tile_for(int64_t /* vectors: always 2 */) {
  return &int4_tile<R, 2>;
}
#endif

TileFn tile_for(int64_t rows, int64_t vectors) {
  switch (rows) {
    case 1: return tile_for<1>(vectors);
    case 2: return tile_for<2>(vectors);
    case 3: return tile_for<3>(vectors);
    default: return tile_for<4>(vectors);
  }
}

// Columns [n0, n0 + width) of the plain nibbles -> wb [K/4][width][4] bytes; their scale and c = zero - 8 * scale
// as fp32 [K/G][width].
void repack_int4(const uint8_t* packed, const uint16_t* sz, int64_t n0, int64_t width, int64_t N, int64_t K,
                 int64_t G, uint8_t* wb, float* ws, float* wc) {
  const __m128i nibble = _mm_set1_epi8(0x0F);
  uint32_t* words = reinterpret_cast<uint32_t*>(wb);
  for (int64_t c = 0; c < width; ++c) {
    const int64_t n = n0 + c;
    const uint8_t* p = packed + n * (K / 2);
    for (int64_t k = 0; k < K; k += 32) {
      const __m128i b = _mm_loadu_si128((const __m128i*)(p + k / 2));
      const __m128i lo = _mm_and_si128(b, nibble), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nibble);
      alignas(16) uint32_t codes[8];  // 32 codes in column order, 4 a word
      _mm_store_si128((__m128i*)codes, _mm_unpacklo_epi8(lo, hi));
      _mm_store_si128((__m128i*)(codes + 4), _mm_unpackhi_epi8(lo, hi));
      for (int i = 0; i < 8; ++i) words[(k / 4 + i) * width + c] = codes[i];
    }
    for (int64_t g = 0; g < K / G; ++g) {
      const float scale = bf16_value(sz[(g * N + n) * 2]), zero = bf16_value(sz[(g * N + n) * 2 + 1]);
      ws[g * width + c] = scale;
      wc[g * width + c] = zero - 8.0f * scale;
    }
  }
}

}  // namespace

// out (M, N) fp32 = x (M, K) (fp32 or bf16, activations quantized to int8 per group) @ int4 weight.T.
void int4_matmul_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                      int64_t group_size, at::Tensor out) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed: contiguous uint8 (N, K/2)");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
              "group size must be a multiple of 32 dividing K, got ", group_size);
  TORCH_CHECK(N % 16 == 0, "output features must be a multiple of 16, got ", N);
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.dim() == 3 && scales_and_zeros.size(0) == K / group_size &&
                  scales_and_zeros.size(1) == N && scales_and_zeros.size(2) == 2,
              "scales_and_zeros: contiguous bf16 (K/group_size, N, 2)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && x.size(1) == K &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x: contiguous fp32 or bf16 (M, K) on the CPU");
  const int64_t M = x.size(0), groups = K / group_size;
  TORCH_CHECK(
      out.dim() == 2 && out.is_contiguous() && out.scalar_type() == at::kFloat && out.size(0) == M && out.size(1) == N,
      "out: contiguous fp32 (M, N)");
  auto xq = at::empty({M, K}, at::kChar);
  auto xs = at::empty({M, groups}, at::kFloat);
  auto xsum = at::empty({M, groups}, at::kInt);
  if (x.scalar_type() == at::kFloat)
    quantize_activations(x.data_ptr<float>(), xq.data_ptr<int8_t>(), xs.data_ptr<float>(), xsum.data_ptr<int32_t>(),
                         M, K, group_size);
  else
    quantize_activations(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), xq.data_ptr<int8_t>(),
                         xs.data_ptr<float>(), xsum.data_ptr<int32_t>(), M, K, group_size);
  const int8_t* q = xq.data_ptr<int8_t>();
  const float* s = xs.data_ptr<float>();
  const int32_t* sq = xsum.data_ptr<int32_t>();
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const uint16_t* sz = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<at::BFloat16>());
  float* y = out.data_ptr<float>();
  const int64_t blocks = (N + kBlockCols - 1) / kBlockCols;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> wb(K * kBlockCols);
    std::vector<float> ws(groups * kBlockCols), wc(groups * kBlockCols);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kBlockCols, width = std::min(kBlockCols, N - n0);
      repack_int4(p, sz, n0, width, N, K, group_size, wb.data(), ws.data(), wc.data());
      for (int64_t m = 0; m < M; ++m) std::memset(y + m * N + n0, 0, width * sizeof(float));
      // A few groups at a time (one with AVX-512), so that their codes (up to 256 x 64 bytes) stay in L1 while
      // every row passes them; the sums build up in out, which stays in L2.
      const int64_t step = std::max<int64_t>(1, kTileInputs / group_size);
      for (int64_t g = 0; g < groups; g += step) {
        const int64_t k0 = g * group_size, count = std::min(step, groups - g);
        for (int64_t m = 0; m < M; m += kTileRows) {
          const int64_t rows = std::min(kTileRows, M - m);
          for (int64_t c0 = 0; c0 < width; c0 += kTileCols) {
            const int64_t cols = std::min(kTileCols, width - c0);
            tile_for(rows, cols / kVectorCols)(q + m * K + k0, s + m * groups + g, sq + m * groups + g, K, groups,
                                               group_size, count, wb.data() + k0 * width + c0 * 4,
                                               ws.data() + g * width + c0, wc.data() + g * width + c0, width,
                                               y + m * N + n0 + c0, N);
          }
        }
      }
    }
  });
}

}  // namespace baichuan_cpu_gemv
