// Λ attention on the CPU, reading vLLM's CPU ("vec" ISA) paged cache layout.
//
// Input: query rows, each with its sequence's block-table row, its position p, its first
// local key lo and its global-key count. Keys in the cache and the queries are rotated at
// their absolute positions, so a local logit is <q, key>; for global key j the kernel
// rotates the query further by (d - p + j) (cos/sin given per row and key), which puts the
// pair at the clamped distance d. Per (block, kv head) the cache holds B*D key elements
// stored dim-major ([D][B]) followed by B*D value elements token-major ([B][D]).
//
// Consecutive queries of one sequence (a prefill chunk) are grouped into tiles: a tile's
// queries share the keys of the union of their windows, so every key loaded feeds
// (queries x query heads per kv head) dot products; each query masks the keys outside its
// own window. Runs of tiles ("bands") walk the key blocks together, so a block comes from
// memory once per band. Work is split over (band, kv head, key chunk); chunks keep
// (max, sum, acc) per row and are merged at the end, so two cores share one long window
// even at batch 1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// exp(x) for x <= 0 with ~1e-7 relative error; plain arithmetic so loops vectorize.
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

#if defined(__AVX512F__)
#include <immintrin.h>
// 16 cache elements -> 16 floats (first n only, the rest read as zero).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
inline __mmask16 first_n(int n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }
constexpr int kMaxGroup = 8;  // rows (query x head) sharing a key in registers: with 2 slices, 16 FMAs per 8 broadcasts

// Independent 16-lane slices a register tile works on per row: few rows (decode) take
// several slices at once so that enough FMA chains run side by side to hide their latency.
template <int GC>
constexpr int slices_for() { return GC <= 4 ? 4 : 2; }

// Asking for the next block while this one computes: a burst of hundreds of lines stalls
// on the fill buffers, so the lines are asked a share per step of the computing loop.
// Step i of a loop of `steps` asks lines [i * per, (i + 1) * per) of pf's `lines`, into
// L2 (prefetcht1): decode scans 1.1x faster than asking for L1, whose few fill buffers
// then wait on memory beside the scan's own loads (cold 32K caches, both decode ops).
inline int64_t lines_per_step(int64_t lines, int64_t steps) { return (lines + steps - 1) / std::max<int64_t>(steps, 1); }
inline void prefetch_step(const char* pf, int64_t lines, int64_t per, int64_t i) {
  for (int64_t l = i * per, e = std::min(lines, l + per); l < e; ++l) __builtin_prefetch(pf + 64 * l, 0, 2);
}

// The register tile both products use: out[g * out_stride + 16 j .. + 16] (=, or += when ADD)
// sum_{r < R} a[g * a_stride + r] * b[r * b_stride + 16 j .. + 16], for GC rows g and
// slices_for<GC>() 16-lane slices j (mask m[j] selects the valid lanes of slice j). Rank-1
// updates: one load of b's row r feeds every row g.
//   scores: a = GC query heads (r = head dim), b = a dim-major key block (lanes = keys);
//   values: a = GC rows of probabilities (r = key), b = token-major values (lanes = dims).
template <int GC, bool ADD, bool PF, typename T>
inline void product_tile(int R, const float* a, int a_stride, const T* b, int64_t b_stride, const __mmask16* m,
                         float* out, int out_stride, const char* pf, int64_t pf_lines) {
  const int64_t per_r = lines_per_step(pf_lines, R);
  constexpr int NS = slices_for<GC>();
  __m512 acc[GC][NS];
#pragma GCC unroll 16
  for (int g = 0; g < GC; ++g)
#pragma GCC unroll 4
    for (int j = 0; j < NS; ++j) acc[g][j] = _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    if (PF) prefetch_step(pf, pf_lines, per_r, r);
    __m512 x[NS];
#pragma GCC unroll 4
    for (int j = 0; j < NS; ++j) x[j] = load16(b + r * b_stride + 16 * j, m[j]);
#pragma GCC unroll 16
    for (int g = 0; g < GC; ++g) {
      const __m512 ag = _mm512_set1_ps(a[g * a_stride + r]);
#pragma GCC unroll 4
      for (int j = 0; j < NS; ++j) acc[g][j] = _mm512_fmadd_ps(ag, x[j], acc[g][j]);
    }
  }
#pragma GCC unroll 16
  for (int g = 0; g < GC; ++g)
#pragma GCC unroll 4
    for (int j = 0; j < NS; ++j) {
      float* dst = out + g * out_stride + 16 * j;
      const __m512 val = ADD ? _mm512_add_ps(_mm512_maskz_loadu_ps(m[j], dst), acc[g][j]) : acc[g][j];
      _mm512_mask_storeu_ps(dst, m[j], val);
    }
}

// Masks of NS consecutive 16-lane slices starting at `first` of `limit` valid lanes.
inline void slice_masks(int first, int limit, int ns, __mmask16* m) {
  for (int j = 0; j < ns; ++j) m[j] = first + 16 * j < limit ? first_n(limit - first - 16 * j) : 0;
}

#define LMINF_DISPATCH_GC(gc, CALL) \
  switch (gc) {                     \
    case 1: CALL(1); break;         \
    case 2: CALL(2); break;         \
    case 3: CALL(3); break;         \
    case 4: CALL(4); break;         \
    case 5: CALL(5); break;         \
    case 6: CALL(6); break;         \
    case 7: CALL(7); break;         \
    default: CALL(8); break;        \
  }
static_assert(kMaxGroup == 8, "LMINF_DISPATCH_GC instantiates 1..8 rows");

// Calls tile(GC, g0, x0, m) for every register tile: rows in groups of GC <= kMaxGroup
// (GC a compile-time constant), lanes [x0, x0 + 16 * slices_for<GC>()) of `lanes`.
template <typename Tile>
inline void for_each_tile(int group, int lanes, Tile tile) {
  __mmask16 m[4];
  for (int g0 = 0; g0 < group; g0 += kMaxGroup) {
    const int gc = std::min(kMaxGroup, group - g0);
#define LMINF_TILES(GC)                                                       \
  for (int x0 = 0; x0 < lanes; x0 += 16 * slices_for<GC>()) {                \
    slice_masks(x0, lanes, slices_for<GC>(), m);                              \
    tile(std::integral_constant<int, GC>{}, g0, x0, m);                       \
  }
    LMINF_DISPATCH_GC(gc, LMINF_TILES)
#undef LMINF_TILES
  }
}

// How many register tiles for_each_tile(group, lanes, ...) visits.
inline int64_t tile_count(int group, int lanes) {
  int64_t n = 0;
  for_each_tile(group, lanes, [&](auto, int, int, const __mmask16*) { ++n; });
  return n;
}

// product_tile as tile t of a product whose tiles each ask `share` of pf's `lines` (no pf: none).
template <int GC, bool ADD, typename T>
inline void product_tile_asking(int R, const float* a, int a_stride, const T* b, int64_t b_stride, const __mmask16* m,
                                float* out, int out_stride, const char* pf, int64_t lines, int64_t share, int64_t t) {
  if (pf == nullptr) return product_tile<GC, ADD, false, T>(R, a, a_stride, b, b_stride, m, out, out_stride, nullptr, 0);
  const int64_t lo = std::min(lines, t * share);
  product_tile<GC, ADD, true, T>(R, a, a_stride, b, b_stride, m, out, out_stride, pf + 64 * lo,
                                 std::min(lines, lo + share) - lo);
}

// s[g*B + i] = sum_d q[g*D + d] * K[d*B + i] for i < n, g < group (K dim-major).
// pf: pf_lines cache lines to ask for while this computes (the next block), spread over the tiles.
template <typename T>
inline void block_scores(int group, int D, int B, int n, const float* q, const T* kd, float* s,
                         const char* pf = nullptr, int64_t pf_lines = 0) {
  const int64_t share = pf == nullptr ? 0 : lines_per_step(pf_lines, tile_count(group, n));
  int64_t t = 0;
  for_each_tile(group, n, [&](auto gc, int g0, int i0, const __mmask16* m) {
    product_tile_asking<decltype(gc)::value, false, T>(D, q + g0 * D, D, kd + i0, B, m, s + g0 * B + i0, B, pf,
                                                      pf_lines, share, t++);
  });
}

