// CUDA skinny_linear: tensor-core GEMM for M <= 32 rows, streaming the weight once.
//
// Work split. A block of four warps owns 64 weight rows (outputs) and one split of K; each warp
// computes 16 rows x all M columns with mma.m16n8k16, the weight tile as the A operand (16 rows
// of W) and x^T as B (8 columns of x per n8 tile, up to 4 tiles). No shared memory: a lane loads
// 8 consecutive k of weight rows g and g + 8 (16 bytes each, streamed past L1) and the same 8 k
// of x row g of each n8 tile (read-only cache: the four warps of a block share it). Within a k32
// block lane (g, t) holds k = 8t .. 8t + 7; mma step s in {0, 1} uses its k = 8t + 4s .. + 3 as
// fragment columns (2t, 2t + 1, 2t + 8, 2t + 9). Any such assignment of k to columns is correct
// as long as A and B use the same one, and this one makes every load a 16-byte vector.
//
// Split-K. Splits come from N, K and the SM count (never M), so each output row sees the same
// sequence of fp32 accumulations whatever M is. With several splits each block writes an fp32
// partial; the last block of an output tile to finish (a semaphore per tile in the workspace)
// sums the splits in order, adds the bias, rounds once, and resets the semaphore for the next
// call: one launch, deterministic, CUDA-graph safe.
//
// Shapes the kernel does not take (fp32, M > 32, K % 32 != 0, misaligned) go to ATen's linear.
//
// A second kernel, plain fp32 FMAs with a few warps per two outputs (K sliced among them inside
// the block, no partial sums in global memory), takes M <= 16 when asked for (impl "fma", or
// "auto" with HIPPO_SKINNY_KERNEL=fma; skinny_linear_fma_kernel below). It also keeps rows
// independent of M (for M <= 16: rows past 16 go to the tensor-core kernel), streams each weight
// row once, and is meant for decode steps: the runtime asks for it by name there (fma_decode; on
// an H200, 2026-11-28, it took 23% off the 0.5B decode step and 8% off the 7B one), while verify
// steps of 5 and 9 rows on it took 1.2-2.7x as long as on cuBLAS: every warp reads each row of x
// through the caches, so its time grows with the rows.
// The same kernel, with a prologue applied to x as it is loaded (add_rms_norm or the SwiGLU
// gating) and for the q/k/v projection an epilogue (RoPE, the cache append), is the one-launch
// CUDA path of add_rms_norm_linear, silu_and_mul_linear and qkv_projection (fused_linear.h) for
// up to 16 rows.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "cuda/dependent_launch.cuh"
#include "cuda/element_types.cuh"
#include "cuda/last_block.cuh"
#include "cuda/layer_math.cuh"
#include "cuda/tensor_core.cuh"
#include "cuda/tuning_env.h"
#include "cuda/warp_reduce.cuh"
#include "fused_linear.h"
#include "linear.h"

namespace hippo {
namespace {

constexpr int kWarps = kSkinnyRowsPerBlock / 16;   // 16 weight rows per warp (one A tile)
constexpr int kThreads = kWarps * 32;
constexpr int kKeyBlock = 32;                      // k per lane quad and load (8 per lane)
constexpr int kUnroll = 4;                         // k32 blocks whose loads are in flight together
constexpr int kSplitGrain = kKeyBlock * kUnroll;   // K per split is a multiple of this
// Blocks per SM a plan aims for: enough warps that many 16-byte weight loads are in flight on
// every SM. HIPPO_SKINNY_BLOCKS_PER_SM=<n> overrides it (tuning).
constexpr int64_t kBlocksPerSmTarget = 8;

struct SkinnyParams {
  const void* x = nullptr;       // [M, K] ([M, 2K]: gate then up, with the SiLU-and-mul prologue)
  const void* weight = nullptr;  // [N, K]
  const void* bias = nullptr;    // [N] or null
  void* out = nullptr;           // [M, N]
  float* partial = nullptr;      // [splits, M, N] when splits > 1
  int* semaphores = nullptr;     // [ceil(N / 64)] zeros
  int rows = 0, out_features = 0, in_features = 0;
  int k_per_split = 0, splits = 1;
  int k_slices = 1;  // FMA kernel: warps that share an output pair, each adding a range of K
  // The add-RMSNorm prologue (FMA kernel): residual [M, K] and norm_weight [K] of x's dtype;
  // block 0 writes x + residual to sum_out [M, K].
  const void* residual = nullptr;
  const void* norm_weight = nullptr;
  void* sum_out = nullptr;
  float eps = 0.f;
  // The rotary-append epilogue (FMA kernel, qkv_projection): the outputs are the q/k/v rows of
  // B * S new tokens; q rotated into out [B, S, Hq, D], k rotated and v into the cache slots.
  const void* cos = nullptr;  // [B, S, D]
  const void* sin = nullptr;
  void* keys = nullptr;       // cache[layer, 0]: [B, Hkv, S_max, D]
  void* values = nullptr;     // cache[layer, 1]
  const void* length = nullptr;  // [B]
  bool length_is_64 = false;
  int tokens = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t max_seq = 0;
};

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

template <typename T>
__device__ __forceinline__ float bias_at(const SkinnyParams& p, int n) {
  return p.bias == nullptr ? 0.f : to_float(static_cast<const T*>(p.bias)[n]);
}

template <typename T, int kMTiles>
__global__ void __launch_bounds__(kThreads) skinny_linear_kernel(const SkinnyParams p) {
  wait_for_prior_kernels();  // HIPPO_PDL: see dependent_launch.cuh
  allow_dependent_kernels();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int tile = blockIdx.x, split = blockIdx.y;
  const int row_a = tile * kSkinnyRowsPerBlock + warp * 16 + g;  // and row_a + 8
  const bool valid_a = row_a < p.out_features, valid_b = row_a + 8 < p.out_features;
  const int k_begin = split * p.k_per_split;
  const int k_end = min(p.in_features, k_begin + p.k_per_split);

  const T* weight = static_cast<const T*>(p.weight);
  const T* x = static_cast<const T*>(p.x);
  const uint4* w_a = reinterpret_cast<const uint4*>(weight + static_cast<int64_t>(valid_a ? row_a : 0) * p.in_features);
  const uint4* w_b = reinterpret_cast<const uint4*>(weight + static_cast<int64_t>(valid_b ? row_a + 8 : 0) * p.in_features);
  const uint4* x_row[kMTiles];
  bool x_valid[kMTiles];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    const int m = mt * 8 + g;
    x_valid[mt] = m < p.rows;
    x_row[mt] = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(x_valid[mt] ? m : 0) * p.in_features);
  }

