"""Reading RecModel and RecExperiment specs from YAML with errors that name the offending field."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from recops.api.recexperiment import GATE_TYPES, RecExperimentSpec
from recops.api.recmodel import RecModelSpec

API_GROUP = "recops.dev"
API_VERSION = f"{API_GROUP}/v1alpha1"

SpecT = TypeVar("SpecT", bound=BaseModel)

# Lists of discriminated unions: pydantic puts the chosen tag into the error location
# (gates.0.ctrLift.alpha); the YAML path a user sees has no such element (gates[0].alpha).
_UNION_TAGS: Mapping[str, Collection[str]] = {"gates": frozenset(GATE_TYPES)}


class SpecError(ValueError):
    """A spec that does not validate; the message names each wrong field by its YAML path."""


def _yaml_path(prefix: str, loc: tuple[Any, ...]) -> str:
    path = prefix
    for index, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        if index >= 2 and isinstance(loc[index - 1], int) and part in _UNION_TAGS.get(str(loc[index - 2]), ()):
            continue
        path += f".{part}"
    return path


def _message(problem: Mapping[str, Any]) -> str:
    # Our own validators raise ValueError with a full sentence; pydantic prefixes it with "Value error, ".
    message = str(problem["msg"])
    return message.removeprefix("Value error, ") if problem.get("type") == "value_error" else message


def format_validation_error(error: ValidationError, prefix: str) -> str:
    """One line per problem: ``spec.training.batchSize: Input should be ...``; list items as ``steps[1]``."""
    return "\n".join(f"{_yaml_path(prefix, tuple(problem['loc']))}: {_message(problem)}" for problem in error.errors())


def _parse(document: Any, source: str, kind: str, model: type[SpecT]) -> SpecT:
    if not isinstance(document, dict):
        raise SpecError(f"{source}: expected a mapping (a {kind} or its spec), got {type(document).__name__}")
    prefix = "spec"
    if "kind" in document or "apiVersion" in document:
        if document.get("kind") != kind:
            raise SpecError(f"{source}: kind is {document.get('kind')!r}, expected {kind!r}")
        if document.get("apiVersion") != API_VERSION:
            raise SpecError(f"{source}: apiVersion is {document.get('apiVersion')!r}, expected {API_VERSION!r}")
        if not isinstance(document.get("spec"), dict):
            raise SpecError(f"{source}: a {kind} needs a 'spec' mapping")
        document = document["spec"]
    try:
        return model.model_validate(document)
    except ValidationError as error:
        raise SpecError(f"{source}: invalid {kind} spec\n{format_validation_error(error, prefix)}") from None


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"{path}: cannot read: {error.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None


def parse_recmodel_spec(document: Any, source: str = "spec") -> RecModelSpec:
    """Validate a RecModel manifest (``kind: RecModel``) or its bare ``spec`` mapping."""
    return _parse(document, source, "RecModel", RecModelSpec)


def load_recmodel_spec(path: str | Path) -> RecModelSpec:
    """Read and validate a RecModel spec (or whole manifest) from a YAML file."""
    path = Path(path)
    return parse_recmodel_spec(_read_yaml(path), str(path))


def parse_recexperiment_spec(document: Any, source: str = "spec") -> RecExperimentSpec:
    """Validate a RecExperiment manifest (``kind: RecExperiment``) or its bare ``spec`` mapping."""
    return _parse(document, source, "RecExperiment", RecExperimentSpec)


def load_recexperiment_spec(path: str | Path) -> RecExperimentSpec:
    """Read and validate a RecExperiment spec (or whole manifest) from a YAML file."""
    path = Path(path)
    return parse_recexperiment_spec(_read_yaml(path), str(path))
