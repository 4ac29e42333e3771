"""The user store's data: user ids, profile and feedback bodies, the listener protocol.

Split from `edge.personal.store` (the SQLite store), which re-exports every name here.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from broker.errors import BadRequest
from serving.auth import USER_ID_PATTERN

MAX_DISPLAY_NAME = 200
MAX_PERSONA = 8000
MAX_SAMPLE = 20000
DEFAULT_MAX_FEEDBACK = 1000


def check_user_id(user_id: str) -> str:
    """`user_id` if it is valid.

    Raises:
        BadRequest: (param `user_id`) not 1-128 characters of letters, digits and `._@:-`
            starting with a letter or digit.
    """
    if not isinstance(user_id, str) or not USER_ID_PATTERN.fullmatch(user_id):
        raise BadRequest(
            "invalid user id: use 1 to 128 characters of letters, digits and `._@:-`, "
            "starting with a letter or digit",
            param="user_id",
        )
    return user_id


class ProfileUpdate(BaseModel):
    """A profile change (the body of `PUT /v1/users/{id}`).

    Fields left out keep their current value (their default for a new user); `null` clears
    display_name, persona and the sampling preferences (the request's or the node's then
    apply). The consent flags cannot be null.
    """

    model_config = ConfigDict(extra="forbid")

    display_name: str | None = Field(default=None, max_length=MAX_DISPLAY_NAME)
    persona: str | None = Field(
        default=None,
        max_length=MAX_PERSONA,
        description="Style or background text put before the user's requests (system message).",
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    allow_cloud: StrictBool = Field(
        default=True, description="May this user's requests go to the cloud at all."
    )
    share_profile: StrictBool = Field(
        default=False, description="May the persona and learned data go with them."
    )


class Profile(BaseModel):
    """A stored profile."""

    user_id: str
    display_name: str | None = None
    persona: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    allow_cloud: bool = True
    share_profile: bool = False
    created: float
    updated: float


class Feedback(BaseModel):
    """One stored feedback sample."""

    id: int
    accepted: str
    rejected: str | None = None
    created: float


class FeedbackBody(BaseModel):
    """The body of `POST /v1/users/{id}/feedback`."""

    model_config = ConfigDict(extra="forbid")

    accepted: str = Field(
        min_length=1, max_length=MAX_SAMPLE, description="Text the user accepted or wrote."
    )
    rejected: str | None = Field(
        default=None, max_length=MAX_SAMPLE, description="Text the user rejected, if any."
    )


class UserListener(Protocol):
    """Told about changes to users' data (the adaptation model plugs in here)."""

    def on_feedback(self, user_id: str, accepted: str, rejected: str | None) -> None:
        """A feedback sample was stored for `user_id`."""

    def on_forget(self, user_id: str) -> None:
        """`user_id`'s learned data was wiped (reset) or the user was deleted."""
