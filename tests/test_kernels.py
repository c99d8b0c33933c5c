"""The kernels' entry points (``recops.kernels``): the order they promise, their errors, and the CUDA code.

The CUDA kernels' device code is checked twice: here on the CPU, compiled with g++ through
``kernels/tests/cpu_emulation.h`` (each CUDA thread a std::thread; the same source files as the GPU
build, so indexing, synchronisation, merging and rounding are tested on a machine without a GPU), and on
a real GPU by the tests marked ``gpu``, which skip where torch sees none (``RECOPS_REQUIRE_GPU=1`` makes
them fail instead, for a GPU machine's run).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from recops import kernels
from recops.kernels import cuda, reference
from recops.kernels.toolchain import cuda_include

REPO = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def brute_force_topk(scores: torch.Tensor, k: int, exclude: list[set[int]] | None = None) -> list[list[int]]:
    """The documented order, spelled out: higher score first, then lower index; NaN as -inf."""
    answers = []
    for row, values in enumerate(scores.tolist()):
        keyed = [(float("-inf") if v != v else v, i) for i, v in enumerate(values)]
        keyed = [(v, i) for v, i in keyed if exclude is None or i not in exclude[row]]
        answers.append([i for _, i in sorted(keyed, key=lambda pair: (-pair[0], pair[1]))[:k]])
    return answers


def assert_same_ranking(got, want, users, items, bias, scale, atol=1e-4):
    """Same scores within float32 rounding; where an index differs, only because two scores are that close."""
    got_scores, got_indices = got
    want_scores, _ = want
    torch.testing.assert_close(got_scores, want_scores, atol=atol, rtol=1e-5)
    full = reference.retrieval_scores(users, items, bias, scale)
    for row in range(got_indices.shape[0]):
        assert len(set(got_indices[row].tolist())) == got_indices.shape[1], "an item appears twice"
        recomputed = full[row, got_indices[row]]
        torch.testing.assert_close(recomputed, want_scores[row], atol=atol, rtol=1e-5)


@pytest.fixture
def kernel_mode(monkeypatch):
    """Set RECOPS_KERNELS for one test (the loaded extension is cached per process: cleared around it)."""

    def choose(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("RECOPS_KERNELS", raising=False)
        else:
            monkeypatch.setenv("RECOPS_KERNELS", value)
        cuda._load.cache_clear()

    yield choose
    cuda._load.cache_clear()


# --- the reference: the definition of a right answer -----------------------------------------------------


def test_reference_orders_by_score_then_lower_index_with_nan_last():
    generator = torch.Generator().manual_seed(1)
    # Small integers: many exact ties, and every dot product exact in float32.
    users = torch.randint(-2, 3, (6, 16), generator=generator).float()
    items = torch.randint(-2, 3, (400, 16), generator=generator).float()
    items[7] = float("nan")
    bias = torch.zeros(400)
    bias[11], bias[12] = float("inf"), float("-inf")
    scores, indices = reference.retrieve_topk(users, items, bias, 1.0, 400)
    full = reference.retrieval_scores(users, items, bias, 1.0)
    assert indices.tolist() == brute_force_topk(full, 400)
    # +inf first; the NaN row counts as -inf, so it comes before the -inf item (lower index)
    assert (indices[:, 0] == 11).all() and indices[:, -2:].tolist() == [[7, 12]] * 6
    assert scores[:, -1].eq(float("-inf")).all()


def test_exclusions_are_never_returned_and_the_rest_keeps_its_order():
    generator = torch.Generator().manual_seed(2)
    users, items = torch.randn(5, 8, generator=generator), torch.randn(50, 8, generator=generator)
    exclude = torch.full((5, 12), -1, dtype=torch.int64)
    banned: list[set[int]] = []
    for row in range(5):
        chosen = torch.randint(0, 50, (row * 3,), generator=generator)  # duplicates included
        exclude[row, : len(chosen)] = chosen
        banned.append(set(chosen.tolist()))
    scores, indices = kernels.retrieve_topk(users, items, 20, scale=2.0, exclude=exclude)
    assert indices.tolist() == brute_force_topk(users @ items.T * 2.0, 20, banned)
    assert scores.shape == (5, 20) and scores.dtype == torch.float32 and indices.dtype == torch.int64


@pytest.mark.parametrize("values", ["distinct", "ties"])
def test_the_reference_selection_equals_the_full_sort_whichever_way_it_takes(values):
    """select_topk takes topk's answer only where ties cannot change it; both ways give the documented order."""
    generator = torch.Generator().manual_seed(6)
    if values == "distinct":
        scores = torch.randn(7, 500, generator=generator)
    else:  # ties inside the top k and across its cut, and -inf rows
        scores = torch.randint(-3, 4, (7, 500), generator=generator).float()
        scores[2, :] = float("-inf")
    for k in (1, 5, 40, 124, 125, 300, 500):
        got_scores, got_indices = reference.select_topk(scores.clone(), k)
        assert got_indices.tolist() == brute_force_topk(scores, k)
        assert torch.equal(got_scores, scores.gather(1, got_indices))


