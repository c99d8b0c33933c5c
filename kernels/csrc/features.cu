// Fused feature assembly for the click and like heads: row m of the output is [u, v, u*v] with
// u = users[user_rows[m]] and v = items[item_rows[m]] (or row m of each when no indices are given).
// One pass: each thread gathers one 16-byte vector of u and of v and writes the three vectors of its
// output row, so the gathered copies and the product never go through memory separately (torch needs an
// index_select per table, a multiply and a cat). Rows whose width is not a multiple of 16 bytes (or not
// 16-byte aligned) take the same kernel one element at a time.

#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "features_kernel.cuh"
#include "kernels.h"

namespace recops {

using namespace features;

namespace {


const int64_t* rows_pointer(const c10::optional<torch::Tensor>& rows, const torch::Tensor& like, const char* name) {
  if (!rows.has_value()) return nullptr;
  TORCH_CHECK(rows->device() == like.device(), name, " must be on the tables' device");
  TORCH_CHECK(rows->scalar_type() == torch::kInt64 && rows->dim() == 1 && rows->is_contiguous(), name,
              " must be a contiguous int64 vector");
  return rows->data_ptr<int64_t>();
}

}  // namespace

torch::Tensor head_features(const torch::Tensor& users, const torch::Tensor& items,
                            const c10::optional<torch::Tensor>& user_rows,
                            const c10::optional<torch::Tensor>& item_rows) {
  TORCH_CHECK(users.is_cuda() && items.is_cuda(), "users and items must be CUDA tensors");
  TORCH_CHECK(users.dim() == 2 && items.dim() == 2 && users.size(1) == items.size(1),
              "users and items must be 2-D with the same d");
  TORCH_CHECK(users.is_contiguous() && items.is_contiguous(), "users and items must be contiguous");
  TORCH_CHECK(users.scalar_type() == items.scalar_type(), "users and items must have one dtype");
  TORCH_CHECK(users.device() == items.device(), "users and items must be on one device");
  TORCH_CHECK(user_rows.has_value() == item_rows.has_value(), "give both user_rows and item_rows, or neither");
  const int64_t* user_index = rows_pointer(user_rows, items, "user_rows");
  const int64_t* item_index = rows_pointer(item_rows, items, "item_rows");
  const int64_t rows = user_rows.has_value() ? user_rows->numel() : users.size(0);
  TORCH_CHECK(!item_rows.has_value() || item_rows->numel() == rows, "user_rows and item_rows differ in length");
  TORCH_CHECK(user_rows.has_value() || users.size(0) == items.size(0), "without row indices, users and items align");
  const int64_t d = users.size(1);
  const c10::cuda::CUDAGuard guard(items.device());
  auto out = torch::empty({rows, 3 * d}, items.options());
  if (rows == 0 || d == 0) return out;

  const auto stream = c10::cuda::getCurrentCUDAStream();
  RECOPS_DISPATCH_STORAGE_TYPES(items.scalar_type(), "head_features", [&] {
    const bool aligned = (d * int64_t(sizeof(scalar_t))) % 16 == 0 &&
                         reinterpret_cast<std::uintptr_t>(users.data_ptr()) % 16 == 0 &&
                         reinterpret_cast<std::uintptr_t>(items.data_ptr()) % 16 == 0;
    const int64_t elements = aligned ? Vector16<scalar_t>::kElements : 1;
    const int64_t vectors_per_row = d / elements;
    const int64_t blocks = std::min<int64_t>((rows * vectors_per_row + kThreads - 1) / kThreads, 65535L * 8);
    if (aligned) {
      head_features_kernel<scalar_t, Wide<scalar_t>><<<unsigned(blocks), kThreads, 0, stream>>>(
          users.data_ptr<scalar_t>(), items.data_ptr<scalar_t>(), user_index, item_index,
          out.data_ptr<scalar_t>(), rows, vectors_per_row);
    } else {
      head_features_kernel<scalar_t, Scalar<scalar_t>><<<unsigned(blocks), kThreads, 0, stream>>>(
          users.data_ptr<scalar_t>(), items.data_ptr<scalar_t>(), user_index, item_index,
          out.data_ptr<scalar_t>(), rows, vectors_per_row);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace recops