// acc[g*D + d] += sum_i p[g*B + i] * V[i*D + d] (V token-major).
template <typename T>
inline void block_values(int group, int D, int B, int n, const float* p, const T* v, float* acc,
                         const char* pf = nullptr, int64_t pf_lines = 0) {
  const int64_t share = pf == nullptr ? 0 : lines_per_step(pf_lines, tile_count(group, D));
  int64_t t = 0;
  for_each_tile(group, D, [&](auto gc, int g0, int d0, const __mmask16* m) {
    product_tile_asking<decltype(gc)::value, true, T>(n, p + g0 * B, B, v + d0, D, m, acc + g0 * D + d0, D, pf,
                                                     pf_lines, share, t++);
  });
}
#else
template <typename T>
inline void block_scores(int group, int D, int B, int n, const float* q, const T* kd, float* s,
                         const char* = nullptr, int64_t = 0) {
  for (int g = 0; g < group; ++g) std::fill(s + g * B, s + g * B + n, 0.0f);
  for (int d = 0; d < D; ++d)
    for (int g = 0; g < group; ++g) {
      const float qd = q[g * D + d];
      for (int i = 0; i < n; ++i) s[g * B + i] += qd * to_f(kd[static_cast<int64_t>(d) * B + i]);
    }
}
template <typename T>
inline void block_values(int group, int D, int B, int n, const float* p, const T* v, float* acc,
                         const char* = nullptr, int64_t = 0) {
  for (int g = 0; g < group; ++g)
    for (int i = 0; i < n; ++i)
      for (int d = 0; d < D; ++d) acc[g * D + d] += p[g * B + i] * to_f(v[static_cast<int64_t>(i) * D + d]);
}
#endif

constexpr int64_t kMaxGroupRows = 16;  // query_tile is capped so a tile has at most this many rows
constexpr int64_t kMaxBandTiles = 32;  // tiles sharing one pass over the key blocks
constexpr int64_t kSerialMergeFloats = 1 << 15;  // partial results below this size merge on one thread

struct Partial {
  float* m;    // [group]
  float* l;    // [group]
  float* acc;  // [group * D]
};

#if defined(__AVX512F__)
// exp_nonpos on 16 lanes (same polynomial and reduction as the scalar version).
inline __m512 exp_nonpos16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// sg[0..n) <- exp(sg - mx) in place; returns max(m_old, max sg) through mx and the sum.
inline float softmax_block(float* sg, int n, float& mx) {
  __m512 vmax = _mm512_set1_ps(mx);
  for (int i = 0; i < n; i += 16) vmax = _mm512_mask_max_ps(vmax, first_n(n - i), vmax, _mm512_maskz_loadu_ps(first_n(n - i), sg + i));
  mx = _mm512_reduce_max_ps(vmax);
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = first_n(n - i);
    const __m512 e = exp_nonpos16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + i), vm));
    _mm512_mask_storeu_ps(sg + i, m, e);
    vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
  }
  return _mm512_reduce_add_ps(vsum);
}
#else
inline float softmax_block(float* sg, int n, float& mx) {
  for (int i = 0; i < n; ++i) mx = std::max(mx, sg[i]);
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) {
    sg[i] = exp_nonpos(sg[i] - mx);
    sum += sg[i];
  }
  return sum;
}
#endif

// Online-softmax update of `rows` rows with `n` keys whose scores are in s[r*B + i] and
// values at v + i*D. Row r sees only keys [v0[r], v1[r]); its other scores are zeroed so
// they add exactly nothing to the values product.
template <typename T>
inline void absorb(int rows, int D, int B, int n, float* s, const T* v, const int* v0, const int* v1, Partial& part,
                   const char* pf = nullptr, int64_t pf_lines = 0) {
  for (int r = 0; r < rows; ++r) {
    float* sr = s + r * B;
    const int a = v0[r], b = v1[r];
    if (a >= b) {
      std::fill(sr, sr + n, 0.0f);
      continue;
    }
    std::fill(sr, sr + a, 0.0f);
    std::fill(sr + b, sr + n, 0.0f);
    float mx = part.m[r];
    const float sum = softmax_block(sr + a, b - a, mx);
    const float corr = part.m[r] == -std::numeric_limits<float>::infinity() ? 0.0f : exp_nonpos(part.m[r] - mx);
    part.l[r] = part.l[r] * corr + sum;
    part.m[r] = mx;
    float* acc = part.acc + r * D;
    for (int d = 0; d < D; ++d) acc[d] *= corr;
  }
  block_values<T>(rows, D, B, n, s, v, part.acc, pf, pf_lines);
}

// Ask for the next block's keys and values while this one computes: the window is paged,
// so the hardware prefetcher cannot guess which block comes next. Costs ~20% when the
// window is already cached (a micro-benchmark), saves ~20% when it is not (a real step:
// every layer's window is evicted by the others).
// Bytes [lo, hi) of p, a cache line at a time.
inline void prefetch_bytes(const void* p, int64_t lo, int64_t hi) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = lo; off < hi; off += 64) __builtin_prefetch(c + off, 0, 3);
}

struct Tile {
  int64_t first;  // first query row
  int64_t count;  // consecutive positions of one sequence
};

