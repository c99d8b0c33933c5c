// Fused retrieval: the top-k items of each user by `users @ items.T * scale + bias`, without ever writing
// the B x N score matrix.
//
// Stage 1 (retrieve_partial_kernel): the index is cut into chunks; block (chunk, group) streams its chunk
// once and scores it against a group of users held in shared memory. L lanes share an item row (16-byte
// loads, coalesced), reduce their partial dot products with warp shuffles, and a score that beats the
// user's current k-th best goes into a small candidate buffer. When a buffer may overflow in the next
// tile (and at the end of the chunk) it is merged into the user's sorted top-k list (merge_candidates).
// Each block writes k (score, index) pairs per user: B x chunks x k, far smaller than B x N.
// Stage 2 (retrieve_topk): the B x (chunks * k) partial results are put in the final order with two
// sorts, as the reference does.
//
// Order (as in recops/kernels/reference.py): higher score first, equal scores by lower index; a NaN score
// counts as -inf. Empty slots hold (-inf, INT_MAX), after every real item.

#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "kernels.h"
#include "retrieval_kernel.cuh"
#include "retrieval_order.h"

namespace recops {

using namespace retrieval;

std::tuple<torch::Tensor, torch::Tensor> retrieve_topk(const torch::Tensor& users, const torch::Tensor& items,
                                                       const c10::optional<torch::Tensor>& bias, double scale,
                                                       int64_t k) {
  check_table(users, "users");
  check_table(items, "items");
  TORCH_CHECK(users.scalar_type() == items.scalar_type(), "users and items must have one dtype");
  TORCH_CHECK(users.device() == items.device(), "users and items must be on one device");
  TORCH_CHECK(users.size(1) == items.size(1), "users and items must have the same d");
  const int64_t n_users = users.size(0), n_items = items.size(0), d = items.size(1);
  TORCH_CHECK(n_items > 0 && n_items < kEmptyIndex, "the number of items must be in [1, 2^31 - 1)");
  TORCH_CHECK(k >= 1 && k <= n_items && k <= kMaxK, "k must be in [1, min(", kMaxK, ", number of items)]");
  TORCH_CHECK((d * items.element_size()) % 16 == 0 && d * items.element_size() <= kMaxRowBytes,
              "rows must be a multiple of 16 bytes and at most ", kMaxRowBytes, " bytes");
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_cuda() && bias->device() == items.device(), "bias must be on the items' device");
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->dim() == 1 && bias->size(0) == n_items &&
                    bias->is_contiguous(),
                "bias must be a contiguous float32 vector with one value per item");
    bias_data = bias->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(items.device());
  auto float_options = items.options().dtype(torch::kFloat32);
  if (n_users == 0) {
    return {torch::empty({0, k}, float_options), torch::empty({0, k}, items.options().dtype(torch::kInt64))};
  }

  int device = 0, processors = 0, shared_budget = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared_budget, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const SharedLayout layout = plan_layout(int(n_users), int(d), int(items.element_size()), int(k), shared_budget);
  const int groups = int((n_users + layout.group - 1) / layout.group);
  const int64_t chunk_size = plan_chunk_size(n_items, groups, processors);
  const int64_t used_chunks = (n_items + chunk_size - 1) / chunk_size;

  auto partial_scores = torch::empty({n_users, used_chunks * k}, float_options);
  auto partial_indices = torch::empty({n_users, used_chunks * k}, items.options().dtype(torch::kInt32));
  const dim3 grid{static_cast<unsigned>(used_chunks), static_cast<unsigned>(groups)};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int vectors_per_row = int(d * items.element_size() / 16);
  RECOPS_DISPATCH_STORAGE_TYPES(items.scalar_type(), "retrieve_topk", [&] {
    with_kernel_for<scalar_t>(vectors_per_row, [&](auto kernel) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, layout.bytes()));
      kernel<<<grid, kThreads, layout.bytes(), stream>>>(
          users.data_ptr<scalar_t>(), items.data_ptr<scalar_t>(), bias_data, float(scale), int(n_users),
          int(n_items), int(d), int(chunk_size), layout, partial_scores.data_ptr<float>(),
          partial_indices.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });

  return order_partials(partial_scores, partial_indices, used_chunks, k);
}

}  // namespace recops
