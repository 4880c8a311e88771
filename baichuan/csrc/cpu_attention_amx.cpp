// Causal self-attention of a fresh prompt on AMX tiles (avx512bf16 build, CPUs with AMX-BF16): bf16 q, k, v of
// (B, H, T, D), D a multiple of 32, every query against the keys up to its own position. torch's flash kernel took
// 1.7 ms a layer of the 1.29B benchmark model at 512 tokens (~0.5 TFLOP/s; benchmarks/README.md).
//
// Per (batch row, head): the keys packed once as B tiles (`pack_rows`, as the products pack their activations) and
// the values as B tiles of key pairs. Then per block of 32 queries (2 A tiles read where the queries lie):
// - the scores S = Q K^T against every key up to the block's last, 2 x 2 C tiles per 32 keys, in fp32;
// - softmax per query over its own keys: the numerators e^(s - max) rounded to bf16 (as torch's flash kernel rounds
//   them for its second product), their sum kept in fp32 before rounding;
// - O = P V, 2 x 2 C tiles per 32 dimensions, divided by the sums and rounded into y (B, T, H * D): the layout the
//   output projection reads, so no transpose follows.

#include "kernels.h"

#if defined(__x86_64__) && defined(__AVX512BF16__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define BAICHUAN_AMX 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace baichuan_cpu_gemv {

#if defined(BAICHUAN_AMX)
#define BAICHUAN_AMX_FN __attribute__((target("amx-tile,amx-bf16")))
BAICHUAN_AMX_FN void configure_tiles();                                                           // cpu_prompt_amx.cpp
void pack_rows(const uint32_t* x, int64_t M, int64_t K, int64_t Mp, uint32_t* out, int64_t row_pairs);  // same
#endif

namespace {

#if defined(BAICHUAN_AMX)
// v (T, D), rows `stride` values apart, as B tiles of key pairs: [Tp/32 steps][D/16 tiles][16 key pairs][16 dims]
// [2 keys]; keys past T are zero (their probabilities are 0, and 0 x a stray NaN would not be).
void pack_values(const uint16_t* v, int64_t T, int64_t D, int64_t stride, int64_t Tp, uint16_t* out) {
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i order = _mm512_load_si512(kInterleave);
  const int64_t tiles = D / 16;
  for (int64_t key = 0; key < Tp; key += 2) {
    const int64_t step = key / 32, pair = key % 32 / 2;
    for (int64_t t = 0; t < tiles; ++t) {
      const __m256i a = key < T ? _mm256_loadu_si256((const __m256i*)(v + key * stride + t * 16)) : __m256i{};
      const __m256i b = key + 1 < T ? _mm256_loadu_si256((const __m256i*)(v + (key + 1) * stride + t * 16)) : __m256i{};
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
      _mm512_storeu_si512(out + ((step * tiles + t) * 16 + pair) * 32, _mm512_permutexvar_epi16(order, both));
    }
  }
}

// One block of 32 queries (qa: their rows, q_stride values apart) of one head against its keys 0..keys-1.
struct QueryBlock {
  const uint16_t* qa;
  int64_t q_stride, first, keys;
};

// The buffers of one thread: scores and numerators (32 x Tp), the output sums (32 x D), a padded copy of a last
// block that runs past T.
struct Scratch {
  std::vector<float> scores, out;
  std::vector<uint16_t> probs, padded;
  float sums[32];
  Scratch(int64_t Tp, int64_t D) : scores(32 * Tp), out(32 * D), probs(32 * Tp), padded(32 * D) {}
};

// The 2 x 2 C tiles (tiles 0-3: rows 0-15 and 16-31 of A against B's two tiles) of the block at hand.
BAICHUAN_AMX_FN inline void zero_tiles() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// C += A (32 rows of 32 bf16, `a_stride` bytes apart) . B (two 1 KB tiles, one after the other).
BAICHUAN_AMX_FN inline void multiply_2x2(const uint16_t* a, int64_t a_stride, const void* b) {
  _tile_loadd(4, a, a_stride);
  _tile_loadd(5, reinterpret_cast<const char*>(a) + 16 * a_stride, a_stride);
  _tile_loadd(6, b, 64);
  _tile_loadd(7, static_cast<const char*>(b) + 1024, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// C into c (32 rows of 32 floats, `row` floats apart).
BAICHUAN_AMX_FN inline void store_tiles(float* c, int64_t row) {
  _tile_stored(0, c, row * 4);
  _tile_stored(1, c + 16, row * 4);
  _tile_stored(2, c + 16 * row, row * 4);
  _tile_stored(3, c + 16 * row + 16, row * 4);
}

// S (32 x Tp fp32) = the block's queries . keys 0..keys-1, from the keys' B tiles (kp).
BAICHUAN_AMX_FN void scores_of(const QueryBlock& q, const uint8_t* kp, int64_t D, int64_t Tp, float* S) {
  const int64_t steps = D / 32, row_bytes = 2 * q.q_stride;
  for (int64_t kb = 0; kb < q.keys / 32; ++kb) {
    zero_tiles();
    for (int64_t s = 0; s < steps; ++s) multiply_2x2(q.qa + s * 32, row_bytes, kp + (kb * steps + s) * 2048);
    store_tiles(S + kb * 32, Tp);
  }
}

// out (32 x D fp32) = P (32 x keys bf16) . V, from the values' B tiles (vp).
BAICHUAN_AMX_FN void weighted_values(const uint16_t* P, const uint16_t* vp, int64_t keys, int64_t D, int64_t Tp,
                                     float* out) {
  const int64_t tiles = D / 16;
  for (int64_t t = 0; t < tiles; t += 2) {
    zero_tiles();
    for (int64_t ks = 0; ks < keys / 32; ++ks) multiply_2x2(P + ks * 32, 2 * Tp, vp + (ks * tiles + t) * 512);
    store_tiles(out + t * 16, D);
  }
}

// Each valid query's numerators over its own keys 0..first+i (zero past them, up to the block's keys) and their sum.
void softmax_rows(const QueryBlock& q, int64_t T, int64_t Tp, float scale, Scratch& w) {
  for (int64_t i = 0; i < 32; ++i) {
    const int64_t n = q.first + i < T ? q.first + i + 1 : 0;
    const float* row = w.scores.data() + i * Tp;
    auto* p = reinterpret_cast<at::BFloat16*>(w.probs.data() + i * Tp);
    w.sums[i] = n > 0 ? softmax_numerators(row, n, scale, p) : 1.0f;
    std::memset(p + n, 0, (q.keys - n) * sizeof(uint16_t));
  }
}

// What every block reads and writes: the queries where they lie, the packed keys and values (Tp x D a head), y.
struct Heads {
  const uint16_t* Q;
  const uint16_t *keys, *values;
  uint16_t* Y;
  int64_t sb, sh, st, H, T, D, Tp;
  float scale;
};

// Blocks [t0, t1) of 32 queries, numbered (batch row, head, block).
BAICHUAN_AMX_FN void attend_blocks(const Heads& a, int64_t t0, int64_t t1) {
  const int64_t blocks = a.Tp / 32, D = a.D, Tp = a.Tp, T = a.T;
  Scratch w(Tp, D);
  configure_tiles();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t i = t / blocks, b = i / a.H, h = i % a.H, first = t % blocks * 32;
    QueryBlock block{a.Q + b * a.sb + h * a.sh + first * a.st, a.st, first, first + 32};
    if (first + 32 > T) {  // a last block past T: its rows copied, the rest zero
      std::fill(w.padded.begin(), w.padded.end(), 0);
      for (int64_t r = 0; r < T - first; ++r)
        std::memcpy(w.padded.data() + r * D, block.qa + r * a.st, D * sizeof(uint16_t));
      block.qa = w.padded.data();
      block.q_stride = D;
    }
    scores_of(block, reinterpret_cast<const uint8_t*>(a.keys + i * Tp * D), D, Tp, w.scores.data());
    softmax_rows(block, T, Tp, a.scale, w);
    weighted_values(w.probs.data(), a.values + i * Tp * D, block.keys, D, Tp, w.out.data());
    for (int64_t r = 0; r < std::min<int64_t>(32, T - first); ++r) {
      const __m512 inverse = _mm512_set1_ps(1.0f / w.sums[r]);
      uint16_t* o = a.Y + ((b * T + first + r) * a.H + h) * D;
      for (int64_t d = 0; d < D; d += 16)
        _mm256_storeu_si256((__m256i*)(o + d),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(&w.out[r * D + d]), inverse)));
    }
  }
  _tile_release();
}
#endif

}  // namespace

