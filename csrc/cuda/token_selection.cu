// select_visual_tokens on CUDA.
//
// Stage 1, the global score, is the heavy part (~11.5 GFLOP per pass at the benchmark shape):
//   pass 1 (row_stats_kernel):    per (layer, KV head, key tile) block, the max and the sum of
//                                 exponentials of every query row over the tile's keys;
//                                 combine_row_stats_kernel merges the per-tile partials into
//                                 each row's softmax statistics (max m, 1 / sum);
//   pass 2 (grid_columns_kernel): per (layer, KV head, grid key tile) block, the sum over the
//                                 block's query rows of exp(s - m) / sum for each grid column;
//                                 written per (layer, KV head), then summed in a fixed order.
// A block takes all G*Lq query rows of its KV head (GQA: every key is read once per pass), so
// q.k tiles are [32 rows x 128 keys] products, on tensor cores (wmma, fp32 accumulate) for
// bf16/fp16 with D % 16 == 0, and with FFMA otherwise. Nothing larger than a tile of scores
// exists at any time; every reduction has a fixed order (deterministic, no atomics).
//
// Stage 2, pair dots: one warp per grid token reads its row of features and those of its five
// forward neighbours (norm + five dots, fp32 accumulation; memory bound).
// Stage 3, local scores: one thread per token, local_scores_at (shared with the CPU path).
// Stage 4 is shared ATen code (csrc/token_selection_topk.cpp).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "cuda/element_types.cuh"
#include "cuda/warp_reduce.cuh"
#include "token_selection.h"

