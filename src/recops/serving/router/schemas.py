"""Request and response bodies of the router's HTTP API (pydantic v2; the OpenAPI document is built from these).

Requests are strict (``"k": "10"`` or ``"user_id": 42`` is refused, not coerced) and refuse unknown
fields, so a client's typo is named instead of ignored. Limits that come from the config file
(``maxK``, ``maxHistory``, ...) are checked by the handlers and written into the served OpenAPI
document by :mod:`recops.serving.router.openapi`.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, RootModel, Tag, ValidationInfo, field_validator

from recops.serving.contract import FEEDBACK_EVENTS

Id = Annotated[str, Field(min_length=1, max_length=256)]

_REQUEST = ConfigDict(strict=True, extra="forbid")
# The event log's device column: logged with the events so that a retrain sees what training saw (the
# feature check refuses a feedback log that lacks a column the training events have).
Device = Annotated[str, Field(min_length=1, max_length=128, description="The client's device, e.g. iOS14.2.")]


class RecommendRequest(BaseModel):
    """``POST /v1/recommend``."""

    model_config = _REQUEST

    user_id: Id = Field(description="The user; decides the arm (sticky).")
    history: list[Id] = Field(default_factory=list, description="Recent item ids, oldest first.")
    k: int = Field(10, ge=1, description="How many items (at most limits.maxK).")
    candidates: list[Id] | None = Field(None, description="Rank only these items (default: the whole catalog).")
    arm: Id | None = Field(None, description="Force this configured arm (testing); not counted as an assignment.")
    device: Device | None = None


class Item(BaseModel):
    """One recommended item."""

    item_id: str
    score: float = Field(description="Retrieval score (higher is better).")
    click: float = Field(description="Click probability.")
    like: float = Field(description="Like probability.")


class RecommendResponse(BaseModel):
    """Answer of ``POST /v1/recommend``: items best first."""

    request_id: str = Field(description="Send it back with feedback on these items.")
    experiment: str
    arm: str
    items: list[Item]


FeedbackEventName = Literal["click", "like", "cart", "purchase"]
assert get_args(FeedbackEventName) == FEEDBACK_EVENTS  # one list of events: the contract's


class FeedbackEvent(BaseModel):
    """One feedback event."""

    model_config = _REQUEST

    user_id: Id
    item_id: Id
    event: FeedbackEventName
    value: float | None = Field(None, ge=0, allow_inf_nan=False, description="Purchase value (purchase only).")
    request_id: str | None = Field(None, max_length=128, description="The recommend response's request_id.")
    arm: Id | None = Field(None, description="The arm that served the items; default: the user's sticky arm.")
    device: Device | None = None
    timestamp: float | None = Field(
        None, gt=0, lt=1e13, allow_inf_nan=False, description="Epoch seconds; default: when the router got it."
    )

    @field_validator("value")
    @classmethod
    def _value_only_for_purchases(cls, value: float | None, info: ValidationInfo) -> float | None:
        event = info.data.get("event")
        if value is not None and event is not None and event != "purchase":
            raise ValueError(f"only purchase events carry a value, this is a {event} event")
        return value


class FeedbackBatch(BaseModel):
    """Several feedback events in one request (at most limits.maxFeedbackBatch); accepted all or none."""

    model_config = _REQUEST

    events: list[FeedbackEvent] = Field(min_length=1)


def _feedback_kind(body: object) -> str:
    return "batch" if isinstance(body, dict) and "events" in body else "event"


class FeedbackBody(RootModel[Annotated[
    Annotated[FeedbackEvent, Tag("event")] | Annotated[FeedbackBatch, Tag("batch")], Discriminator(_feedback_kind)
]]):
    """``POST /v1/feedback``: one event, or ``{"events": [...]}``."""


class FeedbackAccepted(BaseModel):
    """Answer of ``POST /v1/feedback`` (202): the events are queued for the log and counted."""

    accepted: int


class Error(BaseModel):
    """Any 4xx/5xx answer: a message naming the wrong fields, and their paths."""

    error: str
    fields: list[str] = Field(default_factory=list, description="Paths of the wrong fields, e.g. history[3].")


class Health(BaseModel):
    """``GET /healthz``: the process is serving."""

    status: Literal["ok"]
    experiment: str
    config_hash: str


class Readiness(BaseModel):
    """``GET /readyz``: 200 when every arm's upstream answers, else 503."""

    ready: bool
    experiment: str
    config_hash: str
    arms: dict[str, bool]
