// CUDA decode_attention: split-KV flash decoding over one layer of the static cache.
//
// Work split. The G * Lq query rows of one kv head (row r = token r / G, q head h * G + r % G)
// share every key and value they read, so a thread block owns one (batch row, kv head, split of
// the sequence, group of up to 64 rows) and streams its KV chunk from HBM exactly once for all of
// them. Each block writes a partial output normalised by its own softmax sum plus the log-sum-exp
// (base 2) of its scores to fp32 buffers; a second small kernel merges the splits. Given a
// semaphore workspace, a step with at most kFusedMergeMaxRows rows per kv head (decode steps) can
// instead merge them in the same launch: the split block that finishes last reads the others'
// partials (cuda/last_block.cuh). HIPPO_DECODE_ATTENTION_FUSED_MERGE=1 turns that on (opt-in:
// it saves the merge kernel's launch but costs one block's read of the partials; it measured
// slower on an H200, 2026-11-27, 20.3 against 15.4 us on the 7B decode shape, when that block
// merged the rows one after the other, two barriers and a trip to L2 each; with up to 8 rows in
// one pass, on 2026-11-28, a 0.5B decode step took 1.11 against 0.98 ms, a 7B one the same).
//
// Graph capture. The number of splits depends on S_max, B * Hkv and the SM count only, never on
// length values: blocks of splits that start at or beyond length[b] exit at once, and the combine
// kernel reads only the splits that length[b] reaches (in a balanced plan the split length
// itself is derived from length[b] on the device). length is clamped to [0, S_max] on the
// device, so no value can make a kernel read out of bounds.
//
// Two split kernels fill the same workspace:
//   * split_kernel_mma (default): tensor cores (mma.sync m16n8k16, fp32 accumulation) for
//     S = Q K^T and O += P V, K/V tiles staged in shared memory by a 3-stage cp.async pipeline;
//   * split_kernel_simple: one warp per query row, plain FMAs; selected with the environment
//     variable HIPPO_DECODE_ATTENTION_SIMPLE=1 (a cross-check for the fast path).
// HIPPO_DECODE_ATTENTION_CHUNK=<keys> overrides the split length (tuning; rounded up to 64);
// HIPPO_DECODE_ATTENTION_BALANCED=0 cuts S_max rather than the actual length (plan_splits),
// HIPPO_DECODE_ATTENTION_BLOCKS_PER_SM=<n> sets how many blocks per SM a plan aims at,
// HIPPO_DECODE_ATTENTION_WIDE_REGISTERS=0 runs the split kernel under the narrower default
// register bounds instead of the wide ones, and HIPPO_DECODE_ATTENTION_STAGES=2 runs head dim 128
// with two cp.async stages, as GPUs short of shared memory do (launch_mma).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "attention.h"
#include "cuda/dependent_launch.cuh"
#include "cuda/element_types.cuh"
#include "cuda/last_block.cuh"
#include "cuda/tensor_core.cuh"
#include "cuda/tuning_env.h"
#include "cuda/warp_reduce.cuh"

namespace hippo {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileKeys = 64;       // keys per shared-memory stage
constexpr int kStages = 3;          // cp.async pipeline depth (2 where shared memory is short)
constexpr int kRowsPerBlock = 64;   // query rows per block of the MMA kernel: 4 m16 tiles
constexpr int kSmemPad = 8;         // elements of padding per shared row: conflict-free fragments
constexpr int kSimpleRowsPerBlock = kWarps;
// The most query rows per kv head whose splits the last split block merges (fused merge): one
// block reads rows x splits x D floats alone, so it pays only for the few rows of decode steps.
constexpr int kFusedMergeMaxRows = 16;
// Its semaphore counts the splits of a (batch row, kv head): one row group per split, so the
// MMA kernel's blocks must hold all those rows (the simple kernel's blocks do not: it never
// merges in place).
static_assert(kFusedMergeMaxRows <= kRowsPerBlock, "a fused merge needs a single row group");
constexpr float kNegInf = -__builtin_huge_valf();
// How far (base 2) a tile's scores may rise above the running maximum before the accumulators
// are rescaled to a new one (the MMA kernel's lazy rescaling).
constexpr float kRescaleSlack = 8.f;

struct Params {
  const void* query;       // [B, Lq, Hq, D], contiguous
  const void* keys;        // cache[layer, 0]: [B, Hkv, S_max, D]
  const void* values;      // cache[layer, 1]
  const void* length;      // [B], int32 or int64
  const bool* tree_mask;   // [Lq, Lq] or [B, Lq, Lq] contiguous; null: causal
  float* partial_out;      // [B * Hkv, num_splits, rows, D]: each split's normalised output
  float* partial_lse;      // [B * Hkv, num_splits, rows]: log2-sum-exp2 of the split's scores
  void* out;               // [B, Lq, Hq, D]
  int* semaphores;         // [B * Hkv] zeros: the last split block merges (fused merge); or null
  int64_t mask_batch_stride;
  int batch, q_len, q_heads, kv_heads, group, rows, max_seq;
  int chunk;               // keys per split (a multiple of kTileKeys); balanced: the least
  int num_splits;
  bool balanced;           // spread length[b] over all num_splits (split_chunk)
  float scale_log2;        // softmax scale * log2(e): scores live in the exp2 domain
  bool row_invariant;      // MMA kernel in its 4-row-tile layout whatever the row count
  bool length_is_64;
};

// ---------------------------------------------------------------------------------------------
// Shared device helpers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ int clamped_length(const Params& p, int b) {
  const int64_t n = p.length_is_64 ? static_cast<const int64_t*>(p.length)[b]
                                   : static_cast<const int32_t*>(p.length)[b];
  return static_cast<int>(n < 0 ? 0 : (n > p.max_seq ? p.max_seq : n));
}

// Keys per split of sequence b. Fixed: the launch's chunk, so a row meets the same split
// boundaries at every length (what row_invariant needs). Balanced: length spread over all the
// grid's splits in whole tiles (at least p.chunk), so a short sequence in a long cache still
// keeps every block busy; the split kernels and the combine kernel derive it alike.
__device__ __forceinline__ int split_chunk(const Params& p, int length) {
  if (!p.balanced) return p.chunk;
  const int even = (length + p.num_splits - 1) / p.num_splits;
  return max(p.chunk, (even + kTileKeys - 1) / kTileKeys * kTileKeys);
}

