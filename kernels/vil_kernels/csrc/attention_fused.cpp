// The blocked longformer kernel's forward in one C++ pass (vil_kernels/longformer/blocked.py): in bfloat16 its
// products on AMX tiles or, on CPUs with AVX512-BF16 but no AMX (AMD's Zen 4 and later), in AVX-512 registers; in
// float32 in AVX-512 registers (chunk_forward_f32, below: the same tasks, rows and softmax).
//
// The ATen path copies the map's keys and values three times into chunk-window buffers, then per run of chunks runs
// bmm, bias + softmax, bmm: oneDNN's batched products of 49 x 33 by 33 x 444 per chunk take about twice the time of
// one product of the same work, each writes its scores out in bfloat16, and the key windows are copied once more
// (a CPU bfloat16 bmm copies a transposed operand that overlaps itself). Here every (image, head, chunk) is one task
// that reads its queries and its window's keys and values straight from the projections, row by row in the slot
// order of the shared bias (blocked.py's _slot_geometry): the keys are packed into the pair-interleaved layout that
// both AMX's and AVX512-BF16's dot products take, the scores of the chunk's queries against every key accumulate in
// float32, the bias, padding flags and softmax run on that float32 row (never rounded to bfloat16), the weights are
// rounded once for the product with the values, and the output once, written to the output tensor. A chunk's key
// slots in neighbour chunks wholly off the map (or past its image's key_extents) are left out rather than computed as
// padding (Call::kept_ranges): a chunk on the map's edge scores 6 of its 9 neighbour chunks, one in a corner 4; the
// bias's columns for each such pattern are cut once per thread and head (CutBias).
//
// The backward (longformer_backward_, below) takes the same tasks, chunks whose key windows overlap never at once: it
// recomputes a chunk's probabilities with the forward's scores and softmax and runs the four gradient products with
// the rows read and written in place, instead of the ATen path's window copies, batched products and scatter-adds:
// float32 tokens (and bfloat16 ones of other head dims, or without AVX512-BF16) in float32 fused multiply-adds,
// bfloat16 tokens in AVX512-BF16 dot products on the bfloat16 engine's packed layouts. Its gradients are float32
// sums, rounded once by the caller where the tokens are bfloat16. It leaves out the forward's slots, and adds the
// bias's gradient of the others into their columns.
//
// The two bfloat16 engines share everything but the products (chunk_forward<kTiles>). AMX needs Linux's grant of the
// tile state (amx_available); head dims 32 and 64 (float32: 1 to 64). Elsewhere blocked.py runs the ATen path, which
// stays the reference the tests hold every engine against.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "vil_kernels.h"

// GCC 11 brought the AMX intrinsics; other compilers and systems build the op without its body (amx_available and
// avx512_bf16_available and avx512_available are false there, so it is never called)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__linux__)
#define VIL_HAVE_X86_BF16 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define VIL_HAVE_X86_BF16 0
#endif

namespace {

using vil_kernels::bfloat16_bits;
using SlotRanges = std::vector<std::pair<int64_t, int64_t>>;  // (first slot, count) each

#if VIL_HAVE_X86_BF16

// Every function here may use AMX and AVX512-BF16; the vector engine's never executes an AMX instruction (GCC emits
// none but the intrinsics), so it runs on CPUs without AMX.
#define VIL_X86_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

constexpr int64_t kTile = 16;  // rows of every tile here; 64 bytes a row: 32 bfloat16, 16 float32 or 16 pairs

// The AVX-512 subsets that everything but the tile products uses (the OS saving ZMM state included).
bool avx512_bf16_ready() {
  static const bool ready = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                            __builtin_cpu_supports("avx512bf16");
  return ready;
}

// The CPU reports AMX-TILE and AMX-BF16 besides the above, and Linux grants this process the tile data state, which
// it hands out only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA).
bool request_amx() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!avx512_bf16_ready() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = edx & (1u << 22), amx_tile = edx & (1u << 24);
  if (!(amx_bf16 && amx_tile)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

bool amx_ready() {
  static const bool ready = request_amx();
  return ready;
}

// Palette 1 with tiles 0-7 all 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Sizes of one call: every chunk has `slots` queries against `keys` key slots, head dim `dim`.
struct Shape {
  int64_t slots, keys, dim;
  int64_t padded_keys;  // keys rounded up to 32 (one bfloat16 tile row of weights)
  int64_t query_tiles;  // ceil(slots / 16)
  int64_t feature_steps;  // dim / 32: products over the head dim, one tile row of 32 features each
  int64_t dim_tiles;  // dim / 16: output tiles of 16 float32 columns
};

// Zeros read in place of the rows of padding (queries, keys and values; 64 features at most).
alignas(64) const bfloat16_bits kZeroRow[64] = {};
alignas(64) const float kZeroFloats[64] = {};

template <typename T>
const T* zero_row() {
  if constexpr (std::is_same_v<T, float>) {
    return kZeroFloats;
  } else {
    return kZeroRow;
  }
}

inline float to_float(float value) { return value; }

inline float to_float(bfloat16_bits value) { return vil_kernels::widen_bfloat16(value); }

// Per thread: one chunk's rows (pointers into the inputs, kZeroRow for padding), its packed operands, a pair of
// query tiles' scores, weights and outputs.
// T: bfloat16_bits or float, the tokens' type (the float32 engine reads queries and values in place and packs only
// the keys).
template <typename T>
struct Scratch {
  std::vector<const T*> query_rows, key_rows, value_rows;
  std::vector<T*> output_rows;  // nullptr: a padding query, not written
  std::vector<T> queries, keys, values, weights;
  std::vector<float> flags, scores, outputs;
  std::vector<int64_t> query_tokens, key_tokens;  // Call::find_rows's
  SlotRanges kept;  // the key slots computed (Call::kept_ranges)
  bool padding_keys = false;  // whether any of the chunk's kept key slots is padding (a flag other than 0)
  void fit(const Shape& s) {
    constexpr bool kBfloat16 = std::is_same_v<T, bfloat16_bits>;
    query_rows.assign(s.query_tiles * kTile, zero_row<T>());
    key_rows.assign(s.padded_keys, zero_row<T>());
    value_rows.assign(s.padded_keys, zero_row<T>());
    output_rows.assign(s.slots, nullptr);
    queries.resize(kBfloat16 ? s.query_tiles * kTile * s.dim : 0);
    keys.resize(s.padded_keys * s.dim_tiles * kTile);
    values.resize(kBfloat16 ? s.padded_keys * s.dim : 0);
    weights.assign(2 * kTile * s.padded_keys, 0);
    flags.assign(s.padded_keys, -std::numeric_limits<float>::infinity());
    scores.resize(2 * kTile * s.padded_keys);
    outputs.resize(2 * kTile * s.dim_tiles * kTile);
    query_tokens.resize(s.slots);
    key_tokens.resize(s.keys);
  }
};

// rows[i] (16 32-bit words each) -> rows[j] holding word j of every input row: a 16 x 16 transpose in three steps
// (32-bit and 64-bit interleaves within 128-bit lanes, then lanes).
VIL_X86_TARGET inline void transpose_16x16_words(__m512i rows[16]) {
  __m512i pairs[16], quads[16];
  for (int i = 0; i < 16; i += 2) {
    pairs[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    pairs[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  // quads[4g + o], lane L: word 4L + o of rows 4g .. 4g + 3
  for (int g = 0; g < 16; g += 4) {
    quads[g + 0] = _mm512_unpacklo_epi64(pairs[g], pairs[g + 2]);
    quads[g + 1] = _mm512_unpackhi_epi64(pairs[g], pairs[g + 2]);
    quads[g + 2] = _mm512_unpacklo_epi64(pairs[g + 1], pairs[g + 3]);
    quads[g + 3] = _mm512_unpackhi_epi64(pairs[g + 1], pairs[g + 3]);
  }
  for (int o = 0; o < 4; ++o) {
    const __m512i low01 = _mm512_shuffle_i32x4(quads[o], quads[4 + o], 0x44);
    const __m512i high01 = _mm512_shuffle_i32x4(quads[o], quads[4 + o], 0xEE);
    const __m512i low23 = _mm512_shuffle_i32x4(quads[8 + o], quads[12 + o], 0x44);
    const __m512i high23 = _mm512_shuffle_i32x4(quads[8 + o], quads[12 + o], 0xEE);
    rows[o] = _mm512_shuffle_i32x4(low01, low23, 0x88);  // lane 0 of each quad: word o
    rows[4 + o] = _mm512_shuffle_i32x4(low01, low23, 0xDD);
    rows[8 + o] = _mm512_shuffle_i32x4(high01, high23, 0x88);
    rows[12 + o] = _mm512_shuffle_i32x4(high01, high23, 0xDD);
  }
}

// Key rows -> the B operand of scores = Q K^T: for key tile j (16 keys) and feature step t, 16 rows (feature pairs
// t*16 + r) of 16 keys x 2 features, i.e. 32-bit word [r][i] = key j*16+i's feature pair t*16+r: a transpose of
// 16 x 16 words.
VIL_X86_TARGET void pack_keys(const bfloat16_bits* const* rows, const Shape& s, bfloat16_bits* packed) {
  for (int64_t first = 0; first < s.padded_keys; first += kTile) {
    for (int64_t step = 0; step < s.feature_steps; ++step) {
      __m512i words[16];
      for (int64_t i = 0; i < kTile; ++i) words[i] = _mm512_loadu_si512(rows[first + i] + step * 32);
      transpose_16x16_words(words);
      bfloat16_bits* tile = packed + ((first / kTile) * s.feature_steps + step) * kTile * 32;
      for (int64_t r = 0; r < kTile; ++r) _mm512_storeu_si512(tile + r * 32, words[r]);
    }
  }
}

// Value rows -> the B operand of out = weights V: for key block b (32 keys) and dim tile d (16 columns), 16 rows
// (key pairs) of 16 columns x 2 keys.
// Lane order of one packed value row (vpermt2w indices): column i of the even key, then column i of the odd key.
alignas(64) constexpr int16_t kInterleavePairs[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};

VIL_X86_TARGET void pack_values(const bfloat16_bits* const* rows, const Shape& s, bfloat16_bits* packed) {
  const __m512i interleave = _mm512_load_si512(kInterleavePairs);
  for (int64_t key = 0; key < s.padded_keys; key += 2) {
    const int64_t block = key / 32, row = (key % 32) / 2;
    for (int64_t d = 0; d < s.dim_tiles; ++d) {
      const __m512i even =
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[key] + d * kTile)));
      const __m512i odd =
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[key + 1] + d * kTile)));
      _mm512_storeu_si512(packed + ((block * s.dim_tiles + d) * kTile + row) * 32,
                          _mm512_permutex2var_epi16(even, interleave, odd));
    }
  }
}

