"""What both HTTP APIs are configured with: where they listen and who may call them.

`HttpSettings` is the base of the edge's and the cloud API's settings: the bind address, the
body limit, the API keys, the allowed hosts and web origins, and the exposure rule that
refuses an open API beyond loopback (`check_exposure`). Lists come from the environment as
comma-separated text or a JSON list, the same for every list field of both APIs.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode

from serving.auth import check_exposure
from serving.browsers import parse_origins
from serving.limits import KeyRule, parse_rules


def split_list(value: object) -> object:
    """A list setting from the environment: comma-separated, or a JSON list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class HttpSettings(BaseSettings):
    """The HTTP side of an API. A subclass sets `model_config`'s `env_prefix` (the exposure
    rule's messages name its variables) and its port."""

    host: str = Field(default="127.0.0.1", description="HTTP bind address.")
    port: int = Field(default=0, ge=0, le=65535, description="HTTP port (0: any free one).")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="Largest request body.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer keys required on every request (comma-separated); empty leaves "
        "the API open, which only a loopback host allows.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names the API answers to besides its bind host and loopback "
        "(comma-separated; * for any): other Host headers are refused (DNS rebinding).",
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Web origins (scheme://host[:port], comma-separated) whose pages may call "
        "the API; empty: none, every cross-site browser request is refused.",
    )
    allow_open: bool = Field(
        default=False, description="Allow no API keys on a non-loopback host (insecure)."
    )
    metrics_require_key: bool = Field(
        default=False,
        description="Require an API key on /metrics too (default: open, like /healthz).",
    )
    key_limits: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict,
        description='Names and limits of API keys, JSON: {"alice": {"key_sha256": "<first 8+ '
        'hex digits of the key\'s SHA-256>", "rpm": 60, "tpm": 10000, "concurrent": 4}, "*": '
        "{...limits of every other key}}; the fleet config's `limits` key changes them live.",
    )

    @field_validator("api_keys", "allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("key_limits", mode="before")
    @classmethod
    def _parse_key_limits(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = json.loads(value) if value.strip() else {}
        return value

    def key_rules(self) -> dict[str, KeyRule]:
        """The `key_limits` setting, parsed (`serving.limits.parse_rules`).

        Raises:
            ValueError: the message names the entry at fault, never a key.
        """
        env = self.model_config.get("env_prefix", "")
        return parse_rules(self.key_limits, where=f"{env}KEY_LIMITS")

    def check_exposure(self) -> None:
        """Refuse a malformed allowed origin or key limit, an open API (no keys) beyond
        loopback, and a key-protected /metrics without keys.

        Raises:
            ValueError: the message says what to fix.
        """
        env = self.model_config.get("env_prefix", "")
        parse_origins(self.allowed_origins, setting=f"{env}ALLOWED_ORIGINS")
        self.key_rules()
        check_exposure(
            self.host,
            self.api_keys,
            allow_open=self.allow_open,
            metrics_require_key=self.metrics_require_key,
            set_key=f"--api-key KEY or {env}API_KEYS",
            allow=f"--allow-open / {env}ALLOW_OPEN=1",
        )
