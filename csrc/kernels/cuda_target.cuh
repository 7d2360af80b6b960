// The three compilers of segloss's CUDA kernels, and the few names that differ between them.
// Included by the device code (csrc/kernels/*_device.cuh) and the framework-free launchers
// (csrc/cuda/*.h) in place of <cuda_runtime.h>:
//
//   nvcc                      __CUDACC__       the GPU build (torch extension, `nvcc -c csrc/cuda/*.cu`)
//   NVRTC                     __CUDACC_RTC__   the CuPy backend (device code only, no host headers)
//   g++ + HIP CPU Runtime     SEGLOSS_HIP_CPU  the emulated build of the tests: the same kernels and
//                                              launchers executed on the CPU, each block's threads
//                                              as fibers (tests/kernels/test_emulated_cuda.py)
//
// It defines
//   SEGLOSS_DEVICE_CODE              1 where __global__ kernels compile (the three targets above)
//   SEGLOSS_LOW_PRECISION            1 where __half and __nv_bfloat16 are the CUDA types (nvcc, NVRTC)
//   SEGLOSS_DYNAMIC_SHARED(T, name)  `extern __shared__ T name[]`, the block's dynamic shared memory
//   segloss::launch(kernel, grid, block, shared_bytes, stream, args...)
//                                    (host side) the one way every launcher starts a kernel; returns
//                                    cudaGetLastError()
//
// On the emulated target the CUDA runtime names the launchers use are mapped onto the HIP CPU
// Runtime's, `__shfl_down_sync` onto its `__shfl_down` (a shuffle of the whole wavefront, so the
// lane mask must be full), and `min`/`max` are visible as in device code. Its wavefronts have
// warpSize = 64 lanes: kernels read `warpSize`, never 32. The float16/bfloat16 instantiations are
// excluded there (SEGLOSS_LOW_PRECISION is 0 and the launchers return cudaErrorInvalidValue for
// them): the runtime has a software __half but no __nv_bfloat16, and the only code specific to them
// is the conversion to and from the float accumulator (to_acc/from_acc, one CUDA intrinsic each), so
// an emulation would test a stand-in, not the kernels; their indexing and reductions are the
// float32 instantiation's. Math functions differ too: device code on nvcc/NVRTC calls expf/logf
// (__CUDA_ARCH__), the emulated build the host polynomials of common.cuh (a few ulp apart).
#pragma once

#if defined(SEGLOSS_HIP_CPU)

#include <hip/hip_runtime.h>

#include <algorithm>
#include <cstddef>
#include <memory>
#include <tuple>

// The runtime marks __global__ and __device__ functions __attribute__((simd)) (and kernels
// `flatten`): a speed hint that makes g++ emit vector clones of every kernel and device function
// for several ISAs. Dropped here: the meaning is the same and the build takes half the time.
#undef __global__
#define __global__
#undef __device__
#define __device__

#define SEGLOSS_DEVICE_CODE 1
#define SEGLOSS_LOW_PRECISION 0
#define SEGLOSS_DYNAMIC_SHARED(T, name) HIP_DYNAMIC_SHARED(T, name)

using cudaError_t = hipError_t;
using cudaStream_t = hipStream_t;
constexpr cudaError_t cudaSuccess = hipSuccess;
constexpr cudaError_t cudaErrorInvalidValue = hipErrorInvalidValue;
constexpr cudaError_t cudaErrorInvalidConfiguration = hipErrorInvalidConfiguration;

inline cudaError_t cudaGetLastError() noexcept { return hipGetLastError(); }
inline const char* cudaGetErrorString(cudaError_t error) noexcept { return hipGetErrorString(error); }
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream) {
  return hipMemsetAsync(ptr, value, bytes, stream);
}
inline cudaError_t cudaDeviceSynchronize() { return hipDeviceSynchronize(); }

// HIP shuffles take no lane mask: every lane of the wavefront takes part, as with a full CUDA mask.
template <typename T>
inline T __shfl_down_sync(unsigned /*full mask*/, T value, unsigned delta, int width = warpSize) noexcept {
  return __shfl_down(value, delta, width);
}

using std::max;
using std::min;

#elif defined(__CUDACC_RTC__)

#define SEGLOSS_DEVICE_CODE 1
#define SEGLOSS_LOW_PRECISION 1
#define SEGLOSS_DYNAMIC_SHARED(T, name) extern __shared__ T name[]

#else  // nvcc, or a host compiler with the CUDA toolkit (the torch CUDA glue)

#include <cuda_runtime.h>

#if defined(__CUDACC__)
#define SEGLOSS_DEVICE_CODE 1
#define SEGLOSS_LOW_PRECISION 1
#define SEGLOSS_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

#endif

#if SEGLOSS_LOW_PRECISION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#if defined(SEGLOSS_HIP_CPU)
namespace segloss {
namespace emulated {

// The HIP CPU Runtime instantiates its whole launch machinery (TBB tasks, fibers) for each kernel
// type, about ten seconds of g++ each; so every launch goes through one kernel, `trampoline`, which
// each thread of the block enters to call the real kernel with the real arguments. The closure
// is shared by the (asynchronous) launch until its last thread is done.
using Invoke = void (*)(const void* closure);

inline void trampoline(Invoke invoke, const std::shared_ptr<const void>& closure) { invoke(closure.get()); }

template <typename... Params>
struct Closure {
  void (*kernel)(Params...);
  std::tuple<Params...> args;
  static void invoke(const void* self) {
    const Closure* c = static_cast<const Closure*>(self);
    std::apply(c->kernel, c->args);
  }
};

inline void launch_closure(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, Invoke invoke,
                           std::shared_ptr<const void> closure) {
  hipLaunchKernelGGL(trampoline, grid, block, shared_bytes, stream, invoke, closure);
}

}  // namespace emulated
}  // namespace segloss
#endif

#if defined(SEGLOSS_HIP_CPU) || (defined(__CUDACC__) && !defined(__CUDACC_RTC__))
namespace segloss {

// kernel<<<grid, block, shared_bytes, stream>>>(args...) on every target; the arguments are
// converted to the kernel's parameter types first (as a launch does).
template <typename... Params, typename... Args>
inline cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                          cudaStream_t stream, Args... args) {
#if defined(SEGLOSS_HIP_CPU)
  using Closure = emulated::Closure<Params...>;
  emulated::launch_closure(grid, block, shared_bytes, stream, &Closure::invoke,
                           std::make_shared<const Closure>(Closure{kernel, {static_cast<Params>(args)...}}));
#else
  kernel<<<grid, block, shared_bytes, stream>>>(static_cast<Params>(args)...);
#endif
  return cudaGetLastError();
}

}  // namespace segloss
#endif