// Splits of sequence b that hold keys, hence wrote a partial: split s does iff s * chunk < length.
__device__ __forceinline__ int active_splits(const Params& p, int length) {
  const int chunk = split_chunk(p, length);
  return (length + chunk - 1) / chunk;
}

// Visibility of query row token i as (prefix, block bits): positions < prefix are visible,
// position prefix + j (0 <= j < Lq) iff bit j. Rows outside [0, rows) see nothing.
struct RowVisibility {
  int prefix = 0;
  uint64_t bits = 0;

  // Branch-free: it runs for every score element of a masked tile, and the short-circuit form
  // compiled to two branches and a convergence barrier per element.
  __device__ __forceinline__ bool sees(int pos) const {
    const int j = pos - prefix;  // pos >= 0 always; pos < length <=> j < Lq (bits above are 0)
    const bool block_bit = (static_cast<unsigned>(j) < 64u) & static_cast<bool>((bits >> (j & 63)) & 1u);
    return (j < 0) | block_bit;
  }
};

__device__ __forceinline__ RowVisibility row_visibility(const Params& p, int b, int length, int r) {
  RowVisibility v;
  if (r >= p.rows) return v;
  const int i = r / p.group;
  v.prefix = length - p.q_len;
  if (p.tree_mask == nullptr) {
    v.bits = causal_block_bits(i);
  } else {
    const bool* row = p.tree_mask + b * p.mask_batch_stride + static_cast<int64_t>(i) * p.q_len;
    for (int j = 0; j < p.q_len; ++j) v.bits |= static_cast<uint64_t>(row[j]) << j;
  }
  return v;
}

// Offset of (batch b, token i, q head of kv head h, row r) in [B, Lq, Hq, D].
__device__ __forceinline__ int64_t row_offset(const Params& p, int b, int h, int r, int d_size) {
  const int i = r / p.group;
  const int head = h * p.group + r % p.group;
  return ((static_cast<int64_t>(b) * p.q_len + i) * p.q_heads + head) * d_size;
}


// 2^x on the special-function unit alone. exp2f keeps results below 2^-126 as subnormals,
// which costs three more instructions per call (a compare, a halving and a squaring around the
// SFU op). In the key loop and in the merge of the splits, a weight that small sits over a
// hundred binary orders under the row's largest weight (1, or up to 2^kRescaleSlack between
// lazy rescales), far below fp32's resolution of the sums it joins, and its share of an output
// is negligible unless the other contributions to that output cancel; it is flushed to zero.
// Every other input gives exp2f's bits (exp2(-inf) = 0, NaN stays NaN).
__device__ __forceinline__ float exp2_flush(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// What to subtract from scores whose maximum is `max_score` before exp2: the maximum itself, or 0
// while nothing has been seen (-inf - -inf would be NaN; exp2(-inf - 0) is the 0 wanted).
__device__ __forceinline__ float exp2_shift(float max_score) {
  return max_score == kNegInf ? 0.f : max_score;
}

// Base-2 log-sum-exp of a split from its running max and sum (-inf when it saw nothing).
__device__ __forceinline__ float split_lse(float max_score, float sum) {
  return sum != 0.f ? max_score + __log2f(sum) : kNegInf;  // a NaN sum stays NaN
}

// ---------------------------------------------------------------------------------------------
// Merge of the splits: a combine kernel (one block per (batch row, kv head, query row)), or the
// last split block of a fused merge
// ---------------------------------------------------------------------------------------------

// How the merge of the splits splits its work: kGroups thread groups of D / 4 lanes (one float4
// of a row each) take the splits in turn, each keeping its own running maximum of the splits'
// log-sum-exps (one pass: the lse and the partial of a split are loaded together, with no
// maximum to wait for first); then each row's group sums are rescaled to a common maximum and
// added in group order. The order depends on D only, never on how many rows a call merges or
// on the block's width, so a row is merged alike by the combine kernel (one row per block) and
// by a fused merge (all of a kv head's rows in its last split block), which row_invariant relies
// on. Scratch for kRows rows: float4s(kRows) float4s of 16-byte aligned shared memory.
template <int D>
struct MergeLayout {
  static constexpr int kLanesPerRow = D / 4;
  static constexpr int kGroups = kThreads / kLanesPerRow;
  static constexpr int float4s(int rows) {
    return rows * kGroups * kLanesPerRow + (2 * rows * kGroups + 3) / 4;
  }
};

// A group's running merge of one float4 of a row, one split at a time. The roundings are
// spelled out (no contraction left to the compiler), so every instantiation gives the same bits.
struct GroupMerge {
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float weight_sum = 0.f;
  float running_max = kNegInf;

  __device__ __forceinline__ void add_split(float split_lse, const float4& v) {
    const float new_max = fmaxf(running_max, split_lse);
    const float shift = exp2_shift(new_max);
    const float rescale = exp2_flush(running_max - shift);    // 0 while running_max is -inf
    const float w = exp2_flush(split_lse - shift);            // 0 for a split that saw nothing
    acc.x = __fmaf_rn(w, v.x, __fmul_rn(acc.x, rescale));
    acc.y = __fmaf_rn(w, v.y, __fmul_rn(acc.y, rescale));
    acc.z = __fmaf_rn(w, v.z, __fmul_rn(acc.z, rescale));
    acc.w = __fmaf_rn(w, v.w, __fmul_rn(acc.w, rescale));
    weight_sum = __fmaf_rn(weight_sum, rescale, w);
    running_max = new_max;
  }
};

// Query rows [first_row, first_row + count) (count <= kRows) of (batch row, kv head) bh, merged
// over their `splits` active splits into out, by a block of at least kThreads threads. Partials
// are read through L2 (__ldcg), so a block may merge partials that other blocks of the same
// launch wrote. Each thread of a group holds its float4 of all the rows at once, so that the
// loads of a split's rows are in flight together: a fused merge's rows take one pass, not one
// pass each.
template <typename T, int D, int kRows>
__device__ void merge_rows(const Params& p, int bh, int first_row, int count, int splits,
                           float4* scratch) {
  constexpr int kLanesPerRow = MergeLayout<D>::kLanesPerRow;
  constexpr int kGroups = MergeLayout<D>::kGroups;
  float4* group_acc = scratch;                            // [kRows][kGroups][kLanesPerRow]
  float* group_max = reinterpret_cast<float*>(scratch + kRows * kGroups * kLanesPerRow);
  float* group_weight = group_max + kRows * kGroups;     // both [kRows][kGroups]

  // Row first_row of split 0; split s is s * rows further (partials [bh, split, row, D]).
  const int64_t first = static_cast<int64_t>(bh) * p.num_splits * p.rows + first_row;
  const int group = threadIdx.x / kLanesPerRow;
  const int lane4 = threadIdx.x % kLanesPerRow;
  if (group < kGroups) {
    GroupMerge merge[kRows];
    // One row: 8 splits' loads in flight; more rows: a split's loads of every row (unrolling
    // the splits too took the split kernels that hold a fused merge from 96-128 to 144-216
    // registers, and spilled under the narrow bounds).
    constexpr int kUnrollSplits = kRows == 1 ? 8 : 1;
#pragma unroll (kUnrollSplits)
    for (int s = group; s < splits; s += kGroups) {
      const int64_t at = first + static_cast<int64_t>(s) * p.rows;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {  // predicated, not branched: the loads go out together
        const bool row = i < count;
        const float lse = row ? __ldcg(p.partial_lse + at + i) : kNegInf;
        const float4 v = row ? __ldcg(reinterpret_cast<const float4*>(p.partial_out + (at + i) * D) + lane4)
                             : make_float4(0.f, 0.f, 0.f, 0.f);
        merge[i].add_split(lse, v);
      }
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (i >= count) break;
      group_acc[(i * kGroups + group) * kLanesPerRow + lane4] = merge[i].acc;
      if (lane4 == 0) {
        group_max[i * kGroups + group] = merge[i].running_max;
        group_weight[i * kGroups + group] = merge[i].weight_sum;
      }
    }
  }
  __syncthreads();

  for (int item = threadIdx.x; item < count * kLanesPerRow; item += blockDim.x) {
    const int i = item / kLanesPerRow;
    const int lane = item % kLanesPerRow;
    const float* maxes = group_max + i * kGroups;
    float max_all = kNegInf;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) max_all = fmaxf(max_all, maxes[g]);
    const float shift = exp2_shift(max_all);
    float4 total = make_float4(0.f, 0.f, 0.f, 0.f);
    float total_weight = 0.f;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      const float scale = exp2_flush(maxes[g] - shift);  // 0 for a group that saw nothing
      const float4 v = group_acc[(i * kGroups + g) * kLanesPerRow + lane];
      total.x = __fmaf_rn(scale, v.x, total.x);
      total.y = __fmaf_rn(scale, v.y, total.y);
      total.z = __fmaf_rn(scale, v.z, total.z);
      total.w = __fmaf_rn(scale, v.w, total.w);
      total_weight = __fmaf_rn(scale, group_weight[i * kGroups + g], total_weight);
    }
    // Nothing visible: zeros. A NaN (from a NaN query or key) reaches the output, as in SDPA.
    const float inv = total_weight != 0.f ? 1.f / total_weight : 0.f;
    const int b = bh / p.kv_heads, h = bh % p.kv_heads;
    T* out = static_cast<T*>(p.out) + row_offset(p, b, h, first_row + i, D) + lane * 4;
    out[0] = from_float<T>(__fmul_rn(total.x, inv));
    out[1] = from_float<T>(__fmul_rn(total.y, inv));
    out[2] = from_float<T>(__fmul_rn(total.z, inv));
    out[3] = from_float<T>(__fmul_rn(total.w, inv));
  }
  __syncthreads();  // the scratch may be reused
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) combine_kernel(const Params p) {
  wait_for_prior_kernels();  // HIPPO_PDL: see dependent_launch.cuh
  allow_dependent_kernels();
  __shared__ float4 scratch[MergeLayout<D>::float4s(1)];
  const int bh = blockIdx.x / p.rows;
  const int r = blockIdx.x % p.rows;
  const int length = clamped_length(p, bh / p.kv_heads);
  merge_rows<T, D, 1>(p, bh, r, 1, active_splits(p, length), scratch);
}

