"""A request's `n` choices: each its own sequence, answered together.

Both APIs fan a request with `n` > 1 out the same way: choice `i` is the request again with
its own id (`choice_id`) and, when seeded, its own seed (`choice_sampling`: seed + i, so a
seeded request with `n` repeats as a whole). Each choice is served as any request is (the
edge routes it, the cloud API sends it on the bus), and `serving.answer` writes their items
as one answer: `merged` interleaves them as they come, each tagged with its index.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from typing import Any, TypeVar

from serving.sampling import SamplingParams

T = TypeVar("T")

#: The most choices one request may ask for (`n`); a larger `n` is a 400 naming `n`.
MAX_CHOICES = 8
#: Seeds stay 32-bit (the engines' `random_seed`): seed + index wraps around below this.
_SEED_RANGE = 2**31


def choice_sampling(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index`'s sampling: the request's, with seed + index when it is seeded."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) % _SEED_RANGE)


def choice_id(request_id: str, index: int) -> str:
    """Choice `index`'s own request id (the first keeps the request's), unique on the bus."""
    return request_id if index == 0 else f"{request_id}-{index}"


async def merged(sources: Sequence[AsyncIterable[T]]) -> AsyncGenerator[tuple[int, T], None]:
    """Every item of `sources` as it comes, with its source's index; each source's own order
    is kept. A source that fails fails the whole; closing the whole (or a failure) stops
    every source, and each is closed (a generation cut short is cancelled). Read it inside
    `contextlib.aclosing`: the sources are read by tasks of their own, which only closing
    it stops."""
    if len(sources) == 1:
        try:
            async for item in sources[0]:
                yield 0, item
        finally:
            await close(sources[0])
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue(len(sources))
    end = object()

    async def pump(index: int, source: AsyncIterable[T]) -> None:
        try:
            async for item in source:
                await queue.put((index, item, None))
        except Exception as exc:
            await queue.put((index, None, exc))
        else:
            await queue.put((index, end, None))

    tasks = [asyncio.create_task(pump(i, source)) for i, source in enumerate(sources)]
    running = len(sources)
    try:
        while running:
            index, item, failure = await queue.get()
            if failure is not None:
                raise failure
            if item is end:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for source in sources:
            await close(source)


async def close(items: AsyncIterable[Any]) -> None:
    """Close an answer's items: an unfinished generation is cancelled, and items that own
    a resource give it back, read or not."""
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()