// exp(x) for x <= 0 on 16 lanes: softmax.cpp's exp_nonpositive range reduction and polynomial, in fused
// multiply-adds, scaled by 2^n with scalef. Lanes below -87 (and -inf) give 0. kForBfloat16: for weights that are
// rounded to bfloat16 (relative steps of 2^-8), a degree-4 polynomial fitted to exp on [-ln 2 / 2, ln 2 / 2]
// (relative error at most 2.7e-6 there, a thousandth of a bfloat16 step) instead of the degree-6 series: two of the
// six multiply-adds fewer, the bfloat16 forward's softmax about 10% faster.
template <bool kForBfloat16 = false>
VIL_X86_TARGET inline __m512 exp_nonpositive16(__m512 x) {
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p;
  if constexpr (kForBfloat16) {
    p = _mm512_set1_ps(0.0414170995f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.167906851f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.500048518f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.999963582f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.999999166f));
  } else {
    p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  }
  return _mm512_maskz_scalef_ps(kept, p, n);
}

// 16 float32 -> bfloat16, rounding to nearest even (vcvtneps2bf16), as PyTorch's conversion does for finite values.
VIL_X86_TARGET inline __m256i round_to_bfloat16(__m512 x) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)); }

// 16 slots from k of the terms added to the scores: bias (read masked past `keys`) + the keys' padding flags
// (key_terms, -inf past `keys`). Chunks without padding keys skip the flags and only set -inf past `keys`.
template <bool kPaddingKeys>
VIL_X86_TARGET inline __m512 score_terms(const float* bias, const float* key_terms, int64_t k, int64_t keys) {
  const int64_t valid = std::clamp<int64_t>(keys - k, 0, 16);
  const __mmask16 on_keys = static_cast<__mmask16>((1u << valid) - 1u);
  const __m512 value = _mm512_maskz_loadu_ps(on_keys, bias + k);
  if constexpr (kPaddingKeys) return _mm512_add_ps(value, _mm512_loadu_ps(key_terms + k));
  if (valid < 16) return _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), on_keys, value);
  return value;
}

// 16 slots from k of softmax_row's first pass: the scores plus their terms (unless kTermsAdded: the products
// started from them), stored back.
template <bool kPaddingKeys, bool kTermsAdded>
VIL_X86_TARGET inline __m512 add_terms(float* scores, const float* bias, const float* key_terms, int64_t k,
                                       int64_t keys) {
  if constexpr (kTermsAdded) return _mm512_loadu_ps(scores + k);
  const __m512 value = _mm512_add_ps(_mm512_loadu_ps(scores + k), score_terms<kPaddingKeys>(bias, key_terms, k, keys));
  _mm512_storeu_ps(scores + k, value);
  return value;
}

VIL_X86_TARGET inline void store_weights(bfloat16_bits* weights, __m512 values) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(weights), round_to_bfloat16(values));
}

VIL_X86_TARGET inline void store_weights(float* weights, __m512 values) { _mm512_storeu_ps(weights, values); }

// 16 slots from k of its second pass: exp(x - row max) into weights (rounded to bfloat16 where they are); returns the
// float32 values.
template <typename T>
VIL_X86_TARGET inline __m512 exp_and_round(const float* scores, T* weights, int64_t k, __m512 row_max) {
  const __m512 e =
      exp_nonpositive16<std::is_same_v<T, bfloat16_bits>>(_mm512_sub_ps(_mm512_loadu_ps(scores + k), row_max));
  store_weights(weights + k, e);
  return e;
}

// One query row, over all padded_keys slots (a multiple of 32): weights = exp(x - max x), x = scores + bias +
// key_terms (the scores hold them already where kTermsAdded), into `weights` (rounded to bfloat16 for the bfloat16
// engines); returns 1 / their float32 sum, by which the row's output is scaled (so the weights are not normalised one
// by one); past `keys` the weights are 0. Two accumulators per reduction: one would serialise each pass on its
// latency.
template <bool kPaddingKeys, bool kTermsAdded, typename T>
VIL_X86_TARGET float softmax_row(float* scores, const float* bias, const float* key_terms, T* weights, int64_t keys,
                                 int64_t padded_keys) {
  __m512 most_even = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), most_odd = most_even;
  for (int64_t k = 0; k < padded_keys; k += 32) {
    most_even = _mm512_max_ps(most_even, add_terms<kPaddingKeys, kTermsAdded>(scores, bias, key_terms, k, keys));
    most_odd = _mm512_max_ps(most_odd, add_terms<kPaddingKeys, kTermsAdded>(scores, bias, key_terms, k + 16, keys));
  }
  const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(most_even, most_odd)));
  __m512 total_even = _mm512_setzero_ps(), total_odd = total_even;
  for (int64_t k = 0; k < padded_keys; k += 32) {
    total_even = _mm512_add_ps(total_even, exp_and_round(scores, weights, k, row_max));
    total_odd = _mm512_add_ps(total_odd, exp_and_round(scores, weights, k + 16, row_max));
  }
  return 1.0f / _mm512_reduce_add_ps(_mm512_add_ps(total_even, total_odd));
}

// Tiles 2-5 hold the four accumulators of every product here (tile numbers are immediates).
VIL_X86_TARGET inline void zero_accumulators() {
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
}

// Scores of a pair of query tiles (32 rows at scores, padded_keys apart) against every key, on tiles: each key tile
// loaded serves both query tiles, so four accumulators are in flight (a lone last tile is paired with itself; its
// copy is not used): with one tile of queries the stores of each product's scores waited on its latency.
VIL_X86_TARGET void tile_scores(const bfloat16_bits* first_queries, const bfloat16_bits* second_queries,
                                const bfloat16_bits* packed_keys, const Shape& s, float* scores) {
  const int64_t packed_tile = kTile * 32, score_stride = s.padded_keys * 4;
  float* second_scores = scores + kTile * s.padded_keys;
  if (s.feature_steps == 1) {
    _tile_loadd(0, first_queries, s.dim * 2);
    _tile_loadd(1, second_queries, s.dim * 2);
  }
  for (int64_t j = 0; j < s.padded_keys / kTile; j += 2) {  // two key tiles at a time (padded_keys: 32s)
    const bfloat16_bits* first_keys = packed_keys + j * s.feature_steps * packed_tile;
    const bfloat16_bits* second_keys = first_keys + s.feature_steps * packed_tile;
    zero_accumulators();
    for (int64_t t = 0; t < s.feature_steps; ++t) {
      if (s.feature_steps > 1) {
        _tile_loadd(0, first_queries + t * 32, s.dim * 2);
        _tile_loadd(1, second_queries + t * 32, s.dim * 2);
      }
      _tile_loadd(6, first_keys + t * packed_tile, 64);
      _tile_loadd(7, second_keys + t * packed_tile, 64);
      _tile_dpbf16ps(2, 0, 6);
      _tile_dpbf16ps(3, 0, 7);
      _tile_dpbf16ps(4, 1, 6);
      _tile_dpbf16ps(5, 1, 7);
    }
    _tile_stored(2, scores + j * kTile, score_stride);
    _tile_stored(3, scores + (j + 1) * kTile, score_stride);
    _tile_stored(4, second_scores + j * kTile, score_stride);
    _tile_stored(5, second_scores + (j + 1) * kTile, score_stride);
  }
}

// outputs (32 rows, dim) = weights (32 rows, padded_keys apart) V over blocks of 32 keys, on tiles; `pair`: whether
// the second query tile is used.
VIL_X86_TARGET void tile_outputs(const bfloat16_bits* weights, bool pair, const bfloat16_bits* packed_values,
                                 const Shape& s, float* outputs) {
  const int64_t packed_tile = kTile * 32, weight_stride = s.padded_keys * 2, out_stride = s.dim * 4;
  const bfloat16_bits* second_weights = weights + kTile * s.padded_keys;
  if (s.dim_tiles == 2) {  // both query tiles x both dim tiles at once
    zero_accumulators();
    for (int64_t b = 0; b < s.padded_keys / 32; ++b) {
      const bfloat16_bits* block_values = packed_values + b * 2 * packed_tile;
      _tile_loadd(0, weights + b * 32, weight_stride);
      _tile_loadd(1, second_weights + b * 32, weight_stride);
      _tile_loadd(6, block_values, 64);
      _tile_loadd(7, block_values + packed_tile, 64);
      _tile_dpbf16ps(2, 0, 6);
      _tile_dpbf16ps(3, 0, 7);
      _tile_dpbf16ps(4, 1, 6);
      _tile_dpbf16ps(5, 1, 7);
    }
    _tile_stored(2, outputs, out_stride);
    _tile_stored(3, outputs + kTile, out_stride);
    _tile_stored(4, outputs + kTile * s.dim, out_stride);
    _tile_stored(5, outputs + kTile * s.dim + kTile, out_stride);
    return;
  }
  for (int64_t half = 0; half < (pair ? 2 : 1); ++half) {  // four dim tiles: one query tile at a time
    zero_accumulators();
    for (int64_t b = 0; b < s.padded_keys / 32; ++b) {
      const bfloat16_bits* block_values = packed_values + b * 4 * packed_tile;
      _tile_loadd(0, weights + half * kTile * s.padded_keys + b * 32, weight_stride);
      _tile_loadd(6, block_values, 64);
      _tile_loadd(7, block_values + packed_tile, 64);
      _tile_dpbf16ps(2, 0, 6);
      _tile_dpbf16ps(3, 0, 7);
      _tile_loadd(6, block_values + 2 * packed_tile, 64);
      _tile_loadd(7, block_values + 3 * packed_tile, 64);
      _tile_dpbf16ps(4, 0, 6);
      _tile_dpbf16ps(5, 0, 7);
    }
    float* out = outputs + half * kTile * s.dim;
    _tile_stored(2, out, out_stride);
    _tile_stored(3, out + kTile, out_stride);
    _tile_stored(4, out + 2 * kTile, out_stride);
    _tile_stored(5, out + 3 * kTile, out_stride);
  }
}

// 32-bit word `index` of a bfloat16 row: one pair of features or of weights, broadcast as a dot product's operand.
VIL_X86_TARGET inline __m512bh broadcast_pair(const bfloat16_bits* row, int64_t index) {
  uint32_t word;
  std::memcpy(&word, row + 2 * index, sizeof(word));
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(word));
}

// The same products in AVX512-BF16 registers (vdpbf16ps: 16 float32 lanes, each += a pair of bfloat16 products),
// from the same packed operands: a packed key row holds one feature pair of 16 keys, a packed value row one key pair
// of 16 columns, so each query's (or weight row's) pair is broadcast against it. Register blocks of 16 accumulators
// keep the vector unit busy (a lone row's two or four chains wait on the product's latency); a last one or two rows
// go alone all the same, faster than a block of 8 padded with rows that are not slots.
constexpr int64_t kBlockRows = 8;  // query rows per register block of the score product

// Rows [0, rows) in blocks of `block` (then single rows where at most two are left): calls
// rows_at(first row, whether a block) for each.
template <typename RowsAt>
VIL_X86_TARGET inline void in_register_blocks(int64_t rows, int64_t block, RowsAt rows_at) {
  int64_t first = 0;
  for (; rows - first > 2; first += block) rows_at(first, true);
  for (; first < rows; ++first) rows_at(first, false);
}

// The accumulators of kRows score rows x 32 keys from key tile j, started from the bias and padding terms.
template <bool kPaddingKeys, int64_t kRows>
VIL_X86_TARGET inline void start_from_terms(__m512 (&sums)[kRows][2], const float* const* row_bias,
                                            const float* key_terms, int64_t j, int64_t keys) {
#pragma GCC unroll 16
  for (int64_t i = 0; i < kRows; ++i) {
    sums[i][0] = score_terms<kPaddingKeys>(row_bias[i], key_terms, j * kTile, keys);
    sums[i][1] = score_terms<kPaddingKeys>(row_bias[i], key_terms, (j + 1) * kTile, keys);
  }
}