def test_exclusions_with_infinite_scores_and_ties_follow_the_documented_order():
    """The CPU path lowers excluded items to -inf; where that could meet real -inf scores, the general path answers."""
    generator = torch.Generator().manual_seed(7)
    users = torch.randint(-2, 3, (6, 8), generator=generator).float()
    items = torch.randint(-2, 3, (60, 8), generator=generator).float()
    bias = torch.zeros(60)
    bias[[3, 9, 40]] = float("-inf")
    bias[11] = float("inf")
    items[17] = float("nan")
    exclude = torch.full((6, 10), -1, dtype=torch.int64)
    banned: list[set[int]] = []
    for row in range(6):
        chosen = torch.randint(0, 60, (row * 2,), generator=generator)
        exclude[row, : len(chosen)] = chosen
        banned.append(set(chosen.tolist()))
    full = reference.retrieval_scores(users, items, bias, 1.0)
    for k in (1, 8, 45, 50):  # at 50 some row's k-th is -inf: the general path
        scores, indices = kernels.retrieve_topk(users, items, k, bias=bias, exclude=exclude)
        assert indices.tolist() == brute_force_topk(full, k, banned)
        assert torch.equal(scores, full.gather(1, indices))


def test_an_empty_batch_gets_empty_answers():
    scores, indices = kernels.retrieve_topk(torch.zeros(0, 8), torch.randn(10, 8), 3)
    assert scores.shape == (0, 3) and indices.shape == (0, 3)
    assert kernels.head_features(torch.zeros(0, 8), torch.zeros(0, 8)).shape == (0, 24)


def _bad_retrieval_calls():
    users, items = torch.randn(2, 8), torch.randn(10, 8)
    return {
        "k=0": (dict(users=users, items=items, k=0), "k must be an integer between 1 and the number of items (10)"),
        "k > N": (dict(users=users, items=items, k=11), "k must be an integer between 1 and the number of items"),
        "k a bool": (dict(users=users, items=items, k=True), "k must be an integer"),
        "int users": (dict(users=users.long(), items=items, k=1), "users must be float32, float16 or bfloat16"),
        "1-D users": (dict(users=users[0], items=items, k=1), "users must be 2-D"),
        "dtypes differ": (dict(users=users.half(), items=items, k=1), "users and items differ in dtype"),
        "widths differ": (dict(users=torch.randn(2, 4), items=items, k=1), "users have d=4 but items have d=8"),
        "strided index": (dict(users=users, items=torch.randn(8, 10).T, k=1), "items must be contiguous"),
        "empty index": (dict(users=users, items=torch.zeros(0, 8), k=1), "items is empty"),
        "not a tensor": (dict(users=[[0.0] * 8], items=items, k=1), "users must be a torch.Tensor"),
        "other device": (dict(users=users.to("meta"), items=items, k=1), "users is on meta but items is on cpu"),
        "bias dtype": (dict(users=users, items=items, k=1, bias=torch.zeros(10).double()), "bias must be float32"),
        "bias length": (
            dict(users=users, items=items, k=1, bias=torch.zeros(9)),
            "bias must be float32 of shape (10,)",
        ),
        "exclude dtype": (
            dict(users=users, items=items, k=1, exclude=torch.zeros(2, 1, dtype=torch.int32)),
            "exclude must be int64 of shape (2, E)",
        ),
        "exclude rows": (
            dict(users=users, items=items, k=1, exclude=torch.zeros(3, 1, dtype=torch.int64)),
            "exclude must be int64 of shape (2, E)",
        ),
        "exclude range": (
            dict(users=users, items=items, k=1, exclude=torch.tensor([[10], [0]])),
            "exclude holds an item index outside [0, 10)",
        ),
        "too few left": (
            dict(users=users, items=items, k=8, exclude=torch.tensor([[0, 1, 2], [-1, -1, -1]])),
            "k=8 but row 0 has only 7 items left after its exclusions",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_retrieval_calls()))
