"""What the three python-backend models share: artifact location, tensor helpers, errors."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


def artifact_dir(args: dict) -> Path:
    """The exported model files, from the ``artifact`` parameter (relative to the repository root)."""
    config = json.loads(args["model_config"])
    relative = config["parameters"]["artifact"]["string_value"]
    return Path(args["model_repository"]).parent / relative


def strings(request: Any, name: str) -> list[list[str]] | None:
    """A BYTES input as one list of strings per row, empty strings dropped (they pad ragged rows)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    rows = tensor.as_numpy()
    return [[v.decode() if isinstance(v, bytes) else str(v) for v in row if v not in (b"", "")] for row in rows]


def array(request: Any, name: str) -> np.ndarray:
    """A numeric input as numpy (rows first)."""
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy()


def bad_request(message: str) -> Any:
    """An error response with Triton's INVALID_ARG code (HTTP 400 / gRPC INVALID_ARGUMENT)."""
    error = pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def server_error(message: str) -> Any:
    """An error response with Triton's INTERNAL code (HTTP 500): the request was fine, the model failed."""
    error = pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def respond(outputs: dict[str, np.ndarray]) -> Any:
    """A response holding ``outputs`` by name."""
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()])


def answer_each(requests: Sequence[Any], answer: Callable[[Any], Any], refused: type[Exception]) -> list[Any]:
    """One response per request; a request raising ``refused`` gets a bad-request response, the rest go on."""
    responses = []
    for request in requests:
        try:
            responses.append(answer(request))
        except refused as error:
            responses.append(bad_request(str(error)))
    return responses
