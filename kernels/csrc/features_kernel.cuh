// The feature-assembly kernel's device code (features.cu launches it); a header so that the tests can also
// compile it for the CPU (kernels/tests/cpu_emulation.h).
#pragma once

#include <cstdint>

#include "vectors.cuh"

namespace recops {
namespace features {

constexpr int kThreads = 256;

// One element as a "vector": the fallback for narrow or unaligned rows.
template <typename scalar_t>
struct Scalar {
  using type = scalar_t;
  __device__ __forceinline__ static scalar_t multiply(scalar_t a, scalar_t b) {
    return static_cast<scalar_t>(static_cast<float>(a) * static_cast<float>(b));
  }
};

template <typename scalar_t>
struct Wide {
  using type = uint4;
  __device__ __forceinline__ static uint4 multiply(const uint4& a, const uint4& b) {
    return Vector16<scalar_t>::multiply(a, b);
  }
};

template <typename scalar_t, typename Access>
__global__ void __launch_bounds__(kThreads)
    head_features_kernel(const scalar_t* __restrict__ users, const scalar_t* __restrict__ items,
                         const int64_t* __restrict__ user_rows, const int64_t* __restrict__ item_rows,
                         scalar_t* __restrict__ out, int64_t rows, int64_t vectors_per_row) {
  using vector_t = typename Access::type;
  const int64_t total = rows * vectors_per_row;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = t / vectors_per_row;
    const int64_t v = t % vectors_per_row;
    const int64_t user = user_rows != nullptr ? user_rows[m] : m;
    const int64_t item = item_rows != nullptr ? item_rows[m] : m;
    const vector_t u = reinterpret_cast<const vector_t*>(users)[user * vectors_per_row + v];
    const vector_t i = reinterpret_cast<const vector_t*>(items)[item * vectors_per_row + v];
    vector_t* row = reinterpret_cast<vector_t*>(out) + m * 3 * vectors_per_row;
    row[v] = u;
    row[vectors_per_row + v] = i;
    row[2 * vectors_per_row + v] = Access::multiply(u, i);
  }
}

}  // namespace features
}  // namespace recops
