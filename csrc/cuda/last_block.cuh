// The last-block pattern: several thread blocks each publish a partial result to global memory,
// and the block that finishes last (counted on a semaphore in a caller-owned, zeroed workspace)
// combines them in the same launch. This saves the second kernel launch a separate combine step
// would cost, and stays deterministic and CUDA-graph safe: the last block resets the semaphore
// for the next call or graph replay. Used by skinny_linear (split-K sums) and decode_attention
// (the merge of its KV splits).
#pragma once

namespace hippo {

// Called by every thread of a block once its partial is written. Returns true in the block
// that arrives as number `expected` (the last of the group); that block may then read every
// partial of the group, through L2 (__ldcg: another SM's writes are not in this SM's L1).
__device__ __forceinline__ bool arrive_last_of(int* semaphore, int expected) {
  __shared__ bool last;
  __threadfence();  // this block's partials are visible device-wide before it signals
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(semaphore, 1) == expected - 1;
  __syncthreads();
  if (last) __threadfence();  // and the others' partials are visible before it reads them
  return last;
}

// The last block, once it has read every partial: the semaphore is zero again.
__device__ __forceinline__ void release_semaphore(int* semaphore) {
  if (threadIdx.x == 0) *semaphore = 0;
}

}  // namespace hippo