def test_bad_retrieval_input_is_refused_with_its_name(case):
    call, message = _bad_retrieval_calls()[case]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        kernels.retrieve_topk(**call)


def test_head_features_in_training_keep_gradients_and_broadcast():
    users = torch.randn(3, 1, 8, requires_grad=True)
    items = torch.randn(3, 5, 8, requires_grad=True)
    features = kernels.head_features(users.expand(-1, 5, -1), items)
    assert features.shape == (3, 5, 24)
    features.sum().backward()
    assert users.grad is not None and items.grad is not None


def test_gathered_head_features_equal_the_concatenation_of_the_rows():
    users, items = torch.randn(4, 8).half(), torch.randn(30, 8).half()
    user_rows, item_rows = torch.tensor([0, 0, 3, 2]), torch.tensor([29, 1, 1, 0])
    features = kernels.head_features(users, items, user_rows, item_rows)
    u, v = users[user_rows], items[item_rows]
    assert torch.equal(features, torch.cat([u, v, u * v], dim=1))


@pytest.mark.parametrize(
    ("user_rows", "item_rows", "message"),
    [
        (torch.tensor([0]), None, "user_rows and item_rows go together"),
        (torch.tensor([0, 4]), torch.tensor([0, 1]), r"user_rows holds a row outside \[0, 4\)"),
        (torch.tensor([0, 1]), torch.tensor([-1, 1]), r"item_rows holds a row outside \[0, 6\)"),
        (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 1]), "user_rows must be an int64 vector"),
        (torch.tensor([0, 1]), torch.tensor([0]), "user_rows and item_rows differ in length: 2 and 1"),
    ],
)
def test_bad_feature_rows_are_refused_with_their_name(user_rows, item_rows, message):
    with pytest.raises(ValueError, match=message):
        kernels.head_features(torch.randn(4, 8), torch.randn(6, 8), user_rows, item_rows)


def test_cpu_tensors_use_the_reference_and_say_why(kernel_mode):
    kernel_mode(None)
    assert kernels.backend("cpu") == "torch"
    if not torch.cuda.is_available():
        assert cuda.why_unavailable() == "no CUDA GPU is visible to torch"
        assert "torch reference (no CUDA GPU" in cuda.describe()


def test_kernel_mode_is_validated_and_cuda_mode_fails_loudly_without_kernels(kernel_mode):
    kernel_mode("fastest")
    with pytest.raises(ValueError, match="RECOPS_KERNELS must be one of auto, torch, cuda, got 'fastest'"):
        kernels.backend("cuda")
    kernel_mode("torch")
    assert kernels.backend("cuda") == "torch" and cuda.why_unavailable() == "RECOPS_KERNELS=torch"
    if not torch.cuda.is_available():
        kernel_mode("cuda")
        with pytest.raises(kernels.KernelUnavailable, match="RECOPS_KERNELS=cuda but the CUDA kernels cannot be used"):
            kernels.backend("cuda")


# --- the CUDA device code, compiled for the CPU ---------------------------------------------------------


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    """kernels/csrc's kernels built with g++ through kernels/tests/cpu_emulation.h (about 30 s)."""
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name="recops_kernels_emulated",
        sources=[str(REPO / "kernels" / "tests" / "emulated_kernels.cpp")],
        extra_include_paths=[str(REPO / "kernels" / "csrc"), str(cuda_include())],
        # C++20 for std::barrier; no contraction: the kernels round each multiply and add (__fmul_rn...).
        extra_cflags=["-std=c++20", "-O2", "-ffp-contract=off"],
        build_directory=str(tmp_path_factory.mktemp("emulated-kernels")),
    )