// Scores of kRows query rows (queries, rows dim apart; bias rows at row_bias) against every key, 32 keys at a time:
// the accumulators start from the bias and padding terms, so the scores leave here whole and softmax_row only reads
// them.
template <bool kPaddingKeys, int64_t kRows>
VIL_X86_TARGET void score_rows(const bfloat16_bits* queries, const float* const* row_bias,
                               const bfloat16_bits* packed_keys, const float* key_terms, const Shape& s,
                               float* scores) {
  const int64_t packed_tile = kTile * 32;
  for (int64_t j = 0; j < s.padded_keys / kTile; j += 2) {
    __m512 sums[kRows][2];
    start_from_terms<kPaddingKeys, kRows>(sums, row_bias, key_terms, j, s.keys);
    for (int64_t t = 0; t < s.feature_steps; ++t) {
      const bfloat16_bits* first_keys = packed_keys + (j * s.feature_steps + t) * packed_tile;
      const bfloat16_bits* second_keys = first_keys + s.feature_steps * packed_tile;
      for (int64_t r = 0; r < kTile; ++r) {
        const __m512bh first = (__m512bh)_mm512_loadu_si512(first_keys + r * 32);
        const __m512bh second = (__m512bh)_mm512_loadu_si512(second_keys + r * 32);
#pragma GCC unroll 16
        for (int64_t i = 0; i < kRows; ++i) {
          const __m512bh pair = broadcast_pair(queries + i * s.dim, t * kTile + r);
          sums[i][0] = _mm512_dpbf16_ps(sums[i][0], pair, first);
          sums[i][1] = _mm512_dpbf16_ps(sums[i][1], pair, second);
        }
      }
    }
#pragma GCC unroll 16
    for (int64_t i = 0; i < kRows; ++i) {
      _mm512_storeu_ps(scores + i * s.padded_keys + j * kTile, sums[i][0]);
      _mm512_storeu_ps(scores + i * s.padded_keys + (j + 1) * kTile, sums[i][1]);
    }
  }
}

// The float32 engine's (below): its kRows query rows read in place (float32, or bfloat16 in the backward), each
// feature broadcast against 16 keys packed feature-major.
template <bool kPaddingKeys, int64_t kRows, typename Token>
VIL_X86_TARGET void score_rows(const Token* const* query_rows, const float* const* row_bias, const float* packed_keys,
                               const float* key_terms, const Shape& s, float* scores) {
  for (int64_t j = 0; j < s.padded_keys / kTile; j += 2) {
    __m512 sums[kRows][2];
    start_from_terms<kPaddingKeys, kRows>(sums, row_bias, key_terms, j, s.keys);
    const float* first_keys = packed_keys + j * kTile * s.dim;
    const float* second_keys = first_keys + kTile * s.dim;
    for (int64_t d = 0; d < s.dim; ++d) {
      const __m512 first = _mm512_loadu_ps(first_keys + d * kTile);
      const __m512 second = _mm512_loadu_ps(second_keys + d * kTile);
#pragma GCC unroll 16
      for (int64_t i = 0; i < kRows; ++i) {
        const __m512 feature = _mm512_set1_ps(to_float(query_rows[i][d]));
        sums[i][0] = _mm512_fmadd_ps(feature, first, sums[i][0]);
        sums[i][1] = _mm512_fmadd_ps(feature, second, sums[i][1]);
      }
    }
#pragma GCC unroll 16
    for (int64_t i = 0; i < kRows; ++i) {
      _mm512_storeu_ps(scores + i * s.padded_keys + j * kTile, sums[i][0]);
      _mm512_storeu_ps(scores + i * s.padded_keys + (j + 1) * kTile, sums[i][1]);
    }
  }
}

// Scores of query rows [0, rows) (bias: the first row's, rows at bias_stride), by either engine's score_rows: the
// bfloat16 queries copied `query_step` = dim apart, or the float32 rows' pointers (step 1). A block's rows past
// `rows` are padding (zero queries, within the buffers) and read the last row's bias (past it lies the next head's).
template <bool kPaddingKeys, typename Queries, typename Key>
VIL_X86_TARGET void vector_scores(Queries queries, int64_t query_step, int64_t rows, const Key* packed_keys,
                                  const float* bias, int64_t bias_stride, const float* key_terms, const Shape& s,
                                  float* scores) {
  in_register_blocks(rows, kBlockRows, [&](int64_t first, bool block) {
    const float* row_bias[kBlockRows];
#pragma GCC unroll 16
    for (int64_t i = 0; i < kBlockRows; ++i) row_bias[i] = bias + std::min(first + i, rows - 1) * bias_stride;
    Queries block_queries = queries + first * query_step;
    float* block_scores = scores + first * s.padded_keys;
    if (block) {
      score_rows<kPaddingKeys, kBlockRows>(block_queries, row_bias, packed_keys, key_terms, s, block_scores);
    } else {
      score_rows<kPaddingKeys, 1>(block_queries, row_bias, packed_keys, key_terms, s, block_scores);
    }
  });
}

// outputs (kRows, dim) = weights (kRows, padded_keys) V, kDimTiles x 16 columns, over key pairs.
template <int64_t kRows, int64_t kDimTiles>
VIL_X86_TARGET void output_rows(const bfloat16_bits* weights, const bfloat16_bits* packed_values, const Shape& s,
                                float* outputs) {
  const int64_t packed_tile = kTile * 32;
  __m512 sums[kRows][kDimTiles];
#pragma GCC unroll 16
  for (int64_t i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int64_t d = 0; d < kDimTiles; ++d) sums[i][d] = _mm512_setzero_ps();
  }
  for (int64_t pair = 0; pair < s.padded_keys / 2; ++pair) {
    // packed value row of key pair `pair`, dim tile d: block pair / 16, row pair % 16
    const bfloat16_bits* value_row = packed_values + ((pair / kTile) * kDimTiles * kTile + pair % kTile) * 32;
    __m512bh columns[kDimTiles];
#pragma GCC unroll 4
    for (int64_t d = 0; d < kDimTiles; ++d) columns[d] = (__m512bh)_mm512_loadu_si512(value_row + d * packed_tile);
#pragma GCC unroll 16
    for (int64_t i = 0; i < kRows; ++i) {
      const __m512bh weight = broadcast_pair(weights + i * s.padded_keys, pair);
#pragma GCC unroll 4
      for (int64_t d = 0; d < kDimTiles; ++d) sums[i][d] = _mm512_dpbf16_ps(sums[i][d], weight, columns[d]);
    }
  }
#pragma GCC unroll 16
  for (int64_t i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int64_t d = 0; d < kDimTiles; ++d) _mm512_storeu_ps(outputs + i * s.dim + d * kTile, sums[i][d]);
  }
}

// outputs (rows, dim) = weights V, in blocks of 16 / kDimTiles rows (16 accumulators: 4 rows for head dim 64, 8 for
// 32).
template <int64_t kDimTiles>
VIL_X86_TARGET void vector_outputs(const bfloat16_bits* weights, int64_t rows, const bfloat16_bits* packed_values,
                                   const Shape& s, float* outputs) {
  constexpr int64_t kRows = 16 / kDimTiles;
  in_register_blocks(rows, kRows, [&](int64_t first, bool block) {
    (block ? output_rows<kRows, kDimTiles> : output_rows<1, kDimTiles>)(weights + first * s.padded_keys,
                                                                         packed_values, s, outputs + first * s.dim);
  });
}

// One chunk, its rows in w (Scratch::fit, then filled by the caller): bias (slots, keys) with rows at bias_stride.
// Query tiles go in pairs (32 rows of scores, weights and outputs at a time); kTiles: the products on AMX tiles, else
// in AVX512-BF16 registers.
template <bool kTiles>
VIL_X86_TARGET void chunk_forward(const float* bias, int64_t bias_stride, const Shape& s, Scratch<bfloat16_bits>& w) {
  for (int64_t q = 0; q < s.query_tiles * kTile; ++q) {
    std::memcpy(w.queries.data() + q * s.dim, w.query_rows[q], s.dim * sizeof(bfloat16_bits));
  }
  pack_keys(w.key_rows.data(), s, w.keys.data());
  pack_values(w.value_rows.data(), s, w.values.data());
  for (int64_t qt = 0; qt < s.query_tiles; qt += 2) {
    const bool pair = qt + 1 < s.query_tiles;
    const bfloat16_bits* first_queries = w.queries.data() + qt * kTile * s.dim;
    // rows of the pair that are slots: [0, first_rows) and [16, 16 + second_rows); contiguous, as the first tile of
    // a pair is full
    const int64_t first_rows = std::min(kTile, s.slots - qt * kTile);
    const int64_t second_rows = pair ? std::min(kTile, s.slots - (qt + 1) * kTile) : 0;
    const int64_t rows = first_rows + second_rows;
    const float* pair_bias = bias + qt * kTile * bias_stride;
    if constexpr (kTiles) {
      tile_scores(first_queries, first_queries + (pair ? kTile * s.dim : 0), w.keys.data(), s, w.scores.data());
    } else {
      auto* scores = w.padding_keys ? vector_scores<true, const bfloat16_bits*, bfloat16_bits>
                                    : vector_scores<false, const bfloat16_bits*, bfloat16_bits>;
      scores(first_queries, s.dim, rows, w.keys.data(), pair_bias, bias_stride, w.flags.data(), s, w.scores.data());
    }
    float inverse_sums[2 * kTile];
    auto* softmax =
        w.padding_keys ? softmax_row<true, !kTiles, bfloat16_bits> : softmax_row<false, !kTiles, bfloat16_bits>;
    for (int64_t r = 0; r < rows; ++r) {
      inverse_sums[r] = softmax(w.scores.data() + r * s.padded_keys, pair_bias + r * bias_stride, w.flags.data(),
                                w.weights.data() + r * s.padded_keys, s.keys, s.padded_keys);
    }
    // rows past `rows` are not slots: their outputs are not written
    if constexpr (kTiles) {
      tile_outputs(w.weights.data(), pair, w.values.data(), s, w.outputs.data());
    } else if (s.dim_tiles == 2) {
      vector_outputs<2>(w.weights.data(), rows, w.values.data(), s, w.outputs.data());
    } else {
      vector_outputs<4>(w.weights.data(), rows, w.values.data(), s, w.outputs.data());
    }
    for (int64_t r = 0; r < rows; ++r) {
      bfloat16_bits* out_row = w.output_rows[qt * kTile + r];
      if (out_row == nullptr) continue;
      const float* row = w.outputs.data() + r * s.dim;
      const __m512 inverse = _mm512_set1_ps(inverse_sums[r]);
      for (int64_t d = 0; d < s.dim; d += 16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_row + d),
                            round_to_bfloat16(_mm512_mul_ps(_mm512_loadu_ps(row + d), inverse)));
      }
    }
  }
}