template <typename T>
void rows_impl(const at::Tensor& q_loc, const at::Tensor& glob_cos, const at::Tensor& glob_sin,
               const at::Tensor& kv_cache, const at::Tensor& block_table, const at::Tensor& rows,
               const at::Tensor& lo, const at::Tensor& pos, const at::Tensor& n_glob, at::Tensor& out,
               at::Tensor& lse, float scale, int64_t rotary_dim, bool neox, int64_t chunk_tokens, int64_t query_tile) {
  const int64_t S = q_loc.size(0), Hq = q_loc.size(1), D = q_loc.size(2);
  const int64_t Hkv = kv_cache.size(1), B = kv_cache.size(2);
  const int64_t group = Hq / Hkv;
  const int64_t Gmax = glob_cos.size(1), half = rotary_dim / 2;
  const int64_t bt_stride = block_table.stride(0);
  const T* cache = kv_cache.data_ptr<T>();
  const float* ql = q_loc.data_ptr<float>();
  const float* gc = glob_cos.data_ptr<float>();
  const float* gs = glob_sin.data_ptr<float>();
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* lo_p = lo.data_ptr<int64_t>();
  const int64_t* pos_p = pos.data_ptr<int64_t>();
  const int64_t* ng = n_glob.data_ptr<int64_t>();
  const int64_t blk_stride = Hkv * B * 2 * D, head_stride = B * 2 * D;

  // Tiles: runs of rows of one sequence at consecutive positions, at most query_tile long
  // and at most kMaxGroup-ish rows of work per kv head (query_tile * group).
  std::vector<Tile> tiles;
  for (int64_t s = 0; s < S; ++s) {
    const bool extend = !tiles.empty() && tiles.back().count < query_tile && row[s] == row[s - 1] &&
                        pos_p[s] == pos_p[s - 1] + 1 && lo_p[s] >= lo_p[s - 1];
    if (extend) ++tiles.back().count;
    else tiles.push_back({s, 1});
  }
  const int64_t NT = static_cast<int64_t>(tiles.size());
  int64_t max_rows = 0;
  for (const Tile& t : tiles) max_rows = std::max(max_rows, t.count * group);

  // Bands: runs of consecutive tiles of one sequence handled by one task, key block by key
  // block, so each block is read from memory once per band rather than once per tile
  // (prefill: a tile's window is far bigger than the caches). Enough bands stay to keep
  // every thread busy.
  const int64_t want_tasks = 4 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t band_tiles = std::clamp<int64_t>(NT * Hkv / want_tasks, 1, kMaxBandTiles);
  std::vector<Tile> bands;  // first tile, tile count
  for (int64_t t = 0; t < NT; ++t) {
    const bool extend = !bands.empty() && bands.back().count < band_tiles &&
                        row[tiles[t].first] == row[tiles[t - 1].first];
    if (extend) ++bands.back().count;
    else bands.push_back({t, 1});
  }
  const int64_t NB = static_cast<int64_t>(bands.size());
  // band_row[t]: where tile t's rows start among its band's rows (its queries in qs)
  std::vector<int64_t> band_row(NT);
  int64_t max_band_rows = 0;
  for (const Tile& bd : bands) {
    int64_t r = 0;
    for (int64_t t = bd.first; t < bd.first + bd.count; ++t) {
      band_row[t] = r;
      r += tiles[t].count * group;
    }
    max_band_rows = std::max(max_band_rows, r);
  }

  // Chunks of whole blocks: chunk c of a band covers blocks [lo_first / B + c*cb, ...);
  // every tile of the band keeps a partial result per chunk (empty where they do not meet).
  const int64_t cb = std::max<int64_t>(1, chunk_tokens / B);
  std::vector<int64_t> first_task(NB + 1, 0), nchunks(NT), part_at(NT + 1, 0);
  for (int64_t k = 0; k < NB; ++k) {
    const Tile& first = tiles[bands[k].first];
    const Tile& last = tiles[bands[k].first + bands[k].count - 1];
    const int64_t nb = pos_p[last.first + last.count - 1] / B - lo_p[first.first] / B + 1;
    const int64_t nc = (nb + cb - 1) / cb;
    first_task[k + 1] = first_task[k] + nc * Hkv;
    for (int64_t t = bands[k].first; t < bands[k].first + bands[k].count; ++t) nchunks[t] = nc;
  }
  for (int64_t t = 0; t < NT; ++t) part_at[t + 1] = part_at[t] + nchunks[t] * Hkv * tiles[t].count * group * (D + 2);
  const int64_t ntasks = first_task[NB];
  std::vector<float> parts(static_cast<size_t>(part_at[NT]));

  at::parallel_for(0, ntasks, 1, [&](int64_t t_begin, int64_t t_end) {
    std::vector<float> s(static_cast<size_t>(max_rows * B));
    std::vector<float> qs(static_cast<size_t>(max_band_rows * D)), qr(static_cast<size_t>(D));
    std::vector<int> v0(static_cast<size_t>(max_rows)), v1(static_cast<size_t>(max_rows));
    std::vector<Partial> band_parts(static_cast<size_t>(band_tiles));
    for (int64_t task = t_begin; task < t_end; ++task) {
      const int64_t k = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
      const Tile& bd = bands[k];
      const int64_t local = task - first_task[k];
      const int64_t h = local % Hkv, chunk = local / Hkv;
      // every tile's partial for (chunk, h) starts empty; its scaled queries go to qs
      for (int64_t i = 0; i < bd.count; ++i) {
        const Tile& tl = tiles[bd.first + i];
        const int64_t nr = tl.count * group;  // rows: (query e = first + r / group, head h*group + r % group)
        float* base = parts.data() + part_at[bd.first + i] + (chunk * Hkv + h) * nr * (D + 2);
        Partial& part = band_parts[i];
        part = Partial{base, base + nr, base + 2 * nr};
        std::fill(part.m, part.m + nr, -std::numeric_limits<float>::infinity());
        std::fill(part.l, part.l + nr, 0.0f);
        std::fill(part.acc, part.acc + nr * D, 0.0f);
        for (int64_t r = 0; r < nr; ++r) {
          const float* q_raw = ql + ((tl.first + r / group) * Hq + h * group + r % group) * D;
          for (int64_t d = 0; d < D; ++d) qs[(band_row[bd.first + i] + r) * D + d] = q_raw[d] * scale;
        }
      }
      const int32_t* trow = bt + row[tiles[bd.first].first] * bt_stride;
      const Tile& last_tile = tiles[bd.first + bd.count - 1];
      const int64_t band_lo = lo_p[tiles[bd.first].first], band_hi = pos_p[last_tile.first + last_tile.count - 1];
      const int64_t b_first = band_lo / B + chunk * cb;
      const int64_t b_last = std::min(band_hi / B, b_first + cb - 1);
      for (int64_t b = b_first; b <= b_last; ++b) {
        const T* kb = cache + trow[b] * blk_stride + h * head_stride;
        const T* vb = kb + B * D;
        // a paged window is not one stream: ask for the next block's keys and values while
        // this one computes. One tile (decode) asks a share per step of its products: a burst
        // of 512 lines stalls on the fill buffers (0.38 -> 0.33 ms per layer at 32K, cold)
        const char* next = b < b_last ? reinterpret_cast<const char*>(cache + trow[b + 1] * blk_stride + h * head_stride)
                                      : nullptr;
        const int64_t half_lines = B * D * static_cast<int64_t>(sizeof(T)) / 64;
        // a band of several tiles (prefill) computes long enough per block for one burst
        if (bd.count > 1 && next != nullptr) prefetch_bytes(next, 0, 2 * half_lines * 64);
        for (int64_t i = 0; i < bd.count; ++i) {
          const Tile& tl = tiles[bd.first + i];
          const int64_t nr = tl.count * group;
          const int64_t key_lo = lo_p[tl.first], key_hi = pos_p[tl.first + tl.count - 1];  // the tile's windows
          const int64_t k0 = std::max(key_lo, b * B);  // first key of this block in the tile's union
          const int64_t k1 = std::min(key_hi + 1, (b + 1) * B);
          if (k0 >= k1) continue;
          const int n = static_cast<int>(k1 - k0);
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t e = tl.first + r / group;
            v0[r] = static_cast<int>(std::clamp<int64_t>(lo_p[e] - k0, 0, n));
            v1[r] = static_cast<int>(std::clamp<int64_t>(pos_p[e] + 1 - k0, 0, n));
          }
          const bool asks = bd.count == 1 && next != nullptr;
          block_scores<T>(static_cast<int>(nr), D, B, n, qs.data() + band_row[bd.first + i] * D, kb + (k0 - b * B), s.data(),
                          asks ? next : nullptr, half_lines);
          absorb<T>(static_cast<int>(nr), D, B, n, s.data(), vb + (k0 - b * B) * D, v0.data(), v1.data(),
                    band_parts[i], asks ? next + half_lines * 64 : nullptr, half_lines);
        }
      }
      // Global keys j < n_glob (never inside the window): the first chunk takes them,
      // block by block (values of one block are contiguous).
      for (int64_t i = 0; chunk == 0 && i < bd.count; ++i) {
        const Tile& tl = tiles[bd.first + i];
        const int64_t nr = tl.count * group, last = tl.first + tl.count - 1;
        const float* q = qs.data() + band_row[bd.first + i] * D;
        int64_t nglob_max = 0;
        for (int64_t e = tl.first; e <= last; ++e) nglob_max = std::max(nglob_max, ng[e]);
        for (int64_t bj = 0; bj * B < nglob_max; ++bj) {
          const int n = static_cast<int>(std::min(nglob_max - bj * B, B));
          const T* kb = cache + trow[bj] * blk_stride + h * head_stride;
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t e = tl.first + r / group;
            v0[r] = 0;
            v1[r] = static_cast<int>(std::clamp<int64_t>(ng[e] - bj * B, 0, n));
            const float* x = q + r * D;
            for (int i2 = 0; i2 < v1[r]; ++i2) {
              // the query rotated by (d - p + j): seen at the clamped distance from key j
              const float* c = gc + (e * Gmax + bj * B + i2) * half;
              const float* sn = gs + (e * Gmax + bj * B + i2) * half;
              std::copy(x, x + D, qr.begin());
              for (int64_t kk = 0; kk < half; ++kk) {
                const int64_t a = neox ? kk : 2 * kk, bb = neox ? kk + half : 2 * kk + 1;
                qr[a] = x[a] * c[kk] - x[bb] * sn[kk];
                qr[bb] = x[bb] * c[kk] + x[a] * sn[kk];
              }
              float acc = 0.0f;
              for (int64_t d = 0; d < D; ++d) acc += qr[d] * to_f(kb[d * B + i2]);
              s[r * B + i2] = acc;
            }
          }
          absorb<T>(static_cast<int>(nr), D, B, n, s.data(), kb + B * D, v0.data(), v1.data(), band_parts[i]);
        }
      }
    }
  });

  // Merge the chunks of each (tile, kv head). A small merge (decode) runs on this thread:
  // waking the pool again would cost more than the work.
  float* o = out.data_ptr<float>();
  float* lse_o = lse.data_ptr<float>();  // log-sum-exp of each row's logits (top-k merges into it)
  const int64_t merge_grain = part_at[NT] < kSerialMergeFloats ? NT * Hkv : 1;
  at::parallel_for(0, NT * Hkv, merge_grain, [&](int64_t begin, int64_t end) {
    for (int64_t th = begin; th < end; ++th) {
      const int64_t t = th / Hkv, h = th % Hkv;
      const int64_t nr = tiles[t].count * group;
      for (int64_t r = 0; r < nr; ++r) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < nchunks[t]; ++c)
          mx = std::max(mx, parts[part_at[t] + (c * Hkv + h) * nr * (D + 2) + r]);
        float* dst = o + ((tiles[t].first + r / group) * Hq + h * group + r % group) * D;
        std::fill(dst, dst + D, 0.0f);
        float denom = 0.0f;
        for (int64_t c = 0; c < nchunks[t]; ++c) {
          const float* pb = parts.data() + part_at[t] + (c * Hkv + h) * nr * (D + 2);
          if (pb[r] == -std::numeric_limits<float>::infinity()) continue;
          const float w = exp_nonpos(pb[r] - mx);
          denom += w * pb[nr + r];
          const float* acc = pb + 2 * nr + r * D;
          for (int64_t d = 0; d < D; ++d) dst[d] += w * acc[d];
        }
        const float inv = 1.0f / denom;
        for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
        lse_o[(tiles[t].first + r / group) * Hq + h * group + r % group] = mx + std::log(denom);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> lambda_rows(const at::Tensor& q, const at::Tensor& glob_cos, const at::Tensor& glob_sin,
                       const at::Tensor& kv_cache, const at::Tensor& block_table, const at::Tensor& rows,
                       const at::Tensor& lo, const at::Tensor& pos, const at::Tensor& n_glob, double scale,
                       int64_t rotary_dim, bool neox, int64_t chunk_tokens, int64_t query_tile) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be a contiguous float32 [S, Hq, D] tensor");
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= q.size(2), "rotary_dim must be even, <= head size");
  for (const at::Tensor* t : {&glob_cos, &glob_sin})
    TORCH_CHECK(t->dim() == 3 && t->scalar_type() == at::kFloat && t->is_contiguous() && t->size(0) == q.size(0) &&
                    t->size(2) == rotary_dim / 2 && t->sizes() == glob_cos.sizes(),
                "glob_cos/glob_sin must be contiguous float32 [S, G, rotary_dim / 2]");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous(), "kv_cache must be contiguous [N, Hkv, B, 2D]");
  TORCH_CHECK(kv_cache.size(3) == 2 * q.size(2), "kv_cache last dim must be 2 * head size");
  TORCH_CHECK(q.size(1) % kv_cache.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.stride(1) == 1, "block_table must be int32, rows contiguous");
  for (const at::Tensor* t : {&rows, &lo, &pos, &n_glob})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == q.size(0),
                "rows/lo/pos/n_glob must be contiguous int64 [S]");
  TORCH_CHECK(query_tile >= 1, "query_tile must be >= 1");
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options());
  if (q.size(0) == 0) return {out, lse};
  // rows of one tile share registers: at most kMaxGroup (query x head) rows per tile pays off
  const int64_t group = q.size(1) / kv_cache.size(1);
  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(query_tile, kMaxGroupRows / std::max<int64_t>(group, 1)));
  const float sc = static_cast<float>(scale);