// Rows a fused merge takes per pass: the 7 or 8 query heads per kv head of common GQA models in
// one pass (kFusedMergeMaxRows in two).
constexpr int kFusedMergeRowsPerPass = 8;

// Fused merge, in a split block once its partial is written: the last of the (batch row, kv
// head)'s active splits to finish merges all of them for every row (at most
// kFusedMergeMaxRows, so one row group). A sequence of length 0 has no active split: its
// first split block writes the zeros a merge would.
template <typename T, int D>
__device__ void merge_if_last(const Params& p, int bh, int length, float4* scratch) {
  const int splits = active_splits(p, length);
  if (splits > 0 && !arrive_last_of(p.semaphores + bh, splits)) return;
  for (int r = 0; r < p.rows; r += kFusedMergeRowsPerPass) {
    merge_rows<T, D, kFusedMergeRowsPerPass>(p, bh, r, min(kFusedMergeRowsPerPass, p.rows - r),
                                             splits, scratch);
  }
  if (splits > 0) release_semaphore(p.semaphores + bh);
}

// ---------------------------------------------------------------------------------------------
// Split kernel, tensor cores
// ---------------------------------------------------------------------------------------------

template <int D, int W, int S>
struct MmaSmem {
  static constexpr int kStride = D + kSmemPad;  // elements per staged key/value row
  static constexpr int kStageElems = 2 * kTileKeys * kStride;  // keys then values
  static constexpr int kStagingBytes = S * kStageElems * 2;    // S pipeline stages
  // Merge area (reuses the staging area after the loop): per warp 16 rows of O, max, sum and
  // weight; per row of the block (at most 4 row tiles), its sum over the warps.
  static constexpr int kMergeBytes = (W * 16 * (D + 3) + 4 * 16) * 4;
  static constexpr int kBytes = kStagingBytes > kMergeBytes ? kStagingBytes : kMergeBytes;
};

// Who copies what of a K/V tile into shared memory: thread t takes the 16-byte piece
// t % kPieceSlots of the key rows t / kPieceSlots + j * kKeysPerPass (j < kPasses), and the same
// of the value rows. A thread's offsets are then fixed for the whole key loop and every copy of a
// tile adds a compile-time constant to them: the generic index loop this replaces spent about a
// hundred integer instructions per tile on divisions and 64-bit addresses. Slots are a power of
// two so that they divide the block; D 80's ten pieces leave six of every sixteen threads idle.
template <int D, int kBlockThreads>
struct TileCopy {
  static constexpr int kPieces = D * 2 / 16;                // 16-byte pieces per key row
  static constexpr int kPieceSlots = kPieces <= 8 ? 8 : 16;
  static constexpr int kKeysPerPass = kBlockThreads / kPieceSlots;
  static constexpr int kPasses = kTileKeys / kKeysPerPass;
  static_assert(kPieces <= kPieceSlots && kBlockThreads % kPieceSlots == 0 &&
                    kTileKeys % kKeysPerPass == 0,
                "every (key row, piece) of a tile is copied by exactly one thread and pass");
};

