// CUDA kv_gather and kv_compact_.
//
// A cache [layers, 2, B, Hkv, S, D] is `rows` rows of S token slots; a slot is D * element-size
// bytes, moved as `row_vecs` vectors of 16 bytes (or 8, 4, 2 when size or alignment forbid).
//
// kv_gather: blocks over (row, tile of K): every slot is independent, so the grid covers all of
// them and a thread issues kItems loads before its stores.
//
// kv_compact_ (in place, index[b, k] >= k): a block owns a (row, column slice) and walks k in
// chunks. Within a chunk all loads come first, then a barrier, then the stores. A store of chunk
// c writes slots <= its last k, while every later load reads index[b, k'] >= k' > that slot (the
// kernel copies only when index > k), so no store clobbers a source still to be read; loads of
// the same chunk finish before the barrier. Columns of a slot never interact, so slicing D over
// several blocks is safe and gives a small cache (0.5B draft: 96 rows) enough blocks to fill the
// GPU. Slots with index == k (the untouched text prefix) are neither read nor written.
//
// Out-of-range index values (possible only with check=False) are skipped, never dereferenced.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "kv_compaction.h"

namespace hippo {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;  // vectors each thread loads before it stores (memory-level parallelism)
constexpr int kVectorsPerPass = kThreads * kItems;

template <int kBytes> struct VectorOf;
template <> struct VectorOf<16> { using type = uint4; };
template <> struct VectorOf<8> { using type = uint2; };
template <> struct VectorOf<4> { using type = uint32_t; };
template <> struct VectorOf<2> { using type = uint16_t; };  // every KV dtype is >= 2 bytes

// The geometry in vectors, as the kernels see it.
struct SlotLayout {
  int64_t batch;
  int64_t heads;
  int64_t src_positions;
  int64_t dst_positions;
  int64_t num_index;
  int row_vecs;  // vectors per slot

  __device__ int64_t batch_of_row(int64_t row) const { return (row / heads) % batch; }
};

// Copies `tokens` slots k = k_begin.. of one row, columns [col_begin, col_begin + cols) of each
// slot: dst_row[k] <- src_row[index[k]] where the index passes the guard. In place
// (kInPlace), a barrier separates each pass's loads from its stores and only index > k is
// copied; out of place, any index in [0, src_positions) is copied. Must be called by the whole
// block with block-uniform arguments (it may hit __syncthreads).
template <typename Vec, bool kInPlace>
__device__ __forceinline__ void copy_slots(const Vec* src_row, Vec* dst_row, const int64_t* row_index,
                                           int64_t k_begin, int tokens, int col_begin, int cols,
                                           int row_vecs, int64_t src_positions) {
  const int total = tokens * cols;  // <= max(kVectorsPerPass, cols) by construction on the host
  for (int pass = 0; pass < total; pass += kVectorsPerPass) {
    Vec values[kItems];
    int64_t targets[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int j = pass + i * kThreads + static_cast<int>(threadIdx.x);
      targets[i] = -1;
      if (j < total) {
        const int t = j / cols;
        const int col = col_begin + (j - t * cols);
        const int64_t k = k_begin + t;
        const int64_t from = row_index[k];
        const bool copy = kInPlace ? (from > k && from < src_positions) : (from >= 0 && from < src_positions);
        if (copy) {
          values[i] = src_row[from * row_vecs + col];
          targets[i] = k * row_vecs + col;
        }
      }
    }
    if constexpr (kInPlace) __syncthreads();
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (targets[i] >= 0) dst_row[targets[i]] = values[i];
    }
  }
}

template <typename Vec>
__global__ void __launch_bounds__(kThreads)
    kv_gather_kernel(const Vec* __restrict__ src, Vec* __restrict__ dst, const int64_t* __restrict__ index,
                     SlotLayout layout, int tokens_per_tile, int64_t tiles_per_row, int64_t num_tiles) {
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t row = tile / tiles_per_row;
    const int64_t k_begin = (tile - row * tiles_per_row) * tokens_per_tile;
    const int tokens = static_cast<int>(std::min<int64_t>(tokens_per_tile, layout.num_index - k_begin));
    copy_slots<Vec, false>(src + row * layout.src_positions * layout.row_vecs,
                           dst + row * layout.dst_positions * layout.row_vecs,
                           index + layout.batch_of_row(row) * layout.num_index, k_begin, tokens,
                           /*col_begin=*/0, layout.row_vecs, layout.row_vecs, layout.src_positions);
  }
}

template <typename Vec>
__global__ void __launch_bounds__(kThreads)
    kv_compact_kernel(Vec* cache, const int64_t* __restrict__ index, SlotLayout layout, int slices,
                      int cols, int tokens_per_chunk, int64_t num_units) {
  for (int64_t unit = blockIdx.x; unit < num_units; unit += gridDim.x) {
    const int64_t row = unit / slices;
    const int col_begin = static_cast<int>(unit - row * slices) * cols;
    Vec* row_ptr = cache + row * layout.src_positions * layout.row_vecs;
    const int64_t* row_index = index + layout.batch_of_row(row) * layout.num_index;
    for (int64_t k = 0; k < layout.num_index; k += tokens_per_chunk) {
      const int tokens = static_cast<int>(std::min<int64_t>(tokens_per_chunk, layout.num_index - k));
      copy_slots<Vec, true>(row_ptr, row_ptr, row_index, k, tokens, col_begin, cols, layout.row_vecs,
                            layout.src_positions);
    }
  }
}

