"""Shared base for the CRD spec models: camelCase on the wire, unknown fields refused."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class SpecModel(BaseModel):
    """Base of every spec model.

    Kubernetes fields are camelCase (``batchSize``); Python code uses snake_case.
    Unknown fields are errors, so a typo in a manifest is named instead of ignored.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    def to_manifest_dict(self) -> dict:
        """The camelCase dict a user would write in YAML (defaults included)."""
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)
