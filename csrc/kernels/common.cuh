// segloss shared kernel helpers: compile under g++ (CPU), nvcc (CUDA) and NVRTC (CuPy).
// Framework-free: no ATen, no torch, no host-only headers under NVRTC.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define SEGLOSS_HD __host__ __device__ __forceinline__
#define SEGLOSS_DEVICE __device__ __forceinline__
#else
#define SEGLOSS_HD inline
#define SEGLOSS_DEVICE inline
#endif

#ifndef __CUDACC_RTC__
#include <cmath>
#include <cstdint>
#include <cstring>
#else
typedef long long int64_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef unsigned char uint8_t;
#endif

namespace segloss {

// Accumulation type: float for float/half/bfloat16 inputs, double for double.
template <typename T>
struct AccType {
  typedef float type;
};
template <>
struct AccType<double> {
  typedef double type;
};

SEGLOSS_HD float bit_cast_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float out;
  memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

SEGLOSS_HD uint32_t bit_cast_uint(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t out;
  memcpy(&out, &value, sizeof(out));
  return out;
#endif
}

// exp for float, branch-free so loops over it vectorise on the CPU (Cephes expf polynomial,
// about 2 ulp). NaN stays NaN; overflow clamps to exp(88.7); underflow to ~1e-38, not 0.
SEGLOSS_HD float seg_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float hi = 88.7f;
  const float lo = -87.3f;
  x = x > hi ? hi : x;  // comparisons (not fminf/fmaxf) keep NaN
  x = x < lo ? lo : x;
  // round to nearest with the 1.5·2^23 trick: plain adds, so it vectorises on any x86-64
  const float magic = 12582912.0f;
  float k = (x * 1.44269504088896341f + magic) - magic;
  float r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  int32_t ki = static_cast<int32_t>(k);
  float scale = bit_cast_float(static_cast<uint32_t>(ki + 127) << 23);
  return p * scale;
#endif
}

SEGLOSS_HD double seg_exp(double x) { return exp(x); }

// log for float (Cephes logf polynomial, about 2 ulp), branch-free so it vectorises on the CPU.
// Denormals are rescaled; 0 → −inf, negative or NaN → NaN, inf → inf.
SEGLOSS_HD float seg_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  // every conditional is a select between floats, so the compiler if-converts and vectorises
  const bool tiny = x < 1.17549435e-38f;
  const float scaled = tiny ? x * 8388608.0f : x;  // 2^23
  const uint32_t bits = bit_cast_uint(scaled);
  float ef = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127);  // sign bit of x >= 0 handled below
  ef = ef - (tiny ? 23.0f : 0.0f);
  float m = bit_cast_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  ef = ef + (big ? 1.0f : 0.0f);
  const float f = m - 1.0f;
  const float f2 = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = p * f * f2;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * f2;
  float result = f + y + ef * 0.693359375f;
  const float inf = bit_cast_float(0x7f800000u);
  const float nan = bit_cast_float(0x7fc00000u);
  result = x == 0.0f ? -inf : result;
  result = x == inf ? inf : result;
  result = (x < 0.0f) | (x != x) ? nan : result;
  return result;
#endif
}

SEGLOSS_HD double seg_log(double x) { return log(x); }

template <typename A>
SEGLOSS_HD A seg_sign(A x) {
  return x > A(0) ? A(1) : (x < A(0) ? A(-1) : A(0));
}

}  // namespace segloss