  float acc[kMTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

  for (int k0 = k_begin; k0 < k_end; k0 += kSplitGrain) {
    uint4 wa[kUnroll], wb[kUnroll], xv[kUnroll][kMTiles];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = k0 + u * kKeyBlock + t * 8;
      const bool in_range = k < k_end;  // splits hold whole k32 blocks (K % 32 == 0)
      const int v = k / 8;
      wa[u] = valid_a && in_range ? __ldcs(w_a + v) : zero;
      wb[u] = valid_b && in_range ? __ldcs(w_b + v) : zero;
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) xv[u][mt] = x_valid[mt] && in_range ? __ldg(x_row[mt] + v) : zero;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const uint32_t a[4] = {word(wa[u], 2 * s), word(wb[u], 2 * s), word(wa[u], 2 * s + 1),
                               word(wb[u], 2 * s + 1)};
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<T>(acc[mt], a, word(xv[u][mt], 2 * s), word(xv[u][mt], 2 * s + 1));
        }
      }
    }
  }

  // Fragment element e of n8 tile mt is output (m = mt * 8 + 2t + (e & 1), n = row_a + 8 (e / 2)).
  T* out = static_cast<T*>(p.out);
  if (p.splits == 1) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = mt * 8 + 2 * t + (e & 1), n = row_a + 8 * (e / 2);
        if (m < p.rows && n < p.out_features) {
          out[static_cast<int64_t>(m) * p.out_features + n] = from_float<T>(acc[mt][e] + bias_at<T>(p, n));
        }
      }
    }
    return;
  }

  float* partial = p.partial + static_cast<int64_t>(split) * p.rows * p.out_features;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = mt * 8 + 2 * t + (e & 1), n = row_a + 8 * (e / 2);
      if (m < p.rows && n < p.out_features) partial[static_cast<int64_t>(m) * p.out_features + n] = acc[mt][e];
    }
  }
  if (!arrive_last_of(p.semaphores + tile, p.splits)) return;

  // The last block sums the splits in order (deterministic), adds the bias and rounds once.
  const int n_first = tile * kSkinnyRowsPerBlock;
  for (int idx = threadIdx.x; idx < p.rows * kSkinnyRowsPerBlock; idx += kThreads) {
    const int m = idx / kSkinnyRowsPerBlock, n = n_first + idx % kSkinnyRowsPerBlock;
    if (n >= p.out_features) continue;
    float sum = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      sum += __ldcg(p.partial + (static_cast<int64_t>(s) * p.rows + m) * p.out_features + n);  // L2, not L1
    }
    out[static_cast<int64_t>(m) * p.out_features + n] = from_float<T>(sum + bias_at<T>(p, n));
  }
  release_semaphore(p.semaphores + tile);  // ready for the next call or graph replay
}


