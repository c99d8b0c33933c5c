// The kernels' device code compiled for the CPU through cpu_emulation.h, with the same host-side steps as
// kernels/csrc/retrieval.cu and features.cu: tests/test_kernels.py checks it against the torch reference.
#include "cpu_emulation.h"

namespace recops::retrieval {
alignas(16) unsigned char shared[256 * 1024];  // the kernel's `extern __shared__` buffer
}

#include <torch/extension.h>

#include "features_kernel.cuh"
#include "kernels.h"
#include "retrieval_kernel.cuh"
#include "retrieval_order.h"

namespace {

using namespace recops;

// retrieve_topk of retrieval.cu on CPU tensors; `processors` and `shared_budget` stand for the GPU's SM
// count (how many chunks the index is cut into) and shared memory per block (how many users a block takes).
std::tuple<torch::Tensor, torch::Tensor> emulated_retrieve_topk(const torch::Tensor& users, const torch::Tensor& items,
                                                       const c10::optional<torch::Tensor>& bias, double scale,
                                                       int64_t k, int64_t processors, int64_t shared_budget) {
  using namespace retrieval;
  const int64_t n_users = users.size(0), n_items = items.size(0), d = items.size(1);
  TORCH_CHECK(shared_budget <= int64_t(sizeof(shared)), "the emulation has ", sizeof(shared), " bytes of shared memory");
  const SharedLayout layout = plan_layout(int(n_users), int(d), int(items.element_size()), int(k), int(shared_budget));
  const int groups = int((n_users + layout.group - 1) / layout.group);
  const int64_t chunk_size = plan_chunk_size(n_items, groups, int(processors));
  const int64_t used_chunks = (n_items + chunk_size - 1) / chunk_size;
  auto partial_scores = torch::full({n_users, used_chunks * k}, std::nanf(""), items.options().dtype(torch::kFloat32));
  auto partial_indices = torch::full({n_users, used_chunks * k}, -7, items.options().dtype(torch::kInt32));
  const float* bias_data = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  RECOPS_DISPATCH_STORAGE_TYPES(items.scalar_type(), "retrieve_topk", [&] {
    with_kernel_for<scalar_t>(int(d * items.element_size() / 16), [&](auto kernel) {
      emulation::launch(dim3(unsigned(used_chunks), unsigned(groups)), kThreads, [&] {
        kernel(users.data_ptr<scalar_t>(), items.data_ptr<scalar_t>(), bias_data, float(scale), int(n_users),
               int(n_items), int(d), int(chunk_size), layout, partial_scores.data_ptr<float>(),
               partial_indices.data_ptr<int>());
      });
    });
  });
  return order_partials(partial_scores, partial_indices, used_chunks, k);
}

// head_features of features.cu on CPU tensors (the vectorised path when rows are 16-byte multiples).
torch::Tensor emulated_head_features(const torch::Tensor& users, const torch::Tensor& items,
                            const c10::optional<torch::Tensor>& user_rows,
                            const c10::optional<torch::Tensor>& item_rows, int64_t threads) {
  using namespace features;
  const int64_t rows = user_rows.has_value() ? user_rows->numel() : users.size(0);
  const int64_t d = users.size(1);
  auto out = torch::empty({rows, 3 * d}, items.options());
  const int64_t* user_index = user_rows.has_value() ? user_rows->data_ptr<int64_t>() : nullptr;
  const int64_t* item_index = item_rows.has_value() ? item_rows->data_ptr<int64_t>() : nullptr;
  RECOPS_DISPATCH_STORAGE_TYPES(items.scalar_type(), "head_features", [&] {
    const bool wide = (d * int64_t(sizeof(scalar_t))) % 16 == 0;
    const int64_t vectors_per_row = wide ? d / Vector16<scalar_t>::kElements : d;
    // Few blocks, so that the grid-stride loop is exercised.
    const unsigned blocks = unsigned(std::min<int64_t>(3, (rows * vectors_per_row + threads - 1) / threads));
    emulation::launch(dim3(std::max(blocks, 1u)), unsigned(threads), [&] {
      if (wide) {
        head_features_kernel<scalar_t, Wide<scalar_t>>(users.data_ptr<scalar_t>(), items.data_ptr<scalar_t>(),
                                                       user_index, item_index, out.data_ptr<scalar_t>(), rows,
                                                       vectors_per_row);
      } else {
        head_features_kernel<scalar_t, Scalar<scalar_t>>(users.data_ptr<scalar_t>(), items.data_ptr<scalar_t>(),
                                                         user_index, item_index, out.data_ptr<scalar_t>(), rows,
                                                         vectors_per_row);
      }
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("retrieve_topk", &emulated_retrieve_topk);
  module.def("head_features", &emulated_head_features);
}
