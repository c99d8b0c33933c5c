"""CustomResourceDefinitions generated from the typed specs: one source of truth for the schemas.

pydantic writes JSON Schema (2020-12 flavour, with ``$defs``/``$ref``, ``anyOf`` for optionals,
``oneOf`` for the gate union); a CRD needs a *structural* OpenAPI v3.0 schema: every node typed,
everything inlined, ``nullable`` instead of a null branch, boolean ``exclusiveMinimum``. The
conversion below is small and pure; the committed ``crds/*.yaml`` must equal
:func:`render_crds` (a test checks it) and the real apiserver accepts them (an e2e test).

Cross-field rules that pydantic checks in validators are restated as CEL
``x-kubernetes-validations`` next to those validators (``json_schema_extra`` of the model or
field), so ``kubectl apply`` refuses what the operator would refuse.

The gate list is a discriminated union. A structural schema cannot say "one of these shapes",
so its items become one object with the union of all fields, plus generated CEL rules per gate
type: required fields, fields that belong to other types, and ranges tighter than the union's.
Defaults inside the union are dropped (a default for one type would add a field that another
type refuses); pydantic applies them when the operator reads the spec.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from recops.api.loading import API_GROUP
from recops.api.recexperiment import RecExperimentSpec
from recops.api.recmodel import RecModelSpec
from recops.api.status import RecExperimentStatus, RecModelStatus

VERSION = "v1alpha1"
CATEGORY = "recops"

Schema = dict[str, Any]

# JSON Schema keys a CRD schema does not take (or we do not want in it).
_DROPPED_KEYS = ("title", "$schema", "discriminator")
_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


class SchemaConversionError(ValueError):
    """A pydantic schema shape this converter does not know how to make structural."""


# --------------------------------------------------------------------------- JSON Schema → structural


def _resolve(node: Any, defs: Mapping[str, Schema]) -> Any:
    """Inline every ``$ref`` (sibling keys such as a description or default win over the target's)."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        merged = {**target, **{key: value for key, value in node.items() if key != "$ref"}}
        return _resolve(merged, defs)
    return {key: _resolve(value, defs) for key, value in node.items()}


def _openapi_bounds(node: Schema) -> Schema:
    # JSON Schema 2020 writes "exclusiveMinimum: 0"; OpenAPI 3.0 writes "minimum: 0, exclusiveMinimum: true".
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        value = node.get(exclusive)
        if value is not None and not isinstance(value, bool):
            node[bound] = value
            node[exclusive] = True
    return node


def _without_null_branch(node: Schema) -> Schema:
    branches = node.pop("anyOf")
    kept = [branch for branch in branches if branch.get("type") != "null"]
    nullable = len(kept) < len(branches)
    types = sorted(branch.get("type", "") for branch in kept)
    if types == ["integer", "string"]:
        # Quantities: 2, 500m, 16Gi. The apiserver allows typed anyOf branches only in exactly this form;
        # the string's constraints move up (OpenAPI applies pattern and maxLength to strings only).
        string = next(branch for branch in kept if branch.get("type") == "string")
        node.update({key: value for key, value in string.items() if key != "type"})
        node["x-kubernetes-int-or-string"] = True
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    elif len(kept) == 1:
        node = {**kept[0], **node}
    else:
        raise SchemaConversionError(f"cannot make a structural schema of anyOf {branches}")
    if nullable:
        node["nullable"] = True
        if node.get("default", 0) is None:
            del node["default"]
    return node


def _structural(node: Any, *, in_union: bool = False) -> Any:
    """One resolved JSON Schema node → an OpenAPI v3.0 structural node."""
    if isinstance(node, list):
        return [_structural(item, in_union=in_union) for item in node]
    if not isinstance(node, dict):
        return node
    # additionalProperties: false (extra="forbid") is left to the apiserver's strict field validation,
    # which names the unknown field; a CRD schema may not combine it with properties.
    if "anyOf" in node:  # first: an optional model's branch brings its own keys (additionalProperties too)
        node = _without_null_branch(node)
    node = {key: value for key, value in node.items()
            if key not in _DROPPED_KEYS and not (key == "additionalProperties" and value is False)}
    if "oneOf" in node:
        return _structural(_merge_union(node), in_union=True)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    node = _openapi_bounds(node)
    if in_union:
        node.pop("default", None)
    if node.get("additionalProperties") is True:  # dict[str, Any]: keep whatever is written, nested too
        del node["additionalProperties"]
    if node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node:
        node["x-kubernetes-preserve-unknown-fields"] = True  # a free-form mapping (dict[str, Any])
    result: Schema = {}
    for key, value in node.items():
        if key == "properties":
            result[key] = {name: _structural(child, in_union=in_union) for name, child in value.items()}
        elif key in ("items", "anyOf", "additionalProperties"):
            result[key] = _structural(value, in_union=in_union)
        else:
            result[key] = value
    return result


def _merge_union(node: Schema) -> Schema:
    """A discriminated ``oneOf`` → one object schema with the union of fields and CEL rules per variant."""
    variants = [_structural(variant) for variant in node.pop("oneOf")]
    tag = _discriminator(variants)
    kinds = [variant["properties"][tag]["enum"][0] for variant in variants]
    names: list[str] = []
    for variant in variants:
        names += [name for name in variant["properties"] if name not in names]
    properties: Schema = {}
    rules: list[Schema] = []
    for name in names:
        having = [(kind, variant["properties"][name]) for kind, variant in zip(kinds, variants, strict=True)
                  if name in variant["properties"]]
        if name == tag:
            properties[name] = {"type": "string", "enum": kinds}
            continue
        properties[name] = _loosest([schema for _, schema in having], name)
        owners = [kind for kind, _ in having]
        if len(owners) < len(kinds):
            rules.append({
                "rule": f"!has(self.{name}) || self.{tag} in {_cel_list(owners)}",
                "message": f"{name} applies only to {tag} {', '.join(owners)}",
                "fieldPath": f".{name}",
            })
        requiring = [kind for kind, variant in zip(kinds, variants, strict=True) if name in variant.get("required", ())]
        if requiring:
            rules.append({
                "rule": f"!(self.{tag} in {_cel_list(requiring)}) || has(self.{name})",
                "message": f"{name} is required for {tag} {', '.join(requiring)}",
                "fieldPath": f".{name}",
            })
        for kind, schema in having:
            rules += _tighter_bound_rules(tag, kind, name, schema, properties[name])
    merged: Schema = {key: value for key, value in node.items() if key not in ("type", "properties", "required")}
    return {
        **merged, "type": "object", "properties": properties, "required": [tag],
        "x-kubernetes-validations": rules,
    }


def _discriminator(variants: list[Schema]) -> str:
    common = set.intersection(*(set(variant.get("properties", {})) for variant in variants))
    tags = [name for name in sorted(common)
            if all(len(variant["properties"][name].get("enum", ())) == 1 for variant in variants)]
    if len(tags) != 1:
        raise SchemaConversionError(f"a oneOf needs exactly one single-valued tag field, found {tags}")
    return tags[0]


def _cel_list(values: list[str]) -> str:
    return "[" + ", ".join(f"'{value}'" for value in values) + "]"


def _loosest(schemas: list[Schema], name: str) -> Schema:
    """The schema every variant's value of ``name`` satisfies: equal shapes, the widest numeric bounds."""
    ignored = (*_BOUND_KEYS, "description", "default")  # defaults are dropped inside a union
    base = {key: value for key, value in schemas[0].items() if key not in ignored}
    for other in schemas[1:]:
        shape = {key: value for key, value in other.items() if key not in ignored}
        if shape != base:
            raise SchemaConversionError(f"gate field {name!r} has different shapes in different types")
    merged = dict(base)
    if "description" in schemas[0]:
        merged["description"] = schemas[0]["description"]
    for bound, pick in (("minimum", min), ("maximum", max)):
        if all(bound in schema for schema in schemas):
            value = pick(schema[bound] for schema in schemas)
            merged[bound] = value
            exclusive = "exclusiveMinimum" if bound == "minimum" else "exclusiveMaximum"
            # Exclusive only when every variant at this value is exclusive.
            if all(schema.get(exclusive, False) for schema in schemas if schema[bound] == value):
                merged[exclusive] = True
    return merged


def _tighter_bound_rules(tag: str, kind: str, name: str, schema: Schema, merged: Schema) -> list[Schema]:
    rules = []
    for bound, exclusive, strict_op, op in (
        ("minimum", "exclusiveMinimum", ">", ">="), ("maximum", "exclusiveMaximum", "<", "<="),
    ):
        if bound not in schema:
            continue
        if schema[bound] == merged.get(bound) and bool(schema.get(exclusive)) == bool(merged.get(exclusive)):
            continue
        comparison = strict_op if schema.get(exclusive) else op
        value = schema[bound]
        literal = repr(float(value)) if schema.get("type") == "number" else str(value)
        rules.append({
            "rule": f"self.{tag} != '{kind}' || !has(self.{name}) || self.{name} {comparison} {literal}",
            "message": f"{name} must be {comparison} {value:g} for {tag} {kind}",
            "fieldPath": f".{name}",
        })
    return rules


def _defaults_for_objects(node: Any) -> Any:
    """Optional object fields (pydantic ``default_factory``) default to ``{}`` so the apiserver fills
    in their own defaults, as pydantic does."""
    if isinstance(node, list):
        return [_defaults_for_objects(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _defaults_for_objects(value) for key, value in node.items()}
    properties = node.get("properties")
    if isinstance(properties, dict):
        required = set(node.get("required", ()))
        for name, child in properties.items():
            if (name not in required and child.get("type") == "object" and "properties" in child
                    and "default" not in child and not child.get("nullable")):
                child["default"] = {}
    return node


def openapi_schema(model: type[BaseModel]) -> Schema:
    """The structural OpenAPI v3.0 schema of a pydantic model (camelCase field names)."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    return _defaults_for_objects(_structural(_resolve(schema, defs)))


# --------------------------------------------------------------------------- the CRDs


def _printer_column(name: str, path: str, kind: str = "string", description: str = "", priority: int = 0) -> Schema:
    column: Schema = {"name": name, "type": kind, "jsonPath": path}
    if description:
        column["description"] = description
    if priority:
        column["priority"] = priority
    return column


def _crd(kind: str, plural: str, short: str, spec: type[BaseModel], status: type[BaseModel],
         columns: list[Schema], description: str) -> Schema:
    spec_schema = openapi_schema(spec)
    spec_schema.pop("description", None)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}", "labels": {"app.kubernetes.io/part-of": "recops"}},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                "shortNames": [short], "categories": [CATEGORY],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    *columns, _printer_column("Age", ".metadata.creationTimestamp", "date"),
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": description,
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": {**spec_schema, "description": spec.__doc__.strip() if spec.__doc__ else ""},
                        "status": openapi_schema(status),
                    },
                }},
            }],
        },
    }


def recmodel_crd() -> Schema:
    """The RecModel CRD."""
    return _crd(
        "RecModel", "recmodels", "rm", RecModelSpec, RecModelStatus,
        [
            _printer_column("Phase", ".status.phase"),
            _printer_column("Revision", ".status.revision"),
            _printer_column("Recall", ".status.recall", "number", "Recall@20 on the test split"),
            _printer_column("Endpoint", ".status.endpoint"),
            _printer_column("Job", ".status.trainingJob", priority=1),
        ],
        "A recommender: data, an LLM backbone with LoRA, training, and serving on Triton.",
    )


def recexperiment_crd() -> Schema:
    """The RecExperiment CRD."""
    return _crd(
        "RecExperiment", "recexperiments", "rexp", RecExperimentSpec, RecExperimentStatus,
        [
            _printer_column("Phase", ".status.phase"),
            _printer_column("Step", ".status.currentStep", "integer"),
            _printer_column("Weight", ".status.weight", "number", "Percent of users on the treatment"),
            _printer_column("Winner", ".status.winner"),
            _printer_column("Control", ".spec.control.model", priority=1),
            _printer_column("Treatment", ".spec.treatment.model", priority=1),
        ],
        "An A/B rollout of a treatment RecModel against a control, judged by Prometheus gates.",
    )


def kopf_peering_crds() -> list[Schema]:
    """kopf's peering CRDs (``kopf.dev/v1``): how replicas of the operator elect the one that works.
    Each keeps its liveness and priority in the peering object's status; the highest live one runs."""
    def peering(kind: str, plural: str, scope: str) -> Schema:
        return {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.kopf.dev", "labels": {"app.kubernetes.io/part-of": "recops"}},
            "spec": {
                "group": "kopf.dev", "scope": scope,
                "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                "versions": [{
                    "name": "v1", "served": True, "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    }}},
                }],
            },
        }

    return [peering("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
            peering("KopfPeering", "kopfpeerings", "Namespaced")]


CRDS: Mapping[str, Callable[[], Schema | list[Schema]]] = {
    "recmodels.yaml": recmodel_crd,
    "recexperiments.yaml": recexperiment_crd,
    "kopf-peering.yaml": kopf_peering_crds,
}


def render_crds() -> dict[str, str]:
    """File name → YAML text of each CRD file, as committed in ``crds/``."""
    header = "# Generated by `recops crds --out crds/` from src/recops/api. Do not edit.\n"
    texts = {}
    for name, build in CRDS.items():
        built = build()
        documents = built if isinstance(built, list) else [built]
        texts[name] = header + yaml.safe_dump_all(documents, sort_keys=False, width=120, allow_unicode=True)
    return texts


def write_crds(out: Path) -> list[Path]:
    """Write every CRD into ``out`` (created if needed); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_crds().items():
        path = out / name
        path.write_text(text)
        written.append(path)
    return written