#define LMINF_CALL(T) rows_impl<T>(q, glob_cos, glob_sin, kv_cache, block_table, rows, lo, pos, n_glob, out, lse, sc, rotary_dim, neox, chunk_tokens, tile)
  switch (kv_cache.scalar_type()) {
    case at::kFloat: LMINF_CALL(float); break;
    case at::kBFloat16: LMINF_CALL(c10::BFloat16); break;
    case at::kHalf: LMINF_CALL(c10::Half); break;
    default: TORCH_CHECK(false, "kv_cache dtype must be float32, bfloat16 or float16");
  }
#undef LMINF_CALL
  return {out, lse};
}

// CLEX's t step on one sequence's keys: slots [lo, hi), counted from slot 0 of the first
// listed block, are rotated further by the angles in cos/sin ([nb, R/2, B]). Products are
// rounded before they are summed, as torch's float32 ops do (no fused multiply-add), so the
// torch path gives the same bits. Keys of one (block, head) are read in either of vLLM's CPU
// layouts: "vec" [D][B], or "amx" (vLLM's pick for bf16 on AMX CPUs) [B/16][D/2][16][2]:
// 16-slot groups of channel pairs.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
// n consecutive slots of one channel pair: x1 and x2 hold slot i at [STRIDE * i] ("vec":
// 1, contiguous; "amx": 2, the pair's channels interleaved with their neighbours')
template <int STRIDE, typename T>
inline void rotate_slots(T* x1, T* x2, const float* c, const float* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float a = static_cast<float>(x1[STRIDE * i]), e = static_cast<float>(x2[STRIDE * i]);
    const float ac = a * c[i], es = e * s[i], ec = e * c[i], as = a * s[i];
    x1[STRIDE * i] = static_cast<T>(ac - es);
    x2[STRIDE * i] = static_cast<T>(ec + as);
  }
}

template <typename T>
void rerotate_impl(const at::Tensor& kv_cache, const at::Tensor& blocks, const at::Tensor& cos, const at::Tensor& sin,
                   int64_t lo, int64_t hi, int64_t rotary_dim, bool neox, bool amx_keys) {
  const int64_t H = kv_cache.size(1), B = kv_cache.size(2), D = kv_cache.size(3) / 2, half = rotary_dim / 2;
  const int64_t nb = blocks.size(0);
  T* base = kv_cache.data_ptr<T>();
  const int64_t* ids = blocks.data_ptr<int64_t>();
  const float* cos_all = cos.data_ptr<float>();
  const float* sin_all = sin.data_ptr<float>();
  at::parallel_for(0, nb * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / H, h = w % H;
      const int64_t s0 = std::max<int64_t>(lo - b * B, 0), s1 = std::min<int64_t>(hi - b * B, B);
      if (s1 <= s0) continue;
      T* keys = base + (ids[b] * H + h) * 2 * D * B;  // the keys, then the values
      for (int64_t i = 0; i < half; ++i) {
        const int64_t c1 = neox ? i : 2 * i, c2 = neox ? i + half : 2 * i + 1;
        const float* c = cos_all + (b * half + i) * B;
        const float* s = sin_all + (b * half + i) * B;
        if (!amx_keys) {
          rotate_slots<1>(keys + c1 * B + s0, keys + c2 * B + s0, c + s0, s + s0, s1 - s0);
          continue;
        }
        // channel c of slot j sits at (j / 16) * 16 D + (c / 2) * 32 + (j % 16) * 2 + c % 2
        const auto at = [&](int64_t ch, int64_t j) { return (j / 16) * 16 * D + (ch / 2) * 32 + (j % 16) * 2 + ch % 2; };
        for (int64_t j = s0; j < s1; j = (j / 16 + 1) * 16) {  // one 16-slot group at a time
          const int64_t n = std::min<int64_t>(s1, (j / 16 + 1) * 16) - j;
          rotate_slots<2>(keys + at(c1, j), keys + at(c2, j), c + j, s + j, n);
        }
      }
    }
  });
}
#pragma GCC pop_options

void rerotate_keys(const at::Tensor& kv_cache, const at::Tensor& blocks, const at::Tensor& cos, const at::Tensor& sin,
                   int64_t lo, int64_t hi, int64_t rotary_dim, bool neox, bool amx_keys) {
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous(), "kv_cache must be contiguous [N, Hkv, B, 2D]");
  TORCH_CHECK(!amx_keys || (kv_cache.size(2) % 16 == 0 && kv_cache.size(3) % 4 == 0),
              "the amx key layout needs block size % 16 == 0 and an even head size");
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && 2 * rotary_dim <= kv_cache.size(3),
              "rotary_dim must be even, <= head size");
  TORCH_CHECK(blocks.dim() == 1 && blocks.scalar_type() == at::kLong && blocks.is_contiguous(),
              "blocks must be contiguous int64 [nb]");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->dim() == 3 && t->scalar_type() == at::kFloat && t->is_contiguous() && t->size(0) == blocks.size(0) &&
                    t->size(1) == rotary_dim / 2 && t->size(2) == kv_cache.size(2),
                "cos/sin must be contiguous float32 [nb, rotary_dim / 2, block size]");
  TORCH_CHECK(0 <= lo && lo <= hi && hi <= blocks.size(0) * kv_cache.size(2), "slots [lo, hi) must lie in the blocks");
  if (blocks.numel() > 0) {
    const int64_t mn = blocks.min().item<int64_t>(), mx = blocks.max().item<int64_t>();
    TORCH_CHECK(mn >= 0 && mx < kv_cache.size(0), "block ids must lie in the cache");
  }
#define LMINF_CALL(T) rerotate_impl<T>(kv_cache, blocks, cos, sin, lo, hi, rotary_dim, neox, amx_keys)
  switch (kv_cache.scalar_type()) {
    case at::kFloat: LMINF_CALL(float); break;
    case at::kBFloat16: LMINF_CALL(c10::BFloat16); break;
    case at::kHalf: LMINF_CALL(c10::Half); break;
    default: TORCH_CHECK(false, "kv_cache dtype must be float32, bfloat16 or float16");
  }
#undef LMINF_CALL
}

// Top-k middle attention. Rows hold queries in the raw frame at the scoring distance
// (R(distance) q_raw); keys are cached rotated at their absolute position j, so a middle
// logit is <R(j) q, k_abs_j>. R(j) = R(b) R(j0) with j0 a block's first position and b the
// slot: callers pass cos/sin of j0 f per logical block ([blocks, R/2]) and of b f per slot
// ([R/2, B]), so no per-key angle table is read.
struct MiddleRotation {
  const float *blk_cos, *blk_sin, *off_cos, *off_sin;
  int64_t half, rotary_dim, D, B;
  bool neox;
  int64_t ch1(int64_t i) const { return neox ? i : 2 * i; }
  int64_t ch2(int64_t i) const { return neox ? i + half : 2 * i + 1; }
  // u = R(j0) q for logical block blk (channels past rotary_dim copied)
  void to_block(const float* q, int64_t blk, float* u) const {
    const float *c = blk_cos + blk * half, *s = blk_sin + blk * half;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = q[ch1(i)], x2 = q[ch2(i)];
      u[ch1(i)] = x1 * c[i] - x2 * s[i];
      u[ch2(i)] = x2 * c[i] + x1 * s[i];
    }
    for (int64_t c2 = rotary_dim; c2 < D; ++c2) u[c2] = q[c2];
  }
  // kr = R(-b) k_b for slots b < s1 of one block's keys ([D][B] in, [D][B] float out): the
  // slot part of each key's rotation undone once per (block, kv head), so every row and
  // query head then scores the block as a plain product <R(j0) q, kr_b>.
  template <typename K>
  void unrotate(const K* keys, int64_t s1, float* kr) const {
    for (int64_t i = 0; i < half; ++i) {
      const K *k1 = keys + ch1(i) * B, *k2 = keys + ch2(i) * B;
      const float *co = off_cos + i * B, *si = off_sin + i * B;
      float *o1 = kr + ch1(i) * B, *o2 = kr + ch2(i) * B;
      for (int64_t b = 0; b < s1; ++b) {
        const float x = to_f(k1[b]), y = to_f(k2[b]);
        o1[b] = x * co[b] + y * si[b];
        o2[b] = y * co[b] - x * si[b];
      }
    }
    for (int64_t c = rotary_dim; c < D; ++c)
      for (int64_t b = 0; b < s1; ++b) kr[c * B + b] = to_f(keys[c * B + b]);
  }
  // acc[b] = scale * <R(b) u, k_b> for slots [s0, s1) of one block's keys ([D][B])
  template <typename K>
  void logits(const float* u, const K* keys, int64_t s0, int64_t s1, float scale, float* acc) const {
    std::fill(acc + s0, acc + s1, 0.0f);
    for (int64_t i = 0; i < half; ++i) {  // cos(bf)(u1 k1 + u2 k2) + sin(bf)(u1 k2 - u2 k1)
      const float a1 = u[ch1(i)], a2 = u[ch2(i)];
      const K *k1 = keys + ch1(i) * B, *k2 = keys + ch2(i) * B;
      const float *co = off_cos + i * B, *si = off_sin + i * B;
      for (int64_t b = s0; b < s1; ++b) {
        const float x = to_f(k1[b]), y = to_f(k2[b]);
        acc[b] += co[b] * (a1 * x + a2 * y) + si[b] * (a1 * y - a2 * x);
      }
    }
    for (int64_t c = rotary_dim; c < D; ++c) {
      const float a = u[c];
      const K* kc = keys + c * B;
      for (int64_t b = s0; b < s1; ++b) acc[b] += a * to_f(kc[b]);
    }
    for (int64_t b = s0; b < s1; ++b) acc[b] *= scale;
  }
};