// Grid (num_splits, B * Hkv, row groups of 64). Warp w of W owns m16 tile w % M of the block's
// rows and key slice w / M of every staged tile (M = 1, 2, 4 row tiles; W / M slices), so decode
// (few rows) still keeps all the warps on the tensor cores. The slices are merged in shared
// memory at the end. W is 8 for M >= 2 (twice the warps per block to hide latency when a block
// is alone on its SM: 2-5% off the 7B and 0.5B verify steps on an H200, 2026-11-27), 4 for M = 1
// or with HIPPO_DECODE_ATTENTION_WARPS=4.
// The body of the two split kernels below, which differ in their launch bounds only.
template <typename T, int D, int M, int W, int S>
__device__ __forceinline__ void split_mma_body(const Params& p) {
  wait_for_prior_kernels();  // HIPPO_PDL: see dependent_launch.cuh
  allow_dependent_kernels();
  static_assert(M == 1 || M == 2 || M == 4, "row tiles per block");
  static_assert(S == 2 || S == 3, "cp.async pipeline stages");
  static_assert(kTileKeys / (W / M) % 16 == 0 && D % 16 == 0,
                "ldmatrix takes n8 tiles in pairs: whole k16 key steps, even n8 head-dim tiles");
  constexpr int kSlices = W / M;
  constexpr int kBlockThreads = W * 32;
  static_assert(MergeLayout<D>::float4s(kFusedMergeRowsPerPass) * 16 <= MmaSmem<D, W, S>::kBytes &&
                    kBlockThreads >= kThreads,
                "a fused merge reuses the staging area as its scratch, with kThreads threads");
  constexpr int kSliceKeys = kTileKeys / kSlices;  // 16, 32 or 64 keys per warp and tile
  constexpr int kKeyTiles = kSliceKeys / 8;        // n8 tiles of S per warp
  constexpr int kDimK = D / 16;                    // k16 steps of Q K^T
  constexpr int kDimN = D / 8;                     // n8 tiles of O
  constexpr int kStride = MmaSmem<D, W, S>::kStride;

  const int split = blockIdx.x;
  const int bh = blockIdx.y;
  const int b = bh / p.kv_heads;
  const int h = bh % p.kv_heads;
  const int length = clamped_length(p, b);
  const int chunk = split_chunk(p, length);
  const int kv_begin = split * chunk;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  if (kv_begin >= length) {  // no merge reads this split
    if (p.semaphores != nullptr && split == 0) {  // length 0: zeros, as the merge would write
      merge_if_last<T, D>(p, bh, length, reinterpret_cast<float4*>(smem_raw));
    }
    return;
  }
  const int kv_end = min(kv_begin + chunk, length);
  const int num_tiles = (kv_end - kv_begin + kTileKeys - 1) / kTileKeys;

  T* staging = reinterpret_cast<T*>(smem_raw);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int tile_row = warp % M;
  const int slice = warp / M;
  const int frag_row = lane / 4;  // fragment row (and key / head-dim column) index
  const int frag_col = lane % 4;  // fragment column pair
  const int row0 = blockIdx.z * kRowsPerBlock + tile_row * 16 + frag_row;  // and row0 + 8

  const T* keys = static_cast<const T*>(p.keys) + static_cast<int64_t>(bh) * p.max_seq * D;
  const T* values = static_cast<const T*>(p.values) + static_cast<int64_t>(bh) * p.max_seq * D;

  // This thread's share of every tile copy (TileCopy): its first key row and piece, in global
  // memory (relative to the head's keys or values) and in a stage of the staging area.
  using Copy = TileCopy<D, kBlockThreads>;
  const int copy_row = threadIdx.x / Copy::kPieceSlots;
  const int copy_piece = threadIdx.x % Copy::kPieceSlots;
  const bool copies = copy_piece < Copy::kPieces;
  const int64_t copy_src = static_cast<int64_t>(kv_begin + copy_row) * D + copy_piece * 8;
  const unsigned copy_dst =
      shared_address(staging) + (copy_row * kStride + copy_piece * 8) * static_cast<int>(sizeof(T));
  constexpr int kStageBytes = MmaSmem<D, W, S>::kStageElems * sizeof(T);
  constexpr int kValuesBytes = kTileKeys * kStride * sizeof(T);  // values follow keys in a stage

  auto load_tile = [&](int tile) {
    if (!copies) return;
    const unsigned dst = copy_dst + (tile % S) * kStageBytes;
    const int64_t src = copy_src + static_cast<int64_t>(tile) * kTileKeys * D;
    // Rows of this thread's passes that hold keys: pass j's row iff j * kKeysPerPass < rows_left.
    const int rows_left = kv_end - kv_begin - tile * kTileKeys - copy_row;
    auto copy_pass = [&](int j, bool valid) {
      // A row past the split's end is zero-filled (nothing is read); it still gets a valid
      // address, the head's first row.
      const int64_t at = valid ? src + j * Copy::kKeysPerPass * D : copy_piece * 8;
      const unsigned row_dst = dst + j * Copy::kKeysPerPass * kStride * sizeof(T);
      cp_async_16(row_dst, keys + at, valid);
      cp_async_16(row_dst + kValuesBytes, values + at, valid);
    };
    if ((tile + 1) * kTileKeys <= kv_end - kv_begin) {  // the whole tile holds keys (uniform)
#pragma unroll
      for (int j = 0; j < Copy::kPasses; ++j) copy_pass(j, true);
    } else {
#pragma unroll
      for (int j = 0; j < Copy::kPasses; ++j) copy_pass(j, j * Copy::kKeysPerPass < rows_left);
    }
  };

  // Start streaming before the (latency-bound) query and mask reads.
  for (int s = 0; s < S - 1; ++s) {
    if (s < num_tiles) load_tile(s);
    cp_async_commit();
  }

  RowVisibility vis[2];
  uint32_t q_frag[kDimK][4];
  {
    const T* q = static_cast<const T*>(p.query);
    const bool valid[2] = {row0 < p.rows, row0 + 8 < p.rows};
    const int64_t offset[2] = {valid[0] ? row_offset(p, b, h, row0, D) : 0,
                               valid[1] ? row_offset(p, b, h, row0 + 8, D) : 0};
    for (int half = 0; half < 2; ++half) vis[half] = row_visibility(p, b, length, row0 + 8 * half);
#pragma unroll
    for (int kd = 0; kd < kDimK; ++kd) {
      const int d = kd * 16 + 2 * frag_col;
      auto word = [&](int half, int dd) -> uint32_t {
        return valid[half] ? *reinterpret_cast<const uint32_t*>(q + offset[half] + dd) : 0u;
      };
      q_frag[kd][0] = word(0, d);
      q_frag[kd][1] = word(1, d);
      q_frag[kd][2] = word(0, d + 8);
      q_frag[kd][3] = word(1, d + 8);
    }
  }

  float running_max[2] = {kNegInf, kNegInf};
  float running_sum[2] = {0.f, 0.f};  // this thread's share; summed over the quad at the end
  float acc[kDimN][4];
#pragma unroll
  for (int n = 0; n < kDimN; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  const int slice_key0 = slice * kSliceKeys;
  for (int tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait<S - 2>();
    __syncthreads();  // tile is visible to all; the stage refilled below is no longer read
    if (tile + S - 1 < num_tiles) load_tile(tile + S - 1);
    cp_async_commit();

    const T* k_smem = staging + (tile % S) * MmaSmem<D, W, S>::kStageElems;
    const T* v_smem = k_smem + kTileKeys * kStride;

    // S = Q K^T for this warp's 16 rows x kSliceKeys keys. One ldmatrix gives the B fragments
    // of two n8 key tiles at one k16 step: matrices (tile n, dims +0), (n, +8), (n+1, +0),
    // (n+1, +8); lane l addresses key row l % 8 of matrix l / 8.
    float score[kKeyTiles][4];
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) score[n][0] = score[n][1] = score[n][2] = score[n][3] = 0.f;
    const int matrix = lane / 8;
    const T* k_lane = k_smem + (slice_key0 + (matrix / 2) * 8 + lane % 8) * kStride + (matrix % 2) * 8;
#pragma unroll
    for (int n = 0; n < kKeyTiles; n += 2) {
#pragma unroll
      for (int kd = 0; kd < kDimK; ++kd) {
        uint32_t b[4];
        ldmatrix_x4<false>(b, k_lane + n * 8 * kStride + kd * 16);
        mma_16816<T>(score[n], q_frag[kd], b[0], b[1]);
        mma_16816<T>(score[n + 1], q_frag[kd], b[2], b[3]);
      }
    }

    // Mask, scale, and the online softmax update (rows frag_row and frag_row + 8). A tile that
    // ends before the query block and inside the split is visible to every row (rows past
    // p.rows too, harmlessly: their q is zero and their results are never written), so only
    // the tiles that meet the block or the split's end pay for the per-element mask.
    const int tile_start = kv_begin + tile * kTileKeys;
    const bool whole_tile_visible = tile_start + kTileKeys <= min(kv_end, length - p.q_len);
    const int pos0 = tile_start + slice_key0 + 2 * frag_col;
    float tile_max[2] = {kNegInf, kNegInf};
    if (whole_tile_visible) {  // uniform across the block
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          score[n][e] *= p.scale_log2;
          tile_max[e / 2] = fmaxf(tile_max[e / 2], score[n][e]);
        }
      }
    } else {
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half = e / 2;
          const bool seen = vis[half].sees(pos0 + n * 8 + (e & 1));
          score[n][e] = seen ? score[n][e] * p.scale_log2 : kNegInf;
          tile_max[half] = fmaxf(tile_max[half], score[n][e]);
        }
      }
    }
    // Lazy rescaling: the running maximum that the weights are taken against moves only when a
    // row of the warp meets a score more than kRescaleSlack above it, so most tiles skip the
    // rescale of the accumulators (kDimN x 4 multiplies per thread, a fifth of a verify tile's
    // instructions). Weights then reach up to 2^kRescaleSlack: no overflow in fp32 sums or in
    // bf16/fp16 P, and the same relative rounding. Any maximum the weights are relative to
    // gives the same softmax, since the split's log-sum-exp is taken against the same one. A
    // row-invariant launch rescales at every tile, because the warp's vote makes a row's
    // rounding depend on the other rows of its warp.
    bool grows = false;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 1));
      tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 2));
      grows |= tile_max[half] > running_max[half] + kRescaleSlack;  // -inf + slack stays -inf
    }
    float rescale[2] = {1.f, 1.f};
    if (p.row_invariant || __any_sync(0xffffffffu, grows)) {  // uniform across the warp
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float new_max = fmaxf(running_max[half], tile_max[half]);
        const float new_shift = exp2_shift(new_max);
        rescale[half] = exp2_flush(running_max[half] - new_shift);    // 0 when max was -inf
        running_max[half] = new_max;
#pragma unroll
        for (int n = 0; n < kDimN; ++n) {
          acc[n][2 * half] *= rescale[half];
          acc[n][2 * half + 1] *= rescale[half];
        }
      }
    }
    float shift[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      // Outside the branch, so that this product still fuses with the sum's first addition
      // below as it did before lazy rescaling (a row-invariant launch keeps its bits).
      running_sum[half] *= rescale[half];
      shift[half] = exp2_shift(running_max[half]);
    }
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        score[n][e] = exp2_flush(score[n][e] - shift[e / 2]);  // masked: exp2(-inf) = 0
        running_sum[e / 2] += score[n][e];
      }
    }

    // O += P V: the S accumulators of two n8 key tiles are the A fragment of one k16 step.
    // One transposed ldmatrix gives the B fragments of two n8 head-dim tiles: matrices
    // (keys +0, dims n), (keys +8, n), (+0, n+1), (+8, n+1).
    const T* v_lane = v_smem + (slice_key0 + (matrix % 2) * 8 + lane % 8) * kStride + (matrix / 2) * 8;
