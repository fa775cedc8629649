// Programmatic dependent launch (Hopper and later; on by default, HIPPO_PDL=0 turns it off).
//
// Between two small kernels of a decode step the GPU otherwise drains the first grid before it
// starts the second, so each boundary pays the second kernel's launch and block start-up. A
// kernel started through launch_kernel() with PDL on may be scheduled while the kernel before it
// in the stream is still running (CUDA graphs keep this as a programmatic edge). Its contract:
//   * wait_for_prior_kernels() before any global memory access: it returns once the previous
//     kernel has finished and its writes are visible (at once when the launch had no PDL);
//   * allow_dependent_kernels() marks the point from which the next kernel may be scheduled.
// Every kernel launched through launch_kernel() calls both first thing, so the overlap is the
// launch itself, never data; skinny_linear's FMA kernel alone issues its first weight loads
// and reads its bias before it waits (weights and biases are never written during a step, and
// with PDL on neither may be written by the kernel just before its GEMM). Since every kernel
// allows its dependents only after its own wait, at most the one kernel before can still run
// beside those loads. The step-path kernels (norms, rotary, activation, attention, skinny GEMMs)
// launch this way. On by default since it measured 1-3% off the decode steps (H200,
// 2026-11-27, benchmarks/RESULTS.md) with the same bits (a CUDA test).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <utility>

#include "cuda/tuning_env.h"

namespace hippo {

__device__ __forceinline__ void wait_for_prior_kernels() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_kernels() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// On a GPU of compute capability 9.0 or later, unless HIPPO_PDL=0.
inline bool dependent_launch_enabled() {
  return env_flag("HIPPO_PDL", true) && at::cuda::getCurrentDeviceProperties()->major >= 9;
}

// Whether `kernel` runs code compiled for compute capability 9.0 or later, the only code in which
// wait_for_prior_kernels() waits: a kernel JIT-compiled from older PTX (an "8.0+PTX" build on a
// Hopper GPU) would read its predecessor's output before it is written.
template <typename... Params>
bool waits_for_prior_kernels(void (*kernel)(Params...)) {
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  return attributes.ptxVersion >= 90;
}

// kernel<<<grid, block, smem, stream>>>(args...), with the programmatic-serialization attribute
// when dependent_launch_enabled() and the kernel waits for it; errors are raised as c10 errors.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  if (dependent_launch_enabled() && waits_for_prior_kernels(kernel)) {
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace hippo