// ---------------------------------------------------------------------------------------------
// FMA kernel (impl "fma", M <= 16): 1-8 warps per two outputs, K sliced among them
// ---------------------------------------------------------------------------------------------
//
// A warp step covers 256 k: lane l takes k = 8 l + 256 i of both weight rows and of every x row
// (16-byte loads: the weight streamed past L1, x through the read-only cache that the block's
// warps share). The warp steps of K are cut into `k_slices` contiguous ranges, one per warp
// of the pair's group (fma_k_slices: more slices where too few output pairs would leave SMs idle
// or a warp with a long serial chain of loads, as in a 0.5B model's down GEMM: 448 pairs, K =
// 4864). A lane multiplies and adds its range in fp32 in k order (__fmaf_rn, never reassociated),
// one shuffle tree adds the 32 lanes, and the slices' sums are added in slice order. The slices
// come from N, K and the GPU, so nothing in a row's arithmetic depends on M or on the row bucket.
constexpr int kFmaMaxRows = 16;
static_assert(kFmaMaxRows <= 32, "lane m stores row m of the rotary-append epilogue");
constexpr int kFmaOutputsPerWarp = 2;
constexpr int kFmaWarps = 8;
constexpr int kFmaThreads = kFmaWarps * 32;
constexpr int kFmaLaneK = 8;                // k per lane and 16-byte load
constexpr int kFmaWarpK = 32 * kFmaLaneK;   // k per warp step
constexpr int kFmaStepsInFlight = 4;        // warp steps whose weight loads a warp keeps in flight
// Warps per SM that fma_k_slices aims for: four resident blocks of eight, what the one-row
// kernel's registers allow.
constexpr int64_t kFmaWarpsPerSmTarget = 32;

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&out)[kFmaLaneK]) {
  const Pack<T, kFmaLaneK> pack = *reinterpret_cast<const Pack<T, kFmaLaneK>*>(&raw);
#pragma unroll
  for (int e = 0; e < kFmaLaneK; ++e) out[e] = to_float(pack.v[e]);
}

// What the FMA kernel applies to x as it loads it: nothing (skinny_linear), the residual add and
// RMSNorm (add_rms_norm_linear) or the SwiGLU gating (silu_and_mul_linear).
enum class Prologue { kNone, kAddRmsNorm, kSiluAndMul };

// What the FMA kernel does with its outputs: store them (out [M, N]), or, as the q/k/v projection
// of new tokens, apply RoPE and append the keys and values to the cache (qkv_projection).
enum class Epilogue { kStore, kRotaryAppend };

// The two outputs of warp `pair`. Stored: 2 pair and 2 pair + 1. Rotary: a q or k head's rotated
// pair (head h, d) is outputs h D + d and h D + d + D/2, so one warp holds both halves that RoPE
// mixes; the value heads' outputs follow as adjacent pairs.
template <Epilogue kEpilogue>
__device__ __forceinline__ void pair_outputs(const SkinnyParams& p, int pair, int (&n)[kFmaOutputsPerWarp]) {
  if constexpr (kEpilogue == Epilogue::kRotaryAppend) {
    const int half = p.head_dim / 2;
    const int rotated_pairs = (p.q_heads + p.kv_heads) * half;
    if (pair < rotated_pairs) {
      const int head = pair / half, d = pair - head * half;
      n[0] = head * p.head_dim + d;
      n[1] = n[0] + half;
      return;
    }
    n[0] = (p.q_heads + p.kv_heads) * p.head_dim + 2 * (pair - rotated_pairs);
  } else {
    n[0] = 2 * pair;
  }
  n[1] = n[0] + 1;
}

// Where the rotary-append epilogue puts row m's (token b * S + s) pair of projection outputs
// starting at n0 (pair_outputs), and the RoPE factors it applies first: where rotary_kv_append
// puts them, with its arithmetic (layer_math.cuh). Found before the K loop, so that the reads of
// length, cos and sin run under the weight loads rather than after the last FMA.
template <typename T>
struct QkvPairTarget {
  T* dst = nullptr;  // the pair's first element; null: a cache slot outside the cache, not stored
  int second = 1;    // offset of its second element: 1 in a value head, D/2 in a rotated one
  bool rotate = false;
  RopeFactors rope{};
};

template <typename T>
__device__ __forceinline__ QkvPairTarget<T> qkv_pair_target(const SkinnyParams& p, int m, int n0) {
  const int D = p.head_dim, half = D / 2;
  const int b = m / p.tokens, s = m - b * p.tokens;
  const int head = n0 / D, d = n0 - head * D;
  const CacheSlot slot = cache_slot(p.length, p.length_is_64, b, s, p.tokens, p.kv_heads, p.max_seq, D);
  QkvPairTarget<T> target;
  if (head >= p.q_heads + p.kv_heads) {  // a value head: copied to the cache
    if (slot.valid) {
      target.dst = static_cast<T*>(p.values) + slot.offset +
                   (head - p.q_heads - p.kv_heads) * slot.head_stride + d;
    }
    return target;
  }
  target.rotate = true;
  target.second = half;
  target.rope = rope_factors<T>(static_cast<const T*>(p.cos) + static_cast<int64_t>(m) * D,
                                static_cast<const T*>(p.sin) + static_cast<int64_t>(m) * D, d, half);
  if (head < p.q_heads) {
    target.dst = static_cast<T*>(p.out) + (static_cast<int64_t>(m) * p.q_heads + head) * D + d;
  } else if (slot.valid) {
    target.dst = static_cast<T*>(p.keys) + slot.offset + (head - p.q_heads) * slot.head_stride + d;
  }
  return target;
}

