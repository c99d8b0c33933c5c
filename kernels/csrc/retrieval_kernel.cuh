// The retrieval kernel's device code (stage 1 of retrieval.cu). It is a header so that the tests can also
// compile it for the CPU (kernels/tests/cpu_emulation.h) and check it where there is no GPU.
#pragma once

#include <climits>
#include <cmath>

#include "vectors.cuh"

namespace recops {
namespace retrieval {


constexpr int kThreads = 256;
constexpr int kTile = 128;                    // items scored between two looks at the buffers
constexpr int kBuffer = 2 * kTile;            // candidates waiting per user; merged when over kTile
constexpr int kMaxVectorsPerLane = 8;         // 8 x 16 B x 32 lanes: rows of up to 4 KiB (d = 1024 float32)
constexpr int kMaxUsersPerBlock = 64;
constexpr int kEmptyIndex = INT_MAX;

// Lanes that share an item row of `vectors` 16-byte vectors: a power of two, at most a warp.
__host__ __device__ inline int lanes_per_row(int vectors) {
  int lanes = 1;
  while (lanes < 32 && lanes < vectors) lanes *= 2;
  return lanes;
}

// 16-byte vectors each lane holds: the kernel's kVectors (1, 2, 4 or 8).
__host__ __device__ inline int vectors_per_lane(int vectors) {
  const int lanes = lanes_per_row(vectors);
  int per_lane = 1;
  while (per_lane * lanes < vectors) per_lane *= 2;
  return per_lane;
}

struct Candidate {
  float score;
  int index;
};

__device__ __forceinline__ bool better(const Candidate& a, const Candidate& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

// How many of the first n entries of `sorted` (best first) are better than `c`: its rank among them.
__device__ __forceinline__ int count_better(const Candidate* sorted, int n, const Candidate& c) {
  int low = 0, high = n;
  while (low < high) {
    const int middle = (low + high) / 2;
    if (better(sorted[middle], c)) {
      low = middle + 1;
    } else {
      high = middle;
    }
  }
  return low;
}

// Merge a user's n buffered candidates into its sorted list of k, with all threads of the block.
// Every candidate's place is its rank: real candidates are distinct (one index each), and the empty
// slots, equal to each other, only occur in `best`, after every real candidate.
__device__ void merge_candidates(Candidate* best, Candidate* next, const Candidate* buffer, Candidate* sorted, int n,
                                 int k) {
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const Candidate c = buffer[j];
    int rank = 0;
    for (int other = 0; other < n; ++other) rank += better(buffer[other], c);
    sorted[rank] = c;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const int place = j + count_better(sorted, n, best[j]);
    if (place < k) next[place] = best[j];
  }
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const int place = j + count_better(best, k, sorted[j]);
    if (place < k) next[place] = sorted[j];
  }
  __syncthreads();
  for (int j = threadIdx.x; j < k; j += blockDim.x) best[j] = next[j];
  __syncthreads();
}

// Shared memory of a block: the group's user vectors; the merge's scratch [next k | sorted kBuffer], used
// by one user at a time; per user [best k | buffer kBuffer | threshold]; then the buffer counts.
struct SharedLayout {
  int users_bytes;  // group x d values, a multiple of 16 bytes
  int group;
  int k;