// The float32 engine: the same chunk tasks, rows and softmax, its products in float32 fused multiply-adds on
// 16-lane registers (AVX-512F: Intel since Skylake-SP, AMD since Zen 4). Queries and values are read in place, one
// feature (or one weight) broadcast against 16 keys (or 16 output columns); only the keys are packed, feature-major
// per 16 keys. Any head dim up to 64: a last partial group of 16 features is read and written masked.

// 16 features from `first` of a row that has `dim`: the lanes past dim read as 0.
VIL_X86_TARGET inline __m512 load_features(const float* row, int64_t first, int64_t dim) {
  const int64_t valid = std::min<int64_t>(dim - first, 16);
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << valid) - 1u), row + first);
}

// The same of a bfloat16 row (the backward's inputs), widened exactly.
VIL_X86_TARGET inline __m512 load_features(const bfloat16_bits* row, int64_t first, int64_t dim) {
  const int64_t valid = std::min<int64_t>(dim - first, 16);
  const __m256i bits = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << valid) - 1u), row + first);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Key rows -> for key tile j (16 keys) and feature d, the 16 keys' feature d (float32) at packed + (j * dim + d) * 16:
// per 16 features a 16 x 16 transpose.
template <typename Token>
VIL_X86_TARGET void pack_keys_f32(const Token* const* rows, const Shape& s, float* packed) {
  for (int64_t first = 0; first < s.padded_keys; first += kTile) {
    float* tile = packed + first * s.dim;
    for (int64_t feature = 0; feature < s.dim; feature += 16) {
      __m512i words[16];
      for (int64_t i = 0; i < kTile; ++i) {
        words[i] = _mm512_castps_si512(load_features(rows[first + i], feature, s.dim));
      }
      transpose_16x16_words(words);
      for (int64_t r = 0; r < std::min<int64_t>(16, s.dim - feature); ++r) {
        _mm512_storeu_si512(tile + (feature + r) * kTile, words[r]);
      }
    }
  }
}

// outputs (kRows, kDimTiles x 16 apart) = weights R: weight row i at weights + i * row_step, its term t at
// + t * term_step (t < terms), against R's rows read in place (rows[t], dim features; a zero row where a term is
// padding). Both engines' products with rows read in place run here: the forward's weights V and the backward's
// dS K, dS^T Q and P^T dO (the last two with row_step 1: a column of the chunk's scores per output row).
template <int64_t kRows, int64_t kDimTiles, typename Token>
VIL_X86_TARGET void weighted_rows_f32(const float* weights, int64_t row_step, int64_t term_step, int64_t terms,
                                      const Token* const* rows, int64_t dim, float* outputs) {
  __m512 sums[kRows][kDimTiles];
#pragma GCC unroll 16
  for (int64_t i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int64_t d = 0; d < kDimTiles; ++d) sums[i][d] = _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < terms; ++t) {
    __m512 columns[kDimTiles];
#pragma GCC unroll 4
    for (int64_t d = 0; d < kDimTiles; ++d) columns[d] = load_features(rows[t], d * kTile, dim);
#pragma GCC unroll 16
    for (int64_t i = 0; i < kRows; ++i) {
      const __m512 weight = _mm512_set1_ps(weights[i * row_step + t * term_step]);
#pragma GCC unroll 4
      for (int64_t d = 0; d < kDimTiles; ++d) sums[i][d] = _mm512_fmadd_ps(weight, columns[d], sums[i][d]);
    }
  }
#pragma GCC unroll 16
  for (int64_t i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int64_t d = 0; d < kDimTiles; ++d) _mm512_storeu_ps(outputs + (i * kDimTiles + d) * kTile, sums[i][d]);
  }
}

// outputs rows [0, count) (dim_tiles x 16 apart) by weighted_rows_f32, in blocks of 16 / dim_tiles rows.
template <int64_t kDimTiles, typename Token>
VIL_X86_TARGET void weighted_blocks_f32(const float* weights, int64_t count, int64_t row_step, int64_t term_step,
                                        int64_t terms, const Token* const* rows, int64_t dim, float* outputs) {
  constexpr int64_t kRows = 16 / kDimTiles;
  in_register_blocks(count, kRows, [&](int64_t first, bool block) {
    (block ? weighted_rows_f32<kRows, kDimTiles, Token> : weighted_rows_f32<1, kDimTiles, Token>)(
        weights + first * row_step, row_step, term_step, terms, rows, dim, outputs + first * kDimTiles * kTile);
  });
}

template <typename Token>
VIL_X86_TARGET void weighted_products_f32(const float* weights, int64_t count, int64_t row_step, int64_t term_step,
                                          int64_t terms, const Token* const* rows, const Shape& s, float* outputs) {
  switch (s.dim_tiles) {
    case 1: weighted_blocks_f32<1>(weights, count, row_step, term_step, terms, rows, s.dim, outputs); break;
    case 2: weighted_blocks_f32<2>(weights, count, row_step, term_step, terms, rows, s.dim, outputs); break;
    case 3: weighted_blocks_f32<3>(weights, count, row_step, term_step, terms, rows, s.dim, outputs); break;
    default: weighted_blocks_f32<4>(weights, count, row_step, term_step, terms, rows, s.dim, outputs); break;
  }
}

// The first dim features of a row of outputs (16-column groups), times `scale`, stored into or (kAdd) added to
// `target`, masked past dim.
template <bool kAdd>
VIL_X86_TARGET inline void store_row_f32(const float* row, float scale, int64_t dim, float* target) {
  const __m512 factor = _mm512_set1_ps(scale);
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 valid = static_cast<__mmask16>((1u << std::min<int64_t>(dim - d, 16)) - 1u);
    __m512 value = _mm512_mul_ps(_mm512_loadu_ps(row + d), factor);
    if constexpr (kAdd) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(valid, target + d));
    _mm512_mask_storeu_ps(target + d, valid, value);
  }
}

// One chunk in float32, its rows in w (as chunk_forward's), 32 query rows at a time.
VIL_X86_TARGET void chunk_forward_f32(const float* bias, int64_t bias_stride, const Shape& s, Scratch<float>& w) {
  pack_keys_f32(w.key_rows.data(), s, w.keys.data());
  for (int64_t first = 0; first < s.slots; first += 2 * kTile) {
    const int64_t rows = std::min(2 * kTile, s.slots - first);
    const float* rows_bias = bias + first * bias_stride;
    const float* const* queries = w.query_rows.data() + first;  // past the slots: zero rows
    const bool padding = w.padding_keys;
    auto* scores =
        padding ? vector_scores<true, const float* const*, float> : vector_scores<false, const float* const*, float>;
    scores(queries, 1, rows, w.keys.data(), rows_bias, bias_stride, w.flags.data(), s, w.scores.data());
    float inverse_sums[2 * kTile];
    auto* softmax = padding ? softmax_row<true, true, float> : softmax_row<false, true, float>;
    for (int64_t r = 0; r < rows; ++r) {
      inverse_sums[r] = softmax(w.scores.data() + r * s.padded_keys, rows_bias + r * bias_stride, w.flags.data(),
                                w.weights.data() + r * s.padded_keys, s.keys, s.padded_keys);
    }
    weighted_products_f32(w.weights.data(), rows, s.padded_keys, 1, s.keys, w.value_rows.data(), s, w.outputs.data());
    for (int64_t r = 0; r < rows; ++r) {
      float* out_row = w.output_rows[first + r];
      if (out_row == nullptr) continue;
      store_row_f32<false>(w.outputs.data() + r * s.dim_tiles * kTile, inverse_sums[r], s.dim, out_row);
    }
  }
}

// The backward (longformer_backward_): per chunk, the probabilities recomputed as the forward's (same scores, bias,
// flags and softmax), then dP = dO V^T (V packed as the keys are), delta = sum_k P dP per query (equal to dO . O),
// dS = P (dP - delta), and the four products dQ = dS K, dK = dS^T Q, dV = P^T dO. The bias's gradient is dS summed
// over images and chunks. In chunk_backward every product is in float32 fused multiply-adds with rows read in place
// (weighted_products_f32; bfloat16 tokens widened as they are read); in chunk_backward_bf16 in bfloat16 pairs.

// Per thread: the chunk's rows (T: the tokens' type; dO read, dQ, dK and dV written), its keys and values packed,
// every query row's probabilities and score gradients, and one product's output rows; for the bfloat16 products
// (chunk_backward_bf16) the operands in their packed layouts too. Register blocks may run up to 13 rows past the
// last one (in_register_blocks): 16 rows of slack.
template <typename T>
struct BackwardScratch {
  std::vector<const T*> query_rows, key_rows, value_rows;
  std::vector<const T*> grad_output_rows;  // a zero row past the slots and for off-map queries
  std::vector<float*> grad_query_rows, grad_key_rows, grad_value_rows;  // nullptr: padding, not written
  std::vector<float> flags, keys, values, probs, grad_scores, products, zeros;
  std::vector<int64_t> query_tokens, key_tokens;  // Call::find_rows's
  // bfloat16 products: query and dO rows copied, keys and values packed as keys (scores, dP) and the keys as values
  // (dQ); dS rounded; dS^T or P^T (keys x padded slots) and the query or dO rows packed as values (dK, dV)
  std::vector<bfloat16_bits> queries, grad_outputs, packed_keys, packed_values, keys_as_values, weights, transposed,
      rows_as_values;
  bool padding_keys = false;
  // the kept slot ranges (Call::kept_ranges) where the task's keys are some of the slots, else null: the columns of
  // the bias's gradient that its score gradients go to
  const SlotRanges* cut = nullptr;
  void fit(const Shape& s, bool bfloat16_products) {
    const int64_t rows = s.query_tiles * kTile + kTile, padded_slots = (s.slots + 31) / 32 * 32;
    const int64_t query_rows_held = std::max(s.query_tiles * kTile, padded_slots);
    query_rows.assign(query_rows_held, zero_row<T>());
    key_rows.assign(s.padded_keys, zero_row<T>());
    value_rows.assign(s.padded_keys, zero_row<T>());
    grad_output_rows.assign(query_rows_held, zero_row<T>());
    flags.assign(s.padded_keys, -std::numeric_limits<float>::infinity());
    keys.resize(s.padded_keys * s.dim_tiles * kTile);
    query_tokens.resize(s.slots);
    key_tokens.resize(s.keys);
    grad_query_rows.assign(s.slots, nullptr);
    grad_key_rows.assign(s.padded_keys, nullptr);
    grad_value_rows.assign(s.padded_keys, nullptr);
    values.resize(s.padded_keys * s.dim_tiles * kTile);
    probs.assign(rows * s.padded_keys, 0);
    grad_scores.assign(rows * s.padded_keys, 0);
    products.resize((std::max(rows, s.padded_keys) + kTile) * s.dim_tiles * kTile);
    zeros.assign(s.padded_keys, 0);
    const int64_t held = bfloat16_products ? 1 : 0;
    queries.assign(held * s.query_tiles * kTile * s.dim, 0);
    grad_outputs.assign(held * s.query_tiles * kTile * s.dim, 0);
    packed_keys.resize(held * s.padded_keys * s.dim);
    packed_values.resize(held * s.padded_keys * s.dim);
    keys_as_values.resize(held * s.padded_keys * s.dim);
    weights.assign(held * rows * s.padded_keys, 0);
    transposed.assign(held * (s.padded_keys + kTile) * padded_slots, 0);  // columns past the slots stay 0
    rows_as_values.resize(held * padded_slots * s.dim);
  }
};