// The pair (already rounded with its bias, as the unfused GEMM stores it), rotated where it is a
// q or k pair, at its target.
template <typename T>
__device__ __forceinline__ void store_qkv_pair(const QkvPairTarget<T>& target, T first, T second) {
  if (target.dst == nullptr) return;
  if (target.rotate) rotate_pair<T>(to_float(first), to_float(second), target.rope, first, second);
  target.dst[0] = first;
  target.dst[target.second] = second;
}

// The 8 GEMM inputs of row m at k .. k + 7 (k a multiple of 8), after the prologue, with the
// arithmetic of the standalone ops (layer_math.cuh). inverse: row m's 1 / rms (kAddRmsNorm).
template <typename T, Prologue kPrologue>
__device__ __forceinline__ void load_inputs(const SkinnyParams& p, int m, int k, float inverse,
                                            float (&out)[kFmaLaneK]) {
  const int64_t K = p.in_features;
  const T* x = static_cast<const T*>(p.x);
  auto load8 = [](const T* at, float (&values)[kFmaLaneK]) {
    unpack8<T>(__ldg(reinterpret_cast<const uint4*>(at)), values);
  };
  if constexpr (kPrologue == Prologue::kNone) {
    load8(x + m * K + k, out);
  } else if constexpr (kPrologue == Prologue::kAddRmsNorm) {
    float residual[kFmaLaneK], weight[kFmaLaneK];
    load8(x + m * K + k, out);
    load8(static_cast<const T*>(p.residual) + m * K + k, residual);
    load8(static_cast<const T*>(p.norm_weight) + k, weight);
#pragma unroll
    for (int e = 0; e < kFmaLaneK; ++e) {
      const float sum = to_float(residual_sum<T>(out[e], residual[e]));
      out[e] = to_float(rms_normed<T>(sum, weight[e], inverse));
    }
  } else {
    float up[kFmaLaneK];
    const T* row = x + m * 2 * K;
    load8(row + k, out);
    load8(row + K + k, up);
#pragma unroll
    for (int e = 0; e < kFmaLaneK; ++e) out[e] = to_float(gated<T>(out[e], up[e]));
  }
}

// The add-RMSNorm prologue's block-wide part: 1 / rms of each row of x + residual into
// inverse[m], the same in every block; block 0 also stores the sum (the residual stream).
template <typename T>
__device__ void add_rms_norm_rows(const SkinnyParams& p, float* inverse) {
  using P = Pack<T, kFmaLaneK>;
  const int64_t packs = p.in_features / kFmaLaneK;
  for (int m = 0; m < p.rows; ++m) {
    const int64_t row = static_cast<int64_t>(m) * packs;
    float squares = 0.f;
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      const P a = reinterpret_cast<const P*>(p.x)[row + i];
      const P r = reinterpret_cast<const P*>(p.residual)[row + i];
      P sum;
#pragma unroll
      for (int j = 0; j < kFmaLaneK; ++j) {
        sum.v[j] = residual_sum<T>(to_float(a.v[j]), to_float(r.v[j]));
        squares += to_float(sum.v[j]) * to_float(sum.v[j]);
      }
      if (blockIdx.x == 0) reinterpret_cast<P*>(p.sum_out)[row + i] = sum;
    }
    const float total = block_sum(squares);
    if (threadIdx.x == 0) inverse[m] = inverse_rms(total, p.in_features, p.eps);
    __syncthreads();  // inverse[m] is visible, and block_sum's partials may be reused
  }
}