// Softmax partial of n logits l[i] at positions pos[i] over their values: out (+=, starts
// at 0) and the log-sum-exp.
template <typename T>
inline float softmax_values(const float* l, const int64_t* pos, int64_t n, const T* cache, const int64_t* ids,
                            int64_t Hkv, int64_t h, int64_t D, int64_t B, float* out) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, l[i]);
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float p = std::exp(l[i] - mx);
    sum += p;
    const T* v = cache + (ids[pos[i] / B] * Hkv + h) * 2 * D * B + D * B + (pos[i] % B) * D;  // [B][D]
#if defined(__AVX512F__)
    const __m512 pv = _mm512_set1_ps(p);  // the same fused p * v + out as the scalar loop, 16 lanes at once
    for (int64_t c = 0; c < D; c += 16) {
      const __mmask16 m = first_n(static_cast<int>(D - c));
      _mm512_mask_storeu_ps(out + c, m, _mm512_fmadd_ps(pv, load16(v + c, m), _mm512_maskz_loadu_ps(m, out + c)));
    }
#else
    for (int64_t c = 0; c < D; ++c) out[c] += p * to_f(v[c]);
#endif
  }
  for (int64_t c = 0; c < D; ++c) out[c] /= sum;
  return mx + std::log(sum);
}

// The k largest logits offered so far (val descending, idx), ties to the earlier index
// when indices are offered in ascending order. Runs are screened 16 at a time against the
// current k-th value, so once k are held almost every group is rejected by one compare.
struct RunningTopK {
  float* val;
  int64_t* idx;
  int64_t k;
  int64_t m = 0;  // held so far
  void offer(float x, int64_t i) {
    if (m == k) {
      if (!(x > val[k - 1])) return;
      --m;
    }
    int64_t p = m;
    for (; p > 0 && val[p - 1] < x; --p) val[p] = val[p - 1], idx[p] = idx[p - 1];
    val[p] = x, idx[p] = i, ++m;
  }
  // l[0, n) at indices base, base + 1, ...
  void offer_run(const float* l, int64_t n, int64_t base) {
    int64_t i = 0;
    for (; i < n && m < k; ++i) offer(l[i], base + i);
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
      uint32_t hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(l + i), _mm512_set1_ps(val[k - 1]), _CMP_GT_OQ);
      for (; hit; hit &= hit - 1) offer(l[i + __builtin_ctz(hit)], base + i + __builtin_ctz(hit));
    }
#endif
    for (; i < n; ++i) offer(l[i], base + i);
  }
};

// The k largest of l[0, n) (n >= k) into val (descending) and idx; ties go to the earlier index.
inline void top_k_of(const float* l, int64_t n, int64_t k, float* val, int64_t* idx) {
  RunningTopK top{val, idx, k};
  top.offer_run(l, n, 0);
}

#if defined(__AVX512F__)
// Register tile width (16-lane slices) of the rotated scan: few rows take more slices, so
// that enough independent FMA chains hide their latency.
template <int GC>
constexpr int rotated_slices() { return GC <= 4 ? 4 : 2; }

