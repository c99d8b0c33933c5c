// 16-byte vectors of float, half or bfloat16: what one lane loads with one instruction, and the float32
// arithmetic the kernels do on them (the same arithmetic as torch's: products and sums in float32).
// Lanes are copied in and out with memcpy, not reinterpret_cast: type punning through a pointer breaks
// C++'s aliasing rules, which the CPU build of the tests showed (the copies compile to register moves).
#pragma once

#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace recops {

template <typename scalar_t>
struct Vector16;

template <>
struct Vector16<float> {
  static constexpr int kElements = 4;

  __device__ __forceinline__ static void to_floats(const uint4& a, float* out) { memcpy(out, &a, sizeof(a)); }

  // x: a vector already in float (converted once per item row), y: a stored vector.
  __device__ __forceinline__ static float dot_floats(const float* x, const uint4& b) {
    float y[kElements];
    memcpy(y, &b, sizeof(y));
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kElements; ++i) sum = fmaf(x[i], y[i], sum);
    return sum;
  }

  __device__ __forceinline__ static uint4 multiply(const uint4& a, const uint4& b) {
    float x[kElements], y[kElements], z[kElements];
    memcpy(x, &a, sizeof(x));
    memcpy(y, &b, sizeof(y));
#pragma unroll
    for (int i = 0; i < kElements; ++i) z[i] = __fmul_rn(x[i], y[i]);
    uint4 out;
    memcpy(&out, z, sizeof(z));
    return out;
  }
};

// Half and bfloat16 share the code: two values per 32-bit word, converted to float2 and back.
template <typename Pair>
struct PairVector16 {
  using pair_t = typename Pair::type;
  static constexpr int kElements = 8;

  __device__ __forceinline__ static void to_floats(const uint4& a, float* out) {
    pair_t x[kElements / 2];
    memcpy(x, &a, sizeof(x));
#pragma unroll
    for (int i = 0; i < kElements / 2; ++i) {
      const float2 p = Pair::to_float2(x[i]);
      out[2 * i] = p.x;
      out[2 * i + 1] = p.y;
    }
  }

  // x: a vector already in float (converted once per item row), y: a stored vector.
  __device__ __forceinline__ static float dot_floats(const float* x, const uint4& b) {
    pair_t y[kElements / 2];
    memcpy(y, &b, sizeof(y));
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kElements / 2; ++i) {
      const float2 q = Pair::to_float2(y[i]);
      sum = fmaf(x[2 * i], q.x, sum);
      sum = fmaf(x[2 * i + 1], q.y, sum);
    }
    return sum;
  }

  // The product of two halves (or two bfloat16) is exact in float32, so rounding it once to the storage
  // type gives what torch's element-wise multiply gives, bit for bit.
  __device__ __forceinline__ static uint4 multiply(const uint4& a, const uint4& b) {
    pair_t x[kElements / 2], y[kElements / 2], z[kElements / 2];
    memcpy(x, &a, sizeof(x));
    memcpy(y, &b, sizeof(y));
#pragma unroll
    for (int i = 0; i < kElements / 2; ++i) {
      const float2 p = Pair::to_float2(x[i]);
      const float2 q = Pair::to_float2(y[i]);
      z[i] = Pair::from_float2(make_float2(__fmul_rn(p.x, q.x), __fmul_rn(p.y, q.y)));
    }
    uint4 out;
    memcpy(&out, z, sizeof(z));
    return out;
  }
};

struct HalfPair {
  using type = __half2;
  __device__ __forceinline__ static float2 to_float2(type value) { return __half22float2(value); }
  __device__ __forceinline__ static type from_float2(float2 value) { return __float22half2_rn(value); }
};

struct BFloat16Pair {
  using type = __nv_bfloat162;
  __device__ __forceinline__ static float2 to_float2(type value) { return __bfloat1622float2(value); }
  __device__ __forceinline__ static type from_float2(float2 value) { return __float22bfloat162_rn(value); }
};

template <>
struct Vector16<c10::Half> : PairVector16<HalfPair> {};

template <>
struct Vector16<c10::BFloat16> : PairVector16<BFloat16Pair> {};

}  // namespace recops