// kRows: the row bucket (1, 2, 4, 8 or 16) the launch rounded M up to.
template <typename T, int kRows, Prologue kPrologue, Epilogue kEpilogue>
__global__ void __launch_bounds__(kFmaThreads) skinny_linear_fma_kernel(const SkinnyParams p) {
  // HIPPO_PDL (dependent_launch.cuh): the first batch of weight loads is issued before waiting
  // for the previous kernel, so with PDL it streams under that kernel's tail. Weights and the
  // bias are the only memory read before the wait: nothing in a step writes them. The next
  // kernel is let in only after the wait (below), as everywhere else, so no kernel that could
  // still write memory runs beside these early loads except the one directly before this one.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int slices = p.k_slices;  // a power of two that divides kFmaWarps (fma_k_slices)
  const int slice = warp % slices;
  const int pair = blockIdx.x * (kFmaWarps / slices) + warp / slices;
  int n[kFmaOutputsPerWarp];
  pair_outputs<kEpilogue>(p, pair, n);
  const bool warp_has_outputs = n[0] < p.out_features;  // only the last block has warps without
  const int K = p.in_features;
  // This warp's slice of K: warp steps [steps * slice / slices, steps * (slice + 1) / slices).
  // Warps without outputs get an empty one, but still meet the others in the epilogue.
  const int steps = (K + kFmaWarpK - 1) / kFmaWarpK;
  const int k_begin = steps * slice / slices * kFmaWarpK;
  const int k_end = warp_has_outputs ? min(K, steps * (slice + 1) / slices * kFmaWarpK) : k_begin;
  const T* weight = static_cast<const T*>(p.weight);
  const uint4* w_row[kFmaOutputsPerWarp];
  bool w_valid[kFmaOutputsPerWarp];
#pragma unroll
  for (int o = 0; o < kFmaOutputsPerWarp; ++o) {
    w_valid[o] = n[o] < p.out_features;  // an invalid output re-reads a valid row, never written
    const int row = w_valid[o] ? n[o] : (warp_has_outputs ? n[0] : 0);
    w_row[o] = reinterpret_cast<const uint4*>(weight + static_cast<int64_t>(row) * K);
  }
  float acc[kRows][kFmaOutputsPerWarp];
#pragma unroll
  for (int m = 0; m < kRows; ++m) {
#pragma unroll
    for (int o = 0; o < kFmaOutputsPerWarp; ++o) acc[m][o] = 0.f;
  }

  // A warp keeps kFmaStepsInFlight warp steps of weight loads in flight, and a batch's steps
  // past its slice are neither loaded nor added. Up to 4 rows they form two batches that
  // alternate: batch i + 1's loads are issued before batch i's FMAs, so loads never stop while
  // the warp adds. More rows keep one batch of all four (a second buffer beside 8 or 16 rows of
  // accumulators spills) and load the next once the current one is added. The same registers
  // either way, so occupancy is that of one batch of four. The first batch of every buffer,
  // i.e. kFmaStepsInFlight warp steps (the whole slice of most decode GEMMs), is requested
  // before the wait for the previous kernel, so with PDL it streams under that kernel's tail,
  // and before the prologue, whose row reductions then run under its latency. Each lane adds
  // its steps in k order, whatever the batching.
  constexpr int kBuffers = kRows <= 4 ? 2 : 1;
  constexpr int kFmaBatch = kFmaStepsInFlight / kBuffers;  // warp steps per batch
  using Batch = uint4[kFmaBatch][kFmaOutputsPerWarp];
  constexpr int kBatchK = kFmaBatch * kFmaWarpK;
  Batch w_raw[kBuffers];
  auto load_batch = [&](int k, Batch& batch) {
#pragma unroll
    for (int b = 0; b < kFmaBatch; ++b) {
      if (k + b * kFmaWarpK >= k_end) break;
#pragma unroll
      for (int o = 0; o < kFmaOutputsPerWarp; ++o) {
        batch[b][o] = __ldcs(w_row[o] + (k + b * kFmaWarpK) / kFmaLaneK);
      }
    }
  };
  const int first_k = k_begin + lane * kFmaLaneK;
#pragma unroll
  for (int i = 0; i < kBuffers; ++i) load_batch(first_k + i * kBatchK, w_raw[i]);
  float bias[kFmaOutputsPerWarp] = {};  // read now, not after the last FMA
#pragma unroll
  for (int o = 0; o < kFmaOutputsPerWarp; ++o) {
    if (w_valid[o] && slice == 0) bias[o] = bias_at<T>(p, n[o]);
  }
  wait_for_prior_kernels();  // x, residual and out belong to the kernels before this one
  allow_dependent_kernels();
  __shared__ float inverse[kRows];  // the add-RMSNorm prologue's 1 / rms of each row
  if constexpr (kPrologue == Prologue::kAddRmsNorm) add_rms_norm_rows<T>(p, inverse);
  // The rotary-append epilogue's destination and RoPE factors for row `lane`, which this lane
  // of the group's first warp stores (rows <= 16 < 32), read now so that their latency runs
  // under the K loop.
  QkvPairTarget<T> target;
  if constexpr (kEpilogue == Epilogue::kRotaryAppend) {
    if (warp_has_outputs && slice == 0 && lane < p.rows) target = qkv_pair_target<T>(p, lane, n[0]);
  }

  // One warp step at k: the lane's 8 weights of each output against the same 8 k of every row.
  auto accumulate = [&](int k_step, const uint4 (&w_step)[kFmaOutputsPerWarp]) {
    float w[kFmaOutputsPerWarp][kFmaLaneK];
#pragma unroll
    for (int o = 0; o < kFmaOutputsPerWarp; ++o) unpack8<T>(w_step[o], w[o]);
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      if (m >= p.rows) break;
      float xv[kFmaLaneK];
      load_inputs<T, kPrologue>(p, m, k_step, kPrologue == Prologue::kAddRmsNorm ? inverse[m] : 0.f, xv);
#pragma unroll
      for (int o = 0; o < kFmaOutputsPerWarp; ++o) {
#pragma unroll
        for (int e = 0; e < kFmaLaneK; ++e) acc[m][o] = __fmaf_rn(w[o][e], xv[e], acc[m][o]);
      }
    }
  };
  // kBuffers batches per turn, so that each buffer keeps fixed registers.
  for (int k = first_k; k < k_end; k += kBuffers * kBatchK) {
#pragma unroll
    for (int i = 0; i < kBuffers; ++i) {
      const int batch_k = k + i * kBatchK;
      if (batch_k >= k_end) break;
      const bool more = batch_k + kBatchK < k_end;
      const bool preloaded = i == 0 && k == first_k;  // the second buffer's first batch
      if (kBuffers == 2 && more && !preloaded) load_batch(batch_k + kBatchK, w_raw[(i + 1) % kBuffers]);
#pragma unroll
      for (int b = 0; b < kFmaBatch; ++b) {
        if (batch_k + b * kFmaWarpK >= k_end) break;
        accumulate(batch_k + b * kFmaWarpK, w_raw[i][b]);
      }
      if (kBuffers == 1 && more) load_batch(batch_k + kBatchK, w_raw[0]);
    }
  }

  // Each output's sum: a shuffle tree over each slice's lanes, then the slices' sums in slice
  // order, added by the group's first warp. Lane 2 m + o holds output (m, o) of its warp.
  __shared__ float slice_sums[kFmaWarps][kRows][kFmaOutputsPerWarp];
