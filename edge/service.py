"""The running edge service: its node, the bus link, and loading and reloading the model.

The app's lifespan builds one `EdgeService` and keeps it in `app.state.service`; routes
reach it through the `Service` dependency, which answers 503 while the model is still
loading.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from broker.errors import BadRequest, NotFound, Unavailable
from broker.service import SOFTWARE_VERSION
from edge.link import BusLink
from edge.node import EdgeNode
from edge.personal.personalizer import Personalizer, owns_prefix
from edge.personal.store import UserLimits, UserStore
from edge.route.cloud import CloudBridge
from edge.route.router import Router
from edge.runtime import EdgeRuntime
from edge.runtime.drafts import DraftSettings
from edge.settings import EdgeSettings, default_users_db

logger = logging.getLogger(__name__)


def resolve_model_dir(settings: EdgeSettings) -> tuple[Path, str | None]:
    """The model folder to serve and its model-set version (None for a bare folder).

    Raises:
        NotFound: `model_dir` is not an onnxruntime-genai model folder, or the model set is
            not installed.
    """
    if settings.model_dir is not None:
        path = Path(settings.model_dir)
        if not (path / "genai_config.json").is_file():
            raise NotFound(f"{path} is not an onnxruntime-genai model folder (no genai_config)")
        return path, None
    from models.registry import resolve

    model_set = resolve(settings.model_version)
    return model_set.edge_dir(settings.precision), model_set.version


def load_runtime(settings: EdgeSettings, model_dir: Path, version: str | None) -> EdgeRuntime:
    """Load the model in `model_dir` with the node's thread and queue settings (blocking)."""
    return EdgeRuntime(
        model_dir,
        threads=settings.threads,
        max_active=settings.max_active,
        max_queue=settings.max_queue,
        version=version,
        prefix_cache_mb=settings.prefix_cache_mb,
        max_tokens_cap=settings.max_tokens_cap,
        drafting=DraftSettings(
            tokens=settings.draft_tokens if settings.speculative else 0,
            min_match=settings.draft_min_match,
            cache_min_prob=settings.draft_cache_min_prob,
        ),
    )