#pragma unroll
    for (int kk = 0; kk < kSliceKeys / 16; ++kk) {
      const uint32_t a[4] = {pack_pair<T>(score[2 * kk][0], score[2 * kk][1]),
                             pack_pair<T>(score[2 * kk][2], score[2 * kk][3]),
                             pack_pair<T>(score[2 * kk + 1][0], score[2 * kk + 1][1]),
                             pack_pair<T>(score[2 * kk + 1][2], score[2 * kk + 1][3])};
#pragma unroll
      for (int n = 0; n < kDimN; n += 2) {
        uint32_t b[4];
        ldmatrix_x4<true>(b, v_lane + kk * 16 * kStride + n * 8);
        mma_16816<T>(acc[n], a, b[0], b[1]);
        mma_16816<T>(acc[n + 1], a, b[2], b[3]);
      }
    }
  }

  // Merge the key slices of each row tile through shared memory, then write the split's result.
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the staging area
  float* merge_acc = reinterpret_cast<float*>(smem_raw);   // [W][16][D]
  float* merge_max = merge_acc + W * 16 * D;               // [W][16]
  float* merge_sum = merge_max + W * 16;                   // [W][16]
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = running_sum[half];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int local_row = frag_row + 8 * half;
    float* dst = merge_acc + (warp * 16 + local_row) * D + 2 * frag_col;