#pragma unroll
  for (int m = 0; m < kRows; ++m) {
    if (m >= p.rows) break;
#pragma unroll
    for (int o = 0; o < kFmaOutputsPerWarp; ++o) {
      const float sum = warp_sum(acc[m][o]);
      if (lane == m * kFmaOutputsPerWarp + o) slice_sums[warp][m][o] = sum;
    }
  }
  if (slices > 1) {
    __syncthreads();  // the same for the whole block
  } else {
    __syncwarp();
  }
  if (slice != 0 || !warp_has_outputs) return;
  auto output_sum = [&](int m, int o) {
    float sum = slice_sums[warp][m][o];
    for (int s = 1; s < slices; ++s) sum += slice_sums[warp + s][m][o];
    return sum;
  };
  // The GEMM's outputs as the unfused op stores them: fp32 sum plus bias, rounded once.
  if constexpr (kEpilogue == Epilogue::kStore) {
    const int m = lane / kFmaOutputsPerWarp, o = lane % kFmaOutputsPerWarp;  // o is 0 or 1
    if (m < p.rows && (o == 0 ? w_valid[0] : w_valid[1])) {
      static_cast<T*>(p.out)[static_cast<int64_t>(m) * p.out_features + (o == 0 ? n[0] : n[1])] =
          from_float<T>(output_sum(m, o) + (o == 0 ? bias[0] : bias[1]));
    }
  } else {  // lane m takes row m's pair (both outputs of a rotary pair are valid)
    if (lane < p.rows) {
      store_qkv_pair<T>(target, from_float<T>(output_sum(lane, 0) + bias[0]),
                        from_float<T>(output_sum(lane, 1) + bias[1]));
    }
  }
}

// The FMA kernel's K slices (warps per output pair): the fewest, doubling up to kFmaWarps, that
// put about kFmaWarpsPerSmTarget warps on every SM, no more than K's warp steps (a partial last
// step counts: K = 896 takes 4 slices, the last of them 128 k). A function of N, K and the GPU
// only, so rows never depend on M. HIPPO_SKINNY_FMA_SLICES=<n> asks for n instead (rounded down
// to a power of two, within the same bounds: tuning and tests).
int fma_k_slices(int64_t out_features, int64_t in_features) {
  const int64_t pairs = ceil_div(out_features, kFmaOutputsPerWarp);
  const int64_t steps = ceil_div(in_features, kFmaWarpK);
  const int64_t asked = env_int("HIPPO_SKINNY_FMA_SLICES", 0);
  const int64_t wanted = kFmaWarpsPerSmTarget * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int slices = 1;
  while (slices < kFmaWarps && 2 * slices <= steps &&
         (asked > 0 ? 2 * slices <= asked : pairs * slices < wanted)) {
    slices *= 2;
  }
  return slices;
}

// Splits of K: enough blocks for about kBlocksPerSmTarget per SM, each split at least
// kSplitGrain long. A function of N, K and the GPU only, so rows never depend on M.
struct SplitPlan {
  int64_t splits = 1;
  int64_t k_per_split = 0;
};

SplitPlan plan_splits(int64_t out_features, int64_t in_features, int64_t sm_count) {
  const int64_t tiles = ceil_div(out_features, kSkinnyRowsPerBlock);
  const int64_t most = std::max<int64_t>(1, in_features / kSplitGrain);
  const int64_t blocks_per_sm = env_int("HIPPO_SKINNY_BLOCKS_PER_SM", kBlocksPerSmTarget);
  const int64_t wanted = std::clamp<int64_t>(ceil_div(blocks_per_sm * sm_count, tiles), 1, most);
  SplitPlan plan;
  plan.k_per_split = ceil_div(ceil_div(in_features, wanted), kSplitGrain) * kSplitGrain;
  plan.splits = ceil_div(in_features, plan.k_per_split);
  return plan;
}

bool kernel_takes(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const SkinnyShape& s) {
  const auto type = x.scalar_type();
  return (type == at::kBFloat16 || type == at::kHalf) && s.rows >= 1 && s.rows <= kSkinnyMaxRows &&
         s.in_features >= kKeyBlock && s.in_features % kKeyBlock == 0 && s.out_features >= 1 &&
         s.out_features <= INT32_MAX / kSkinnyMaxRows &&
         all_aligned(16, {x.data_ptr(), weight.data_ptr()}) &&
         (!bias.has_value() || all_aligned(2, {bias->data_ptr()}));
}

