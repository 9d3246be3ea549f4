"""API request and response models (apart from the ORM models)."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

T = TypeVar("T")
Action = Literal["allow", "flag", "review", "block"]
Status = Literal["queued", "review", "running", "completed", "blocked", "failed"]
ALLOWED_CONTROL = {"\n", "\t"}


def check_text(value: str, *, field: str) -> str:
    bad = [c for c in value if unicodedata.category(c) == "Cc" and c not in ALLOWED_CONTROL]
    if bad:
        raise ValueError(f"{field} contains control characters ({', '.join(repr(c) for c in bad[:3])})")
    if not value.strip():
        raise ValueError(f"{field} must not be blank")
    return value


def to_utc(value: datetime) -> datetime:
    """A timestamp with a timezone, in UTC; a naive one or one outside the calendar once in UTC is refused."""
    if value.utcoffset() is None:
        raise PydanticCustomError("timezone_required", "give a timezone, e.g. 2026-01-01T00:00:00Z")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise PydanticCustomError("datetime_out_of_range", "out of range once converted to UTC") from None


UTCTimestamp = Annotated[datetime, AfterValidator(to_utc)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN would pass no bound check clearly


class SamplingParamsIn(Strict):
    cfg_scale: float | None = Field(None, ge=1.0, le=20.0, description="classifier-free guidance scale")
    temperature: float | None = Field(None, gt=0.0, le=5.0)
    top_k: int | None = Field(None, ge=0, le=65536, description="0 disables top-k")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="1.0 disables top-p")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="omitted: drawn and recorded")
    num_images: int = Field(1, ge=1, le=16)


class GenerationCreate(Strict):
    model: str | None = Field(None, min_length=1, max_length=128,
                              description="model card name; the default model if omitted")
    prompt: str | None = Field(None, min_length=1, max_length=4000, description="text-to-image models")
    class_id: int | None = Field(None, ge=0, description="class-conditional models")
    params: SamplingParamsIn = Field(default_factory=SamplingParamsIn)

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "demo-shapes-t2i", "prompt": "a small red star above a large blue circle on a white background",
         "params": {"cfg_scale": 3.0, "seed": 7, "num_images": 1}},
        {"model": "demo-shapes-c2i", "class_id": 3, "params": {"seed": 1}},
    ]})

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value: str | None) -> str | None:
        return None if value is None else check_text(value, field="prompt")

    @model_validator(mode="after")
    def _one_condition(self) -> GenerationCreate:
        if self.prompt is None and self.class_id is None:
            raise ValueError("give a prompt (text-to-image) or a class_id (class-conditional)")
        return self


class ModerationCreate(Strict):
    prompt: str = Field(..., min_length=1, max_length=4000)
    model: str | None = Field(None, min_length=1, max_length=128,
                              description="model card name (its lineage can matter); the default model if omitted")

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "a small red star above a large blue circle on a white background", "model": "demo-shapes-t2i"},
    ]})

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value: str) -> str:
        return check_text(value, field="prompt")


class ImagePublic(BaseModel):
    index: int
    sha256: str
    url: str
    manifest_id: str
    audit_event_id: str
    width: int
    height: int


class GenerationPublic(BaseModel):
    id: str
    status: Status
    model: str
    model_card_hash: str
    team: str
    task: str
    prompt: str | None = None
    class_id: int | None = None
    params: dict[str, Any]
    policy_revision: str
    decisions: dict[str, Any]
    images: list[ImagePublic]
    error: str | None = None
    timings: dict[str, Any]
    cost: dict[str, Any]
    review: dict[str, Any] | None = None
    created_at: datetime
    updated_at: datetime


class ReviewItem(GenerationPublic):
    """A generation waiting for a reviewer. Parked at output screening, it holds its images for the reviewer
    to look at: signed and audited as held, released only if the reviewer approves."""

    held_images: list[ImagePublic] = Field(default_factory=list)


class ModerationPublic(BaseModel):
    decision: dict[str, Any]
    classifiers: list[dict[str, Any]]
    policy_revision: str
    audit_event_id: str


class ReviewDecisionIn(Strict):
    decision: Literal["approve", "reject"]
    reason: str = Field(..., min_length=3, max_length=2000, description="required: why")

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"decision": "approve", "reason": "a generic illustration; no real person is depicted"},
        {"decision": "reject", "reason": "shows a real public figure"},
    ]})

    @field_validator("reason")
    @classmethod
    def _reason_text(cls, value: str) -> str:
        return check_text(value, field="reason")


class PolicyPublic(BaseModel):
    revision: str
    policy_id: str
    version: str
    author: str
    reason: str
    created_at: datetime
    active: bool
    source: str | None = None


class Page(BaseModel, Generic[T]):
    data: list[T]
    count: int
    next_before: str | None = Field(None, description="where a list pages by cursor: pass as `before` for the "
                                                      "next page (stable while new items arrive); null on the last")


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str
    details: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

MAX_OFFSET = 1_000_000_000  # keeps page offsets inside every database's integer range