// Few rows (a decode step: rows x query heads of one kv head <= kMaxGroup): out[g * B + b] =
// <R(b) u_g, k_b> for slots [x0, x0 + 16 NS) of one block's keys ([D][B]), each key's slot
// rotation undone in registers on its way in. No float copy of the block is written, so
// the keys stream through while the slot tables and accumulators stay in L1 (writing and
// re-reading the copy made the op 1.3x slower with few rows to share it).
template <int GC, bool NEOX, typename K>
inline void rotated_scores_tile(const MiddleRotation& rot, const float* u, const K* keys, int64_t x0,
                                const __mmask16* m, float* out, const char* pf, int64_t pf_lines) {
  constexpr int NS = rotated_slices<GC>();
  const int64_t B = rot.B, D = rot.D, half = rot.half;
  // the pair's second channel: NEOX i + half, else 2i + 1; consecutive pairs 1 or 2 rows apart
  const int64_t row_step = NEOX ? B : 2 * B, gap = NEOX ? half * B : B;
  const int64_t u_step = NEOX ? 1 : 2, u_gap = NEOX ? half : 1;
  const int64_t per_pair = lines_per_step(pf_lines, half);
  __m512 acc[GC][NS];
#pragma GCC unroll 8
  for (int g = 0; g < GC; ++g)
#pragma GCC unroll 4
    for (int j = 0; j < NS; ++j) acc[g][j] = _mm512_setzero_ps();
  const K* k1 = keys + x0;
  const float *co_p = rot.off_cos + x0, *si_p = rot.off_sin + x0, *up = u;
  for (int64_t i = 0; i < half; ++i, k1 += row_step, co_p += B, si_p += B, up += u_step) {
    if (pf != nullptr) prefetch_step(pf, pf_lines, per_pair, i);
    __m512 xr[NS], yr[NS];
#pragma GCC unroll 4
    for (int j = 0; j < NS; ++j) {
      const __m512 x = load16(k1 + 16 * j, m[j]), y = load16(k1 + gap + 16 * j, m[j]);
      const __m512 co = _mm512_maskz_loadu_ps(m[j], co_p + 16 * j);
      const __m512 si = _mm512_maskz_loadu_ps(m[j], si_p + 16 * j);
      xr[j] = _mm512_fmadd_ps(x, co, _mm512_mul_ps(y, si));   // R(-b) k, first channel
      yr[j] = _mm512_fmsub_ps(y, co, _mm512_mul_ps(x, si));   // second channel
    }
#pragma GCC unroll 8
    for (int g = 0; g < GC; ++g) {
      const __m512 a1 = _mm512_set1_ps(up[g * D]), a2 = _mm512_set1_ps(up[g * D + u_gap]);
#pragma GCC unroll 4
      for (int j = 0; j < NS; ++j) acc[g][j] = _mm512_fmadd_ps(a2, yr[j], _mm512_fmadd_ps(a1, xr[j], acc[g][j]));
    }
  }
  for (int64_t c = rot.rotary_dim; c < D; ++c) {  // channels past the rotary part: plain product
#pragma GCC unroll 4
    for (int j = 0; j < NS; ++j) {
      const __m512 x = load16(keys + c * B + x0 + 16 * j, m[j]);
#pragma GCC unroll 8
      for (int g = 0; g < GC; ++g) acc[g][j] = _mm512_fmadd_ps(_mm512_set1_ps(u[g * D + c]), x, acc[g][j]);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < GC; ++g)
#pragma GCC unroll 4
    for (int j = 0; j < NS; ++j) _mm512_mask_storeu_ps(out + g * B + x0 + 16 * j, m[j], acc[g][j]);
}

template <int GC, bool NEOX, typename K>
inline void rotated_scores_rows(const MiddleRotation& rot, const float* u, const K* keys, int64_t s1, float* out,
                                const K* next) {
  constexpr int NS = rotated_slices<GC>();
  __mmask16 m[NS];
  const int64_t lines = rot.D * rot.B * static_cast<int64_t>(sizeof(K)) / 64, tiles = (s1 + 16 * NS - 1) / (16 * NS);
  const int64_t share = lines_per_step(lines, tiles);
  const char* pf = reinterpret_cast<const char*>(next);
  for (int64_t x0 = 0, t = 0; x0 < s1; x0 += 16 * NS, ++t) {
    slice_masks(static_cast<int>(x0), static_cast<int>(s1), NS, m);
    const int64_t lo = std::min(lines, t * share), n = std::min(lines, lo + share) - lo;
    rotated_scores_tile<GC, NEOX>(rot, u, keys, x0, m, out, pf == nullptr ? nullptr : pf + 64 * lo, n);
  }
}

// rotated_scores_tile over slots [0, s1) for `rows` <= kMaxGroup rows. next: the key block
// this thread scores after this one (or null), asked for a share per tile so that it
// arrives while this block computes (the middle is paged: 1.2x on caches not in L3).
template <typename K>
inline void rotated_scores(const MiddleRotation& rot, int rows, const float* u, const K* keys, int64_t s1, float* out,
                           const K* next) {
#define LMINF_ROTATED(GC) \
  rot.neox ? rotated_scores_rows<GC, true>(rot, u, keys, s1, out, next) : rotated_scores_rows<GC, false>(rot, u, keys, s1, out, next)
  LMINF_DISPATCH_GC(rows, LMINF_ROTATED)
#undef LMINF_ROTATED
}
#endif

// Exact mode for the query rows of one sequence: per (row, query head) the k largest
// logits of the middle [n_global, n_global + count); a row with count < k gets out = 0 and
// lse = -inf. Keys are read and un-rotated once per (block, kv head) for every row and
// query head, then scored by the register-tiled product the Λ kernel uses; decode-sized
// row sets rotate the keys in registers instead (rotated_scores) and keep each row's k best
// per thread as they go (no logit buffer, no second pass), merged at the end.
template <typename T>
void middle_topk_impl(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_row,
                      const at::Tensor& counts, int64_t n_global, const MiddleRotation& rot, int64_t k, float scale,
                      at::Tensor& out, at::Tensor& lse) {
  const int64_t R = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = kv_cache.size(1), B = kv_cache.size(2), G = Hq / Hkv;
  const int64_t* cnt = counts.data_ptr<int64_t>();
  int64_t n_max = 0;
  for (int64_t r = 0; r < R; ++r)
    if (cnt[r] >= k) n_max = std::max(n_max, cnt[r]);
  if (n_max == 0) return;
  const T* cache = kv_cache.data_ptr<T>();
  const int64_t* ids = block_row.data_ptr<int64_t>();
  const float* qp = q.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  const int64_t first_blk = n_global / B, nblk = (n_global + n_max - 1) / B - first_blk + 1;
  int64_t scoring_rows = 0;  // (row, query head) pairs per kv head
  for (int64_t r = 0; r < R; ++r) scoring_rows += cnt[r] >= k ? G : 0;
#if defined(__AVX512F__)
  const bool in_registers = scoring_rows <= kMaxGroup;
#else
  const bool in_registers = false;
#endif
  // in registers: per thread and scoring (row, query head) its k best so far; else every logit.
  // scoring[i]: the i-th row with a middle of >= k keys (a chunk may hold many rows without)
  std::vector<int64_t> scoring;
  for (int64_t r = 0; r < R; ++r)
    if (cnt[r] >= k) scoring.push_back(r);
  const int64_t threads = in_registers ? at::get_num_threads() : 0;
  const int64_t SH = static_cast<int64_t>(scoring.size()) * Hq;  // scoring (row, query head) pairs
  std::vector<float> logits(in_registers ? 0 : static_cast<size_t>(R * Hq * n_max)), best_val(threads * SH * k);
  std::vector<int64_t> best_idx(threads * SH * k), best_n(threads * SH, 0);
  // 1. logits, work split over (kv head, middle block)
  at::parallel_for(0, Hkv * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kr(in_registers ? 0 : D * B), u(std::max<int64_t>(G, scoring_rows) * D),
        acc(std::max<int64_t>(G, scoring_rows) * B);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t h = w / nblk, blk = first_blk + w % nblk, j0 = blk * B;
      const int64_t s0 = std::max<int64_t>(n_global - j0, 0);
      int64_t s_hi = 0;  // slots any row reads
      for (int64_t r = 0; r < R; ++r)
        if (cnt[r] >= k) s_hi = std::max<int64_t>(s_hi, std::min<int64_t>(n_global + cnt[r] - j0, B));
      if (s_hi <= s0) continue;
#if defined(__AVX512F__)
      if (in_registers) {  // every scoring row at once, keys rotated back in registers
        int64_t n = 0;
        for (int64_t r = 0; r < R; ++r)
          if (cnt[r] >= k)
            for (int64_t g = 0; g < G; ++g, ++n) rot.to_block(qp + (r * Hq + h * G + g) * D, blk, u.data() + n * D);
        const T* next = w + 1 < end ? cache + (ids[first_blk + (w + 1) % nblk] * Hkv + (w + 1) / nblk) * 2 * D * B : nullptr;
        rotated_scores(rot, static_cast<int>(n), u.data(), cache + (ids[blk] * Hkv + h) * 2 * D * B, s_hi, acc.data(),
                       next);
        const int64_t t = at::get_thread_num();
        TORCH_CHECK(t < threads, "middle_topk: more threads than at::get_num_threads()");
        n = 0;
        for (int64_t i = 0; i < static_cast<int64_t>(scoring.size()); ++i) {
          const int64_t s1 = std::min<int64_t>(n_global + cnt[scoring[i]] - j0, B);
          for (int64_t g = 0; g < G; ++g, ++n) {
            float* l = acc.data() + n * B;
            for (int64_t b = s0; b < s1; ++b) l[b] *= scale;
            const int64_t slot = t * SH + i * Hq + h * G + g;
            RunningTopK top{best_val.data() + slot * k, best_idx.data() + slot * k, k, best_n[slot]};
            if (s1 > s0) top.offer_run(l + s0, s1 - s0, j0 - n_global + s0);  // a thread meets its blocks in order
            best_n[slot] = top.m;
          }
        }
        continue;
      }
#endif
      rot.unrotate(cache + (ids[blk] * Hkv + h) * 2 * D * B, s_hi, kr.data());
      for (int64_t r = 0; r < R; ++r) {
        if (cnt[r] < k) continue;
        const int64_t s1 = std::min<int64_t>(n_global + cnt[r] - j0, B);
        if (s1 <= s0) continue;
        for (int64_t g = 0; g < G; ++g) rot.to_block(qp + (r * Hq + h * G + g) * D, blk, u.data() + g * D);
        block_scores<float>(static_cast<int>(G), static_cast<int>(D), static_cast<int>(B), static_cast<int>(s1),
                            u.data(), kr.data(), acc.data());
        for (int64_t g = 0; g < G; ++g) {
          float* dst = logits.data() + (r * Hq + h * G + g) * n_max + (j0 - n_global);
          for (int64_t b = s0; b < s1; ++b) dst[b] = acc[g * B + b] * scale;
        }
      }
    }
  });
  // 2. per (row, query head): the k best, their softmax partial over the values
  if (in_registers) {  // the threads' k best merged: the first k by (logit desc, index asc)
    std::vector<std::pair<float, int64_t>> cand;
    std::vector<float> top(k);
    std::vector<int64_t> pos(k);
    for (int64_t sw = 0; sw < SH; ++sw) {
      const int64_t w = scoring[sw / Hq] * Hq + sw % Hq;  // (row, query head)
      cand.clear();
      for (int64_t t = 0; t < threads; ++t)
        for (int64_t i = 0; i < best_n[t * SH + sw]; ++i)
          cand.emplace_back(best_val[(t * SH + sw) * k + i], best_idx[(t * SH + sw) * k + i]);
      TORCH_CHECK(static_cast<int64_t>(cand.size()) >= k, "middle_topk: fewer than k candidates");
      std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
      for (int64_t i = 0; i < k; ++i) top[i] = cand[i].first, pos[i] = cand[i].second + n_global;
      lse_p[w] = softmax_values(top.data(), pos.data(), k, cache, ids, Hkv, (w % Hq) / G, D, B, out_p + w * D);
    }
    return;
  }
  at::parallel_for(0, R * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> top(k);
    std::vector<int64_t> pos(k);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t n = cnt[w / Hq];
      if (n < k) continue;
      top_k_of(logits.data() + w * n_max, n, k, top.data(), pos.data());
      for (int64_t i = 0; i < k; ++i) pos[i] += n_global;
      lse_p[w] = softmax_values(top.data(), pos.data(), k, cache, ids, Hkv, (w % Hq) / G, D, B, out_p + w * D);
    }
  });
}

// sum_c q_pos[c] hi[c] + q_neg[c] lo[c] over one block's summary (lo_hi: D minima, D maxima).
inline float summary_bound(const float* q_pos, const float* q_neg, const float* lo_hi, int64_t D) {
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 16) {
    const __mmask16 m = first_n(static_cast<int>(D - c));
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q_neg + c), _mm512_maskz_loadu_ps(m, lo_hi + c), acc);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q_pos + c), _mm512_maskz_loadu_ps(m, lo_hi + D + c), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float acc = 0.0f;
  for (int64_t c = 0; c < D; ++c) acc += q_neg[c] * lo_hi[c] + q_pos[c] * lo_hi[D + c];
  return acc;