#pragma unroll
    for (int n = 0; n < kDimN; ++n) {
      dst[n * 8] = acc[n][2 * half];
      dst[n * 8 + 1] = acc[n][2 * half + 1];
    }
    if (frag_col == 0) {
      merge_max[warp * 16 + local_row] = running_max[half];
      merge_sum[warp * 16 + local_row] = sum;
    }
  }
  __syncthreads();

  // Each row's slice weights exp2(slice max - row max), its sum and its log-sum-exp, once per
  // row (one thread each), so the loop over the row's D elements below only multiplies and
  // adds: it had recomputed the row's maximum and kSlices exponentials for every element.
  float* merge_weight = merge_sum + W * 16;  // [W][16]
  float* row_sum = merge_weight + W * 16;    // [M * 16]
  const int64_t split_base = static_cast<int64_t>(bh) * p.num_splits + split;
  if (threadIdx.x < M * 16) {
    const int t = threadIdx.x / 16, rr = threadIdx.x % 16;
    float max_score = kNegInf;
#pragma unroll
    for (int s = 0; s < kSlices; ++s) max_score = fmaxf(max_score, merge_max[(s * M + t) * 16 + rr]);
    const float shift = exp2_shift(max_score);
    float sum = 0.f;
#pragma unroll
    for (int s = 0; s < kSlices; ++s) {
      const int w = s * M + t;
      const float weight = exp2f(merge_max[w * 16 + rr] - shift);
      merge_weight[w * 16 + rr] = weight;
      sum += merge_sum[w * 16 + rr] * weight;
    }
    row_sum[threadIdx.x] = sum;
    const int r = blockIdx.z * kRowsPerBlock + threadIdx.x;
    if (r < p.rows) p.partial_lse[split_base * p.rows + r] = split_lse(max_score, sum);
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < M * 16 * D; idx += kBlockThreads) {
    const int local = idx / D;  // row within the block: tile local / 16, row local % 16
    const int d = idx % D;
    const int r = blockIdx.z * kRowsPerBlock + local;
    if (r >= p.rows) continue;
    const int t = local / 16;
    const int rr = local % 16;
    float value = 0.f;
#pragma unroll
    for (int s = 0; s < kSlices; ++s) {
      const int w = s * M + t;
      value += merge_acc[(w * 16 + rr) * D + d] * merge_weight[w * 16 + rr];
    }
    const float sum = row_sum[local];
    p.partial_out[(split_base * p.rows + r) * D + d] = sum != 0.f ? value / sum : 0.f;
  }
  if (p.semaphores != nullptr) {  // fused merge; arrive_last_of waits for the merge-area reads
    merge_if_last<T, D>(p, bh, length, reinterpret_cast<float4*>(smem_raw));
  }
}

template <typename T, int D, int M, int W, int S>
__global__ void __launch_bounds__(W * 32) split_kernel_mma(const Params p) {
  split_mma_body<T, D, M, W, S>(p);
}

// The same kernel with the whole register file open to one block per SM (the default;
// HIPPO_DECODE_ATTENTION_WIDE_REGISTERS=0 launches the one above). ptxas then interleaves
// every S accumulator of a key tile and issues ldmatrix four steps ahead, where the default
// bounds (169 registers at D 128) leave the last key tiles' fragments queued through one
// register buffer; 253 registers at D 128, and no spill for D 80 with eight warps. The balanced
// plan runs one block per SM, so occupancy is unchanged (the fixed plan's two 4-warp blocks still
// fit); results are bitwise the same (register allocation changes no arithmetic). Measured on an
// H200 (2026-11-27, eight-warp verify blocks): 7B verify at 12.6k 23.6 us against 24.6, at 6.4k
// 20.3 against 22.0; decode steps unchanged (15.2 / 15.4 us, 0.5B 6.1 / 6.1 us).
template <typename T, int D, int M, int W>
__global__ void __launch_bounds__(W * 32, 1) split_kernel_mma_wide(const Params p) {
  split_mma_body<T, D, M, W, kStages>(p);
}

