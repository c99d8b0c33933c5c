// Host-side steps of retrieval shared by the CUDA build and the CPU emulation of the tests: how many users
// a block takes, and stage 2, the final order of the blocks' partial top-k lists.
#pragma once

#include <torch/extension.h>

#include <algorithm>

#include "retrieval_kernel.cuh"

namespace recops {
namespace retrieval {

// Users per block: as many as `budget` bytes of shared memory hold, at most kMaxUsersPerBlock. More users
// per block means fewer passes over the index (one per group of users).
inline SharedLayout plan_layout(int n_users, int d, int element_size, int k, int budget) {
  SharedLayout layout{0, 1, k};
  for (int group = std::min(n_users, kMaxUsersPerBlock); group >= 1; --group) {
    layout = SharedLayout{group * d * element_size, group, k};
    if (layout.bytes() <= budget) return layout;
  }
  TORCH_CHECK(false, "k=", k, " with d=", d, " does not fit the retrieval kernel's shared memory");
  return layout;
}

// Items per block: about four blocks per SM in all, each a whole number of tiles.
inline int64_t plan_chunk_size(int64_t n_items, int groups, int processors) {
  const int64_t max_chunks = (n_items + kTile - 1) / kTile;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(max_chunks, (4 * processors + groups - 1) / groups));
  return ((n_items + chunks - 1) / chunks + kTile - 1) / kTile * kTile;
}

// The kernel for a row width, by the number of vectors each lane holds.
template <typename scalar_t, typename Launch>
void with_kernel_for(int vectors_per_row, Launch launch) {
  switch (vectors_per_lane(vectors_per_row)) {
    case 1: launch(retrieve_partial_kernel<scalar_t, 1>); break;
    case 2: launch(retrieve_partial_kernel<scalar_t, 2>); break;
    case 4: launch(retrieve_partial_kernel<scalar_t, 4>); break;
    default: launch(retrieve_partial_kernel<scalar_t, kMaxVectorsPerLane>); break;
  }
}

// Stage 2: B x (chunks * k) partial results in the final order, the first k of each row. Each chunk's
// list is already in order, so one chunk is the answer; otherwise sort by index, then stably by score
// (equal scores keep index order), as the reference does.
inline std::tuple<torch::Tensor, torch::Tensor> order_partials(const torch::Tensor& partial_scores,
                                                               const torch::Tensor& partial_indices,
                                                               int64_t chunks, int64_t k) {
  auto indices = partial_indices.to(torch::kInt64);
  if (chunks == 1) return {partial_scores, indices};
  const auto by_index = std::get<1>(indices.sort(/*dim=*/1));
  auto scores = partial_scores.gather(1, by_index);
  indices = indices.gather(1, by_index);
  const auto by_score = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
  const auto top = by_score.narrow(1, 0, k);
  return {scores.gather(1, top).contiguous(), indices.gather(1, top).contiguous()};
}

}  // namespace retrieval
}  // namespace recops