#endif
}

// Block mode for the query rows of one sequence: per (row, query head) each middle block's
// bound sum_c max(q_c hi_c, q_c lo_c) from its summary ([N, Hkv, 2, D]: min, max of the raw
// keys), the k best blocks (ties: the earlier block), their middle tokens
// (n_global <= j <= last_mid) at the scoring distance. A row whose middle touches fewer than
// k blocks (or last_mid < n_global) gets out = 0 and lse = -inf.
template <typename T>
void middle_blocks_impl(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_row,
                        const at::Tensor& last_mid, int64_t n_global, const at::Tensor& summary,
                        const MiddleRotation& rot, int64_t k, float scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t R = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = kv_cache.size(1), B = kv_cache.size(2), G = Hq / Hkv;
  const T* cache = kv_cache.data_ptr<T>();
  const int64_t* ids = block_row.data_ptr<int64_t>();
  const int64_t* last = last_mid.data_ptr<int64_t>();
  const float* qp = q.data_ptr<float>();
  const float* sum_p = summary.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  const int64_t first_blk = n_global / B;
  at::parallel_for(0, R * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> bound, u(D), l(k * B), q_pos(D), q_neg(D), acc(B);
    std::vector<int32_t> idx;
    std::vector<int64_t> pos(k * B);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w / Hq, h = (w % Hq) / G;
      const int64_t nb = last[r] >= n_global ? last[r] / B - first_blk + 1 : 0;
      if (nb < k) continue;
      const float* qv = qp + w * D;
      // max(q lo, q hi) = q+ hi + q- lo (lo <= hi): each bound a dot product of the summary
      for (int64_t c = 0; c < D; ++c) q_pos[c] = std::max(qv[c], 0.0f), q_neg[c] = std::min(qv[c], 0.0f);
      bound.resize(nb);
      idx.resize(nb);
      for (int64_t b = 0; b < nb; ++b) {
        bound[b] = summary_bound(q_pos.data(), q_neg.data(), sum_p + (ids[first_blk + b] * Hkv + h) * 2 * D, D);
        idx[b] = static_cast<int32_t>(b);
      }
      const float* bd = bound.data();
      std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(),
                       [bd](int32_t a, int32_t b) { return bd[a] > bd[b] || (bd[a] == bd[b] && a < b); });
      const auto keys_of = [&](int64_t blk) { return cache + (ids[blk] * Hkv + h) * 2 * D * B; };
      int64_t n = 0;
      for (int64_t i = 0; i < k; ++i) {
        const int64_t blk = first_blk + idx[i], j0 = blk * B;
        const int64_t s0 = std::max<int64_t>(n_global - j0, 0), s1 = std::min<int64_t>(last[r] + 1 - j0, B);
        const T* keys = keys_of(blk);
        rot.to_block(qv, blk, u.data());
#if defined(__AVX512F__)
        // the exact scan's register tile (one row); the next chosen block asked for meanwhile
        const T* next = i + 1 < k ? keys_of(first_blk + idx[i + 1]) : nullptr;
        rotated_scores(rot, 1, u.data(), keys, s1, acc.data(), next);
        for (int64_t b = s0; b < s1; ++b) l[n + b - s0] = acc[b] * scale;
#else
        rot.logits(u.data(), keys, s0, s1, scale, l.data() + n - s0);
#endif
        for (int64_t b = s0; b < s1; ++b) pos[n + b - s0] = j0 + b;
        n += s1 - s0;
      }
      lse_p[w] = softmax_values(l.data(), pos.data(), n, cache, ids, Hkv, h, D, B, out_p + w * D);
    }
  });
}

// The middle partial (mid, mid_lse: float32 [R, Hq, D], [R, Hq]) merged in place into the
// rows' Λ result (res, res_lse): one softmax over both key sets; rows whose middle lse is -inf
// keep res as it is.
template <typename O>
void merge_into_impl(const at::Tensor& res, const at::Tensor& res_lse, const at::Tensor& mid,
                     const at::Tensor& mid_lse) {
  const int64_t rows = res_lse.numel(), D = res.size(2);
  O* o = res.data_ptr<O>();
  const float *l1 = res_lse.data_ptr<float>(), *m = mid.data_ptr<float>(), *l2 = mid_lse.data_ptr<float>();
  for (int64_t w = 0; w < rows; ++w) {
    if (!(l2[w] > -std::numeric_limits<float>::infinity())) continue;
    const float top = std::max(l1[w], l2[w]);
    const float w1 = std::exp(l1[w] - top), w2 = std::exp(l2[w] - top), total = w1 + w2;
    for (int64_t c = 0; c < D; ++c)
      o[w * D + c] = static_cast<O>((to_f(o[w * D + c]) * w1 + m[w * D + c] * w2) / total);
  }
}

void merge_into(const at::Tensor& res, const at::Tensor& res_lse, const at::Tensor& mid, const at::Tensor& mid_lse) {
  TORCH_CHECK(res.dim() == 3 && res.is_contiguous() && res.sizes() == mid.sizes(), "res must be contiguous like mid");
  TORCH_CHECK(res_lse.scalar_type() == at::kFloat && res_lse.is_contiguous() && res_lse.sizes() == mid_lse.sizes(),
              "res_lse must be contiguous float32 [R, Hq]");
  switch (res.scalar_type()) {
    case at::kFloat: merge_into_impl<float>(res, res_lse, mid, mid_lse); break;
    case at::kBFloat16: merge_into_impl<c10::BFloat16>(res, res_lse, mid, mid_lse); break;
    case at::kHalf: merge_into_impl<c10::Half>(res, res_lse, mid, mid_lse); break;
    default: TORCH_CHECK(false, "res dtype must be float32, bfloat16 or float16");
  }
}

// Queries at absolute positions first_pos + r -> the raw frame at the scoring distance:
// R(distance - p) q_abs, angles in double (as absolute_cos_sin), float32 out.
at::Tensor to_scoring_frame(const at::Tensor& q_abs, const at::Tensor& inv_freq, int64_t distance, int64_t first_pos,
                            int64_t rotary_dim, bool neox) {
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.scalar_type() == at::kFloat && inv_freq.is_contiguous() &&
                  inv_freq.size(0) == rotary_dim / 2, "inv_freq must be contiguous float32 [rotary_dim / 2]");
  at::Tensor q = q_abs.to(at::kFloat).contiguous().clone();
  const int64_t R = q.size(0), Hq = q.size(1), D = q.size(2), half = rotary_dim / 2;
  const float* f = inv_freq.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  std::vector<float> c(half), s(half);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t i = 0; i < half; ++i) {
      const double ang = static_cast<double>(distance - first_pos - r) * static_cast<double>(f[i]);
      c[i] = static_cast<float>(std::cos(ang));
      s[i] = static_cast<float>(std::sin(ang));
    }
    for (int64_t h = 0; h < Hq; ++h) {
      float* x = qp + (r * Hq + h) * D;
      for (int64_t i = 0; i < half; ++i) {
        const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        const float x1 = x[a], x2 = x[b];
        x[a] = x1 * c[i] - x2 * s[i];
        x[b] = x2 * c[i] + x1 * s[i];
      }
    }
  }
  return q;
}

// Checks shared by the two middle ops; returns the rotation tables' view.
MiddleRotation check_middle(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_row,
                            const at::Tensor& rows_arg, int64_t n_blocks_needed, const at::Tensor& blk_cos,
                            const at::Tensor& blk_sin, const at::Tensor& off_cos, const at::Tensor& off_sin, int64_t k,
                            int64_t n_global, int64_t rotary_dim, bool neox) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be a contiguous float32 [R, Hq, D] tensor");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous() && kv_cache.size(3) == 2 * q.size(2),
              "kv_cache must be contiguous [N, Hkv, B, 2D] with D the head size of q");
  TORCH_CHECK(q.size(1) % kv_cache.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= q.size(2), "rotary_dim must be even, <= head size");
  TORCH_CHECK(k >= 1 && n_global >= 0, "k must be >= 1 and n_global >= 0");
  TORCH_CHECK(block_row.dim() == 1 && block_row.scalar_type() == at::kLong && block_row.is_contiguous(),
              "block_row must be contiguous int64 [blocks]");
  TORCH_CHECK(rows_arg.dim() == 1 && rows_arg.scalar_type() == at::kLong && rows_arg.is_contiguous() &&
                  rows_arg.size(0) == q.size(0), "counts / last_mid must be contiguous int64 [R]");
  const int64_t half = rotary_dim / 2, B = kv_cache.size(2);
  TORCH_CHECK(block_row.size(0) >= n_blocks_needed, "block_row must cover the middle of every row");
  for (const at::Tensor* t : {&blk_cos, &blk_sin})
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->size(0) >= n_blocks_needed && t->size(1) == half,
                "blk_cos/blk_sin must be contiguous float32 [>= blocks, rotary_dim / 2]");
  for (const at::Tensor* t : {&off_cos, &off_sin})
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == at::kFloat && t->is_contiguous() && t->size(0) == half &&
                    t->size(1) == B, "off_cos/off_sin must be contiguous float32 [rotary_dim / 2, block size]");
  const int64_t* ids = block_row.data_ptr<int64_t>();  // a plain loop: torch reductions cost more per call
  for (int64_t b = 0; b < n_blocks_needed; ++b)
    TORCH_CHECK(ids[b] >= 0 && ids[b] < kv_cache.size(0), "block ids must lie in the cache");
  return MiddleRotation{blk_cos.data_ptr<float>(), blk_sin.data_ptr<float>(), off_cos.data_ptr<float>(),
                        off_sin.data_ptr<float>(), half, rotary_dim, q.size(2), B, neox};
}