namespace hippo {
namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kKeyTile = 128;  // keys per block
constexpr int kRowChunk = 32;  // query rows per q.k tile
constexpr int kScoreLd = kKeyTile + 4;  // float row stride of the score tile (wmma: multiple of 4)
constexpr int kColumnGroups = kThreads / kKeyTile;  // threads per column in pass 2
static_assert(kThreads % kKeyTile == 0 && kRowChunk % kColumnGroups == 0, "tile shape");
static_assert(kKeyTile % 32 == 0, "a warp covers whole key tiles in pass 1");

// ---- element types (conversions and the dtype dispatch: cuda/element_types.cuh) -------------

template <typename T> __device__ __forceinline__ T zero_value();
template <> __device__ __forceinline__ float zero_value<float>() { return 0.f; }
template <> __device__ __forceinline__ __half zero_value<__half>() { return __float2half(0.f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_value<__nv_bfloat16>() {
  return __float2bfloat16(0.f);
}

template <typename T> constexpr bool kIs16Bit = sizeof(T) == 2;


// ---- shared-memory layout of the attention kernels ------------------------------------------
// Row stride (elements) of the key and query tiles: 16-bit rows padded by 8 elements (wmma needs
// a multiple of 8 and 32-byte aligned fragment starts; the padding also spreads banks); fp32 rows
// padded by one word so that a warp reading 32 key rows at one d hits 32 banks.
template <typename T>
__host__ __device__ constexpr int tile_ld(int head_dim) {
  return kIs16Bit<T> ? head_dim + 8 : head_dim + 1;
}

__host__ __device__ constexpr size_t round_up(size_t bytes) { return (bytes + 127) / 128 * 128; }

template <typename T>
struct TileLayout {
  size_t key_offset, query_offset, score_offset, stats_offset, partial_offset, bytes;
  __host__ __device__ explicit TileLayout(int head_dim) {
    const int ld = tile_ld<T>(head_dim);
    key_offset = 0;
    query_offset = key_offset + round_up(size_t(kKeyTile) * ld * sizeof(T));
    score_offset = query_offset + round_up(size_t(kRowChunk) * ld * sizeof(T));
    stats_offset = score_offset + round_up(size_t(kRowChunk) * kScoreLd * sizeof(float));
    partial_offset = stats_offset + round_up(2 * kRowChunk * sizeof(float));
    bytes = partial_offset + round_up(size_t(kColumnGroups) * kKeyTile * sizeof(float));
  }
};

struct AttentionParams {
  const void* queries;  // contiguous [layers, Hq, Lq, D]
  const void* keys;     // [layers, Hkv, S, D], last dim contiguous
  int64_t key_stride_layer, key_stride_head, key_stride_pos;
  int layers, q_heads, kv_heads, num_queries, seq_len, head_dim;
  int rows;             // G * Lq query rows per KV head
  float scale;
  bool vector_loads;    // 16-byte global loads are aligned for keys and queries
  // pass 1
  int num_key_tiles;
  float* partial_max;   // [layers * Hkv, rows, num_key_tiles]
  float* partial_sum;
  // pass 2
  int visual_start, grid_tokens;
  const float* row_max;      // [layers * Hkv, rows]
  const float* row_inv_sum;  // [layers * Hkv, rows]
  float* columns;            // [layers * Hkv, grid_tokens]
};

// dst[r * ld + d] = src[r * src_stride + d] for r < valid_rows, else 0; num_rows x head_dim.
template <typename T>
__device__ void load_tile(T* dst, int ld, const T* src, int64_t src_stride, int valid_rows,
                          int num_rows, int head_dim, bool vector_loads) {
  if (vector_loads) {
    constexpr int kVec = 16 / sizeof(T);
    const int per_row = head_dim / kVec;
    for (int idx = threadIdx.x; idx < num_rows * per_row; idx += blockDim.x) {
      const int r = idx / per_row, c = (idx % per_row) * kVec;
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (r < valid_rows) raw = *reinterpret_cast<const uint4*>(src + r * src_stride + c);
      if constexpr (kIs16Bit<T>) {
        // ld and c are multiples of 8 elements: the 16-byte store is aligned.
        *reinterpret_cast<uint4*>(dst + r * ld + c) = raw;
      } else {
        const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int v = 0; v < kVec; ++v) dst[r * ld + c + v] = vals[v];
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < num_rows * head_dim; idx += blockDim.x) {
      const int r = idx / head_dim, d = idx % head_dim;
      dst[r * ld + d] = r < valid_rows ? src[r * src_stride + d] : zero_value<T>();
    }
  }
}

// scores[r * kScoreLd + j] = q_r . k_j (unscaled) for the kRowChunk x kKeyTile tile.
template <typename T, bool kTensorCores>
__device__ void score_tile(const T* query_tile, const T* key_tile, float* scores, int head_dim) {
  const int ld = tile_ld<T>(head_dim);
  if constexpr (kTensorCores) {
    namespace wmma = nvcuda::wmma;
    constexpr int kColFrags = kKeyTile / 16;
    constexpr int kFragsPerWarp = (kRowChunk / 16) * kColFrags / kWarps;
    static_assert(kFragsPerWarp * kWarps == (kRowChunk / 16) * kColFrags, "whole fragments");
    static_assert(kColFrags % kFragsPerWarp == 0, "a warp's fragments share one row fragment");
    const int warp = threadIdx.x / 32;
    const int first = warp * kFragsPerWarp;
    const int row_frag = first / kColFrags, col_frag0 = first % kColFrags;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragsPerWarp];
#pragma unroll
    for (int f = 0; f < kFragsPerWarp; ++f) wmma::fill_fragment(acc[f], 0.f);
    for (int d0 = 0; d0 < head_dim; d0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, query_tile + row_frag * 16 * ld + d0, ld);
#pragma unroll
      for (int f = 0; f < kFragsPerWarp; ++f) {
        // K^T as a col-major [D x keys] matrix is the row-major [keys x D] key tile.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, key_tile + (col_frag0 + f) * 16 * ld + d0, ld);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
#pragma unroll
    for (int f = 0; f < kFragsPerWarp; ++f) {
      wmma::store_matrix_sync(scores + row_frag * 16 * kScoreLd + (col_frag0 + f) * 16, acc[f],
                              kScoreLd, wmma::mem_row_major);
    }
  } else {
    // Thread -> one key column, every kColumnGroups-th row: per d one key load (distinct banks
    // across the warp) and broadcast query loads.
    constexpr int kRowsPerThread = kRowChunk / kColumnGroups;
    const int j = threadIdx.x % kKeyTile, group = threadIdx.x / kKeyTile;
    float acc[kRowsPerThread] = {};
    for (int d = 0; d < head_dim; ++d) {
      const float k = to_float(key_tile[j * ld + d]);
#pragma unroll
      for (int m = 0; m < kRowsPerThread; ++m) {
        acc[m] += to_float(query_tile[(group + m * kColumnGroups) * ld + d]) * k;
      }
    }
#pragma unroll
    for (int m = 0; m < kRowsPerThread; ++m) {
      scores[(group + m * kColumnGroups) * kScoreLd + j] = acc[m];
    }
  }
}


template <typename T>
struct BlockTiles {
  T* keys;
  T* queries;
  float* scores;
  float* stats;    // [2][kRowChunk]: row max, row 1/sum (pass 2)
  float* partial;  // [kColumnGroups][kKeyTile] (pass 2)
  __device__ BlockTiles(unsigned char* smem, int head_dim) {
    const TileLayout<T> layout(head_dim);
    keys = reinterpret_cast<T*>(smem + layout.key_offset);
    queries = reinterpret_cast<T*>(smem + layout.query_offset);
    scores = reinterpret_cast<float*>(smem + layout.score_offset);
    stats = reinterpret_cast<float*>(smem + layout.stats_offset);
    partial = reinterpret_cast<float*>(smem + layout.partial_offset);
  }
};

// Loads this block's key tile: keys [first_key, min(first_key + kKeyTile, key_end)).
template <typename T>
__device__ void load_key_tile(const AttentionParams& p, const BlockTiles<T>& tiles, int layer,
                              int kv_head, int first_key, int key_end) {
  const T* head_keys = static_cast<const T*>(p.keys) + layer * p.key_stride_layer +
                       kv_head * p.key_stride_head;
  load_tile(tiles.keys, tile_ld<T>(p.head_dim), head_keys + first_key * p.key_stride_pos,
            p.key_stride_pos, min(kKeyTile, key_end - first_key), kKeyTile, p.head_dim,
            p.vector_loads);
}

// Loads query rows [first_row, first_row + kRowChunk) of (layer, kv_head); rows past p.rows are 0.
template <typename T>
__device__ void load_query_chunk(const AttentionParams& p, const BlockTiles<T>& tiles, int layer,
                                 int kv_head, int first_row) {
  // The G heads of one KV head are adjacent, so its rows g * Lq + i are contiguous.
  const T* head_queries = static_cast<const T*>(p.queries) +
                          (int64_t(layer) * p.q_heads + int64_t(kv_head) * (p.q_heads / p.kv_heads)) *
                              p.num_queries * p.head_dim;
  load_tile(tiles.queries, tile_ld<T>(p.head_dim), head_queries + int64_t(first_row) * p.head_dim,
            p.head_dim, min(kRowChunk, p.rows - first_row), kRowChunk, p.head_dim,
            p.vector_loads);
}

// Causal limit: query row (g, i) sits at position S - Lq + i and sees keys up to it.
__device__ __forceinline__ int last_visible_key(const AttentionParams& p, int row) {
  return p.seq_len - p.num_queries + row % p.num_queries;
}

// Pass 1. grid (num_key_tiles, layers * Hkv).
template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(AttentionParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const BlockTiles<T> tiles(smem, p.head_dim);
  const int tile = blockIdx.x, lh = blockIdx.y;
  const int layer = lh / p.kv_heads, kv_head = lh % p.kv_heads;
  const int first_key = tile * kKeyTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  load_key_tile(p, tiles, layer, kv_head, first_key, p.seq_len);
  for (int chunk = 0; chunk < p.rows; chunk += kRowChunk) {
    __syncthreads();  // the previous chunk's scores and queries are consumed
    load_query_chunk(p, tiles, layer, kv_head, chunk);
    __syncthreads();
    score_tile<T, kTensorCores>(tiles.queries, tiles.keys, tiles.scores, p.head_dim);
    __syncthreads();
    // One warp per row: the tile's max and sum of exp over the keys this row sees.
    for (int r = warp; r < kRowChunk; r += kWarps) {
      const int row = chunk + r;
      if (row >= p.rows) break;  // warp-uniform
      const int last = last_visible_key(p, row);
      float s[kKeyTile / 32];
      float m = -INFINITY;
#pragma unroll
      for (int c = 0; c < kKeyTile / 32; ++c) {
        const int j = lane + 32 * c, key = first_key + j;
        const bool visible = key < p.seq_len && key <= last;
        s[c] = visible ? tiles.scores[r * kScoreLd + j] * p.scale : -INFINITY;
        m = fmaxf(m, s[c]);
      }
      m = warp_max(m);
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < kKeyTile / 32; ++c) sum += s[c] == -INFINITY ? 0.f : expf(s[c] - m);
      sum = warp_sum(sum);
      if (lane == 0) {
        const int64_t out = (int64_t(lh) * p.rows + row) * p.num_key_tiles + tile;
        p.partial_max[out] = m;
        p.partial_sum[out] = sum;
      }
    }
  }
}

// Pass 2. grid (ceil(grid_tokens / kKeyTile), layers * Hkv).
template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kThreads) grid_columns_kernel(AttentionParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const BlockTiles<T> tiles(smem, p.head_dim);
  const int lh = blockIdx.y;
  const int layer = lh / p.kv_heads, kv_head = lh % p.kv_heads;
  const int first_column = blockIdx.x * kKeyTile;  // grid index n of the tile's first key
  const int first_key = p.visual_start + first_column;
  const int key_end = p.visual_start + p.grid_tokens;
  const int j = threadIdx.x % kKeyTile, group = threadIdx.x / kKeyTile;
  const int key = first_key + j;

  load_key_tile(p, tiles, layer, kv_head, first_key, key_end);
  float column_sum = 0.f;  // this thread's rows of column j, in a fixed order
  for (int chunk = 0; chunk < p.rows; chunk += kRowChunk) {
    __syncthreads();
    load_query_chunk(p, tiles, layer, kv_head, chunk);
    for (int r = threadIdx.x; r < kRowChunk; r += blockDim.x) {
      const int row = chunk + r;
      const bool valid = row < p.rows;
      const int64_t stat = int64_t(lh) * p.rows + row;
      tiles.stats[r] = valid ? p.row_max[stat] : 0.f;
      tiles.stats[kRowChunk + r] = valid ? p.row_inv_sum[stat] : 0.f;
    }
    __syncthreads();
    score_tile<T, kTensorCores>(tiles.queries, tiles.keys, tiles.scores, p.head_dim);
    __syncthreads();
    for (int r = group; r < kRowChunk; r += kColumnGroups) {
      const int row = chunk + r;
      if (row < p.rows && key < key_end && key <= last_visible_key(p, row)) {
        const float s = tiles.scores[r * kScoreLd + j] * p.scale;
        column_sum += expf(s - tiles.stats[r]) * tiles.stats[kRowChunk + r];
      }
    }
  }
  tiles.partial[group * kKeyTile + j] = column_sum;
  __syncthreads();
  if (group == 0 && key < key_end) {
    float total = 0.f;
    for (int g = 0; g < kColumnGroups; ++g) total += tiles.partial[g * kKeyTile + j];
    p.columns[int64_t(lh) * p.grid_tokens + first_column + j] = total;
  }
}

// Between the passes: one warp per (layer, KV head, row) combines the per-tile (max, sum of exp)
// partials into the row's softmax statistics, in a fixed order. Tile 0 holds key 0, which every
// row sees, so the max is finite and the sum at least 1 (for finite scores).
// A tile is left out when its sum is 0 (no key of it visible to the row), not when its max is
// -inf: a tile whose only visible scores are NaN has max -inf (fmaxf drops NaN) and sum NaN, and
// that NaN must reach the row's statistics (NaN * exp(-inf) is NaN), as on the CPU, where a NaN
// score makes the row's softmax sum NaN.
__global__ void __launch_bounds__(kThreads) combine_row_stats_kernel(
    const float* partial_max, const float* partial_sum, int64_t total_rows, int num_tiles,
    float* row_max, float* row_inv_sum) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= total_rows) return;  // whole warp
  const float* tile_max = partial_max + row * num_tiles;
  const float* tile_sum = partial_sum + row * num_tiles;
  float m = -INFINITY;
  for (int t = lane; t < num_tiles; t += 32) m = fmaxf(m, tile_max[t]);
  m = warp_max(m);
  float sum = 0.f;
  for (int t = lane; t < num_tiles; t += 32) {
    if (tile_sum[t] != 0.f) sum += tile_sum[t] * expf(tile_max[t] - m);
  }
  sum = warp_sum(sum);
  if (lane == 0) {
    row_max[row] = m;
    row_inv_sum[row] = 1.f / sum;
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, bool kTensorCores>
void launch_attention_passes(AttentionParams p, const at::Tensor& partial_max,
                             const at::Tensor& partial_sum, const at::Tensor& row_max,
                             const at::Tensor& row_inv_sum, cudaStream_t stream) {
  const size_t smem = TileLayout<T>(p.head_dim).bytes;
  const int64_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  HIPPO_CHECK(static_cast<int64_t>(smem) <= optin, kSelectOp, "head dim ", p.head_dim,
              " needs ", smem, " bytes of shared memory per block, the device allows ", optin);
  const int lh = p.layers * p.kv_heads;

  auto pass1 = row_stats_kernel<T, kTensorCores>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(pass1, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  pass1<<<dim3(p.num_key_tiles, lh), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t total_rows = int64_t(lh) * p.rows;
  combine_row_stats_kernel<<<(total_rows + kWarps - 1) / kWarps, kThreads, 0, stream>>>(
      partial_max.data_ptr<float>(), partial_sum.data_ptr<float>(), total_rows, p.num_key_tiles,
      row_max.data_ptr<float>(), row_inv_sum.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  auto pass2 = grid_columns_kernel<T, kTensorCores>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(pass2, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  const int grid_tiles = (p.grid_tokens + kKeyTile - 1) / kKeyTile;
  pass2<<<dim3(grid_tiles, lh), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor global_score_cuda(const at::Tensor& queries, const at::Tensor& keys,
                             const SelectionShape& s, double scale) {
  HIPPO_CHECK(s.seq_len < (int64_t{1} << 31) && s.layers * s.q_heads * s.num_queries < (int64_t{1} << 31),
              kSelectOp, "sizes beyond int32 are not supported on CUDA");
  HIPPO_CHECK(s.layers * s.kv_heads <= 65535, kSelectOp,
              "at most 65535 (layer, KV head) pairs are supported on CUDA");
  const auto f32 = queries.options().dtype(at::kFloat);
  const int64_t lh = s.layers * s.kv_heads, rows = s.group() * s.num_queries;
  const int64_t num_key_tiles = (s.seq_len + kKeyTile - 1) / kKeyTile;
  at::Tensor partial_max = at::empty({lh, rows, num_key_tiles}, f32);
  at::Tensor partial_sum = at::empty({lh, rows, num_key_tiles}, f32);
  at::Tensor row_max = at::empty({lh, rows}, f32);
  at::Tensor row_inv_sum = at::empty({lh, rows}, f32);
  at::Tensor columns = at::empty({lh, s.grid_tokens()}, f32);

  AttentionParams p{};
  p.queries = queries.data_ptr();
  p.keys = keys.data_ptr();
  p.key_stride_layer = keys.stride(0);
  p.key_stride_head = keys.stride(1);
  p.key_stride_pos = keys.stride(2);
  p.layers = static_cast<int>(s.layers);
  p.q_heads = static_cast<int>(s.q_heads);
  p.kv_heads = static_cast<int>(s.kv_heads);
  p.num_queries = static_cast<int>(s.num_queries);
  p.seq_len = static_cast<int>(s.seq_len);
  p.head_dim = static_cast<int>(s.head_dim);
  p.rows = static_cast<int>(rows);
  p.scale = static_cast<float>(scale);
  p.num_key_tiles = static_cast<int>(num_key_tiles);
  p.partial_max = partial_max.data_ptr<float>();
  p.partial_sum = partial_sum.data_ptr<float>();
  p.visual_start = static_cast<int>(s.visual_start);
  p.grid_tokens = static_cast<int>(s.grid_tokens());
  p.row_max = row_max.data_ptr<float>();
  p.row_inv_sum = row_inv_sum.data_ptr<float>();
  p.columns = columns.data_ptr<float>();

  const int64_t elem = queries.element_size();
  p.vector_loads = (s.head_dim * elem) % 16 == 0 && aligned16(p.queries) && aligned16(p.keys) &&
                   (p.key_stride_layer * elem) % 16 == 0 && (p.key_stride_head * elem) % 16 == 0 &&
                   (p.key_stride_pos * elem) % 16 == 0;
  const bool tensor_cores = elem == 2 && s.head_dim % 16 == 0;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_element_type(queries.scalar_type(), kSelectOp, [&](auto element) {
    using T = decltype(element);
    if constexpr (kIs16Bit<T>) {
      if (tensor_cores) {
        launch_attention_passes<T, true>(p, partial_max, partial_sum, row_max, row_inv_sum, stream);
        return;
      }
    }
    launch_attention_passes<T, false>(p, partial_max, partial_sum, row_max, row_inv_sum, stream);
  });
  const double total_rows = static_cast<double>(s.layers * s.q_heads * s.num_queries);
  return columns.sum(0).div_(total_rows).view({s.frames, s.grid_h, s.grid_w});
}

// ---- stage 2: pair dots -----------------------------------------------------------------------

// Loads kVec consecutive elements at ptr as floats (one 16-byte load when kVec > 1).
template <typename T, int kVec>
__device__ __forceinline__ void load_floats(const T* ptr, float (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = to_float(*ptr);
  } else {
    static_assert(kVec * sizeof(T) == 16, "one 16-byte load");
    const uint4 raw = *reinterpret_cast<const uint4*>(ptr);
    const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int v = 0; v < kVec; ++v) out[v] = to_float(vals[v]);
  }
}

// One warp per grid token: its squared norm and its dots with the pair_offset neighbours
// (0 where the neighbour does not exist). grid ceil(N / kWarps), kThreads.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) pair_dots_kernel(const T* features, int64_t channels,
                                                            int frames, int grid_h, int grid_w,
                                                            float* norms_sq, float* dots) {
  const int64_t token = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t grid_tokens = int64_t(frames) * grid_h * grid_w;
  if (token >= grid_tokens) return;  // whole warp
  const int t = token / (grid_h * grid_w), y = (token / grid_w) % grid_h, x = token % grid_w;

  const T* self = features + token * channels;
  const T* neighbour[kNumPairDirections];
#pragma unroll
  for (int k = 0; k < kNumPairDirections; ++k) {
    const PairOffset o = pair_offset(k);
    const int nt = t + o.dt, ny = y + o.dy, nx = x + o.dx;
    const bool exists = nt < frames && ny < grid_h && nx >= 0 && nx < grid_w;
    neighbour[k] = exists ? features + ((int64_t(nt) * grid_h + ny) * grid_w + nx) * channels
                          : nullptr;
  }

  float acc[kNumPairDirections + 1] = {};
#pragma unroll 2  // more loads in flight per lane
  for (int64_t c = int64_t(lane) * kVec; c < channels; c += 32 * kVec) {
    float a[kVec];
    load_floats<T, kVec>(self + c, a);
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[0] += a[v] * a[v];
#pragma unroll
    for (int k = 0; k < kNumPairDirections; ++k) {
      if (neighbour[k] == nullptr) continue;  // warp-uniform
      float b[kVec];
      load_floats<T, kVec>(neighbour[k] + c, b);
#pragma unroll
      for (int v = 0; v < kVec; ++v) acc[k + 1] += a[v] * b[v];
    }
  }
#pragma unroll
  for (int k = 0; k <= kNumPairDirections; ++k) acc[k] = warp_sum(acc[k]);
  if (lane == 0) {
    norms_sq[token] = acc[0];
#pragma unroll
    for (int k = 0; k < kNumPairDirections; ++k) {
      dots[token * kNumPairDirections + k] = neighbour[k] != nullptr ? acc[k + 1] : 0.f;
    }
  }
}

// Stage 3: one thread per grid token (local_scores_at is shared with the CPU path).
__global__ void local_scores_kernel(const float* norms_sq, const float* dots, int64_t frames,
                                    int64_t grid_h, int64_t grid_w, float* temporal,
                                    float* spatial) {
  const int64_t token = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (token >= frames * grid_h * grid_w) return;
  const LocalScores scores = local_scores_at(token, norms_sq, dots, frames, grid_h, grid_w);
  temporal[token] = scores.temporal;
  spatial[token] = scores.spatial;
}

std::tuple<at::Tensor, at::Tensor> local_scores_cuda(const at::Tensor& features,
                                                      const SelectionShape& s) {
  const auto f32 = features.options().dtype(at::kFloat);
  at::Tensor norms_sq = at::empty({s.frames, s.grid_h, s.grid_w}, f32);
  at::Tensor dots = at::empty({s.frames, s.grid_h, s.grid_w, kNumPairDirections}, f32);
  const int64_t blocks = (s.grid_tokens() + kWarps - 1) / kWarps;
  const bool vector_loads =
      (s.channels * features.element_size()) % 16 == 0 && aligned16(features.data_ptr());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_element_type(features.scalar_type(), kSelectOp, [&](auto element) {
    using T = decltype(element);
    const T* f = reinterpret_cast<const T*>(features.data_ptr());
    const int frames = static_cast<int>(s.frames), h = static_cast<int>(s.grid_h),
              w = static_cast<int>(s.grid_w);
    if (vector_loads) {
      pair_dots_kernel<T, 16 / sizeof(T)><<<blocks, kThreads, 0, stream>>>(
          f, s.channels, frames, h, w, norms_sq.data_ptr<float>(), dots.data_ptr<float>());
    } else {
      pair_dots_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(
          f, s.channels, frames, h, w, norms_sq.data_ptr<float>(), dots.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor temporal = at::empty_like(norms_sq), spatial = at::empty_like(norms_sq);
  constexpr int kScoreThreads = 128;
  const int64_t score_blocks = (s.grid_tokens() + kScoreThreads - 1) / kScoreThreads;
  local_scores_kernel<<<score_blocks, kScoreThreads, 0, stream>>>(
      norms_sq.data_ptr<float>(), dots.data_ptr<float>(), s.frames, s.grid_h, s.grid_w,
      temporal.data_ptr<float>(), spatial.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {temporal, spatial};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_visual_tokens_cuda(
    const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& features,
    int64_t visual_start, int64_t num_visual, int64_t num_keep, bool per_frame, double w_global,
    double w_temporal, double w_spatial, double scale) {
  const SelectionShape s =
      check_selection_inputs(queries, keys, features, visual_start, num_visual, num_keep,
                             w_global, w_temporal, w_spatial, scale);
  const c10::cuda::CUDAGuard guard(queries.device());
  const at::Tensor global = global_score_cuda(queries.contiguous(), keys, s, scale);
  const auto [temporal, spatial] = local_scores_cuda(features.contiguous(), s);
  return fuse_and_select(s, global, temporal, spatial, per_frame, w_global, w_temporal, w_spatial);
}

}  // namespace
}  // namespace hippo

TORCH_LIBRARY_IMPL(hippo_ext, CUDA, m) {
  m.impl("select_visual_tokens", &hippo::select_visual_tokens_cuda);
}
