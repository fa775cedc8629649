// Reductions across the 32 lanes of a warp by a butterfly of xor shuffles (every lane gets the
// result, and the order of the additions is the same in every kernel that uses them), and
// across a block.
#pragma once

namespace hippo {

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Sum of `value` over the block; every thread gets the result. blockDim.x is a multiple of 32
// (at most 1024). A caller that sums again must __syncthreads() first: the partials' shared
// array is reused.
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sums[32];
  value = warp_sum(value);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += warp_sums[w];
  return total;
}

}  // namespace hippo