// row[k] for the k-th kept slot added to target[slot] (slot order).
VIL_X86_TARGET void add_kept_columns(const float* row, const SlotRanges& kept, float* target) {
  for (const auto& [first, count] : kept) {
    for (int64_t i = 0; i < count; i += 16) {
      const __mmask16 on = static_cast<__mmask16>((1u << std::min<int64_t>(count - i, 16)) - 1u);
      float* at = target + first + i;
      _mm512_mask_storeu_ps(at, on, _mm512_add_ps(_mm512_maskz_loadu_ps(on, at), _mm512_maskz_loadu_ps(on, row + i)));
    }
    row += count;
  }
}

// The chunk's P and dS from its scores (in g.probs, terms added) and dP (in g.grad_scores), both in place; dS added
// to bias_grad (slots, all key slots) at grad_stride unless null (into the kept slots' columns where g.cut).
template <typename T>
VIL_X86_TARGET void probabilities_and_score_grads(const float* bias, int64_t bias_stride, const Shape& s,
                                                  BackwardScratch<T>& g, float* bias_grad, int64_t grad_stride) {
  auto* softmax = g.padding_keys ? softmax_row<true, true, float> : softmax_row<false, true, float>;
  for (int64_t r = 0; r < s.slots; ++r) {
    float* probs = g.probs.data() + r * s.padded_keys;  // scores, then the weights in place, then P
    float* grad = g.grad_scores.data() + r * s.padded_keys;  // dP, then dS
    const __m512 inverse = _mm512_set1_ps(softmax(probs, bias + r * bias_stride, g.flags.data(), probs, s.keys,
                                                  s.padded_keys));
    __m512 total = _mm512_setzero_ps();
    for (int64_t k = 0; k < s.padded_keys; k += 16) {
      const __mmask16 on_keys = static_cast<__mmask16>((1u << std::clamp<int64_t>(s.keys - k, 0, 16)) - 1u);
      const __m512 prob = _mm512_mul_ps(_mm512_loadu_ps(probs + k), inverse);
      _mm512_storeu_ps(probs + k, prob);
      total = _mm512_fmadd_ps(prob, _mm512_maskz_loadu_ps(on_keys, grad + k), total);
    }
    const __m512 delta = _mm512_set1_ps(_mm512_reduce_add_ps(total));
    for (int64_t k = 0; k < s.padded_keys; k += 16) {
      const __mmask16 on_keys = static_cast<__mmask16>((1u << std::clamp<int64_t>(s.keys - k, 0, 16)) - 1u);
      const __m512 grad_scores =
          _mm512_maskz_mul_ps(on_keys, _mm512_loadu_ps(probs + k), _mm512_sub_ps(_mm512_loadu_ps(grad + k), delta));
      _mm512_storeu_ps(grad + k, grad_scores);
      if (bias_grad != nullptr && g.cut == nullptr) {
        float* target = bias_grad + r * grad_stride + k;
        _mm512_mask_storeu_ps(target, on_keys, _mm512_add_ps(_mm512_maskz_loadu_ps(on_keys, target), grad_scores));
      }
    }
    if (bias_grad != nullptr && g.cut != nullptr) add_kept_columns(grad, *g.cut, bias_grad + r * grad_stride);
  }
}

// dQ rows (products, out_step apart) stored; dK or dV rows added (neighbouring chunks share keys).
template <typename T>
VIL_X86_TARGET void store_query_grads(const float* products, int64_t out_step, const Shape& s,
                                      const BackwardScratch<T>& g) {
  for (int64_t r = 0; r < s.slots; ++r) {
    if (g.grad_query_rows[r] == nullptr) continue;
    store_row_f32<false>(products + r * out_step, 1.0f, s.dim, g.grad_query_rows[r]);
  }
}

VIL_X86_TARGET void add_key_grads(const float* products, int64_t out_step, const Shape& s, float* const* targets) {
  for (int64_t k = 0; k < s.keys; ++k) {
    if (targets[k] != nullptr) store_row_f32<true>(products + k * out_step, 1.0f, s.dim, targets[k]);
  }
}

// One chunk's gradients in float32 products, its rows in g (filled by the caller).
template <typename T>
VIL_X86_TARGET void chunk_backward(const float* bias, int64_t bias_stride, const Shape& s, BackwardScratch<T>& g,
                                   float* bias_grad, int64_t grad_stride) {
  using Rows = const T* const*;
  pack_keys_f32(g.key_rows.data(), s, g.keys.data());
  pack_keys_f32(g.value_rows.data(), s, g.values.data());
  auto* scores = g.padding_keys ? vector_scores<true, Rows, float> : vector_scores<false, Rows, float>;
  scores(g.query_rows.data(), 1, s.slots, g.keys.data(), bias, bias_stride, g.flags.data(), s, g.probs.data());
  // dP: no terms (a zero bias row); its lanes past `keys` are -inf and never read
  vector_scores<false, Rows, float>(g.grad_output_rows.data(), 1, s.slots, g.values.data(), g.zeros.data(), 0,
                                    g.flags.data(), s, g.grad_scores.data());
  probabilities_and_score_grads(bias, bias_stride, s, g, bias_grad, grad_stride);
  const int64_t out_step = s.dim_tiles * kTile;
  float* products = g.products.data();
  weighted_products_f32(g.grad_scores.data(), s.slots, s.padded_keys, 1, s.keys, g.key_rows.data(), s, products);
  store_query_grads(products, out_step, s, g);
  // per key slot: a column of dS (or P) against the chunk's query (or dO) rows
  weighted_products_f32(g.grad_scores.data(), s.keys, 1, s.padded_keys, s.slots, g.query_rows.data(), s, products);
  add_key_grads(products, out_step, s, g.grad_key_rows.data());
  weighted_products_f32(g.probs.data(), s.keys, 1, s.padded_keys, s.slots, g.grad_output_rows.data(), s, products);
  add_key_grads(products, out_step, s, g.grad_value_rows.data());
}

// matrix (float32, `rows` rows padded_keys apart; rows past them read as 0) -> transposed (bfloat16, padded_keys rows
// `columns` apart), in 16 x 16 blocks.
VIL_X86_TARGET void transpose_to_bfloat16(const float* matrix, int64_t rows, int64_t padded_keys, int64_t columns,
                                          bfloat16_bits* transposed) {
  for (int64_t first_row = 0; first_row < rows; first_row += kTile) {
    for (int64_t first_key = 0; first_key < padded_keys; first_key += kTile) {
      __m512i words[16];
      for (int64_t i = 0; i < kTile; ++i) {
        words[i] = first_row + i < rows ? _mm512_loadu_si512(matrix + (first_row + i) * padded_keys + first_key)
                                        : _mm512_setzero_si512();
      }
      transpose_16x16_words(words);
      for (int64_t j = 0; j < kTile; ++j) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(transposed + (first_key + j) * columns + first_row),
                            round_to_bfloat16(_mm512_castsi512_ps(words[j])));
      }
    }
  }
}

// The same chunk's gradients of bfloat16 tokens in AVX512-BF16 dot products (head dims 32 and 64), on the bfloat16
// forward's packed layouts: scores and dP as its scores, dQ = dS K as its weights V with the keys packed as values,
// dK = dS^T Q and dV = P^T dO likewise with dS^T or P^T (rounded to bfloat16, as the ATen path's products round
// them) as the weights and the query or dO rows, padded to 32, packed as values.
VIL_X86_TARGET void chunk_backward_bf16(const float* bias, int64_t bias_stride, const Shape& s,
                                        BackwardScratch<bfloat16_bits>& g, float* bias_grad, int64_t grad_stride) {
  const int64_t padded_slots = (s.slots + 31) / 32 * 32;
  // the transposed products: a row per key slot, a term per query slot
  const Shape ts{s.keys, s.slots, s.dim, padded_slots, 0, s.feature_steps, s.dim_tiles};
  for (int64_t q = 0; q < s.query_tiles * kTile; ++q) {
    std::memcpy(g.queries.data() + q * s.dim, g.query_rows[q], s.dim * sizeof(bfloat16_bits));
    std::memcpy(g.grad_outputs.data() + q * s.dim, g.grad_output_rows[q], s.dim * sizeof(bfloat16_bits));
  }
  pack_keys(g.key_rows.data(), s, g.packed_keys.data());
  pack_keys(g.value_rows.data(), s, g.packed_values.data());
  using Rows = const bfloat16_bits*;
  auto* scores = g.padding_keys ? vector_scores<true, Rows, bfloat16_bits> : vector_scores<false, Rows, bfloat16_bits>;
  scores(g.queries.data(), s.dim, s.slots, g.packed_keys.data(), bias, bias_stride, g.flags.data(), s, g.probs.data());
  vector_scores<false, Rows, bfloat16_bits>(g.grad_outputs.data(), s.dim, s.slots, g.packed_values.data(),
                                            g.zeros.data(), 0, g.flags.data(), s, g.grad_scores.data());
  probabilities_and_score_grads(bias, bias_stride, s, g, bias_grad, grad_stride);
  float* products = g.products.data();
  auto outputs = s.dim_tiles == 2 ? vector_outputs<2> : vector_outputs<4>;
  for (int64_t r = 0; r < s.slots; ++r) {
    for (int64_t k = 0; k < s.padded_keys; k += 16) {
      const int64_t at = r * s.padded_keys + k;
      store_weights(g.weights.data() + at, _mm512_loadu_ps(g.grad_scores.data() + at));
    }
  }
  pack_values(g.key_rows.data(), s, g.keys_as_values.data());
  outputs(g.weights.data(), s.slots, g.keys_as_values.data(), s, products);
  store_query_grads(products, s.dim, s, g);
  transpose_to_bfloat16(g.grad_scores.data(), s.slots, s.padded_keys, padded_slots, g.transposed.data());
  pack_values(g.query_rows.data(), ts, g.rows_as_values.data());
  outputs(g.transposed.data(), s.keys, g.rows_as_values.data(), ts, products);
  add_key_grads(products, s.dim, s, g.grad_key_rows.data());
  transpose_to_bfloat16(g.probs.data(), s.slots, s.padded_keys, padded_slots, g.transposed.data());
  pack_values(g.grad_output_rows.data(), ts, g.rows_as_values.data());
  outputs(g.transposed.data(), s.keys, g.rows_as_values.data(), ts, products);
  add_key_grads(products, s.dim, s, g.grad_value_rows.data());
}

VIL_X86_TARGET void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = kTile;
  }
  // GCC's _tile_loadconfig tells the compiler it reads 8 bytes of the config: without this barrier the stores to
  // the rest of it can be dropped as dead
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

VIL_X86_TARGET void release_tiles() { _tile_release(); }

#endif  // VIL_HAVE_X86_BF16

bool amx_available() {
#if VIL_HAVE_X86_BF16
  return amx_ready();
#else
  return false;
#endif
}

bool avx512_bf16_available() {
#if VIL_HAVE_X86_BF16
  return avx512_bf16_ready();
#else
  return false;
#endif
}

