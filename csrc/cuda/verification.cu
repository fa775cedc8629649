// CUDA verify_greedy, verify_sampling and verify_tree_greedy.
//
// Each op is two launches, with no host synchronisation:
//
// * greedy / tree: (1) row_argmax_partials — every (row, vocabulary chunk) pair is one block, so
//   even B = 1, g = 4 fills the GPU; a block reduces its chunk to (max, index) read with 16-byte
//   loads. (2) a finalize kernel, one block per batch row, reduces the chunk partials of each row
//   and runs the (tiny) acceptance logic: the first mismatch of the chain, or the tree walk.
// * sampling: the row that is sampled from (the first rejection n, or g for the bonus) depends on
//   the data, so (1) sampling_partial_sums has every block recompute n from the g draft tokens
//   (one warp, a few scattered loads that hit L2) and sum its chunk of max(0, p_n - q_n) and of
//   p_n; (2) sampling_pick, one block per batch row, picks the distribution (residual, or p when
//   the residual has no mass), finds the chunk that holds uniform * total with a warp scan over
//   the chunk sums, and scans only that chunk to find the token (inverse CDF).
//
// Index safety: draft tokens outside [0, V) count as rejected (sampling never dereferences
// them; greedy only compares them), tree nodes whose parent is outside [-1, i) are not accepted;
// every emitted token is a vocabulary index found by the kernel itself.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "verification.h"