// The widest vector that divides the slot size and both base addresses.
int vector_bytes(int64_t row_bytes, const void* a, const void* b) {
  const auto addresses = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b);
  for (int width : {16, 8, 4}) {
    if (row_bytes % width == 0 && addresses % width == 0) return width;
  }
  return 2;
}

SlotLayout slot_layout(const KvGeometry& g, int width) {
  return SlotLayout{g.batch, g.heads, g.src_positions, g.dst_positions, g.num_index,
                    static_cast<int>(g.row_bytes / width)};
}

int grid_size(int64_t units) { return static_cast<int>(std::min<int64_t>(units, INT_MAX)); }

// Enough slots per tile that one pass of the block fills kItems vectors per thread.
int tokens_per_pass(int cols) { return std::max(1, kVectorsPerPass / cols); }

template <int kWidth>
void launch_gather(const at::Tensor& src, const at::Tensor& index, const at::Tensor& dst, const KvGeometry& g) {
  using Vec = typename VectorOf<kWidth>::type;
  const SlotLayout layout = slot_layout(g, kWidth);
  const int tokens_per_tile = tokens_per_pass(layout.row_vecs);
  const int64_t tiles_per_row = (g.num_index + tokens_per_tile - 1) / tokens_per_tile;
  const int64_t num_tiles = g.rows * tiles_per_row;
  kv_gather_kernel<Vec><<<grid_size(num_tiles), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const Vec*>(src.data_ptr()), static_cast<Vec*>(dst.data_ptr()), index.data_ptr<int64_t>(),
      layout, tokens_per_tile, tiles_per_row, num_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Column slices per row for kv_compact_: halve the slice while the grid is smaller than a few
// blocks per SM, keeping slices of at least 32 bytes (one DRAM sector) so reads stay efficient.
int compact_slices(const KvGeometry& g, int width, int row_vecs) {
  const int64_t target_units = 4 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  int slices = 1;
  while (g.rows * slices < target_units && row_vecs % (2 * slices) == 0 &&
         static_cast<int64_t>(row_vecs / (2 * slices)) * width >= 32) {
    slices *= 2;
  }
  return slices;
}

template <int kWidth>
void launch_compact(const at::Tensor& cache, const at::Tensor& index, const KvGeometry& g) {
  using Vec = typename VectorOf<kWidth>::type;
  const SlotLayout layout = slot_layout(g, kWidth);
  const int slices = compact_slices(g, kWidth, layout.row_vecs);
  const int cols = layout.row_vecs / slices;
  const int64_t num_units = g.rows * slices;
  kv_compact_kernel<Vec><<<grid_size(num_units), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<Vec*>(cache.data_ptr()), index.data_ptr<int64_t>(), layout, slices, cols,
      tokens_per_pass(cols), num_units);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool nothing_to_copy(const KvGeometry& g) { return g.num_index == 0 || g.rows == 0 || g.row_bytes == 0; }

void kv_gather_cuda(const at::Tensor& src, const at::Tensor& index, const at::Tensor& dst) {
  const KvGeometry g = check_kv_gather(src, index, dst);
  if (nothing_to_copy(g)) return;
  const c10::cuda::CUDAGuard guard(src.device());
  const at::Tensor idx = contiguous_index(index, dst, "kv_gather", "dst");
  switch (vector_bytes(g.row_bytes, src.data_ptr(), dst.data_ptr())) {
    case 16: launch_gather<16>(src, idx, dst, g); break;
    case 8: launch_gather<8>(src, idx, dst, g); break;
    case 4: launch_gather<4>(src, idx, dst, g); break;
    default: launch_gather<2>(src, idx, dst, g); break;
  }
}

void kv_compact_cuda(const at::Tensor& cache, const at::Tensor& index) {
  const KvGeometry g = check_kv_compact(cache, index);
  if (nothing_to_copy(g)) return;
  const c10::cuda::CUDAGuard guard(cache.device());
  const at::Tensor idx = contiguous_index(index, cache, "kv_compact_", "cache");
  switch (vector_bytes(g.row_bytes, cache.data_ptr(), cache.data_ptr())) {
    case 16: launch_compact<16>(cache, idx, g); break;
    case 8: launch_compact<8>(cache, idx, g); break;
    case 4: launch_compact<4>(cache, idx, g); break;
    default: launch_compact<2>(cache, idx, g); break;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CUDA, m) {
  m.impl("kv_gather", &kv_gather_cuda);
  m.impl("kv_compact_", &kv_compact_cuda);
}

}  // namespace hippo