H100_SHARED = 227 * 1024  # shared memory a block may use on H100/H200 (A100: 163 KiB)
RETRIEVAL_CASES = {
    # name: (users B, items N, d, k, SMs: how many chunks the index is cut into, shared memory per block)
    "one user, one chunk": (1, 300, 64, 10, 1, H100_SHARED),
    "several chunks": (5, 3000, 64, 50, 4, H100_SHARED),
    "k larger than a tile": (3, 1000, 128, 300, 2, H100_SHARED),
    "more users than a block takes": (70, 700, 32, 7, 3, H100_SHARED),
    "groups of few users (small shared memory)": (11, 700, 64, 40, 2, 16 * 1024),
    "k = N": (2, 257, 16, 257, 2, H100_SHARED),
    "largest k": (2, 2300, 16, 2048, 1, H100_SHARED),
    "rows of 9 vectors (d=72 half, 36 float)": (4, 900, 72, 20, 3, H100_SHARED),
    "widest rows": (3, 400, 256, 16, 2, H100_SHARED),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(RETRIEVAL_CASES))
def test_emulated_retrieval_kernel_matches_the_reference(emulated, case, dtype):
    n_users, n_items, d, k, processors, shared = RETRIEVAL_CASES[case]
    if dtype == torch.float32 and case.startswith("rows of 9"):
        d = 36
    if case == "widest rows":
        d = 1024 if dtype == torch.float32 else 2048  # 4 KiB rows: the kernel's widest
    generator = torch.Generator().manual_seed(n_items + d)
    users = torch.randn(n_users, d, generator=generator).to(dtype)
    items = torch.randn(n_items, d, generator=generator).to(dtype)
    bias = torch.randn(n_items, generator=generator)
    got = emulated.retrieve_topk(users, items, bias, 3.0, k, processors, shared)
    want = reference.retrieve_topk(users, items, bias, 3.0, k)
    assert_same_ranking(got, want, users, items, bias, 3.0, atol=1e-4 * d**0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_retrieval_breaks_ties_by_lower_index_like_the_reference(emulated, dtype):
    generator = torch.Generator().manual_seed(3)
    distinct = torch.randint(-2, 3, (40, 32), generator=generator).to(dtype)
    items = distinct[torch.randint(0, 40, (2000,), generator=generator)].contiguous()  # duplicated rows
    users = torch.randint(-2, 3, (6, 32), generator=generator).to(dtype)
    for k in (1, 37, 600):
        got = emulated.retrieve_topk(users, items, None, 1.0, k, 5, H100_SHARED)
        want = reference.retrieve_topk(users, items, None, 1.0, k)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_retrieval_handles_nan_infinite_and_extreme_values(emulated, dtype):
    generator = torch.Generator().manual_seed(4)
    items = torch.randn(1500, 64, generator=generator)
    items[100:110] = float("nan")  # a broken index: these rank last, as -inf
    items[200] *= 1000.0  # far larger than the rest
    items = items.to(dtype)
    bias = torch.randn(1500, generator=generator)
    bias[300], bias[301], bias[302] = float("inf"), float("-inf"), float("inf")
    users = torch.randn(3, 64, generator=generator).to(dtype)
    got = emulated.retrieve_topk(users, items, bias, 1.0, 1500, 4, H100_SHARED)
    want = reference.retrieve_topk(users, items, bias, 1.0, 1500)
    assert got[1][:, :2].tolist() == [[300, 302]] * 3
    assert set(got[1][:, -11:].flatten().tolist()) <= {301, *range(100, 110)}
    assert torch.equal(got[1][:, -11:], want[1][:, -11:])
    finite = want[0].isfinite()
    torch.testing.assert_close(got[0][finite], want[0][finite], atol=1e-2, rtol=1e-5)


def test_emulated_retrieval_with_exclusions_matches_the_entry_point(emulated):
    generator = torch.Generator().manual_seed(5)
    users, items = torch.randn(4, 64, generator=generator).half(), torch.randn(900, 64, generator=generator).half()
    exclude = torch.randint(-1, 900, (4, 25), generator=generator)
    want = kernels.retrieve_topk(users, items, 30, scale=2.0, exclude=exclude)  # the reference path, on CPU
    # What the entry point does on a GPU: the kernel's top k + E, then the exclusions dropped.
    ranked = emulated.retrieve_topk(users, items, None, 2.0, 30 + 25, 3, 48 * 1024)
    got = kernels._drop_excluded(*ranked, exclude, 30)
    assert_same_ranking(got, want, users, items, None, 2.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 12, 7], ids=lambda d: f"d={d}")