// ---------------------------------------------------------------------------------------------
// Split kernel, plain FMAs (one warp per query row)
// ---------------------------------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) split_kernel_simple(const Params p) {
  wait_for_prior_kernels();  // HIPPO_PDL: see dependent_launch.cuh
  allow_dependent_kernels();
  constexpr int kPerLane = (D + 31) / 32;
  const int split = blockIdx.x;
  const int bh = blockIdx.y;
  const int r = blockIdx.z * kSimpleRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int b = bh / p.kv_heads;
  const int h = bh % p.kv_heads;
  const int length = clamped_length(p, b);
  const int chunk = split_chunk(p, length);
  const int kv_begin = split * chunk;
  if (r >= p.rows || kv_begin >= length) return;
  const int kv_end = min(kv_begin + chunk, length);
  const RowVisibility vis = row_visibility(p, b, length, r);

  const T* q = static_cast<const T*>(p.query) + row_offset(p, b, h, r, D);
  const T* keys = static_cast<const T*>(p.keys) + static_cast<int64_t>(bh) * p.max_seq * D;
  const T* values = static_cast<const T*>(p.values) + static_cast<int64_t>(bh) * p.max_seq * D;
  float q_reg[kPerLane], acc[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int d = lane + 32 * k;
    q_reg[k] = d < D ? to_float(q[d]) : 0.f;
    acc[k] = 0.f;
  }
  float running_max = kNegInf, running_sum = 0.f;
  for (int pos = kv_begin; pos < kv_end; ++pos) {
    if (!vis.sees(pos)) continue;  // uniform across the warp
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int d = lane + 32 * k;
      if (d < D) dot += q_reg[k] * to_float(keys[static_cast<int64_t>(pos) * D + d]);
    }
    const float score = warp_sum(dot) * p.scale_log2;
    const float new_max = fmaxf(running_max, score);
    // Against exp2_shift(new_max), as in the MMA kernel: a visible key whose score is -inf (an
    // infinite query or key element) weighs 0 as on the CPU, even as the split's first key,
    // where exp2(-inf - -inf) would be NaN and spoil the row.
    const float shift = exp2_shift(new_max);
    const float rescale = exp2f(running_max - shift);
    const float weight = exp2f(score - shift);
    running_max = new_max;
    running_sum = running_sum * rescale + weight;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int d = lane + 32 * k;
      const float v = d < D ? to_float(values[static_cast<int64_t>(pos) * D + d]) : 0.f;
      acc[k] = acc[k] * rescale + weight * v;
    }
  }
  const int64_t out_row = (static_cast<int64_t>(bh) * p.num_splits + split) * p.rows + r;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int d = lane + 32 * k;
    if (d < D) p.partial_out[out_row * D + d] = running_sum != 0.f ? acc[k] / running_sum : 0.f;
  }
  if (lane == 0) p.partial_lse[out_row] = split_lse(running_max, running_sum);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------




int64_t whole_tiles(int64_t keys) { return ceil_div(keys, kTileKeys) * kTileKeys; }

struct SplitPlan {
  int64_t chunk;       // keys per split; balanced: the least keys per split
  int64_t num_splits;  // splits in the grid
  bool balanced;       // chunk derived from length[b] on the device (split_chunk)
};

// How one sequence is cut across thread blocks: enough splits that a full split's blocks fill
// the GPU about HIPPO_DECODE_ATTENTION_BLOCKS_PER_SM times over, but never so few keys per split
// that the fp32 partials outweigh the KV they replace.
//   * Balanced (the default): the actual length is cut, on the device, over one block per SM.
//   * Fixed (row_invariant, or HIPPO_DECODE_ATTENTION_BALANCED=0): S_max is cut over two blocks
//     per SM, so a row meets the same split boundaries at every length.
// Measured on an H200 (benchmarks/RESULTS.md, 2026-11-26): balanced at one block per SM was the
// fastest of the plans tried at every benchmark shape but one, within 1.2%; fixed plans leave
// blocks idle whenever the length is well under S_max. HIPPO_DECODE_ATTENTION_CHUNK=<keys>
// forces a fixed split length (tuning sweeps).
SplitPlan plan_splits(int64_t max_seq, int64_t blocks_per_split, int64_t rows, int64_t sm_count,
                      bool row_invariant) {
  // A forced length beyond the cache is one split of it (the kernel's chunk is an int).
  const int64_t forced = std::min(env_int("HIPPO_DECODE_ATTENTION_CHUNK", 0), whole_tiles(max_seq));
  if (forced > 0) return {whole_tiles(forced), ceil_div(max_seq, whole_tiles(forced)), false};
  const bool balanced = !row_invariant && env_flag("HIPPO_DECODE_ATTENTION_BALANCED", true);
  const int64_t blocks_per_sm = env_int("HIPPO_DECODE_ATTENTION_BLOCKS_PER_SM", balanced ? 1 : 2);
  const int64_t target_splits =
      std::max<int64_t>(1, ceil_div(blocks_per_sm * sm_count, blocks_per_split));
  const int64_t block_rows = std::min<int64_t>(rows, kRowsPerBlock);
  if (balanced) {
    const int64_t least = whole_tiles(2 * block_rows);
    return {least, std::min(target_splits, ceil_div(max_seq, least)), true};
  }
  const int64_t chunk = whole_tiles(std::max(ceil_div(max_seq, target_splits), 4 * block_rows));
  return {chunk, ceil_div(max_seq, chunk), false};
}

template <typename T, int D, int M, int W, int S>
void launch_split_kernel(const Params& p, dim3 grid, bool wide, cudaStream_t stream) {
  auto kernel = split_kernel_mma<T, D, M, W, S>;
  if constexpr (S == kStages) {
    if (wide) kernel = split_kernel_mma_wide<T, D, M, W>;
  }
  constexpr int kBytes = MmaSmem<D, W, S>::kBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes));
  launch_kernel(kernel, grid, dim3(W * 32), kBytes, stream, p);
}

// The shared memory a block may opt into on every GPU the build runs on: 99 KB on compute
// capability 8.6 and 8.9 (A10, A40, L4, L40, GeForce 30/40), which run the sm_80 build.
constexpr int kLeastOptinSharedBytes = 101376;

// Three cp.async stages where a block may take their shared memory; two where it may not. Only
// head dim 128 can be short (three stages 104,448 bytes, two 69,632; D 64 and 80 take 55,296 and
// 67,584), so only its kernels have a two-stage instantiation. HIPPO_DECODE_ATTENTION_STAGES=2
// forces them (tests, and timing the cost on cards that have the room). The two-stage kernel runs
// under the default register bounds only: the wide bounds serve one block per SM on Hopper,
// which has the room for three stages.
template <typename T, int D, int M, int W>
void launch_mma(const Params& p, dim3 grid, cudaStream_t stream) {
  const bool wide = env_flag("HIPPO_DECODE_ATTENTION_WIDE_REGISTERS", true);
  if constexpr (MmaSmem<D, W, kStages>::kBytes > kLeastOptinSharedBytes) {
    const int64_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    constexpr int kTwoStageBytes = MmaSmem<D, W, 2>::kBytes;
    const bool three_fit = MmaSmem<D, W, kStages>::kBytes <= optin;
    if (!three_fit || env_int("HIPPO_DECODE_ATTENTION_STAGES", kStages) == 2) {
      HIPPO_CHECK(kTwoStageBytes <= optin, kDecodeAttentionOp, "head dim ", D, " needs ",
                  kTwoStageBytes, " bytes of shared memory per block; this GPU allows ", optin);
      return launch_split_kernel<T, D, M, W, 2>(p, grid, /*wide=*/false, stream);
    }
  }
  launch_split_kernel<T, D, M, W, kStages>(p, grid, wide, stream);
}