class EdgeService:
    """Everything the routes need: the node, its router, its bus link, and model reloading."""

    def __init__(self, settings: EdgeSettings, node: EdgeNode) -> None:
        self.settings = settings
        self.node = node
        #: Where each request is routed and served (locally, or through the cloud link).
        self.router = Router(node, CloudBridge(node))
        #: Users' profiles and feedback (`edge.personal.store`); the file opens on first use.
        self.users = UserStore(
            settings.users_db or default_users_db(settings.node_id),
            limits=UserLimits(
                max_users=settings.personalize_max_users,
                max_user_bytes=settings.personalize_max_user_bytes,
                feedback_per_minute=settings.personalize_feedback_per_minute,
                feedback_burst=settings.personalize_feedback_burst,
            ),
        )
        #: Requests with `user` are personalized through it (`edge.personal.personalizer`).
        self.personalizer = Personalizer(
            self.users,
            lambda text: self.node.runtime.encode(text),  # the runtime in service now
            memory_bytes=int(settings.personalize_memory_mb * (1 << 20)),
            samples_k=settings.personalize_samples,
            persist_s=settings.personalize_persist_s,
            max_contexts=settings.personalize_max_contexts,
            max_user_bytes=settings.personalize_max_user_bytes,
        )
        # A reset or deleted user's kept persona prefixes go from every loaded runtime.
        self.users.add_listener(_PrefixForgetter(self))
        self.link = BusLink(
            node,
            reload_model=self.reload_model,
            software_version=SOFTWARE_VERSION,
            apply_experiment=self.apply_experiment,
        )
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._retiring_runtimes: set[EdgeRuntime] = set()
        # Feedback counts for the A/B variant that served the user last (edge.route.experiments).
        self.users.add_listener(node.experiments)
        self._experiment_lock = asyncio.Lock()
        #: The edge A/B variant's (version, runtime) when this service loaded one.
        self._variant: tuple[str, EdgeRuntime] | None = None

    async def reload_model(self, args: dict[str, Any]) -> dict[str, Any]:
        """Load a model next to the current one, then swap; the old one finishes its requests.

        Args:
            args: `{"model_dir": PATH}`, or `{"version": V, "precision": "int4"}` (pulled from
                the object store when not installed here).
        """
        async with self._reload_lock:
            model_dir, version = await self._locate(args)
            started = time.perf_counter()
            runtime = await asyncio.to_thread(load_runtime, self.settings, model_dir, version)
            old = self.node.swap_runtime(runtime)
            self._retire(old)
            info = {
                "model_dir": str(model_dir),
                "model_version": runtime.version,
                "previous_version": old.version,
                "load_s": round(time.perf_counter() - started, 3),
            }
            logger.info("model swapped: %s", info)
            return info

    async def apply_experiment(self, value: dict[str, Any] | None) -> None:
        """Put an A/B experiment in force (`fleet.experiment`; None: stop it).

        An edge model-set variant is loaded next to the node's model (from the registry,
        else pulled from the object store, as `reload-model` does) and replaces any other
        variant runtime: one extra runtime at most. Stopping unloads it once its requests
        finish. An invalid value is logged and leaves the experiment in force as it was.
        """
        from fleet.experiment import Experiment

        try:
            experiment = None if value is None else Experiment.model_validate(value)
        except ValueError as exc:
            logger.error("ignoring an invalid experiment from the KV bucket: %s", exc)
            return
        state = self.node.experiments
        async with self._experiment_lock:
            if experiment == state.experiment:
                return
            wanted = None if experiment is None else experiment.edge_variant
            version = None if wanted is None else wanted.edge_version
            if self._variant is not None and self._variant[0] != version:
                old = self._variant[1]
                self._variant = None
                state.edge_runtime = None
                self._retire(old)
            state.set(experiment)
            logger.info("experiment now %s", None if experiment is None else experiment.name)
            if version is None or self._variant is not None:
                return
            try:
                model_dir, found = await self._locate({"version": version})
                runtime = await asyncio.to_thread(load_runtime, self.settings, model_dir, found)
            except Exception as exc:
                logger.error(
                    "experiment variant %s not loaded (its share stays control): %s", version, exc
                )
                return
            self._variant = (version, runtime)
            state.edge_runtime = runtime
            self.node.publish_event(
                "experiment", f"variant model set {version} loaded", None, version=version
            )

    def _retire(self, runtime: EdgeRuntime) -> None:
        """Close `runtime` once its requests are done, in the background."""
        task = asyncio.create_task(runtime.close(drain_timeout=300.0))
        self._retiring.add(task)
        self._retiring_runtimes.add(runtime)
        task.add_done_callback(self._retiring.discard)
        task.add_done_callback(lambda _: self._retiring_runtimes.discard(runtime))

    def runtimes(self) -> list[EdgeRuntime]:
        """Every loaded runtime: the node's, the A/B variant's, and those finishing."""
        found = [self.node.runtime, *list(self._retiring_runtimes)]
        if self._variant is not None:
            found.append(self._variant[1])
        return found

    async def _locate(self, args: dict[str, Any]) -> tuple[Path, str | None]:
        if args.get("model_dir"):
            path = Path(str(args["model_dir"]))
            if not (path / "genai_config.json").is_file():
                raise NotFound(f"{path} is not an onnxruntime-genai model folder")
            return path, args.get("version")
        version = args.get("version")
        if not isinstance(version, str) or not version:
            raise BadRequest("reload-model needs `version` or `model_dir`", param="version")
        precision = str(args.get("precision", self.settings.precision))
        from models import registry

        try:
            model_set = registry.resolve(version)
        except NotFound:
            model_set = await self._pull(version)
        return model_set.edge_dir(precision), model_set.version

    async def _pull(self, version: str) -> Any:
        """Pull a model set from the object store with the models part's (torch-free) code."""
        if self.link.nc is None:
            raise NotFound(f"model set {version!r} is not installed and the bus is unavailable")
        from models import distribution

        logger.info("pulling model set %s from the object store", version)
        return await distribution.pull(self.link.nc, version)

    async def close(self) -> None:
        """Stop the bus link, let retiring models finish, then close the runtime."""
        await self.link.close()
        if self._variant is not None:
            self._retire(self._variant[1])
            self._variant = None
        for task in list(self._retiring):
            await task
        await self.node.runtime.close()
        await asyncio.to_thread(self.personalizer.close)
        await asyncio.to_thread(self.users.close)


class _PrefixForgetter:
    """The store's listener that drops a forgotten user's kept prefixes (`edge.runtime`)."""

    def __init__(self, service: EdgeService) -> None:
        self.service = service

    def on_feedback(self, user_id: str, accepted: str, rejected: str | None) -> None:
        """Nothing: the prefix keys hash the text, so new samples make new keys."""

    def on_forget(self, user_id: str) -> None:
        """Drop `user:<id>:…` from every loaded runtime's prefix cache."""
        match = owns_prefix(user_id)
        dropped = sum(runtime.forget_prefixes(match) for runtime in self.service.runtimes())
        logger.debug("forgotten user: %d kept prefixes dropped", dropped)


def get_service(request: Request) -> EdgeService:
    """The app's EdgeService (503 while the model is still loading)."""
    service: EdgeService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise Unavailable("the edge model is still loading", retry_after=1.0)
    return service


Service = Annotated[EdgeService, Depends(get_service)]