at::Tensor amx_causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(amx_ready(), "amx_causal_attention: this build or CPU has no AMX-BF16 (see amx_ready)");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kBFloat16 && t->device().is_cpu() && t->stride(3) == 1,
                "amx_causal_attention: q, k, v bf16 (B, H, T, D) on the CPU with contiguous rows");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "amx_causal_attention: q, k, v of one shape");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  TORCH_CHECK(D % 32 == 0 && D > 0, "amx_causal_attention: the head size must be a multiple of 32, got ", D);
  TORCH_CHECK(k.stride(2) % 2 == 0, "amx_causal_attention: key rows must start on 32-bit boundaries");
  at::Tensor y = at::empty({B, T, H * D}, q.options());
#if defined(BAICHUAN_AMX)
  if (y.numel() == 0) return y;
  const int64_t Tp = (T + 31) / 32 * 32, blocks = Tp / 32;
  at::Tensor keys = at::empty({B * H * Tp * D}, q.options()), values = at::empty({B * H * Tp * D}, q.options());
  auto* packed_keys = reinterpret_cast<uint16_t*>(keys.data_ptr<at::BFloat16>());
  auto* packed_values = reinterpret_cast<uint16_t*>(values.data_ptr<at::BFloat16>());
  const auto* Q = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* K = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* V = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      pack_rows(reinterpret_cast<const uint32_t*>(K + b * k.stride(0) + h * k.stride(1)), T, D, Tp,
                reinterpret_cast<uint32_t*>(packed_keys + i * Tp * D), k.stride(2) / 2);
      pack_values(V + b * v.stride(0) + h * v.stride(1), T, D, v.stride(2), Tp, packed_values + i * Tp * D);
    }
  });
  const Heads heads{Q, packed_keys, packed_values, reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()),
                    q.stride(0), q.stride(1), q.stride(2), H, T, D, Tp, 1.0f / std::sqrt(float(D))};
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t t0, int64_t t1) { attend_blocks(heads, t0, t1); });
#endif
  return y;
}

}  // namespace baichuan_cpu_gemv