template <typename T, int kMTiles>
void launch(const SkinnyParams& p, dim3 grid, cudaStream_t stream) {
  launch_kernel(skinny_linear_kernel<T, kMTiles>, grid, dim3(kThreads), 0, stream, p);
}

// Whether M rows run the FMA kernel: asked for by name, or by HIPPO_SKINNY_KERNEL=fma for
// impl "auto" (default: tensor cores); never past kFmaMaxRows rows.
bool fma_kernel_selected(SkinnyKernel kernel, int64_t rows) {
  const bool asked = kernel == SkinnyKernel::kFma ||
                     (kernel == SkinnyKernel::kAuto && env_is("HIPPO_SKINNY_KERNEL", "fma"));
  return asked && rows <= kFmaMaxRows;
}

template <typename T, int kRows, Prologue kPrologue, Epilogue kEpilogue>
void launch_fma(const SkinnyParams& p, cudaStream_t stream) {
  SkinnyParams sliced = p;
  sliced.k_slices = fma_k_slices(p.out_features, p.in_features);
  const int64_t pairs_per_block = kFmaWarps / sliced.k_slices;
  const unsigned blocks = static_cast<unsigned>(
      ceil_div(ceil_div(p.out_features, kFmaOutputsPerWarp), pairs_per_block));
  launch_kernel(skinny_linear_fma_kernel<T, kRows, kPrologue, kEpilogue>, dim3(blocks), dim3(kFmaThreads),
                0, stream, sliced);
}

template <typename T, Prologue kPrologue = Prologue::kNone, Epilogue kEpilogue = Epilogue::kStore>
void launch_fma_for_rows(const SkinnyParams& p, cudaStream_t stream) {
  if (p.rows <= 1) return launch_fma<T, 1, kPrologue, kEpilogue>(p, stream);
  if (p.rows <= 2) return launch_fma<T, 2, kPrologue, kEpilogue>(p, stream);
  if (p.rows <= 4) return launch_fma<T, 4, kPrologue, kEpilogue>(p, stream);
  if (p.rows <= 8) return launch_fma<T, 8, kPrologue, kEpilogue>(p, stream);
  return launch_fma<T, kFmaMaxRows, kPrologue, kEpilogue>(p, stream);
}

// The operands and sizes every kernel of this file reads.
SkinnyParams gemm_params(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& out, const SkinnyShape& s) {
  SkinnyParams p;
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.rows = static_cast<int>(s.rows);
  p.out_features = static_cast<int>(s.out_features);
  p.in_features = static_cast<int>(s.in_features);
  p.k_per_split = p.in_features;  // no split of K unless the caller plans one
  return p;
}