// The float32 engine's instructions: AVX-512 F/BW/VL/DQ (the functions here are compiled for the BF16 and AMX
// targets as well, but it executes none of their instructions: GCC emits them only for their intrinsics).
bool avx512_available() {
#if VIL_HAVE_X86_BF16
  static const bool ready = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ready;
#else
  return false;
#endif
}

// A (B, H, tokens, M) CPU tensor of `dtype` with unit stride in M.
void check_tokens(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t batch, int64_t heads,
                  int64_t tokens, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == dtype && t.device().is_cpu(), name, " must be a ", dtype, " CPU tensor, got ",
              t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == batch && t.size(1) == heads && t.size(2) == tokens && t.size(3) == dim &&
                  t.stride(3) == 1,
              name, " must be (", batch, ", ", heads, ", ", tokens, ", ", dim,
              ") with unit stride in the last dim, got ", t.sizes(), " strides ", t.strides());
}

enum class Engine { kTiles, kBfloat16Vectors, kFloat32 };

// One call of the ops below, its inputs checked: queries (B, H, L, M), their windows' keys and values (B, H, L, M)
// and the global keys and values (B, H, G, M), L = height x width. Query chunk (i, j) sees, per block of key slots,
// `chunks_per_block` chunks at chunk_offsets (P, 2: chunk rows, chunk columns; P = blocks x chunks_per_block, in slot
// order) and then the G globals; keys outside the map or beyond their image's key_extents (B, 2: rows, cols) are
// padding. bias (H, W^2, S) float32 is added to the scores (relative bias, masks: blocked.py's _shared_scores_bias).
struct Call {
  int64_t batch, heads, length, dim, num_global, height, width, window, area, blocks, chunks_per_block, key_slots;
  int64_t chunk_rows, chunk_cols;
  at::Tensor offsets;  // (P, 2), contiguous
  std::vector<int64_t> extents;  // per image: the rows and columns of keys that are not padding
  // A chunk inside its image (inside()) has every query slot on the map and every key slot inside the image's
  // key_extents: its rows lie at these token offsets from the first token of its neighbourhood (first_token()), the
  // same for every such chunk (a global's slot: -1 - g), and none of its key slots is left out or padding, so its
  // task skips find_rows, kept_ranges and the padding flags, which took 23% of the bfloat16 forward's time on
  // ViL-Small's stage 1 at 800x1216. With ViL's 3 x 3 neighbourhoods every chunk but those along the edges of a
  // map (or of its image's extents) is inside: 84% of that stage's.
  std::vector<int64_t> query_offsets, key_offsets;
  // the chunk offsets' extremes, in chunks, with the query chunk's own 0 (the backward colours chunks by them too)
  int64_t reach_up = 0, reach_down = 0, reach_left = 0, reach_right = 0;

  void find_offsets() {
    const int64_t* offset_data = offsets.const_data_ptr<int64_t>();
    for (int64_t p = 0; p < blocks * chunks_per_block; ++p) {
      reach_up = std::min(reach_up, offset_data[2 * p]), reach_down = std::max(reach_down, offset_data[2 * p]);
      reach_left = std::min(reach_left, offset_data[2 * p + 1]);
      reach_right = std::max(reach_right, offset_data[2 * p + 1]);
    }
    query_offsets.clear();
    for (int64_t dy = 0; dy < window; ++dy) {
      for (int64_t dx = 0; dx < window; ++dx) {
        query_offsets.push_back((-reach_up * window + dy) * width - reach_left * window + dx);
      }
    }
    key_offsets.clear();
    for (int64_t block = 0; block < blocks; ++block) {
      for (int64_t c = 0; c < chunks_per_block; ++c) {
        const int64_t* offset = offset_data + 2 * (block * chunks_per_block + c);
        const int64_t top = (offset[0] - reach_up) * window, left = (offset[1] - reach_left) * window;
        for (int64_t dy = 0; dy < window; ++dy) {
          for (int64_t dx = 0; dx < window; ++dx) key_offsets.push_back((top + dy) * width + left + dx);
        }
      }
      for (int64_t g = 0; g < num_global; ++g) key_offsets.push_back(-1 - g);
    }
  }

  bool inside(int64_t b, int64_t ci, int64_t cj) const {
    return ci + reach_up >= 0 && cj + reach_left >= 0 && (ci + reach_down + 1) * window <= extents[2 * b] &&
           (cj + reach_right + 1) * window <= extents[2 * b + 1];
  }

  int64_t first_token(int64_t ci, int64_t cj) const {
    return (ci + reach_up) * window * width + (cj + reach_left) * window;
  }

  // Chunk (ci, cj) of image b: the token of each query slot (-1: off the map) and of each key slot (-1: padding;
  // length + g: global g). (Nested loops: no division per slot.)
  void find_rows(int64_t b, int64_t ci, int64_t cj, int64_t* query_tokens, int64_t* key_tokens) const {
    for (int64_t dy = 0, slot = 0; dy < window; ++dy) {
      for (int64_t dx = 0; dx < window; ++dx, ++slot) {
        const int64_t y = ci * window + dy, x = cj * window + dx;
        query_tokens[slot] = y < height && x < width ? y * width + x : -1;
      }
    }
    const int64_t* offset_data = offsets.const_data_ptr<int64_t>();
    int64_t slot = 0;
    for (int64_t block = 0; block < blocks; ++block) {
      for (int64_t c = 0; c < chunks_per_block; ++c) {
        const int64_t* offset = offset_data + 2 * (block * chunks_per_block + c);
        const int64_t top = (ci + offset[0]) * window, left = (cj + offset[1]) * window;
        for (int64_t y = top; y < top + window; ++y) {
          for (int64_t x = left; x < left + window; ++x, ++slot) {
            const bool seen = y >= 0 && x >= 0 && y < extents[2 * b] && x < extents[2 * b + 1];
            key_tokens[slot] = seen ? y * width + x : -1;
          }
        }
      }
      for (int64_t g = 0; g < num_global; ++g, ++slot) key_tokens[slot] = length + g;
    }
  }

  // The key slots the forward computes for a chunk whose slots' tokens find_rows gave: all but the neighbour chunks
  // that lie wholly off the map or past the image's key_extents (their slots all padding, whose weights are 0), as
  // (first slot, count) ranges in slot order, adjacent ones merged, into `ranges`; returns how many. Such chunks
  // hold 16% of the slots of a map of 8 x 8 chunks (ViL's stage 1 at 224 px), 31% of one of 4 x 4 (stage 2).
  int64_t kept_ranges(const int64_t* key_tokens, SlotRanges& ranges) const {
    ranges.clear();
    int64_t kept = 0;
    const auto keep = [&](int64_t first, int64_t count) {
      if (!ranges.empty() && ranges.back().first + ranges.back().second == first) {
        ranges.back().second += count;
      } else {
        ranges.emplace_back(first, count);
      }
      kept += count;
    };
    for (int64_t block = 0, slot = 0; block < blocks; ++block) {
      for (int64_t chunk = 0; chunk < chunks_per_block; ++chunk, slot += area) {
        if (std::any_of(key_tokens + slot, key_tokens + slot + area, [](int64_t token) { return token >= 0; })) {
          keep(slot, area);
        }
      }
      if (num_global > 0) keep(slot, num_global);
      slot += num_global;
    }
    if (kept == 0) {  // every key padding (queries past their image's extents, no globals): as uncut, weights even
      ranges.assign(1, {0, key_slots});
      return key_slots;
    }
    return kept;
  }
};

// any_head_dim: head dims 1 to 64 (the float32 engine's products, whatever the tokens' dtype), else bfloat16's 32 and
// 64 (the tiles' and vector engine's packed pairs).
Call check_call(const char* op, at::ScalarType dtype, bool any_head_dim, const at::Tensor& queries,
                const at::Tensor& keys, const at::Tensor& values, const at::Tensor& global_keys,
                const at::Tensor& global_values, const at::Tensor& bias, const at::Tensor& chunk_offsets,
                int64_t chunks_per_block, int64_t height, int64_t width, int64_t window,
                const std::optional<at::Tensor>& key_extents) {
  TORCH_CHECK(queries.dim() == 4, "queries must be (batch, heads, tokens, head dim), got ", queries.sizes());
  Call c;
  c.batch = queries.size(0), c.heads = queries.size(1), c.length = queries.size(2), c.dim = queries.size(3);
  if (any_head_dim) {
    TORCH_CHECK(c.dim >= 1 && c.dim <= 64, op, " takes head dims 1 to 64, got ", c.dim);
  } else {
    TORCH_CHECK(c.dim == 32 || c.dim == 64, op, " takes head dims 32 and 64, got ", c.dim);
  }
  TORCH_CHECK(height > 0 && width > 0 && window > 0 && c.length == height * width, "queries hold ", c.length,
              " tokens, not a ", height, "x", width, " map");
  c.num_global = global_keys.dim() == 4 ? global_keys.size(2) : -1;
  check_tokens(queries, "queries", dtype, c.batch, c.heads, c.length, c.dim);
  check_tokens(keys, "keys", dtype, c.batch, c.heads, c.length, c.dim);
  check_tokens(values, "values", dtype, c.batch, c.heads, c.length, c.dim);
  check_tokens(global_keys, "global_keys", dtype, c.batch, c.heads, c.num_global, c.dim);
  check_tokens(global_values, "global_values", dtype, c.batch, c.heads, c.num_global, c.dim);
  TORCH_CHECK(chunk_offsets.scalar_type() == at::kLong && chunk_offsets.dim() == 2 && chunk_offsets.size(1) == 2 &&
                  chunks_per_block > 0 && chunk_offsets.size(0) % chunks_per_block == 0,
              "chunk_offsets must be int64 (blocks x chunks_per_block, 2), got ", chunk_offsets.sizes());
  c.height = height, c.width = width, c.window = window, c.chunks_per_block = chunks_per_block;
  c.area = window * window, c.blocks = chunk_offsets.size(0) / chunks_per_block;
  c.key_slots = c.blocks * (chunks_per_block * c.area + c.num_global);
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 3 && bias.size(0) == c.heads &&
                  bias.size(1) == c.area && bias.size(2) == c.key_slots && bias.is_contiguous(),
              "bias must be contiguous float32 (", c.heads, ", ", c.area, ", ", c.key_slots, "), got ",
              bias.scalar_type(), " ", bias.sizes());
  if (key_extents.has_value()) {
    TORCH_CHECK(key_extents->scalar_type() == at::kLong && key_extents->dim() == 2 &&
                    key_extents->size(0) == c.batch && key_extents->size(1) == 2,
                "key_extents must be int64 (", c.batch, ", 2), got ", key_extents->sizes());
  }
  c.chunk_rows = (height + window - 1) / window, c.chunk_cols = (width + window - 1) / window;
  c.offsets = chunk_offsets.contiguous();
  c.extents.resize(2 * c.batch);
  const auto given = key_extents.has_value() ? key_extents->contiguous() : at::Tensor();
  for (int64_t b = 0; b < c.batch; ++b) {
    c.extents[2 * b] = given.defined() ? std::min(height, given.const_data_ptr<int64_t>()[2 * b]) : height;
    c.extents[2 * b + 1] = given.defined() ? std::min(width, given.const_data_ptr<int64_t>()[2 * b + 1]) : width;
  }
  c.find_offsets();
  return c;
}

