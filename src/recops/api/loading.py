"""Reading a RecModel spec from YAML with errors that name the offending field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from recops.api.recmodel import RecModelSpec

API_GROUP = "recops.dev"
API_VERSION = f"{API_GROUP}/v1alpha1"


class SpecError(ValueError):
    """A spec that does not validate; the message names each wrong field by its YAML path."""


def format_validation_error(error: ValidationError, prefix: str) -> str:
    """One line per problem: ``spec.training.batchSize: Input should be ...``."""
    lines = []
    for problem in error.errors():
        path = ".".join([prefix, *(str(p) for p in problem["loc"])]) if problem["loc"] else prefix
        lines.append(f"{path}: {problem['msg']}")
    return "\n".join(lines)


def parse_recmodel_spec(document: Any, source: str = "spec") -> RecModelSpec:
    """Validate a RecModel manifest (``kind: RecModel``) or its bare ``spec`` mapping."""
    if not isinstance(document, dict):
        raise SpecError(f"{source}: expected a mapping (a RecModel or its spec), got {type(document).__name__}")
    prefix = "spec"
    if "kind" in document or "apiVersion" in document:
        if document.get("kind") != "RecModel":
            raise SpecError(f"{source}: kind is {document.get('kind')!r}, expected 'RecModel'")
        if document.get("apiVersion") != API_VERSION:
            raise SpecError(f"{source}: apiVersion is {document.get('apiVersion')!r}, expected {API_VERSION!r}")
        if not isinstance(document.get("spec"), dict):
            raise SpecError(f"{source}: a RecModel needs a 'spec' mapping")
        document = document["spec"]
    try:
        return RecModelSpec.model_validate(document)
    except ValidationError as error:
        raise SpecError(f"{source}: invalid RecModel spec\n{format_validation_error(error, prefix)}") from None


def load_recmodel_spec(path: str | Path) -> RecModelSpec:
    """Read and validate a RecModel spec (or whole manifest) from a YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"{path}: cannot read: {error.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    return parse_recmodel_spec(document, str(path))