  __host__ __device__ int scratch() const { return k + kBuffer; }
  __host__ __device__ int candidates_per_user() const { return k + kBuffer + 1; }
  __host__ __device__ int bytes() const {
    return users_bytes + (scratch() + group * candidates_per_user()) * int(sizeof(Candidate)) +
           group * int(sizeof(int));
  }
};

// kVectors: 16-byte vectors of an item row each lane holds (a power of two, the row's width over its lanes).
template <typename scalar_t, int kVectors>
__global__ void __launch_bounds__(kThreads)
    retrieve_partial_kernel(const scalar_t* __restrict__ users, const scalar_t* __restrict__ items,
                            const float* __restrict__ bias, float scale, int n_users, int n_items, int d,
                            int chunk_size, SharedLayout layout, float* __restrict__ out_scores,
                            int* __restrict__ out_indices) {
  using Vector = Vector16<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared[];
  const int k = layout.k;
  const int first_user = blockIdx.y * layout.group;
  const int group = min(layout.group, n_users - first_user);
  const int chunk_start = blockIdx.x * chunk_size;
  const int chunk_end = min(chunk_start + chunk_size, n_items);

  uint4* user_vectors = reinterpret_cast<uint4*>(shared);
  Candidate* next = reinterpret_cast<Candidate*>(shared + layout.users_bytes);
  Candidate* sorted = next + k;
  Candidate* lists = next + layout.scratch();
  int* counts = reinterpret_cast<int*>(lists + layout.group * layout.candidates_per_user());
  const int vectors_per_row = d / Vector::kElements;
  auto best_of = [&](int g) { return lists + g * layout.candidates_per_user(); };
  auto buffer_of = [&](int g) { return best_of(g) + k; };
  auto threshold_of = [&](int g) { return best_of(g) + k + kBuffer; };

  const uint4* group_rows = reinterpret_cast<const uint4*>(users + size_t(first_user) * d);
  for (int v = threadIdx.x; v < group * vectors_per_row; v += blockDim.x) user_vectors[v] = group_rows[v];
  for (int g = 0; g < group; ++g) {
    for (int j = threadIdx.x; j < k; j += blockDim.x) best_of(g)[j] = Candidate{-INFINITY, kEmptyIndex};
  }
  if (threadIdx.x < group) {
    counts[threadIdx.x] = 0;
    *threshold_of(threadIdx.x) = Candidate{-INFINITY, kEmptyIndex};
  }
  __syncthreads();

  // L lanes per item row (a power of two, at most 32): 32 / L items per warp at a time.
  const int lanes = lanes_per_row(vectors_per_row);
  const int lane = threadIdx.x % 32;
  const int lane_in_row = lane % lanes;
  const int rows_per_pass = (kThreads / 32) * (32 / lanes);
  const int row_in_pass = (threadIdx.x / 32) * (32 / lanes) + lane / lanes;

  for (int tile = chunk_start; tile < chunk_end; tile += kTile) {
    const int tile_end = min(tile + kTile, chunk_end);
    // Every lane runs every pass (the shuffles need the whole warp); rows past the tile score nothing.
    for (int pass = tile; pass < tile_end; pass += rows_per_pass) {
      const int item = pass + row_in_pass;
      const bool active = item < tile_end;
      // The lane's slice of the row, loaded once (16 bytes at a time) and converted to float once.
      float row[kVectors][Vector::kElements];
      const uint4* item_row = reinterpret_cast<const uint4*>(items + size_t(active ? item : 0) * d);
#pragma unroll
      for (int j = 0; j < kVectors; ++j) {
        const int v = lane_in_row + j * lanes;
        Vector::to_floats(active && v < vectors_per_row ? __ldg(item_row + v) : make_uint4(0, 0, 0, 0), row[j]);
      }
      const float item_bias = active && bias != nullptr ? bias[item] : 0.f;
      for (int g = 0; g < group; ++g) {
        const uint4* user = user_vectors + g * vectors_per_row;
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < kVectors; ++j) {
          const int v = lane_in_row + j * lanes;
          if (v < vectors_per_row) dot += Vector::dot_floats(row[j], user[v]);
        }
        for (int offset = lanes / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        if (active && lane_in_row == 0) {
          // Rounded as the reference rounds: (dot * scale) + bias, no fused multiply-add.
          float score = __fadd_rn(__fmul_rn(dot, scale), item_bias);
          if (isnan(score)) score = -INFINITY;
          const Candidate candidate{score, item};
          if (better(candidate, *threshold_of(g))) buffer_of(g)[atomicAdd(&counts[g], 1)] = candidate;
        }
      }
    }
    __syncthreads();
    // Merge when a buffer could overflow during the next tile, and at the end of the chunk.
    const bool last_tile = tile + kTile >= chunk_end;
    for (int g = 0; g < group; ++g) {
      const int n = counts[g];
      if (n == 0 || (!last_tile && n <= kBuffer - kTile)) continue;
      merge_candidates(best_of(g), next, buffer_of(g), sorted, n, k);
      if (threadIdx.x == 0) {
        counts[g] = 0;
        *threshold_of(g) = best_of(g)[k - 1];
      }
    }
    __syncthreads();
  }

  for (int g = 0; g < group; ++g) {
    const size_t offset = (size_t(first_user + g) * gridDim.x + blockIdx.x) * k;
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
      out_scores[offset + j] = best_of(g)[j].score;
      out_indices[offset + j] = best_of(g)[j].index;
    }
  }
}

}  // namespace retrieval
}  // namespace recops