// Rows of image b, head h of a (B, H, tokens, M) tensor.
template <typename T>
T* rows_of(const at::Tensor& t, int64_t b, int64_t h) {
  return reinterpret_cast<T*>(t.data_ptr()) + b * t.stride(0) + h * t.stride(1);
}

#if VIL_HAVE_X86_BF16
// keys rounded up to 32 (Shape::padded_keys)
int64_t padded(int64_t keys) { return (keys + 31) / 32 * 32; }

Shape shape_of(const Call& c, bool float32) {
  // float32: feature_steps counts groups of 16 features (pack_keys_f32), dim_tiles the output's (the last partial)
  const int64_t steps = float32 ? (c.dim + 15) / 16 : c.dim / 32, tiles = float32 ? (c.dim + 15) / 16 : c.dim / kTile;
  return Shape{c.area, c.key_slots, c.dim, padded(c.key_slots), (c.area + kTile - 1) / kTile, steps, tiles};
}

// as blocked.py's: exp() of it is 0
const float kPaddingFlag = std::numeric_limits<float>::lowest() / 4;

// A head's bias (W^2 rows of key_slots) cut to the columns of a chunk's kept slot ranges (Call::kept_ranges), per
// thread and call: the chunks along the map's edges share a few patterns of ranges, each cut once. Past kBytes the
// patterns cut so far are dropped (a map's left and right edges then alternate, one cut per chunk row).
class CutBias {
 public:
  // Each call of an op takes a new number (the backward's phases share theirs): another call's bias may lie at the
  // address of this one's, so a new call drops the cuts.
  static int64_t next_call() {
    static std::atomic<int64_t> calls{0};
    return ++calls;
  }

  void start(int64_t call) {
    if (call == call_) return;
    call_ = call;
    clear();
  }

  // (rows, kept) at stride kept
  const float* get(const float* head_bias, int64_t head, int64_t rows, int64_t key_slots, const SlotRanges& ranges,
                   int64_t kept) {
    for (const Cut& cut : cuts_) {
      if (cut.head == head && cut.ranges == ranges) return cut.values.data();
    }
    const int64_t bytes = rows * kept * static_cast<int64_t>(sizeof(float));
    if (bytes_ + bytes > kBytes) clear();
    Cut& cut = cuts_.emplace_back(Cut{head, ranges, std::vector<float>(rows * kept)});
    float* out = cut.values.data();
    for (int64_t row = 0; row < rows; ++row) {
      for (const auto& [first, count] : ranges) {
        std::memcpy(out, head_bias + row * key_slots + first, count * sizeof(float));
        out += count;
      }
    }
    bytes_ += bytes;
    return cut.values.data();
  }

 private:
  static constexpr int64_t kBytes = 4 << 20;
  struct Cut {
    int64_t head;
    SlotRanges ranges;
    std::vector<float> values;
  };
  void clear() {
    cuts_.clear();
    bytes_ = 0;
  }

  std::vector<Cut> cuts_;
  int64_t bytes_ = 0, call_ = 0;
};
#endif

// output (B, H, L, M) = the longformer attention of the call's queries (see Call).
template <typename T>
void fused_forward(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                   const at::Tensor& global_keys, const at::Tensor& global_values, const at::Tensor& bias,
                   const at::Tensor& chunk_offsets, int64_t chunks_per_block, int64_t height, int64_t width,
                   int64_t window, const std::optional<at::Tensor>& key_extents, at::Tensor& output, Engine engine) {
  constexpr bool kFloat32 = std::is_same_v<T, float>;
  const auto dtype = kFloat32 ? at::kFloat : at::kBFloat16;
  const Call c = check_call(kFloat32 ? "longformer_forward_f32_" : "longformer_forward_bf16_", dtype, kFloat32,
                            queries, keys, values, global_keys, global_values, bias, chunk_offsets, chunks_per_block,
                            height, width, window, key_extents);
  check_tokens(output, "output", dtype, c.batch, c.heads, c.length, c.dim);
#if VIL_HAVE_X86_BF16
  const Shape shape = shape_of(c, kFloat32);
  const float* bias_data = bias.const_data_ptr<float>();
  const T* zero = zero_row<T>();
  const int64_t call = CutBias::next_call();
  at::parallel_for(0, c.batch * c.heads * c.chunk_rows * c.chunk_cols, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch<T> scratch;
    thread_local CutBias cut_bias;
    Scratch<T>& w = scratch;
    w.fit(shape);
    cut_bias.start(call);
    if (engine == Engine::kTiles) configure_tiles();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t cj = task % c.chunk_cols, ci = task / c.chunk_cols % c.chunk_rows;
      const int64_t maps = task / (c.chunk_cols * c.chunk_rows), h = maps % c.heads, b = maps / c.heads;
      const T *q = rows_of<const T>(queries, b, h), *k = rows_of<const T>(keys, b, h);
      const T* v = rows_of<const T>(values, b, h);
      const T *gk = rows_of<const T>(global_keys, b, h), *gv = rows_of<const T>(global_values, b, h);
      T* o = rows_of<T>(output, b, h);
      const int64_t qs = queries.stride(2), os = output.stride(2), ks = keys.stride(2), vs = values.stride(2);
      const int64_t gks = global_keys.stride(2), gvs = global_values.stride(2);
      const float* head_bias = bias_data + h * c.area * c.key_slots;
      const float* task_bias = head_bias;
      Shape cut = shape;  // its keys: the kept slots only, packed to the front
      int64_t key = 0;
      w.padding_keys = false;
      if (c.inside(b, ci, cj)) {  // most chunks: rows at fixed offsets, every slot kept, no padding
        const int64_t first = c.first_token(ci, cj);
        for (int64_t slot = 0; slot < shape.slots; ++slot) {
          w.query_rows[slot] = q + (first + c.query_offsets[slot]) * qs;
          w.output_rows[slot] = o + (first + c.query_offsets[slot]) * os;
        }
        for (; key < c.key_slots; ++key) {
          const int64_t offset = c.key_offsets[key];
          w.key_rows[key] = offset >= 0 ? k + (first + offset) * ks : gk + (-1 - offset) * gks;
          w.value_rows[key] = offset >= 0 ? v + (first + offset) * vs : gv + (-1 - offset) * gvs;
          w.flags[key] = 0.0f;
        }
      } else {
        c.find_rows(b, ci, cj, w.query_tokens.data(), w.key_tokens.data());
        for (int64_t slot = 0; slot < shape.slots; ++slot) {
          const int64_t token = w.query_tokens[slot];
          w.query_rows[slot] = token >= 0 ? q + token * qs : zero;
          w.output_rows[slot] = token >= 0 ? o + token * os : nullptr;
        }
        cut.keys = c.kept_ranges(w.key_tokens.data(), w.kept);
        cut.padded_keys = padded(cut.keys);
        for (const auto& [first, count] : w.kept) {
          for (int64_t slot = first; slot < first + count; ++slot, ++key) {
            const int64_t token = w.key_tokens[slot], g = token - c.length;
            w.key_rows[key] = token < 0 ? zero : g >= 0 ? gk + g * gks : k + token * ks;
            w.value_rows[key] = token < 0 ? zero : g >= 0 ? gv + g * gvs : v + token * vs;
            w.flags[key] = token < 0 ? kPaddingFlag : 0.0f;
            w.padding_keys |= token < 0;
          }
        }
        if (cut.keys != c.key_slots) task_bias = cut_bias.get(head_bias, h, c.area, c.key_slots, w.kept, cut.keys);
      }
      for (; key < cut.padded_keys; ++key) {  // as Scratch::fit leaves them past the keys (see the backward's)
        w.key_rows[key] = w.value_rows[key] = zero;
        w.flags[key] = -std::numeric_limits<float>::infinity();
      }
      if constexpr (kFloat32) {
        chunk_forward_f32(task_bias, cut.keys, cut, w);
      } else {
        (engine == Engine::kTiles ? chunk_forward<true> : chunk_forward<false>)(task_bias, cut.keys, cut, w);
      }
    }
    if (engine == Engine::kTiles) release_tiles();
  });
#endif
}

// tiles: the products on AMX tiles, else in AVX512-BF16 registers.
void longformer_forward_bf16_(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                              const at::Tensor& global_keys, const at::Tensor& global_values, const at::Tensor& bias,
                              const at::Tensor& chunk_offsets, int64_t chunks_per_block, int64_t height, int64_t width,
                              int64_t window, const std::optional<at::Tensor>& key_extents, at::Tensor output,
                              bool tiles) {
  TORCH_CHECK(!tiles || amx_available(),
              "longformer_forward_bf16_ on tiles needs a CPU with AMX-BF16 and Linux's tile permission");
  TORCH_CHECK(tiles || avx512_bf16_available(),
              "longformer_forward_bf16_ needs a CPU with AVX512-BF16 (and AVX512-F/BW/VL/DQ)");
  fused_forward<bfloat16_bits>(queries, keys, values, global_keys, global_values, bias, chunk_offsets,
                               chunks_per_block, height, width, window, key_extents, output,
                               tiles ? Engine::kTiles : Engine::kBfloat16Vectors);
}

void longformer_forward_f32_(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                             const at::Tensor& global_keys, const at::Tensor& global_values, const at::Tensor& bias,
                             const at::Tensor& chunk_offsets, int64_t chunks_per_block, int64_t height, int64_t width,
                             int64_t window, const std::optional<at::Tensor>& key_extents, at::Tensor output) {
  TORCH_CHECK(avx512_available(), "longformer_forward_f32_ needs a CPU with AVX-512 (F/BW/VL/DQ)");
  fused_forward<float>(queries, keys, values, global_keys, global_values, bias, chunk_offsets, chunks_per_block,
                       height, width, window, key_extents, output, Engine::kFloat32);
}