template <typename T, int D>
void launch(const Params& p, bool simple, cudaStream_t stream) {
  const int bh = p.batch * p.kv_heads;
  if (simple) {
    const dim3 grid(p.num_splits, bh, ceil_div(p.rows, kSimpleRowsPerBlock));
    launch_kernel(split_kernel_simple<T, D>, grid, dim3(kThreads), 0, stream, p);
  } else {
    const dim3 grid(p.num_splits, bh, ceil_div(p.rows, kRowsPerBlock));
    // Fewer rows run fewer row tiles, each warp then taking a slice of every key tile; the
    // row-invariant layout keeps 4 tiles (and the same warps per tile) whatever the row count,
    // so a row's sums run in the same order in a decode step and in a verify step.
    const int row_tiles =
        p.row_invariant ? 4 : static_cast<int>(ceil_div(std::min(p.rows, kRowsPerBlock), 16));
    // Eight warps need slices of at least 16 keys: two or more row tiles (M = 1 keeps four).
    const bool eight_warps = env_int("HIPPO_DECODE_ATTENTION_WARPS", 8) == 8;
    if (row_tiles == 1) launch_mma<T, D, 1, kWarps>(p, grid, stream);
    else if (row_tiles == 2 && eight_warps) launch_mma<T, D, 2, 8>(p, grid, stream);
    else if (row_tiles == 2) launch_mma<T, D, 2, kWarps>(p, grid, stream);
    else if (eight_warps) launch_mma<T, D, 4, 8>(p, grid, stream);
    else launch_mma<T, D, 4, kWarps>(p, grid, stream);
  }
  if (p.semaphores == nullptr) {
    launch_kernel(combine_kernel<T, D>, dim3(bh * p.rows), dim3(kThreads), 0, stream, p);
  }
}

template <typename T>
void launch_for_head_dim(const Params& p, int64_t head_dim, bool simple, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return launch<T, 64>(p, simple, stream);
    case 80: return launch<T, 80>(p, simple, stream);
    case 128: return launch<T, 128>(p, simple, stream);
    default: TORCH_CHECK(false, kDecodeAttentionOp, ": unsupported head dim ", head_dim);
  }
}

at::Tensor decode_attention_cuda(const at::Tensor& query_in, const at::Tensor& cache,
                                 int64_t layer, const at::Tensor& length, double scale,
                                 const std::optional<at::Tensor>& tree_mask, bool row_invariant,
                                 const std::optional<at::Tensor>& workspace) {
  const DecodeAttentionShape s =
      check_decode_attention_inputs(query_in, cache, layer, length, scale, tree_mask);
  check_decode_attention_workspace(workspace, cache, s);
  check_decode_attention_cuda_support(query_in, s);
  const c10::cuda::CUDAGuard guard(cache.device());

  // 32-bit query fragment loads and 16-byte cp.async copies need aligned bases.
  HIPPO_CHECK(reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 == 0, kDecodeAttentionOp,
              "cache must start at a 16-byte aligned address on CUDA");
  at::Tensor query = query_in.contiguous();
  if (reinterpret_cast<uintptr_t>(query.data_ptr()) % 16 != 0) query = query.clone();
  const at::Tensor mask = s.has_mask ? tree_mask->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(query, at::MemoryFormat::Contiguous);
  if (s.batch == 0) return out;  // no block to launch (and no grid of zero blocks may launch)

  const int64_t rows = s.rows_per_kv_head();
  const int64_t sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Row-invariant: the split length is the one a full 64-row block gets, whatever the row count,
  // so a row sees the same splits, tiles and key order in a decode and in a verify step.
  const int64_t row_groups = row_invariant ? 1 : ceil_div(rows, kRowsPerBlock);
  const int64_t blocks_per_split = s.batch * s.kv_heads * row_groups;
  const SplitPlan plan = plan_splits(s.max_seq, blocks_per_split,
                                     row_invariant ? kRowsPerBlock : rows, sm_count, row_invariant);
  const int64_t num_splits = plan.num_splits;
  const auto f32 = query.options().dtype(at::kFloat);
  at::Tensor partial_out = at::empty({s.batch * s.kv_heads, num_splits, rows, s.head_dim}, f32);
  at::Tensor partial_lse = at::empty({s.batch * s.kv_heads, num_splits, rows}, f32);

  const int64_t layer_stride = 2 * s.batch * s.kv_heads * s.max_seq * s.head_dim;
  Params p;
  p.query = query.data_ptr();
  p.keys = static_cast<const char*>(cache.data_ptr()) + layer * layer_stride * cache.element_size();
  p.values = static_cast<const char*>(p.keys) + layer_stride / 2 * cache.element_size();
  p.length = length.data_ptr();
  p.length_is_64 = length.scalar_type() == at::kLong;
  p.tree_mask = s.has_mask ? mask.data_ptr<bool>() : nullptr;
  p.mask_batch_stride = s.mask_per_batch ? s.q_len * s.q_len : 0;
  p.partial_out = partial_out.data_ptr<float>();
  p.partial_lse = partial_lse.data_ptr<float>();
  p.out = out.data_ptr();
  p.batch = static_cast<int>(s.batch);
  p.q_len = static_cast<int>(s.q_len);
  p.q_heads = static_cast<int>(s.q_heads);
  p.kv_heads = static_cast<int>(s.kv_heads);
  p.group = static_cast<int>(s.group());
  p.rows = static_cast<int>(rows);
  p.max_seq = static_cast<int>(s.max_seq);
  p.chunk = static_cast<int>(plan.chunk);
  p.num_splits = static_cast<int>(num_splits);
  p.balanced = plan.balanced;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  const bool simple = env_flag("HIPPO_DECODE_ATTENTION_SIMPLE") && !row_invariant;
  p.row_invariant = row_invariant;
  const bool fused_merge = workspace.has_value() && !simple && rows <= kFusedMergeMaxRows &&
                           env_flag("HIPPO_DECODE_ATTENTION_FUSED_MERGE");
  p.semaphores = fused_merge ? workspace->data_ptr<int>() : nullptr;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (query.scalar_type() == at::kBFloat16) {
    launch_for_head_dim<__nv_bfloat16>(p, s.head_dim, simple, stream);
  } else {
    launch_for_head_dim<__half>(p, s.head_dim, simple, stream);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CUDA, m) {
  m.impl("decode_attention", &decode_attention_cuda);
}

}  // namespace hippo
