"""Shared base for the CRD spec models: camelCase on the wire, unknown fields refused."""

from __future__ import annotations

from typing import Any

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


def cel_rules(*rules: tuple[str, str, str | None]) -> dict[str, Any]:
    """``json_schema_extra`` carrying CEL rules (rule, message, fieldPath) into the generated CRD.

    They restate, for the apiserver, the cross-field checks the pydantic validators beside them make,
    so ``kubectl apply`` refuses what the operator would refuse.
    """
    return {"x-kubernetes-validations": [
        {"rule": rule, "message": message, **({"fieldPath": path} if path else {})} for rule, message, path in rules
    ]}
