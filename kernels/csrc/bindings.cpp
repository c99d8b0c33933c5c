// The Python module recops_kernels_cuda: what recops.kernels calls when the kernels are built.
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "recops CUDA kernels: fused top-k retrieval and head-feature assembly";
  module.def("retrieve_topk", &recops::retrieve_topk, "Top-k items per user, (float32 scores, int64 indices)",
             pybind11::arg("users"), pybind11::arg("items"), pybind11::arg("bias"), pybind11::arg("scale"),
             pybind11::arg("k"));
  module.def("head_features", &recops::head_features, "[u, v, u*v] rows, gathered by optional row indices",
             pybind11::arg("users"), pybind11::arg("items"), pybind11::arg("user_rows") = pybind11::none(),
             pybind11::arg("item_rows") = pybind11::none());
}