namespace hippo {
namespace {

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kScanItems = 4;  // elements per thread per tile in the inverse-CDF scan
constexpr int kMaxSplits = 4096;

// ---- device helpers -----------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T value) {
  return static_cast<float>(value);
}

struct ArgmaxPair {
  float value;
  int index;
};

__device__ __forceinline__ ArgmaxPair no_argmax() { return {-INFINITY, INT_MAX}; }

struct ArgmaxOp {
  __device__ __forceinline__ ArgmaxPair operator()(const ArgmaxPair& a, const ArgmaxPair& b) const {
    return argmax_beats(b.value, b.index, a.value, a.index) ? b : a;
  }
};

struct Double2Sum {
  __device__ __forceinline__ double2 operator()(const double2& a, const double2& b) const {
    return {a.x + b.x, a.y + b.y};
  }
};

// Calls visit(j, a[j], b[j]) for every j in [begin, end), spread over the block's threads (each
// thread sees increasing j). The part where the rows are 16-byte aligned is read with 16-byte
// loads; the head before it and the tail after it element by element. With kPaired == false only
// row a is read (b[j] is passed as 0). Paired rows whose alignments differ are read element-wise.
template <typename T, bool kPaired, typename Visit>
__device__ __forceinline__ void for_each_in_chunk(const T* __restrict__ a, const T* __restrict__ b,
                                                  int begin, int end, Visit&& visit) {
  constexpr int kVec = 16 / sizeof(T);
  const auto misalignment = [](const T* p) {
    return static_cast<int>((reinterpret_cast<uintptr_t>(p) % 16) / sizeof(T));
  };
  const int a_mis = misalignment(a + begin);
  const bool vectorise = !kPaired || a_mis == misalignment(b + begin);
  const int vec_begin = vectorise ? min(end, begin + (kVec - a_mis) % kVec) : end;
  const int num_vec = (end - vec_begin) / kVec;
  const int vec_end = vec_begin + num_vec * kVec;

  for (int j = begin + threadIdx.x; j < vec_begin; j += blockDim.x) {
    visit(j, to_float(a[j]), kPaired ? to_float(b[j]) : 0.f);
  }
  const uint4* a_vec = reinterpret_cast<const uint4*>(a + vec_begin);
  const uint4* b_vec = reinterpret_cast<const uint4*>(b + vec_begin);
#pragma unroll 4
  for (int k = threadIdx.x; k < num_vec; k += blockDim.x) {
    T a_items[kVec], b_items[kVec];
    const uint4 a_raw = __ldg(a_vec + k);
    memcpy(a_items, &a_raw, sizeof(a_raw));
    if constexpr (kPaired) {
      const uint4 b_raw = __ldg(b_vec + k);
      memcpy(b_items, &b_raw, sizeof(b_raw));
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      visit(vec_begin + k * kVec + e, to_float(a_items[e]), kPaired ? to_float(b_items[e]) : 0.f);
    }
  }
  for (int j = vec_end + threadIdx.x; j < end; j += blockDim.x) {
    visit(j, to_float(a[j]), kPaired ? to_float(b[j]) : 0.f);
  }
}

// Argmax of one row from its per-chunk partials; called by a whole warp, result in every lane.
__device__ __forceinline__ ArgmaxPair reduce_row_partials(const ArgmaxPair* __restrict__ row_partials,
                                                          int splits) {
  const int lane = threadIdx.x & 31;
  ArgmaxOp op;
  ArgmaxPair best = no_argmax();
  for (int s = lane; s < splits; s += 32) best = op(best, row_partials[s]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    ArgmaxPair other{__shfl_xor_sync(kFullMask, best.value, offset),
                     __shfl_xor_sync(kFullMask, best.index, offset)};
    best = op(best, other);
  }
  return best;
}

// End of the chunk that starts at `begin` in a row of `vocab` tokens (begin + chunk may exceed INT_MAX).
__device__ __forceinline__ int chunk_end(int begin, int chunk, int vocab) {
  return static_cast<int>(static_cast<int64_t>(begin) + chunk < vocab ? begin + chunk : vocab);
}

// ---- kernel 1 of greedy and tree: per-chunk argmax of every row ----------------------------------

// Block x handles chunk (x % splits) of row (x / splits); row r of batch element b is
// logits[b, r, :]. partials[x] = the chunk's (max, lowest index of the max).
template <typename T>
__global__ void __launch_bounds__(kBlock)
    row_argmax_partials_kernel(const T* __restrict__ logits, int64_t batch_stride,
                               int64_t row_stride, int rows_per_batch, int vocab, int chunk,
                               int splits, ArgmaxPair* __restrict__ partials) {
  const int64_t row = blockIdx.x / splits;
  const int split = blockIdx.x % splits;
  const T* row_ptr = logits + (row / rows_per_batch) * batch_stride + (row % rows_per_batch) * row_stride;
  const int begin = split * chunk;
  const int end = chunk_end(begin, chunk, vocab);

  ArgmaxPair best = no_argmax();
  for_each_in_chunk<T, false>(row_ptr, row_ptr, begin, end, [&](int j, float value, float) {
    if (argmax_beats(value, j, best.value, best.index)) best = {value, j};
  });
  using BlockReduce = cub::BlockReduce<ArgmaxPair, kBlock>;
  __shared__ typename BlockReduce::TempStorage temp;
  const ArgmaxPair block_best = BlockReduce(temp).Reduce(best, ArgmaxOp{});
  if (threadIdx.x == 0) partials[blockIdx.x] = block_best;
}

// ---- kernel 2 of greedy --------------------------------------------------------------------------

// One block per batch element: warps reduce rows 0..g-1 and record the first mismatch; then
// warp 0 reduces the row after the accepted prefix for the next token.
__global__ void __launch_bounds__(kBlock)
    greedy_finalize_kernel(const ArgmaxPair* __restrict__ partials, int splits,
                           const int64_t* __restrict__ draft_tokens, int g,
                           int64_t* __restrict__ num_accepted, int64_t* __restrict__ next_token) {
  const int64_t b = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const ArgmaxPair* batch_partials = partials + b * (g + 1) * splits;
  __shared__ int first_mismatch;
  if (threadIdx.x == 0) first_mismatch = g;
  __syncthreads();
  for (int i = warp; i < g; i += kWarps) {
    const ArgmaxPair best = reduce_row_partials(batch_partials + static_cast<int64_t>(i) * splits, splits);
    if (lane == 0 && draft_tokens[b * g + i] != best.index) atomicMin(&first_mismatch, i);
  }
  __syncthreads();
  const int accepted = first_mismatch;
  if (warp == 0) {
    const ArgmaxPair best =
        reduce_row_partials(batch_partials + static_cast<int64_t>(accepted) * splits, splits);
    if (lane == 0) {
      num_accepted[b] = accepted;
      next_token[b] = best.index;
    }
  }
}

// ---- kernel 2 of the tree ------------------------------------------------------------------------

// One block per batch element. Shared memory, all of it dynamic: the argmax of each of the N+1
// rows, each node's parent and its depth (0 = not accepted), and the accepted path's length. No
// static __shared__ variable: ptxas rounds even one int up to 16 bytes, and static plus dynamic
// must fit the 48 KB a block gets without opting in (tree_smem_bytes). Node acceptance is
// resolved by one thread in topological order (N is small); the path is written root to leaf,
// the rest of the row is -1.
__global__ void __launch_bounds__(kBlock)
    tree_finalize_kernel(const ArgmaxPair* __restrict__ partials, int splits,
                         const int64_t* __restrict__ tree_tokens, const int64_t* __restrict__ parents,
                         int nodes, int64_t* __restrict__ num_accepted,
                         int64_t* __restrict__ accepted_nodes, int64_t* __restrict__ next_token) {
  extern __shared__ int tree_smem[];
  int* row_argmax = tree_smem;            // [nodes + 1]
  int* parent_of = row_argmax + nodes + 1;  // [nodes]
  int* depth = parent_of + nodes;           // [nodes]
  int& best_depth = depth[nodes];           // [1]

  const int64_t b = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const ArgmaxPair* batch_partials = partials + b * (nodes + 1) * splits;
  for (int r = warp; r <= nodes; r += kWarps) {
    const ArgmaxPair best = reduce_row_partials(batch_partials + static_cast<int64_t>(r) * splits, splits);
    if (lane == 0) row_argmax[r] = best.index;
  }
  __syncthreads();

  const int64_t* tokens = tree_tokens + b * nodes;
  const int64_t* parent = parents + b * nodes;
  for (int i = threadIdx.x; i < nodes; i += kBlock) {
    const int64_t p = parent[i];
    const bool valid = p >= -1 && p < i;  // anything else (check=False) is never accepted
    parent_of[i] = valid ? static_cast<int>(p) : -1;
    depth[i] = valid && tokens[i] == row_argmax[p + 1] ? 1 : 0;
  }
  __syncthreads();

  int64_t* path = accepted_nodes + b * nodes;
  if (threadIdx.x == 0) {
    int best = -1, deepest = 0;  // the lowest index wins among equally deep nodes
    for (int i = 0; i < nodes; ++i) {
      if (depth[i] == 0) continue;
      const int p = parent_of[i];
      if (p >= 0) depth[i] = depth[p] > 0 ? depth[p] + 1 : 0;
      if (depth[i] > deepest) {
        best = i;
        deepest = depth[i];
      }
    }
    for (int node = best, d = deepest - 1; d >= 0; node = parent_of[node], --d) path[d] = node;
    best_depth = deepest;
    num_accepted[b] = deepest;
    next_token[b] = row_argmax[best + 1];
  }
  __syncthreads();
  for (int j = best_depth + threadIdx.x; j < nodes; j += kBlock) path[j] = -1;
}

// ---- verify_sampling -----------------------------------------------------------------------------

template <typename T>
struct SamplingArgs {
  const int64_t* draft_tokens;  // [B, g]
  const T* draft_probs;         // q [B, g, V]
  const T* target_probs;        // p [B, g+1, V]
  const float* uniforms;        // [B, g+1]
  int64_t q_batch_stride, q_row_stride, p_batch_stride, p_row_stride;
  int g;
  int vocab;