def test_emulated_feature_kernel_is_bit_identical_to_torch(emulated, dtype, d):
    generator = torch.Generator().manual_seed(d)
    users, items = torch.randn(9, d, generator=generator).to(dtype), torch.randn(50, d, generator=generator).to(dtype)
    user_rows = torch.randint(0, 9, (77,), generator=generator)
    item_rows = torch.randint(0, 50, (77,), generator=generator)
    assert torch.equal(
        emulated.head_features(users, items, user_rows, item_rows, 64),
        reference.head_features(users, items, user_rows, item_rows),
    )
    aligned = items[:9].contiguous()
    assert torch.equal(emulated.head_features(users, aligned, None, None, 32), reference.head_features(users, aligned))


# --- on a GPU -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu():
    """The CUDA kernels on a real GPU: skip without one (fail with RECOPS_REQUIRE_GPU=1)."""
    if not torch.cuda.is_available():
        if os.environ.get("RECOPS_REQUIRE_GPU") == "1":
            pytest.fail("RECOPS_REQUIRE_GPU=1 but torch sees no CUDA GPU")
        pytest.skip("needs a CUDA GPU (the device code is checked on the CPU by the emulated tests)")
    os.environ["RECOPS_KERNELS"] = "cuda"  # fail rather than fall back to the reference
    cuda._load.cache_clear()
    yield torch.device("cuda")
    os.environ.pop("RECOPS_KERNELS")
    cuda._load.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("n_users", "n_items", "d", "k"),
    [(1, 1000, 64, 10), (8, 200_000, 128, 100), (64, 1_000_000, 768, 50), (3, 5000, 1024, 2000)],
)
def test_gpu_retrieval_matches_the_reference(gpu, dtype, n_users, n_items, d, k):
    generator = torch.Generator(device=gpu).manual_seed(7)
    users = torch.randn(n_users, d, device=gpu, generator=generator).to(dtype)
    items = torch.randn(n_items, d, device=gpu, generator=generator).to(dtype)
    bias = torch.randn(n_items, device=gpu, generator=generator)
    exclude = torch.randint(-1, n_items, (n_users, 20), device=gpu, generator=generator)
    assert kernels.backend(gpu) == "cuda"
    got = kernels.retrieve_topk(users, items, k, bias=bias, scale=2.0, exclude=exclude)
    want_scores, want_indices = reference.retrieve_topk(users, items, bias, 2.0, min(k + 20, n_items))
    want = kernels._drop_excluded(want_scores, want_indices, exclude, k)
    torch.testing.assert_close(got[0], want[0], atol=1e-4 * d**0.5, rtol=1e-5)
    full = reference.retrieval_scores(users, items, bias, 2.0)
    torch.testing.assert_close(full.gather(1, got[1]), want[0], atol=1e-4 * d**0.5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_retrieval_ties_and_broken_rows_follow_the_documented_order(gpu, dtype):
    generator = torch.Generator(device=gpu).manual_seed(8)
    distinct = torch.randint(-2, 3, (50, 64), device=gpu, generator=generator).to(dtype)
    items = distinct[torch.randint(0, 50, (100_000,), device=gpu, generator=generator)].contiguous()
    items[10:20] = float("nan")
    users = torch.randint(-2, 3, (16, 64), device=gpu, generator=generator).to(dtype)
    got = kernels.retrieve_topk(users, items, 500)
    want = reference.retrieve_topk(users, items, None, 1.0, 500)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    last = kernels.retrieve_topk(users, items, 100_000)[1][:, -10:]
    assert torch.equal(last, torch.arange(10, 20, device=gpu).expand(16, -1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [128, 768, 6], ids=lambda d: f"d={d}")
def test_gpu_head_features_are_bit_identical_to_torch(gpu, dtype, d):
    users, items = torch.randn(64, d, device=gpu).to(dtype), torch.randn(10_000, d, device=gpu).to(dtype)
    user_rows = torch.arange(64, device=gpu).repeat_interleave(100)
    item_rows = torch.randint(0, 10_000, (6400,), device=gpu)
    assert torch.equal(
        kernels.head_features(users, items, user_rows, item_rows),
        reference.head_features(users, items, user_rows, item_rows),
    )


def test_gpu_kernels_refuse_cpu_tensors_with_a_clear_error(gpu):
    with pytest.raises(RuntimeError, match="users must be a CUDA tensor"):
        cuda.extension().retrieve_topk(torch.randn(2, 8), torch.randn(4, 8), None, 1.0, 2)