// The gradients of the attention's inputs (float32 or bfloat16 tokens, the ops' above) from grad_output (B, H, L, M,
// the tokens' dtype): grad_queries, grad_keys and grad_values (B, H, L, M), grad_global_keys and grad_global_values
// (B, H, G, M) and, unless None, grad_bias (H, W^2, S), all float32 and overwritten. Chunks whose key
// neighbourhoods cannot meet (rows and columns 2 x reach + 1 apart) run at once, so no two tasks add into one key
// row; every task of a head adds into the bias's and the globals' gradients, so each worker (a slice of a phase's
// tasks) sums those apart and the sums are added at the end.
template <typename T>
void fused_backward(const at::Tensor& grad_output, const at::Tensor& queries, const at::Tensor& keys,
                    const at::Tensor& values, const at::Tensor& global_keys, const at::Tensor& global_values,
                    const at::Tensor& bias, const at::Tensor& chunk_offsets, int64_t chunks_per_block, int64_t height,
                    int64_t width, int64_t window, const std::optional<at::Tensor>& key_extents,
                    at::Tensor& grad_queries, at::Tensor& grad_keys, at::Tensor& grad_values,
                    at::Tensor& grad_global_keys, at::Tensor& grad_global_values,
                    const std::optional<at::Tensor>& grad_bias, bool bfloat16_products) {
  const auto dtype = std::is_same_v<T, float> ? at::kFloat : at::kBFloat16;
  const Call c = check_call("longformer_backward_", dtype, true, queries, keys, values, global_keys, global_values,
                            bias, chunk_offsets, chunks_per_block, height, width, window, key_extents);
  check_tokens(grad_output, "grad_output", dtype, c.batch, c.heads, c.length, c.dim);
  check_tokens(grad_queries, "grad_queries", at::kFloat, c.batch, c.heads, c.length, c.dim);
  check_tokens(grad_keys, "grad_keys", at::kFloat, c.batch, c.heads, c.length, c.dim);
  check_tokens(grad_values, "grad_values", at::kFloat, c.batch, c.heads, c.length, c.dim);
  check_tokens(grad_global_keys, "grad_global_keys", at::kFloat, c.batch, c.heads, c.num_global, c.dim);
  check_tokens(grad_global_values, "grad_global_values", at::kFloat, c.batch, c.heads, c.num_global, c.dim);
  if (grad_bias.has_value()) {
    TORCH_CHECK(grad_bias->scalar_type() == at::kFloat && grad_bias->sizes() == bias.sizes() &&
                    grad_bias->is_contiguous(),
                "grad_bias must be contiguous float32 ", bias.sizes(), ", got ", grad_bias->scalar_type(), " ",
                grad_bias->sizes());
  }
#if VIL_HAVE_X86_BF16
  TORCH_CHECK(!bfloat16_products || (dtype == at::kBFloat16 && (c.dim == 32 || c.dim == 64)),
              "longformer_backward_'s bfloat16 products take bfloat16 tokens of head dims 32 and 64, got ", dtype,
              " of ", c.dim);
  const Shape shape = shape_of(c, !bfloat16_products);
  const int64_t call = CutBias::next_call();
  grad_keys.zero_();
  grad_values.zero_();
  const int64_t reach = std::max({-c.reach_up, c.reach_down, -c.reach_left, c.reach_right});
  const int64_t period = 2 * reach + 1, workers = std::max<int64_t>(1, at::get_num_threads());
  at::Tensor bias_sums =
      grad_bias.has_value() ? bias.new_zeros({workers, c.heads, c.area, c.key_slots}) : at::Tensor();
  at::Tensor global_key_sums = bias.new_zeros({workers, c.batch, c.heads, c.num_global, c.dim});
  at::Tensor global_value_sums = bias.new_zeros({workers, c.batch, c.heads, c.num_global, c.dim});
  const float* bias_data = bias.const_data_ptr<float>();
  for (int64_t first_row = 0; first_row < std::min(period, c.chunk_rows); ++first_row) {
    for (int64_t first_col = 0; first_col < std::min(period, c.chunk_cols); ++first_col) {
      const int64_t rows = (c.chunk_rows - first_row + period - 1) / period;
      const int64_t cols = (c.chunk_cols - first_col + period - 1) / period;
      const int64_t tasks = c.batch * c.heads * rows * cols, used = std::min(workers, tasks);
      at::parallel_for(0, used, 1, [&](int64_t begin, int64_t end) {
        thread_local BackwardScratch<T> scratch;
        thread_local CutBias cut_bias;
        thread_local SlotRanges kept;
        BackwardScratch<T>& g = scratch;
        g.fit(shape, bfloat16_products);
        cut_bias.start(call);
        const T* zero = zero_row<T>();
        for (int64_t worker = begin; worker < end; ++worker) {
          float* worker_bias = bias_sums.defined() ? bias_sums[worker].data_ptr<float>() : nullptr;
          float* worker_keys = global_key_sums[worker].data_ptr<float>();
          float* worker_values = global_value_sums[worker].data_ptr<float>();
          for (int64_t task = worker * tasks / used; task < (worker + 1) * tasks / used; ++task) {
            const int64_t cj = first_col + task % cols * period, ci = first_row + task / cols % rows * period;
            const int64_t h = task / (cols * rows) % c.heads, b = task / (cols * rows * c.heads);
            const T *q = rows_of<const T>(queries, b, h), *k = rows_of<const T>(keys, b, h);
            const T *v = rows_of<const T>(values, b, h), *go = rows_of<const T>(grad_output, b, h);
            const T *gk = rows_of<const T>(global_keys, b, h), *gv = rows_of<const T>(global_values, b, h);
            float *gq = rows_of<float>(grad_queries, b, h), *gkr = rows_of<float>(grad_keys, b, h);
            float* gvr = rows_of<float>(grad_values, b, h);
            const int64_t global_first = (b * c.heads + h) * c.num_global * c.dim;
            c.find_rows(b, ci, cj, g.query_tokens.data(), g.key_tokens.data());
            for (int64_t slot = 0; slot < shape.slots; ++slot) {
              const int64_t token = g.query_tokens[slot];
              g.query_rows[slot] = token >= 0 ? q + token * queries.stride(2) : zero;
              g.grad_output_rows[slot] = token >= 0 ? go + token * grad_output.stride(2) : zero;
              g.grad_query_rows[slot] = token >= 0 ? gq + token * grad_queries.stride(2) : nullptr;
            }
            // the kept slots only, as the forward's (their scores' gradients go back to their bias columns)
            Shape cut = shape;
            cut.keys = c.kept_ranges(g.key_tokens.data(), kept);
            cut.padded_keys = padded(cut.keys);
            g.padding_keys = false;
            int64_t key = 0;
            for (const auto& [first, count] : kept) {
              for (int64_t slot = first; slot < first + count; ++slot, ++key) {
                const int64_t token = g.key_tokens[slot], global = token - c.length;
                if (token < 0) {
                  g.key_rows[key] = g.value_rows[key] = zero;
                  g.grad_key_rows[key] = g.grad_value_rows[key] = nullptr;
                } else if (global >= 0) {
                  g.key_rows[key] = gk + global * global_keys.stride(2);
                  g.value_rows[key] = gv + global * global_values.stride(2);
                  g.grad_key_rows[key] = worker_keys + global_first + global * c.dim;
                  g.grad_value_rows[key] = worker_values + global_first + global * c.dim;
                } else {
                  g.key_rows[key] = k + token * keys.stride(2);
                  g.value_rows[key] = v + token * values.stride(2);
                  g.grad_key_rows[key] = gkr + token * grad_keys.stride(2);
                  g.grad_value_rows[key] = gvr + token * grad_values.stride(2);
                }
                g.flags[key] = token < 0 ? kPaddingFlag : 0.0f;
                g.padding_keys |= token < 0;
              }
            }
            // past the keys, as BackwardScratch::fit leaves them (a zero row, not another chunk's key that might not
            // be finite, even though its weight is 0; the gradients' rows are not read there)
            for (; key < cut.padded_keys; ++key) {
              g.key_rows[key] = g.value_rows[key] = zero;
              g.flags[key] = -std::numeric_limits<float>::infinity();
            }
            const int64_t head_offset = h * c.area * c.key_slots;
            const bool whole = cut.keys == c.key_slots;
            g.cut = whole ? nullptr : &kept;
            const float* task_bias = bias_data + head_offset;
            if (!whole) task_bias = cut_bias.get(task_bias, h, c.area, c.key_slots, kept, cut.keys);
            float* head_bias_grad = worker_bias == nullptr ? nullptr : worker_bias + head_offset;
            if constexpr (std::is_same_v<T, bfloat16_bits>) {
              if (bfloat16_products) {
                chunk_backward_bf16(task_bias, cut.keys, cut, g, head_bias_grad, c.key_slots);
                continue;
              }
            }
            chunk_backward(task_bias, cut.keys, cut, g, head_bias_grad, c.key_slots);
          }
        }
      });
    }
  }
  if (grad_bias.has_value()) grad_bias->copy_(bias_sums.sum(0));
  grad_global_keys.copy_(global_key_sums.sum(0));
  grad_global_values.copy_(global_value_sums.sum(0));
#endif
}

// bfloat16_products: the products of bfloat16 tokens (head dims 32 and 64) in AVX512-BF16 dot products, else in
// float32 fused multiply-adds.
void longformer_backward_(const at::Tensor& grad_output, const at::Tensor& queries, const at::Tensor& keys,
                          const at::Tensor& values, const at::Tensor& global_keys, const at::Tensor& global_values,
                          const at::Tensor& bias, const at::Tensor& chunk_offsets, int64_t chunks_per_block,
                          int64_t height, int64_t width, int64_t window, const std::optional<at::Tensor>& key_extents,
                          at::Tensor grad_queries, at::Tensor grad_keys, at::Tensor grad_values,
                          at::Tensor grad_global_keys, at::Tensor grad_global_values,
                          const std::optional<at::Tensor>& grad_bias, bool bfloat16_products) {
  TORCH_CHECK(avx512_available(), "longformer_backward_ needs a CPU with AVX-512 (F/BW/VL/DQ)");
  TORCH_CHECK(!bfloat16_products || avx512_bf16_available(),
              "longformer_backward_'s bfloat16 products need a CPU with AVX512-BF16");
  if (queries.scalar_type() == at::kBFloat16) {
    fused_backward<bfloat16_bits>(grad_output, queries, keys, values, global_keys, global_values, bias,
                                  chunk_offsets, chunks_per_block, height, width, window, key_extents, grad_queries,
                                  grad_keys, grad_values, grad_global_keys, grad_global_values, grad_bias,
                                  bfloat16_products);
  } else {
    fused_backward<float>(grad_output, queries, keys, values, global_keys, global_values, bias, chunk_offsets,
                          chunks_per_block, height, width, window, key_extents, grad_queries, grad_keys, grad_values,
                          grad_global_keys, grad_global_values, grad_bias, bfloat16_products);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vil_kernels_native, m) {
  m.def("amx_available() -> bool", &amx_available);
  m.def("avx512_bf16_available() -> bool", &avx512_bf16_available);
  m.def("avx512_available() -> bool", &avx512_available);
  m.def(
      "longformer_forward_bf16_(Tensor queries, Tensor keys, Tensor values, Tensor global_keys, Tensor global_values, "
      "Tensor bias, Tensor chunk_offsets, int chunks_per_block, int height, int width, int window, "
      "Tensor? key_extents, Tensor(a!) output, bool tiles) -> ()");
  m.def(
      "longformer_forward_f32_(Tensor queries, Tensor keys, Tensor values, Tensor global_keys, Tensor global_values, "
      "Tensor bias, Tensor chunk_offsets, int chunks_per_block, int height, int width, int window, "
      "Tensor? key_extents, Tensor(a!) output) -> ()");
  m.def(
      "longformer_backward_(Tensor grad_output, Tensor queries, Tensor keys, Tensor values, Tensor global_keys, "
      "Tensor global_values, Tensor bias, Tensor chunk_offsets, int chunks_per_block, int height, int width, "
      "int window, Tensor? key_extents, Tensor(a!) grad_queries, Tensor(b!) grad_keys, Tensor(c!) grad_values, "
      "Tensor(d!) grad_global_keys, Tensor(e!) grad_global_values, Tensor(f!)? grad_bias, bool bfloat16_products) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(vil_kernels_native, CPU, m) {
  m.impl("longformer_forward_bf16_", &longformer_forward_bf16_);
  m.impl("longformer_forward_f32_", &longformer_forward_f32_);
  m.impl("longformer_backward_", &longformer_backward_);
}