  __device__ const T* p_row(int64_t b, int i) const {
    return target_probs + b * p_batch_stride + i * p_row_stride;
  }
  __device__ const T* q_row(int64_t b, int i) const {
    return draft_probs + b * q_batch_stride + i * q_row_stride;
  }
};

// First rejected draft position of batch element b (g if all accepted); called by a whole warp,
// result in every lane. Out-of-vocabulary tokens are rejected without being dereferenced.
template <typename T>
__device__ int first_rejection(const SamplingArgs<T>& args, int64_t b) {
  const int lane = threadIdx.x & 31;
  for (int base = 0; base < args.g; base += 32) {
    const int i = base + lane;
    bool rejected = false;
    if (i < args.g) {
      const int64_t x = args.draft_tokens[b * args.g + i];
      rejected = x < 0 || x >= args.vocab ||
                 !sampling_accepts(args.uniforms[b * (args.g + 1) + i], to_float(args.q_row(b, i)[x]),
                                   to_float(args.p_row(b, i)[x]));
    }
    const unsigned mask = __ballot_sync(kFullMask, rejected);
    if (mask != 0) return base + __ffs(mask) - 1;
  }
  return args.g;
}

// Weight of token j in the distribution sampled from: the residual max(0, p - q), or p.
template <typename T>
__device__ __forceinline__ float sampling_weight(const T* p_row, const T* q_row, bool residual, int j) {
  const float p = to_float(p_row[j]);
  return residual ? fmaxf(p - to_float(q_row[j]), 0.f) : p;
}

// Block x handles chunk (x % splits) of batch element (x / splits). partials[x] = (chunk sum of
// the weights sampled from if the residual has mass: max(0, p_n - q_n), or p_g for the bonus;
// chunk sum of p_n). Weights are fp32 like on the CPU; sums are double, so that the CPU
// reference and this kernel find the same token except at boundaries ~1e-16 wide.
// Block (b, 0) also writes num_accepted[b].
template <typename T>
__global__ void __launch_bounds__(kBlock)
    sampling_partial_sums_kernel(SamplingArgs<T> args, int chunk, int splits,
                                 double2* __restrict__ partials, int64_t* __restrict__ num_accepted) {
  const int64_t b = blockIdx.x / splits;
  const int split = blockIdx.x % splits;
  __shared__ int accepted_shared;
  if (threadIdx.x < 32) {
    const int n = first_rejection(args, b);
    if (threadIdx.x == 0) accepted_shared = n;
  }
  __syncthreads();
  const int n = accepted_shared;
  if (split == 0 && threadIdx.x == 0) num_accepted[b] = n;

  const int begin = split * chunk;
  const int end = chunk_end(begin, chunk, args.vocab);
  const T* p_row = args.p_row(b, n);
  double2 sums{0.0, 0.0};  // (weights, p)
  if (n < args.g) {
    for_each_in_chunk<T, true>(p_row, args.q_row(b, n), begin, end, [&](int, float p, float q) {
      sums.x += fmaxf(p - q, 0.f);
      sums.y += p;
    });
  } else {
    for_each_in_chunk<T, false>(p_row, p_row, begin, end, [&](int, float p, float) { sums.y += p; });
    sums.x = sums.y;
  }
  using BlockReduce = cub::BlockReduce<double2, kBlock>;
  __shared__ typename BlockReduce::TempStorage temp;
  const double2 block_sums = BlockReduce(temp).Reduce(sums, Double2Sum{});
  if (threadIdx.x == 0) partials[blockIdx.x] = block_sums;
}

// One block per batch element: inverse-CDF draw of the emitted token.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    sampling_pick_kernel(SamplingArgs<T> args, int chunk, int splits,
                         const double2* __restrict__ partials,
                         const int64_t* __restrict__ num_accepted, int64_t* __restrict__ next_token) {
  const int64_t b = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const double2* batch_partials = partials + b * splits;
  const int n = static_cast<int>(num_accepted[b]);  // written by sampling_partial_sums_kernel

  using Double2Reduce = cub::BlockReduce<double2, kBlock>;
  using DoubleScan = cub::BlockScan<double, kBlock>;
  __shared__ union {
    typename Double2Reduce::TempStorage reduce;
    typename DoubleScan::TempStorage scan;
  } temp;
  __shared__ bool use_residual;
  __shared__ double threshold;
  __shared__ int chunk_index;
  __shared__ double chunk_offset;  // weight of all chunks before chunk_index
  __shared__ int found_token, last_positive_token;

  // 1. Which distribution, and the threshold uniform * total.
  double2 sums{0.0, 0.0};
  for (int s = threadIdx.x; s < splits; s += kBlock) {
    const double2 part = batch_partials[s];
    sums.x += part.x;
    sums.y += part.y;
  }
  const double2 total = Double2Reduce(temp.reduce).Reduce(sums, Double2Sum{});
  if (threadIdx.x == 0) {
    use_residual = n < args.g && residual_has_mass(total.x, total.y);
    threshold = static_cast<double>(args.uniforms[b * (args.g + 1) + args.g]) *
                (use_residual ? total.x : total.y);
    found_token = INT_MAX;
    last_positive_token = -1;
  }
  __syncthreads();
  const bool residual = use_residual;
  const double target = threshold;

  // 2. Warp 0 scans the chunk sums for the first chunk whose running sum exceeds the threshold
  //    (rounding may leave none: then the last chunk with positive weight).
  if (warp == 0) {
    double carry = 0.0;
    int found = -1, last_positive = -1;
    double found_offset = 0.0, last_positive_offset = 0.0;
    for (int base = 0; base < splits; base += 32) {
      const int s = base + lane;
      const double w = s < splits ? (residual ? batch_partials[s].x : batch_partials[s].y) : 0.0;
      double inclusive = w;
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const double up = __shfl_up_sync(kFullMask, inclusive, offset);
        if (lane >= offset) inclusive += up;
      }
      const double previous = __shfl_up_sync(kFullMask, inclusive, 1);  // every lane shuffles
      const double exclusive = carry + (lane > 0 ? previous : 0.0);
      const unsigned positive = __ballot_sync(kFullMask, w > 0.0);
      const unsigned crossed = __ballot_sync(kFullMask, w > 0.0 && carry + inclusive > target);
      if (positive != 0) {
        last_positive = base + 31 - __clz(positive);
        last_positive_offset = __shfl_sync(kFullMask, exclusive, 31 - __clz(positive));
      }
      if (crossed != 0) {
        found = base + __ffs(crossed) - 1;
        found_offset = __shfl_sync(kFullMask, exclusive, __ffs(crossed) - 1);
        break;
      }
      carry += __shfl_sync(kFullMask, inclusive, 31);
    }
    if (lane == 0) {
      chunk_index = found >= 0 ? found : last_positive;
      chunk_offset = found >= 0 ? found_offset : last_positive_offset;
    }
  }
  __syncthreads();
  if (chunk_index < 0) {  // no positive weight anywhere (garbage input): token 0, as on the CPU
    if (threadIdx.x == 0) next_token[b] = 0;
    return;
  }

  // 3. Block scan of that chunk, kScanItems consecutive tokens per thread per tile.
  const T* p_row = args.p_row(b, n);
  const T* q_row = residual ? args.q_row(b, n) : p_row;
  const int begin = chunk_index * chunk;
  const int end = chunk_end(begin, chunk, args.vocab);
  const double local_target = target - chunk_offset;
  double carry = 0.0;
  for (int tile = begin; tile < end; tile += kBlock * kScanItems) {
    const int first = tile + threadIdx.x * kScanItems;
    float w[kScanItems];
    double thread_sum = 0.0;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      w[k] = first + k < end ? sampling_weight(p_row, q_row, residual, first + k) : 0.f;
      thread_sum += w[k];
    }
    double exclusive, tile_sum;
    DoubleScan(temp.scan).ExclusiveSum(thread_sum, exclusive, tile_sum);
    double running = carry + exclusive;
    int my_found = INT_MAX, my_last_positive = -1;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      if (w[k] > 0.f) {
        running += w[k];
        my_last_positive = first + k;
        if (running > local_target && my_found == INT_MAX) my_found = first + k;
      }
    }
    if (my_found != INT_MAX) atomicMin(&found_token, my_found);
    if (my_last_positive >= 0) atomicMax(&last_positive_token, my_last_positive);
    __syncthreads();
    const bool done = found_token != INT_MAX;
    __syncthreads();  // every thread has read found_token (and temp.scan) before the next tile
    if (done) break;
    carry += tile_sum;
  }
  if (threadIdx.x == 0) {
    next_token[b] = found_token != INT_MAX ? found_token
                    : last_positive_token >= 0 ? last_positive_token
                                               : 0;
  }
}

