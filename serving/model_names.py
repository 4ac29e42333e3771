"""The one answer to a model name an API does not serve, on every route of both APIs."""

from __future__ import annotations

from collections.abc import Sequence

from broker.errors import NotFound


def require_served(model: str, served: Sequence[str]) -> None:
    """Refuse a model name that is not one of `served`.

    Raises:
        NotFound: 404 `not_found` naming `model` as the field at fault and the names served.
    """
    if model not in served:
        names = " or ".join(repr(name) for name in served)
        raise NotFound(f"model {model!r} does not exist here; use {names}", param="model")
