"""Settings of the cloud worker and the cloud API (environment prefix `HG_CLOUD_`).

Both read the same prefix; each class ignores the other's fields. Command-line flags
override the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.registry import CLOUD_MODEL
from serving.auth import KeyRing, parse_key_entries
from serving.context import MAX_TOKENS_CAP, MAX_TOKENS_CAP_HELP
from serving.drafts import draft_min_match_field, draft_tokens_field
from serving.settings import HttpSettings, split_list

#: Default most rows x columns of a step that checks drafts (`cloud.speculative.propose`).
VERIFY_TOKENS = 8


class WorkerSettings(BaseSettings):
    """`hybridgen cloud worker`."""

    model_config = SettingsConfigDict(env_prefix="HG_CLOUD_", extra="ignore")

    model: str = Field(
        default=CLOUD_MODEL, description="Model name served on `hg.gen.<model>` (a subject token)."
    )
    model_dir: Path | None = Field(
        default=None,
        description="Checkpoint folder to load; none: the `cloud/` model of the current "
        "model set (`hybridgen models build`).",
    )
    model_set: str | None = Field(
        default=None, description="Model-set version to load from (none: CURRENT)."
    )
    node_id: str | None = Field(
        default=None, description="This worker's node id (none: cloud-<host>-<hex>)."
    )
    device: str | None = Field(
        default=None, description="'cpu' or 'cuda'; none: CUDA when available."
    )
    threads: int | None = Field(
        default=None, ge=1, description="torch threads on CPU (none: all cores)."
    )
    max_queue_requests: int = Field(
        default=64, ge=1, description="Requests admitted at once (running + waiting)."
    )
    max_queue_tokens: int = Field(
        default=32768,
        ge=16,
        description="Sum of prompt + max_tokens over admitted requests; beyond it: overloaded.",
    )
    max_batch_requests: int = Field(default=32, ge=1, description="Sequences per forward step.")
    max_batch_tokens: int = Field(default=1024, ge=16, description="Tokens per forward step.")
    cache_tokens: int = Field(
        default=16384,
        ge=64,
        description="Most prompt + max_tokens, summed over the batch's requests, on CPU and CUDA "
        "alike (it bounds the KV cache); a request beyond it waits its turn.",
    )
    max_tokens_cap: int = Field(
        default=MAX_TOKENS_CAP,
        ge=1,
        description=MAX_TOKENS_CAP_HELP,
    )
    speculative: bool = Field(
        default=True,
        description="Speculative decoding: draft tokens from each request's own text and "
        "check every row's draft in the batch's forward (each token is still the model's own "
        "choice); a request's `speculative: false` turns it off for that request.",
    )
    draft_tokens: int = draft_tokens_field()
    draft_min_match: int = draft_min_match_field()
    verify_tokens: int = Field(
        default=VERIFY_TOKENS,
        ge=2,
        description="Most rows x columns of a step that checks drafts: every row of the batch "
        "pays the longest draft's columns, so a batch of B rows drafts at most "
        "verify_tokens // B - 1 tokens a row, none when that is 0.",
    )
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight requests may finish."
    )
    heartbeat_s: float = Field(default=1.0, gt=0, description="Heartbeat interval.")
    retry_after_s: float = Field(
        default=1.0, gt=0, description="Retry-After sent with `overloaded`."
    )


class ApiSettings(HttpSettings):
    """`hybridgen cloud api`. Every field can be set as `HG_CLOUD_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="HG_CLOUD_", extra="ignore")

    port: int = Field(default=8500, ge=0, le=65535, description="Port (0: any free port).")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [CLOUD_MODEL],
        description="Model names served (comma-separated); each is `hg.gen.<model>`.",
    )
    accept_timeout_s: float = Field(default=2.0, gt=0, description="Wait for a worker to admit.")
    idle_timeout_s: float = Field(default=15.0, gt=0, description="Longest gap between tokens.")
    request_timeout_s: float = Field(default=120.0, gt=0, description="Whole-request deadline.")
    node_id: str | None = Field(
        default=None, description="This API's node id (none: api-<host>-<hex>)."
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Admin keys that do not close the API (comma-separated, each KEY@*): "
        "they read GET /v1/usage while an API without api_keys stays open on loopback.",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        return split_list(value)

    @field_validator("admin_keys", mode="before")
    @classmethod
    def _split_admin_keys(cls, value: object) -> object:
        return split_list(value)

    def key_ring(self) -> KeyRing:
        """The API keys, parsed: `KEY`, or `KEY@*` for an admin key (it may read `GET
        /v1/usage`); and the admin keys, `KEY@*`, which leave the API open.

        Raises:
            ValueError: a malformed entry, or one with users (the cloud API has none), named
                by position (never the key itself).
        """
        admin_setting = "HG_CLOUD_ADMIN_KEYS / --admin-key"
        admins = parse_key_entries(self.admin_keys, setting=admin_setting)
        for index, entry in enumerate(admins, 1):
            if entry.users is not None:
                raise ValueError(f"{admin_setting} entry {index}: give an admin key as KEY@*")
        setting = "HG_CLOUD_API_KEYS / --api-key"
        entries = parse_key_entries(self.api_keys, setting=setting)
        for index, entry in enumerate(entries, 1):
            if entry.users:
                raise ValueError(
                    f"{setting} entry {index}: a cloud API key acts for no users: give KEY, "
                    "or KEY@* for an admin key (a key itself holds no `@`)"
                )
        return KeyRing(entries, admins)

    def check_exposure(self) -> None:
        """Refuse malformed keys, key limits or origins, an open API beyond loopback and a
        key-protected /metrics without keys (`HttpSettings.check_exposure`)."""
        self.key_ring()
        super().check_exposure()