// ---- host side -----------------------------------------------------------------------------------


// How a row of `vocab` tokens is cut into chunks, one block each: about 4 blocks per SM over all
// `rows`, chunks of at least min_chunk tokens (so a block has work for its threads) and at most
// max_chunk. Chunks are multiples of 16 tokens, so in 16-byte-aligned rows every chunk starts
// 16-byte aligned.
struct SplitPlan {
  int chunk;
  int splits;
};

SplitPlan plan_splits(int64_t rows, int64_t vocab, int64_t min_chunk, int64_t max_chunk) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = ceil_div(4 * sms, rows);
  splits = std::max(splits, ceil_div(vocab, max_chunk));
  splits = std::min(splits, ceil_div(vocab, min_chunk));
  splits = std::clamp<int64_t>(splits, 1, kMaxSplits);
  const int64_t chunk = ceil_div(ceil_div(vocab, splits), 16) * 16;
  return {static_cast<int>(chunk), static_cast<int>(ceil_div(vocab, chunk))};
}

void check_grid(int64_t blocks, const char* op) {
  HIPPO_CHECK(blocks <= INT_MAX, op, "input too large for one launch (", blocks, " blocks)");
}

// Launches kernel 1 of greedy and tree; returns the [rows * splits] partials (as raw storage).
at::Tensor launch_row_argmax_partials(const at::Tensor& logits, const VerifyShape& shape,
                                      int64_t rows_per_batch, SplitPlan plan, const char* op) {
  const int64_t rows = shape.batch * rows_per_batch;
  check_grid(rows * plan.splits, op);
  at::Tensor partials = at::empty({rows * plan.splits * 2}, logits.options().dtype(at::kInt));
  auto* out = reinterpret_cast<ArgmaxPair*>(partials.data_ptr<int>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  HIPPO_DISPATCH_PROB_TYPES(logits.scalar_type(), "row_argmax_partials", [&] {
    row_argmax_partials_kernel<scalar_t><<<static_cast<unsigned>(rows * plan.splits), kBlock, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
        static_cast<int>(rows_per_batch), static_cast<int>(shape.vocab), plan.chunk, plan.splits,
        out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partials;
}

constexpr int64_t kArgmaxMinChunk = 2048;

// Dynamic shared memory of tree_finalize_kernel (which has no static shared memory): row_argmax
// [N + 1], parent_of [N], depth [N] and best_depth.
constexpr size_t tree_smem_bytes(int64_t nodes) {
  return (3 * static_cast<size_t>(nodes) + 2) * sizeof(int);
}
static_assert(tree_smem_bytes(kMaxTreeNodes) <= 48 * 1024,
              "kMaxTreeNodes must fit the 48 KB of shared memory a block gets without opting in");

std::tuple<at::Tensor, at::Tensor> verify_greedy_cuda(const at::Tensor& draft_tokens,
                                                      const at::Tensor& target_logits) {
  const VerifyShape shape = check_verify_greedy_inputs(draft_tokens, target_logits);
  const c10::cuda::CUDAGuard guard(target_logits.device());
  at::Tensor num_accepted = at::empty({shape.batch}, draft_tokens.options());
  at::Tensor next_token = at::empty({shape.batch}, draft_tokens.options());
  if (shape.batch == 0) return {num_accepted, next_token};
  check_grid(shape.batch * (shape.draft_len + 1), "verify_greedy");

  const int64_t rows_per_batch = shape.draft_len + 1;
  const SplitPlan plan = plan_splits(shape.batch * rows_per_batch, shape.vocab, kArgmaxMinChunk, INT_MAX);
  const at::Tensor partials =
      launch_row_argmax_partials(target_logits, shape, rows_per_batch, plan, "verify_greedy");
  greedy_finalize_kernel<<<static_cast<unsigned>(shape.batch), kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const ArgmaxPair*>(partials.const_data_ptr<int>()), plan.splits,
      draft_tokens.const_data_ptr<int64_t>(), static_cast<int>(shape.draft_len),
      num_accepted.data_ptr<int64_t>(), next_token.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {num_accepted, next_token};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_greedy_cuda(
    const at::Tensor& tree_tokens, const at::Tensor& parents, const at::Tensor& target_logits) {
  // check_... bounds the nodes by kMaxTreeNodes, which the tree kernel's shared memory (3 ints
  // a node and two more, all dynamic) fits without opting in past 48 KB.
  const VerifyShape shape = check_verify_tree_greedy_inputs(tree_tokens, parents, target_logits);
  const c10::cuda::CUDAGuard guard(target_logits.device());
  at::Tensor num_accepted = at::empty({shape.batch}, tree_tokens.options());
  at::Tensor accepted_nodes = at::empty({shape.batch, shape.draft_len}, tree_tokens.options());
  at::Tensor next_token = at::empty({shape.batch}, tree_tokens.options());
  if (shape.batch == 0) return {num_accepted, accepted_nodes, next_token};
  check_grid(shape.batch * (shape.draft_len + 1), "verify_tree_greedy");

  const int64_t rows_per_batch = shape.draft_len + 1;
  const SplitPlan plan = plan_splits(shape.batch * rows_per_batch, shape.vocab, kArgmaxMinChunk, INT_MAX);
  const at::Tensor partials =
      launch_row_argmax_partials(target_logits, shape, rows_per_batch, plan, "verify_tree_greedy");
  const int nodes = static_cast<int>(shape.draft_len);
  const size_t smem = tree_smem_bytes(nodes);
  tree_finalize_kernel<<<static_cast<unsigned>(shape.batch), kBlock, smem, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const ArgmaxPair*>(partials.const_data_ptr<int>()), plan.splits,
      tree_tokens.const_data_ptr<int64_t>(), parents.const_data_ptr<int64_t>(), nodes,
      num_accepted.data_ptr<int64_t>(), accepted_nodes.data_ptr<int64_t>(),
      next_token.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {num_accepted, accepted_nodes, next_token};
}

constexpr int64_t kSamplingMinChunk = 1024;
constexpr int64_t kSamplingMaxChunk = 8192;  // bounds the one-block scan of sampling_pick

std::tuple<at::Tensor, at::Tensor> verify_sampling_cuda(const at::Tensor& draft_tokens,
                                                        const at::Tensor& draft_probs,
                                                        const at::Tensor& target_probs,
                                                        const at::Tensor& uniforms) {
  const VerifyShape shape =
      check_verify_sampling_inputs(draft_tokens, draft_probs, target_probs, uniforms);
  const c10::cuda::CUDAGuard guard(target_probs.device());
  at::Tensor num_accepted = at::empty({shape.batch}, draft_tokens.options());
  at::Tensor next_token = at::empty({shape.batch}, draft_tokens.options());
  if (shape.batch == 0) return {num_accepted, next_token};
  HIPPO_CHECK(shape.draft_len < INT_MAX, "verify_sampling", "g too large: ", shape.draft_len);

  const SplitPlan plan = plan_splits(shape.batch, shape.vocab, kSamplingMinChunk, kSamplingMaxChunk);
  check_grid(shape.batch * plan.splits, "verify_sampling");
  at::Tensor partials = at::empty({shape.batch * plan.splits * 2}, uniforms.options().dtype(at::kDouble));
  auto* sums = reinterpret_cast<double2*>(partials.data_ptr<double>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  HIPPO_DISPATCH_PROB_TYPES(target_probs.scalar_type(), "verify_sampling", [&] {
    const SamplingArgs<scalar_t> args{draft_tokens.const_data_ptr<int64_t>(),
                                      draft_probs.const_data_ptr<scalar_t>(),
                                      target_probs.const_data_ptr<scalar_t>(),
                                      uniforms.const_data_ptr<float>(),
                                      draft_probs.stride(0),
                                      draft_probs.stride(1),
                                      target_probs.stride(0),
                                      target_probs.stride(1),
                                      static_cast<int>(shape.draft_len),
                                      static_cast<int>(shape.vocab)};
    sampling_partial_sums_kernel<scalar_t><<<static_cast<unsigned>(shape.batch * plan.splits), kBlock, 0, stream>>>(
        args, plan.chunk, plan.splits, sums, num_accepted.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sampling_pick_kernel<scalar_t><<<static_cast<unsigned>(shape.batch), kBlock, 0, stream>>>(
        args, plan.chunk, plan.splits, sums, num_accepted.const_data_ptr<int64_t>(),
        next_token.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {num_accepted, next_token};
}

}  // namespace
}  // namespace hippo

TORCH_LIBRARY_IMPL(hippo_ext, CUDA, m) {
  m.impl("verify_greedy", &hippo::verify_greedy_cuda);
  m.impl("verify_sampling", &hippo::verify_sampling_cuda);
  m.impl("verify_tree_greedy", &hippo::verify_tree_greedy_cuda);
}