#define LMINF_DISPATCH_CACHE(CALL)                                                         \
  switch (kv_cache.scalar_type()) {                                                        \
    case at::kFloat: { using T = float; CALL; break; }                                     \
    case at::kBFloat16: { using T = c10::BFloat16; CALL; break; }                          \
    case at::kHalf: { using T = c10::Half; CALL; break; }                                  \
    default: TORCH_CHECK(false, "kv_cache dtype must be float32, bfloat16 or float16");   \
  }

std::tuple<at::Tensor, at::Tensor> middle_topk(const at::Tensor& q, const at::Tensor& kv_cache,
                                               const at::Tensor& block_row, const at::Tensor& counts, int64_t n_global,
                                               const at::Tensor& blk_cos, const at::Tensor& blk_sin,
                                               const at::Tensor& off_cos, const at::Tensor& off_sin, int64_t k,
                                               double scale, int64_t rotary_dim, bool neox) {
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous(), "counts must be contiguous int64 [R]");
  int64_t n_max = 0;
  for (int64_t r = 0; r < counts.numel(); ++r) n_max = std::max(n_max, counts.data_ptr<int64_t>()[r]);
  const int64_t B = kv_cache.dim() == 4 ? kv_cache.size(2) : 1;
  const MiddleRotation rot = check_middle(q, kv_cache, block_row, counts, n_max > 0 ? (n_global + n_max - 1) / B + 1 : 0,
                                          blk_cos, blk_sin, off_cos, off_sin, k, n_global, rotary_dim, neox);
  at::Tensor out = at::zeros(q.sizes(), q.options());
  at::Tensor lse = at::full({q.size(0), q.size(1)}, -std::numeric_limits<float>::infinity(), q.options());
  LMINF_DISPATCH_CACHE(middle_topk_impl<T>(q, kv_cache, block_row, counts, n_global, rot, k, static_cast<float>(scale), out, lse))
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> middle_blocks(const at::Tensor& q, const at::Tensor& kv_cache,
                                                 const at::Tensor& block_row, const at::Tensor& last_mid,
                                                 int64_t n_global, const at::Tensor& summary, const at::Tensor& blk_cos,
                                                 const at::Tensor& blk_sin, const at::Tensor& off_cos,
                                                 const at::Tensor& off_sin, int64_t k, double scale,
                                                 int64_t rotary_dim, bool neox) {
  TORCH_CHECK(last_mid.scalar_type() == at::kLong && last_mid.is_contiguous(), "last_mid must be contiguous int64 [R]");
  int64_t last = -1;
  for (int64_t r = 0; r < last_mid.numel(); ++r) last = std::max(last, last_mid.data_ptr<int64_t>()[r]);
  const int64_t B = kv_cache.dim() == 4 ? kv_cache.size(2) : 1;
  const MiddleRotation rot = check_middle(q, kv_cache, block_row, last_mid, last >= n_global ? last / B + 1 : 0,
                                          blk_cos, blk_sin, off_cos, off_sin, k, n_global, rotary_dim, neox);
  TORCH_CHECK(summary.dim() == 4 && summary.scalar_type() == at::kFloat && summary.is_contiguous() &&
                  summary.size(0) == kv_cache.size(0) && summary.size(1) == kv_cache.size(1) && summary.size(2) == 2 &&
                  summary.size(3) == q.size(2), "summary must be contiguous float32 [N, Hkv, 2, D]");
  at::Tensor out = at::zeros(q.sizes(), q.options());
  at::Tensor lse = at::full({q.size(0), q.size(1)}, -std::numeric_limits<float>::infinity(), q.options());
  LMINF_DISPATCH_CACHE(middle_blocks_impl<T>(q, kv_cache, block_row, last_mid, n_global, summary, rot, k,
                                             static_cast<float>(scale), out, lse))
  return {out, lse};
}

// A block-table row as int64 ids: vLLM's tables are int32; converting here, not in Python,
// saves a dispatched op per layer call.
at::Tensor block_ids(const at::Tensor& block_row) {
  TORCH_CHECK(block_row.scalar_type() == at::kInt || block_row.scalar_type() == at::kLong,
              "block_row must be int32 or int64");
  return block_row.scalar_type() == at::kLong ? block_row : block_row.to(at::kLong);
}

// The ops as the fast path calls them: queries at absolute positions (rotated here to the
// scoring frame), the middle partial merged in place into the Λ result (res, res_lse).
void middle_topk_merge(const at::Tensor& q_abs, const at::Tensor& kv_cache, const at::Tensor& block_row,
                       const at::Tensor& counts, int64_t n_global, const at::Tensor& blk_cos, const at::Tensor& blk_sin,
                       const at::Tensor& off_cos, const at::Tensor& off_sin, int64_t k, double scale, int64_t rotary_dim,
                       bool neox, const at::Tensor& inv_freq, int64_t distance, int64_t first_pos,
                       const at::Tensor& res, const at::Tensor& res_lse) {
  const at::Tensor q = to_scoring_frame(q_abs, inv_freq, distance, first_pos, rotary_dim, neox);
  auto [mid, mid_lse] = middle_topk(q, kv_cache, block_ids(block_row), counts, n_global, blk_cos, blk_sin, off_cos, off_sin, k,
                                    scale, rotary_dim, neox);
  merge_into(res, res_lse, mid, mid_lse);
}

void middle_blocks_merge(const at::Tensor& q_abs, const at::Tensor& kv_cache, const at::Tensor& block_row,
                         const at::Tensor& last_mid, int64_t n_global, const at::Tensor& summary,
                         const at::Tensor& blk_cos, const at::Tensor& blk_sin, const at::Tensor& off_cos,
                         const at::Tensor& off_sin, int64_t k, double scale, int64_t rotary_dim, bool neox,
                         const at::Tensor& inv_freq, int64_t distance, int64_t first_pos, const at::Tensor& res,
                         const at::Tensor& res_lse) {
  const at::Tensor q = to_scoring_frame(q_abs, inv_freq, distance, first_pos, rotary_dim, neox);
  auto [mid, mid_lse] = middle_blocks(q, kv_cache, block_ids(block_row), last_mid, n_global, summary, blk_cos, blk_sin, off_cos,
                                      off_sin, k, scale, rotary_dim, neox);
  merge_into(res, res_lse, mid, mid_lse);
}
#undef LMINF_DISPATCH_CACHE

}  // namespace

TORCH_LIBRARY(lminf_cpu, m) {
  m.def("lambda_rows(Tensor q, Tensor glob_cos, Tensor glob_sin, Tensor kv_cache, Tensor block_table, "
        "Tensor rows, Tensor lo, Tensor pos, Tensor n_glob, float scale, int rotary_dim, bool neox, "
        "int chunk_tokens, int query_tile) -> (Tensor, Tensor)");
  m.def("rerotate_keys(Tensor(a!) kv_cache, Tensor blocks, Tensor cos, Tensor sin, int lo, int hi, int rotary_dim, "
        "bool neox, bool amx_keys) -> ()");
  m.def("middle_topk_merge(Tensor q_abs, Tensor kv_cache, Tensor block_row, Tensor counts, int n_global, "
        "Tensor blk_cos, Tensor blk_sin, Tensor off_cos, Tensor off_sin, int k, float scale, int rotary_dim, bool neox, "
        "Tensor inv_freq, int distance, int first_pos, Tensor(a!) res, Tensor res_lse) -> ()");
  m.def("middle_blocks_merge(Tensor q_abs, Tensor kv_cache, Tensor block_row, Tensor last_mid, int n_global, "
        "Tensor summary, Tensor blk_cos, Tensor blk_sin, Tensor off_cos, Tensor off_sin, int k, float scale, "
        "int rotary_dim, bool neox, Tensor inv_freq, int distance, int first_pos, Tensor(a!) res, Tensor res_lse) -> ()");
}

TORCH_LIBRARY_IMPL(lminf_cpu, CPU, m) {
  m.impl("lambda_rows", &lambda_rows);
  m.impl("rerotate_keys", &rerotate_keys);
  m.impl("middle_topk_merge", &middle_topk_merge);
  m.impl("middle_blocks_merge", &middle_blocks_merge);
}