at::Tensor skinny_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& workspace, c10::string_view impl) {
  const SkinnyShape s = check_skinny_linear_inputs(x, weight, bias, workspace, impl);
  if (!kernel_takes(x, weight, bias, s)) return at::linear(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool fma = fma_kernel_selected(skinny_kernel(impl), s.rows);
  const SplitPlan plan = fma ? SplitPlan{1, s.in_features}
                             : plan_splits(s.out_features, s.in_features,
                                           at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  at::Tensor out = at::empty(skinny_linear_output_shape(x, s.out_features), x.options());
  at::Tensor partial;
  if (plan.splits > 1) partial = at::empty({plan.splits, s.rows, s.out_features}, x.options().dtype(at::kFloat));

  SkinnyParams p = gemm_params(x, weight, bias, out, s);
  p.partial = plan.splits > 1 ? partial.data_ptr<float>() : nullptr;
  p.semaphores = workspace.data_ptr<int>();
  p.k_per_split = static_cast<int>(plan.k_per_split);
  p.splits = static_cast<int>(plan.splits);
  const dim3 grid(static_cast<unsigned>(ceil_div(s.out_features, kSkinnyRowsPerBlock)),
                  static_cast<unsigned>(plan.splits));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int m_tiles = static_cast<int>(ceil_div(s.rows, 8));
  dispatch_element_type(x.scalar_type(), kSkinnyLinearOp, [&](auto element) {
    using T = decltype(element);
    if constexpr (sizeof(T) == 2) {
      if (fma) return launch_fma_for_rows<T>(p, stream);
      switch (m_tiles) {
        case 1: return launch<T, 1>(p, grid, stream);
        case 2: return launch<T, 2>(p, grid, stream);
        case 3: return launch<T, 3>(p, grid, stream);
        default: return launch<T, 4>(p, grid, stream);
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// add_rms_norm_linear and silu_and_mul_linear: the FMA kernel with a prologue
// ---------------------------------------------------------------------------------------------

// Whether the FMA kernel takes a fused op: bf16/fp16, 1..16 rows, K a multiple of 8 and every
// operand 16-byte aligned (its loads are 16-byte vectors). Other shapes run the composition.
bool fused_kernel_takes(const at::Tensor& x, const SkinnyShape& s, const std::optional<at::Tensor>& bias,
                        std::initializer_list<const void*> operands) {
  const auto type = x.scalar_type();
  return (type == at::kBFloat16 || type == at::kHalf) && s.rows >= 1 && s.rows <= kFmaMaxRows &&
         s.in_features >= kFmaLaneK && s.in_features % kFmaLaneK == 0 && s.out_features >= 1 &&
         s.out_features <= INT32_MAX / kFmaMaxRows && all_aligned(16, operands) &&
         (!bias.has_value() || all_aligned(2, {bias->data_ptr()}));
}

template <Prologue kPrologue, Epilogue kEpilogue = Epilogue::kStore>
void launch_fused(const SkinnyParams& p, at::ScalarType type, const char* op) {
  dispatch_element_type(type, op, [&](auto element) {
    using T = decltype(element);
    if constexpr (sizeof(T) == 2) {
      launch_fma_for_rows<T, kPrologue, kEpilogue>(p, at::cuda::getCurrentCUDAStream());
    }
  });
}

// The add-RMSNorm prologue's operands: residual and norm weight in, x + residual out to sum.
void set_add_rms_norm(SkinnyParams& p, const at::Tensor& residual, const at::Tensor& norm_weight,
                      double eps, const at::Tensor& sum) {
  p.residual = residual.data_ptr();
  p.norm_weight = norm_weight.data_ptr();
  p.sum_out = sum.data_ptr();
  p.eps = static_cast<float>(eps);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_linear_cuda(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const SkinnyShape s = check_add_rms_norm_linear_inputs(x, residual, norm_weight, eps, weight, bias);
  if (!fused_kernel_takes(x, s, bias, {x.data_ptr(), residual.data_ptr(), norm_weight.data_ptr(),
                                       weight.data_ptr()})) {
    return add_rms_norm_then_linear(x, residual, norm_weight, eps, weight, bias);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(skinny_linear_output_shape(x, s.out_features), x.options());
  at::Tensor sum = at::empty_like(x, at::MemoryFormat::Contiguous);
  SkinnyParams p = gemm_params(x, weight, bias, out, s);
  set_add_rms_norm(p, residual, norm_weight, eps, sum);
  launch_fused<Prologue::kAddRmsNorm>(p, x.scalar_type(), kAddRmsNormLinearOp);
  return {out, sum};
}

at::Tensor silu_and_mul_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias) {
  const SkinnyShape s = check_silu_and_mul_linear_inputs(x, weight, bias);
  if (!fused_kernel_takes(x, s, bias, {x.data_ptr(), weight.data_ptr()})) {
    return silu_and_mul_then_linear(x, weight, bias);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(skinny_linear_output_shape(x, s.out_features), x.options());
  launch_fused<Prologue::kSiluAndMul>(gemm_params(x, weight, bias, out, s), x.scalar_type(),
                                      kSiluAndMulLinearOp);
  return out;
}

std::tuple<at::Tensor, at::Tensor> qkv_projection_cuda(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& cos,
    const at::Tensor& sin, const at::Tensor& cache, int64_t layer, const at::Tensor& length) {
  const auto [s, r] =
      check_qkv_projection_inputs(x, residual, norm_weight, eps, weight, bias, cos, sin, cache, layer, length);
  if (!fused_kernel_takes(x, s, bias, {x.data_ptr(), residual.data_ptr(), norm_weight.data_ptr(),
                                       weight.data_ptr()})) {
    return qkv_projection_composed(x, residual, norm_weight, eps, weight, bias, cos, sin, cache, layer,
                                   length);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor q = at::empty({r.batch, r.tokens, r.q_heads, r.head_dim}, x.options());
  at::Tensor sum = at::empty_like(x, at::MemoryFormat::Contiguous);
  SkinnyParams p = gemm_params(x, weight, bias, q, s);
  set_add_rms_norm(p, residual, norm_weight, eps, sum);
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.keys = cache[layer][0].data_ptr();
  p.values = cache[layer][1].data_ptr();
  p.length = length.data_ptr();
  p.length_is_64 = length.scalar_type() == at::kLong;
  p.tokens = static_cast<int>(r.tokens);
  p.q_heads = static_cast<int>(r.q_heads);
  p.kv_heads = static_cast<int>(r.kv_heads);
  p.head_dim = static_cast<int>(r.head_dim);
  p.max_seq = r.max_seq;
  launch_fused<Prologue::kAddRmsNorm, Epilogue::kRotaryAppend>(p, x.scalar_type(), kQkvProjectionOp);
  return {q, sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CUDA, m) {
  m.impl("skinny_linear", &skinny_linear_cuda);
  m.impl("add_rms_norm_linear", &add_rms_norm_linear_cuda);
  m.impl("silu_and_mul_linear", &silu_and_mul_linear_cuda);
  m.impl("qkv_projection", &qkv_projection_cuda);
}

}  // namespace hippo
