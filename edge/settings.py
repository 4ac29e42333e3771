"""Settings of an edge node. Environment prefix `HG_EDGE_`; the CLI overrides them."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from broker.settings import BusSettings, hg_home
from edge.runtime.drafts import DRAFT_CACHE_MIN_PROB
from models.registry import EDGE_MODEL
from serving.auth import KeyRing, parse_key_entries
from serving.context import MAX_TOKENS_CAP, MAX_TOKENS_CAP_HELP
from serving.drafts import draft_min_match_field, draft_tokens_field
from serving.settings import HttpSettings, split_list


class EdgeSettings(HttpSettings):
    """How one edge node runs. Every field can be set as `HG_EDGE_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="HG_EDGE_", extra="ignore")

    port: int = Field(default=8400, ge=0, le=65535, description="HTTP port (0: any free one).")
    model_dir: Path | None = Field(
        default=None,
        description="An onnxruntime-genai model folder (any builder output); none: the "
        "edge build of the current model set.",
    )
    model_version: str | None = Field(
        default=None, description="Model-set version to serve (none: CURRENT)."
    )
    precision: str = Field(default="int4", description="Edge build of the model set to use.")
    threads: int = Field(default=1, ge=1, le=64, description="ONNX intra-op threads.")
    max_active: int = Field(
        default=4, ge=1, le=64, description="Requests generated at once (round-robin)."
    )
    max_queue: int = Field(
        default=32, ge=0, description="Requests waiting for a slot before 503 overloaded."
    )
    max_tokens_cap: int = Field(
        default=MAX_TOKENS_CAP,
        ge=1,
        description=MAX_TOKENS_CAP_HELP,
    )
    speculative: bool = Field(
        default=True,
        description="Speculative decoding: draft tokens from the request's own text and the "
        "user's n-gram cache and check them in one forward pass (each token is still the "
        "model's own choice); a request's `speculative: false` or the policy's turns it off.",
    )
    draft_tokens: int = draft_tokens_field()
    draft_min_match: int = draft_min_match_field()
    draft_cache_min_prob: float = Field(
        default=DRAFT_CACHE_MIN_PROB,
        gt=0,
        le=1,
        description="Draft from a user's n-gram cache the tokens it gives at least this "
        "probability.",
    )
    prefix_cache_mb: float = Field(
        default=256.0,
        ge=0,
        description="Memory (estimated KV MiB) for kept persona prefixes reused across a "
        "user's requests; 0 turns prefix reuse off.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer keys required on every request (HG_EDGE_API_KEYS comma-separated); "
        "an entry KEY@alice+bob may also act for those users, KEY@* for every user (admin). "
        "Empty leaves plain completions open, which only a loopback host allows.",
    )
    user_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Keys for users' data only (HG_EDGE_USER_KEYS comma-separated), each "
        "KEY@alice+bob (those users) or KEY@* (every user): a request's `user` and "
        "/v1/users/<id> need a key covering the id; these keys do not close the API.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names the API answers to besides its bind host, loopback and the "
        "advertised URL's host (comma-separated; * for any): other Host headers are refused "
        "(DNS rebinding).",
    )
    node_id: str | None = Field(
        default=None, description="Node id on the bus (none: edge-<host>-<4 hex>)."
    )
    nats_url: str | None = Field(
        default=None, description="NATS server URL (none: HG_NATS_URL or localhost:4222)."
    )
    no_cloud: bool = Field(
        default=False, description="Never connect to the bus: serve everything locally."
    )
    cloud_model: str = Field(
        default="hg-cloud", description="Model the cloud workers serve (`hg.gen.<model>`)."
    )
    edge_model_name: str = Field(default=EDGE_MODEL, description="Model name of the edge.")
    reconnect_s: float = Field(
        default=2.0, gt=0, description="Seconds between attempts to reach an absent bus."
    )
    telemetry_interval_s: float = Field(
        default=1.0, gt=0, description="Seconds between heartbeats."
    )
    policy: dict[str, Any] = Field(
        default_factory=dict,
        description="Local routing policy (JSON), under the fleet's and the node's KV policy.",
    )
    advertise_url: str | None = Field(
        default=None,
        description="Base URL of this node's HTTP API, told to the fleet in heartbeats (the "
        "console's test prompt uses it; none: http://<host>:<port>, a wildcard host replaced "
        "by the hostname; unset when port is 0).",
    )
    users_db: Path | None = Field(
        default=None,
        description="SQLite file of the users' profiles, feedback and learned state (none: "
        "<HG_HOME>/edge/<node_id or 'default'>/users.sqlite3; created on first use).",
    )

    personalize_memory_mb: float = Field(
        default=64.0,
        gt=0,
        description="Memory budget (estimated) of the users' n-gram caches kept in memory; "
        "the least recently used users are dropped past it (their state stays stored).",
    )
    personalize_samples: int = Field(
        default=8,
        ge=0,
        le=16,
        description="Most of a user's own feedback samples offered to a request's context, "
        "picked for their relevance to it (0: none).",
    )
    personalize_sample_tokens: int = Field(
        default=256,
        ge=0,
        description="Most tokens of the user's samples in a request's context (also at most "
        "a quarter of the edge model's context window).",
    )
    personalize_sample_gain: float = Field(
        default=2.0,
        description="The samples stay in a request's context only when they make the "
        "request's own tokens more likely by more than this many nats in all (the request "
        "is prefilled with and without them); otherwise it runs without them.",
    )
    personalize_persist_s: float = Field(
        default=2.0,
        gt=0,
        description="Seconds after a feedback before the user's updated cache is written "
        "back to the user store.",
    )
    personalize_max_contexts: int = Field(
        default=40_000,
        ge=1,
        description="Most n-gram contexts kept per user (the oldest go first); with "
        "personalize_max_user_bytes it must let the largest user fit personalize_memory_mb.",
    )
    personalize_max_users: int = Field(
        default=1000, ge=1, description="Most users in the user store (a new one past it: 413)."
    )
    personalize_max_user_bytes: int = Field(
        default=64 << 10,
        ge=1024,
        description="Most bytes (UTF-8) of one user's persona and feedback texts (past it: 413).",
    )
    personalize_feedback_per_minute: float = Field(
        default=60.0, gt=0, description="Feedback samples one user may add per minute (429 past)."
    )
    personalize_feedback_burst: int = Field(
        default=20, ge=1, description="Feedback samples one user may add at once."
    )

    @field_validator("user_keys", mode="before")
    @classmethod
    def _split_user_keys(cls, value: object) -> object:
        return split_list(value)

    def key_ring(self) -> KeyRing:
        """The API keys and user keys, parsed.

        Raises:
            ValueError: a malformed entry, named by position (never the key itself).
        """
        return KeyRing(
            parse_key_entries(self.api_keys, setting="HG_EDGE_API_KEYS / --api-key"),
            parse_key_entries(
                self.user_keys, setting="HG_EDGE_USER_KEYS / --user-key", need_users=True
            ),
        )

    def check_exposure(self) -> None:
        """Refuse malformed keys or origins, an open API (no keys) beyond loopback, and a
        key-protected /metrics without keys.

        Raises:
            ValueError: the message says what to fix.
        """
        self.key_ring()
        super().check_exposure()

    @model_validator(mode="after")
    def _default_users_db(self) -> EdgeSettings:
        # Resolved once, here: a node id made up later (at start) must not move the file.
        if self.users_db is None:
            self.users_db = default_users_db(self.node_id)
        return self

    @model_validator(mode="after")
    def _default_advertise_url(self) -> EdgeSettings:
        if self.advertise_url is None and self.port != 0:
            self.advertise_url = default_advertise_url(self.host, self.port)
        elif self.advertise_url is not None:
            self.advertise_url = self.advertise_url.rstrip("/") or None
        return self

    def bus(self) -> BusSettings:
        """The bus settings, `nats_url` overriding HG_NATS_URL and the context's URL (whose
        login then stays with the context's server)."""
        return BusSettings.resolve(url=self.nats_url or None)


def default_advertise_url(host: str, port: int) -> str:
    """`http://<host>:<port>`, a wildcard bind address (0.0.0.0, ::) replaced by the hostname."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostname()
    elif ":" in host and not host.startswith("["):  # an IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{port}"


def default_users_db(node_id: str | None) -> Path:
    """`<HG_HOME>/edge/<node_id or 'default'>/users.sqlite3` (odd characters become `_`)."""
    folder = re.sub(r"[^A-Za-z0-9_-]", "_", node_id or "default")
    return hg_home() / "edge" / folder / "users.sqlite3"
