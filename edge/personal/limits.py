"""Per-user bounds of the user store: how many users, how many bytes each, how fast feedback.

One user's data must not stall or crowd out the others: `UserLimits` caps the number of users
(a new one past it: 413), the bytes a user's stored text takes (persona, feedback samples and
rejected texts, in UTF-8; past it: 413) and the feedback rate of each user (a token bucket,
`FeedbackRate`; past it: 429 with `Retry-After`). All come from `EdgeSettings.personalize_*`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from broker.errors import Overloaded
from serving.errors import PayloadTooLarge

#: Default caps (the settings' defaults; see `EdgeSettings.personalize_*`).
DEFAULT_MAX_USERS = 1000
DEFAULT_MAX_USER_BYTES = 128 << 10
DEFAULT_FEEDBACK_PER_MINUTE = 60.0
DEFAULT_FEEDBACK_BURST = 20


class RateLimited(Overloaded):
    """Too many requests of one user: `overloaded` in the envelope, HTTP 429 (Retry-After)."""

    http_status: ClassVar[int] = 429


class StoreFull(PayloadTooLarge):
    """A user's data (or the number of users) at its cap: `bad_request`, HTTP 413."""


@dataclass(frozen=True)
class UserLimits:
    """The caps of one store (module docstring).

    Attributes:
        max_users: profiles the store holds at most.
        max_user_bytes: UTF-8 bytes of one user's persona and feedback texts at most.
        feedback_per_minute: feedback samples one user may add per minute, sustained.
        feedback_burst: samples one user may add at once (the bucket's size).
    """

    max_users: int = DEFAULT_MAX_USERS
    max_user_bytes: int = DEFAULT_MAX_USER_BYTES
    feedback_per_minute: float = DEFAULT_FEEDBACK_PER_MINUTE
    feedback_burst: int = DEFAULT_FEEDBACK_BURST

    def check_users(self, count: int) -> None:
        """Refuse a new user when the store holds `count` >= `max_users` already.

        Raises:
            StoreFull: (413) the store is full.
        """
        if count >= self.max_users:
            raise StoreFull(
                f"the user store holds the most users allowed ({self.max_users}): delete "
                "users or raise HG_EDGE_PERSONALIZE_MAX_USERS",
                param="user_id",
            )

    def check_bytes(self, used: int, param: str) -> None:
        """Refuse a change that leaves a user with `used` > `max_user_bytes` bytes of text.

        Raises:
            StoreFull: (413) naming `param`.
        """
        if used > self.max_user_bytes:
            raise StoreFull(
                f"this user's stored text would take {used} bytes, over the "
                f"{self.max_user_bytes} allowed per user: reset the user (POST "
                "/v1/users/{id}/reset) or raise HG_EDGE_PERSONALIZE_MAX_USER_BYTES",
                param=param,
            )


class FeedbackRate:
    """One token bucket per user: `feedback_burst` tokens, refilled at `feedback_per_minute`.

    Not thread-safe: the store calls it under its lock. Buckets exist only for users who
    sent feedback; `forget` drops one (a deleted user), `len` counts them.
    """

    def __init__(self, limits: UserLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, as of)

    def take(self, user_id: str) -> None:
        """Spend one token of the user's bucket.

        Raises:
            RateLimited: (429) the bucket is empty; `retry_after` is when a token is back.
        """
        rate = self.limits.feedback_per_minute / 60.0
        burst = float(self.limits.feedback_burst)
        now = self.clock()
        tokens, since = self._buckets.get(user_id, (burst, now))
        tokens = min(burst, tokens + (now - since) * rate)
        if tokens < 1.0:
            self._buckets[user_id] = (tokens, now)
            wait = (1.0 - tokens) / rate if rate > 0 else 60.0
            raise RateLimited(
                f"too much feedback for this user: at most {self.limits.feedback_per_minute:g} "
                f"a minute (bursts of {self.limits.feedback_burst}); retry in {wait:.1f} s",
                retry_after=wait,
            )
        self._buckets[user_id] = (tokens - 1.0, now)

    def forget(self, user_id: str) -> None:
        """Drop the user's bucket (nothing is kept about a deleted user)."""
        self._buckets.pop(user_id, None)

    def __len__(self) -> int:
        return len(self._buckets)
