// CPU reference of kv_gather and kv_compact_: one memcpy per token slot, rows in parallel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "kv_compaction.h"

namespace hippo {
namespace {

// Copies slot index[b, k] of every source row to slot k of the matching destination row.
// Rows are independent, so they run in parallel. For the in-place case (src == dst) the
// caller guarantees index[b, k] >= k: visiting k in ascending order then reads every source
// slot before any write reaches it, and slots with index[b, k] == k are left alone.
void copy_slots(const char* src, char* dst, const int64_t* index, const KvGeometry& g) {
  const int64_t src_row_bytes = g.src_positions * g.row_bytes;
  const int64_t dst_row_bytes = g.dst_positions * g.row_bytes;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, g.num_index * g.row_bytes));
  at::parallel_for(0, g.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const char* src_row = src + row * src_row_bytes;
      char* dst_row = dst + row * dst_row_bytes;
      const int64_t* row_index = index + g.batch_of_row(row) * g.num_index;
      for (int64_t k = 0; k < g.num_index; ++k) {
        const char* from = src_row + row_index[k] * g.row_bytes;
        char* to = dst_row + k * g.row_bytes;
        if (from != to) std::memcpy(to, from, g.row_bytes);  // distinct slots never overlap
      }
    }
  });
}

void kv_gather_cpu(const at::Tensor& src, const at::Tensor& index, const at::Tensor& dst) {
  const KvGeometry g = check_kv_gather(src, index, dst);
  const at::Tensor idx = contiguous_index(index, dst, "kv_gather", "dst");
  // Values first, so that a call with nothing to copy still rejects them.
  check_index_values_cpu(idx, g.src_positions, /*strictly_ascending=*/false, "kv_gather");
  if (g.num_index == 0 || g.rows == 0 || g.row_bytes == 0) return;
  copy_slots(static_cast<const char*>(src.data_ptr()), static_cast<char*>(dst.data_ptr()),
             idx.data_ptr<int64_t>(), g);
}

void kv_compact_cpu(const at::Tensor& cache, const at::Tensor& index) {
  const KvGeometry g = check_kv_compact(cache, index);
  const at::Tensor idx = contiguous_index(index, cache, "kv_compact_", "cache");
  // Strictly ascending and >= 0 implies index[b, k] >= k, which copy_slots relies on.
  check_index_values_cpu(idx, g.src_positions, /*strictly_ascending=*/true, "kv_compact_");
  if (g.num_index == 0 || g.rows == 0 || g.row_bytes == 0) return;
  char* data = static_cast<char*>(cache.data_ptr());
  copy_slots(data, data, idx.data_ptr<int64_t>(), g);
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CPU, m) {
  m.impl("kv_gather", &kv_gather_cpu);
  m.impl("kv_compact_", &kv_compact_cpu);
}

}  // namespace hippo
