// KV compaction (kv_gather, kv_compact_): the checks and the geometry shared by the CPU and
// CUDA implementations. The kernels treat cache elements as raw bytes, so one implementation
// serves fp32, bf16 and fp16 alike.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "common.h"

namespace hippo {

// A cache [layers, 2, B, Hkv, S, D] seen as `rows` rows (one per (layer, k/v, b, head)) of
// `positions` token slots of `row_bytes` bytes each. Row r belongs to batch (r / heads) % batch.
struct KvGeometry {
  int64_t rows = 0;
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t src_positions = 0;  // S of the source (the cache for kv_compact_)
  int64_t dst_positions = 0;  // S2 of the destination (S for kv_compact_)
  int64_t num_index = 0;      // K: slots written per row
  int64_t row_bytes = 0;      // D * element size: the bytes of one token slot

  int64_t batch_of_row(int64_t row) const { return (row / heads) % batch; }
};

// index [B, K] int64 on the cache's device, one row of positions per batch element.
inline void check_kv_index(const at::Tensor& index, const at::Tensor& cache, const char* op,
                           const char* cache_name) {
  check_dim(index, 2, op, "index");
  check_dtype(index, at::kLong, op, "index");
  check_same_device(index, cache, op, "index", cache_name);
  HIPPO_CHECK(index.size(0) == cache.size(2), op, "index must be [B, K] with B = ", cache_name,
              ".size(2) = ", cache.size(2), ", got shape ", index.sizes());
}

inline KvGeometry make_geometry(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& index) {
  KvGeometry g;
  g.rows = src.size(0) * 2 * src.size(2) * src.size(3);
  g.batch = src.size(2);
  g.heads = src.size(3);
  g.src_positions = src.size(4);
  g.dst_positions = dst.size(4);
  g.num_index = index.size(1);
  g.row_bytes = src.size(5) * static_cast<int64_t>(src.element_size());
  return g;
}

// Shape, dtype and device checks of kv_gather(src, index, dst).
inline KvGeometry check_kv_gather(const at::Tensor& src, const at::Tensor& index, const at::Tensor& dst) {
  constexpr const char* op = "kv_gather";
  check_kv_cache(src, op, "src");
  check_kv_cache(dst, op, "dst");
  HIPPO_CHECK(src.scalar_type() == dst.scalar_type(), op, "src is ", src.scalar_type(), " but dst is ",
              dst.scalar_type());
  check_same_device(src, dst, op, "src", "dst");
  for (int64_t d : {0, 2, 3, 5}) {
    HIPPO_CHECK(src.size(d) == dst.size(d), op, "src and dst must agree in every dimension but S (dim 4), got ",
                src.sizes(), " and ", dst.sizes());
  }
  check_kv_index(index, src, op, "src");
  HIPPO_CHECK(index.size(1) <= dst.size(4), op, "index selects K = ", index.size(1),
              " positions but dst holds only S2 = ", dst.size(4));
  // A gather into its own source would read slots it has already overwritten.
  const auto overlap = at::get_overlap_status(src, dst);
  HIPPO_CHECK(overlap == at::MemOverlapStatus::No, op,
              "src and dst must not share memory; use kv_compact_ to compact a cache in place");
  return make_geometry(src, dst, index);
}

// index as the kernels read it: contiguous, and in no memory the op writes (a copy would read
// positions it has overwritten; the CPU one then reads out of bounds).
inline at::Tensor contiguous_index(const at::Tensor& index, const at::Tensor& written, const char* op,
                                   const char* written_name) {
  at::Tensor idx = index.contiguous();
  HIPPO_CHECK(at::get_overlap_status(idx, written) == at::MemOverlapStatus::No, op,
              "index must not share memory with ", written_name);
  return idx;
}

// Shape, dtype and device checks of kv_compact_(cache, index).
inline KvGeometry check_kv_compact(const at::Tensor& cache, const at::Tensor& index) {
  constexpr const char* op = "kv_compact_";
  check_kv_cache(cache, op, "cache");
  check_kv_index(index, cache, op, "cache");
  HIPPO_CHECK(index.size(1) <= cache.size(4), op, "index selects K = ", index.size(1),
              " positions but cache holds only S = ", cache.size(4));
  return make_geometry(cache, cache, index);
}

// Value checks, done on the host: the CPU implementation calls them always; on CUDA the Python
// wrapper does the equivalent (it would need a device-to-host copy here). index must be a
// contiguous CPU tensor.
inline void check_index_values_cpu(const at::Tensor& index, int64_t positions, bool strictly_ascending,
                                   const char* op) {
  const int64_t* idx = index.data_ptr<int64_t>();
  const int64_t batch = index.size(0), count = index.size(1);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* row = idx + b * count;
    for (int64_t k = 0; k < count; ++k) {
      HIPPO_CHECK(row[k] >= 0 && row[k] < positions, op, "index[", b, ", ", k, "] = ", row[k],
                  " is outside [0, ", positions, ")");
      HIPPO_CHECK(!strictly_ascending || k == 0 || row[k] > row[k - 1], op, "index must be strictly ascending ",
                  "per row, but index[", b, ", ", k - 1, "] = ", k > 0 ? row[k - 1] : 0, " and index[", b,
                  ", ", k, "] = ", row[k]);
    }
  }
}

}  // namespace hippo
