"""The OpenAPI 3.1 document of the router, built from the pydantic models in :mod:`.schemas`.

The models are the single source of the bodies' shapes; this module adds the paths and writes the
config's limits (``maxK``, ``maxHistory``, the arm names, ...) into the schemas, so the served
document describes exactly what this router accepts. Built once per config version.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic.json_schema import models_json_schema

from recops.serving.router.config import RouterConfig
from recops.serving.router.schemas import (
    Error,
    FeedbackAccepted,
    FeedbackBatch,
    FeedbackBody,
    FeedbackEvent,
    Health,
    Readiness,
    RecommendRequest,
    RecommendResponse,
)

_REF = "#/components/schemas/{model}"


def _json(ref: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": ref}}}
    if headers:
        response["headers"] = headers
    return response


def _array_branch(schema: dict[str, Any]) -> dict[str, Any]:
    """The array schema of ``list[...]`` or of the non-null branch of ``list[...] | None``."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "array":
            return branch
    raise KeyError("no array schema")


def _string_branch(schema: dict[str, Any]) -> dict[str, Any]:
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "string":
            return branch
    raise KeyError("no string schema")


def _component_schemas() -> tuple[dict[Any, dict[str, Any]], dict[str, Any]]:
    refs, top = models_json_schema(
        [
            (RecommendRequest, "validation"),
            (FeedbackBody, "validation"),
            (RecommendResponse, "serialization"),
            (FeedbackAccepted, "serialization"),
            (Error, "serialization"),
            (Health, "serialization"),
            (Readiness, "serialization"),
        ],
        ref_template=_REF,
    )
    return refs, top["$defs"]


def openapi_document(config: RouterConfig) -> bytes:
    """The document served at ``/openapi.json`` for this config (JSON bytes)."""
    refs, schemas = _component_schemas()
    limits = config.limits
    arm_names = [arm.name for arm in config.arms]

    request = schemas[RecommendRequest.__name__]["properties"]
    request["k"]["maximum"] = limits.max_k
    _array_branch(request["history"])["maxItems"] = limits.max_history
    _array_branch(request["candidates"])["maxItems"] = limits.max_candidates
    _string_branch(request["arm"])["enum"] = arm_names
    _string_branch(schemas[FeedbackEvent.__name__]["properties"]["arm"])["enum"] = arm_names
    _array_branch(schemas[FeedbackBatch.__name__]["properties"]["events"])["maxItems"] = limits.max_feedback_batch

    def ref(model: type, mode: str = "serialization") -> dict[str, Any]:
        return refs[(model, mode)]

    error = ref(Error)
    refused = {
        "400": _json(error, "The body is not JSON."),
        "413": _json(error, f"The body is larger than {limits.max_body_bytes} bytes."),
        "422": _json(error, "A field is missing, of the wrong type or over a limit; the message names it."),
    }
    retry_after = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "recops router",
            "version": config.experiment,
            "description": "A/B router: sticky assignment of users to arms, recommendations, feedback.",
        },
        "paths": {
            "/v1/recommend": {"post": {
                "summary": "Recommend items for a user from the user's arm.",
                "operationId": "recommend",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": ref(RecommendRequest, "validation")}}},
                "responses": {
                    "200": _json(ref(RecommendResponse), "Items, best first."),
                    **refused,
                    "502": _json(error, "The arm's upstream failed."),
                    "503": _json(error, "Overloaded (too many requests in flight).", retry_after),
                    "504": _json(error, "The arm's upstream timed out."),
                },
            }},
            "/v1/feedback": {"post": {
                "summary": "Record feedback events (one, or a batch of at most limits.maxFeedbackBatch).",
                "operationId": "feedback",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": ref(FeedbackBody, "validation")}}},
                "responses": {
                    "202": _json(ref(FeedbackAccepted), "Accepted into the feedback log's queue and counted."),
                    **refused,
                    "503": _json(error, "The feedback log's queue is full; nothing was accepted.", retry_after),
                },
            }},
            "/healthz": {"get": {"summary": "Liveness.", "operationId": "healthz",
                                 "responses": {"200": _json(ref(Health), "Serving.")}}},
            "/readyz": {"get": {"summary": "Readiness: every arm's upstream answers.", "operationId": "readyz",
                                "responses": {"200": _json(ref(Readiness), "Ready."),
                                              "503": _json(ref(Readiness), "Not ready.")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics.", "operationId": "metrics", "responses": {
                "200": {"description": "Text exposition format.", "content": {"text/plain": {
                    "schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document.", "operationId": "openapi", "responses": {
                "200": {"description": "OpenAPI 3.1.", "content": {"application/json": {
                    "schema": {"type": "object"}}}}}}},
        },
        "components": {"schemas": schemas},
    }
    return orjson.dumps(document)
