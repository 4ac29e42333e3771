"""`/v1/users`: the edge's user profiles, feedback, reset, deletion and export (HTTP).

| route | does |
|---|---|
| `PUT /v1/users/{id}` | create the user or change the profile fields given (`ProfileUpdate`) |
| `GET /v1/users/{id}` | the profile |
| `DELETE /v1/users/{id}` | remove the user and everything about them |
| `POST /v1/users/{id}/feedback` | store `{"accepted": str, "rejected": str | null}` |
| `POST /v1/users/{id}/reset` | forget feedback and learned state, keep the profile |
| `GET /v1/users/{id}/export` | everything held about the user, as JSON |

Errors come in OpenAI's envelope: 404 `not_found` for an unknown user, 400 `bad_request`
naming `param` for a bad id or field (the store checks ids before anything else), 503
`unavailable` when the store's file is corrupt or locked (the rest of the edge keeps
serving), 413 `bad_request` past the number of users or a user's bytes, 429 `overloaded`
with Retry-After past a user's feedback rate (`edge.personal.limits`). DELETE and reset answer
`scrubbed`: false when a reader blocked the checkpoint (logged, retried; the text may stay
in the write-ahead log until then). Every route first checks that the caller's key covers the id
(`serving.auth.authorize_user`): 401 `unauthorized` without a key, 403 `forbidden` for a key
bound to other users, before the body or the store is touched. The store is the running
service's (`EdgeService.users`, an `edge.personal.store.UserStore`); its listeners
(`UserStore.add_listener`) hear about feedback (`on_feedback`) and about resets and
deletions (`on_forget`). The app adds these routes behind the same API-key check as the
OpenAI routes.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from edge.personal.store import FeedbackBody, ProfileUpdate, UserStore
from edge.service import Service
from serving.auth import authorize_user
from serving.bodies import json_body


async def _authorized(request: Request, user_id: str) -> None:
    """Only a key that covers `user_id` may reach the route (before its body or the store)."""
    authorize_user(request, user_id, param="user_id")


#: The user routes; `create_app` adds them behind the API-key check, which runs first.
users_routes = APIRouter(prefix="/v1/users", dependencies=[Depends(_authorized)])

UpdateBody = Annotated[ProfileUpdate, Depends(json_body(ProfileUpdate))]
SampleBody = Annotated[FeedbackBody, Depends(json_body(FeedbackBody))]


def _store(service: Service) -> UserStore:
    store: UserStore = service.users
    return store


Store = Annotated[UserStore, Depends(_store)]


def _profile_body(profile: Any) -> dict[str, Any]:
    return {"object": "user", **profile.model_dump()}


@users_routes.put("/{user_id}")
async def put_user(user_id: str, store: Store, update: UpdateBody) -> dict[str, Any]:
    """Create the user, or change the profile fields the body sets (the others are kept)."""
    return _profile_body(await asyncio.to_thread(store.put_profile, user_id, update))


@users_routes.get("/{user_id}")
async def get_user(user_id: str, store: Store) -> dict[str, Any]:
    """The user's profile."""
    return _profile_body(await asyncio.to_thread(store.get_profile, user_id))


@users_routes.delete("/{user_id}")
async def delete_user(user_id: str, store: Store) -> dict[str, Any]:
    """Remove the user and everything held about them."""
    scrubbed = await asyncio.to_thread(store.delete_profile, user_id)
    # scrubbed false: a reader blocked the checkpoint; it is logged and retried.
    return {"object": "user.deleted", "id": user_id, "deleted": True, "scrubbed": scrubbed}


@users_routes.post("/{user_id}/feedback")
async def post_feedback(user_id: str, store: Store, sample: SampleBody) -> dict[str, Any]:
    """Store a sample of text the user accepted (and optionally one they rejected)."""
    stored = await asyncio.to_thread(store.add_feedback, user_id, sample.accepted, sample.rejected)
    return {
        "object": "user.feedback",
        "user_id": user_id,
        "id": stored.id,
        "created": stored.created,
    }


@users_routes.post("/{user_id}/reset")
async def reset_user(user_id: str, store: Store) -> dict[str, Any]:
    """Forget the user's feedback and learned state; the profile stays."""
    scrubbed = await asyncio.to_thread(store.reset, user_id)
    return {"object": "user.reset", "id": user_id, "reset": True, "scrubbed": scrubbed}


@users_routes.get("/{user_id}/export")
async def export_user(user_id: str, store: Store) -> Response:
    """Everything held about the user, as one JSON document."""
    body = await asyncio.to_thread(store.export, user_id)
    return JSONResponse(
        body, headers={"Content-Disposition": f'attachment; filename="{user_id}.json"'}
    )
