// The CUDA kernels' host functions (bound to Python in bindings.cpp) and their shared input checks.
// recops/kernels/__init__.py validates every input with messages for users first; these checks are the
// kernels' own guard, so that a wrong call from anywhere is an exception, never a wrong answer.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <tuple>

// The kernels' storage types: float32, float16, bfloat16 (torch's AT_DISPATCH_FLOATING_TYPES adds double).
#define RECOPS_DISPATCH_STORAGE_TYPES(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace recops {

// Limits of the retrieval kernel; recops/kernels/cuda.py mirrors them (MAX_K, MAX_ROW_BYTES).
constexpr int64_t kMaxK = 2048;
constexpr int64_t kMaxRowBytes = 4096;

inline void check_table(const torch::Tensor& table, const char* name) {
  TORCH_CHECK(table.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(table.dim() == 2, name, " must be 2-D (rows x d)");
  TORCH_CHECK(table.is_contiguous(), name, " must be contiguous");
  const auto dtype = table.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kFloat16 || dtype == torch::kBFloat16, name,
              " must be float32, float16 or bfloat16");
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(table.data_ptr()) % 16 == 0, name,
              " must start on a 16-byte boundary");
}

std::tuple<torch::Tensor, torch::Tensor> retrieve_topk(const torch::Tensor& users, const torch::Tensor& items,
                                                       const c10::optional<torch::Tensor>& bias, double scale,
                                                       int64_t k);

torch::Tensor head_features(const torch::Tensor& users, const torch::Tensor& items,
                            const c10::optional<torch::Tensor>& user_rows,
                            const c10::optional<torch::Tensor>& item_rows);

}  // namespace recops
