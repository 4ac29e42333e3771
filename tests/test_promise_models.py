"""docs/models.md: "A build is written to a temporary folder and renamed into place only
when complete, so a running edge or cloud worker never sees a half-built model set."

Real builds (the pretrained path, from the session's tiny checkpoints, into the test's own
HG_HOME). Each build is watched at a step inside it: what the models home and the registry
show there, while the staging folder already holds files, is what a runtime would see."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from broker.errors import BadRequest, NotFound
from models import manifest, registry
from models.lab import edge_build
from models.lab.build import BuildOptions, build_model_set
from models.registry import ModelSet

VERSION = "whole-or-nothing"


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def seen_from_outside(home: Path) -> dict[str, Any]:
    """What a runtime can see: the models home's folders (staging ones apart), the sets the
    registry lists, and what resolving the version gives."""
    base = registry.models_home(home)
    try:
        resolved: str | None = registry.resolve(VERSION, home).version
    except NotFound:
        resolved = None
    return {
        "folders": sorted(p.name for p in base.iterdir() if not p.name.startswith(".tmp-")),
        "listed": [s.version for s in registry.list_model_sets(home)],
        "resolved": resolved,
    }


def staged(home: Path) -> dict[str, set[str]]:
    """The staging folders in the models home, with the files each holds."""
    base = registry.models_home(home)
    return {p.name: files_under(p) for p in base.iterdir() if p.name.startswith(".tmp-")}


def watch(
    monkeypatch: pytest.MonkeyPatch,
    module: Any,
    name: str,
    home: Path,
    seen: list[dict[str, Any]],
    *,
    after: bool = False,
    then_fail: BaseException | None = None,
) -> None:
    """Wrap `module.name` (a step of the build): record what is seen from outside and what is
    staged, before the step runs (or after, with `after`), then raise `then_fail` if given."""
    step: Callable[..., Any] = getattr(module, name)

    def look() -> None:
        seen.append({"outside": seen_from_outside(home), "staged": staged(home)})

    def watched(*args: Any, **kwargs: Any) -> Any:
        if not after:
            look()
        result = step(*args, **kwargs)
        if after:
            look()
        if then_fail is not None:
            raise then_fail
        return result

    monkeypatch.setattr(module, name, watched)


def options(home: Path, edge: Path, cloud: Path) -> BuildOptions:
    return BuildOptions(
        version=VERSION,
        home=home,
        edge_from=edge,
        cloud_from=cloud,
        precisions=("int4",),
        threads=1,
        progress=False,
    )


#: What a runtime sees of a build that is not installed.
NOTHING: dict[str, Any] = {"folders": [], "listed": [], "resolved": None}


def test_a_build_refused_midway_leaves_nothing(
    tiny_models: ModelSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real input that fails midway: the cloud end is imported, then the edge (a GPT-2,
    which the edge builder cannot convert) is refused. Staged files existed; nothing was
    ever visible, and nothing is left."""
    gpt2 = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(str(gpt2))
    AutoTokenizer.from_pretrained(str(tiny_models.tokenizer_dir)).save_pretrained(str(gpt2))
    home = tmp_path / "home"
    seen: list[dict[str, Any]] = []
    watch(monkeypatch, edge_build, "check_architecture", home, seen)

    with pytest.raises(BadRequest, match="GPT2LMHeadModel"):
        build_model_set(options(home, gpt2, tiny_models.cloud_dir))

    [midway] = seen
    assert midway["outside"] == NOTHING
    [(folder, files)] = midway["staged"].items()
    assert folder.startswith(f".tmp-{VERSION}-")
    assert {"cloud/config.json", "edge/config.json"} <= files
    assert sorted(p.name for p in registry.models_home(home).iterdir()) == []
    assert registry.current_version(home) is None


def test_a_build_failing_at_its_last_write_leaves_nothing(
    tiny_models: ModelSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest, the last file of a build, is written, then the write fails. A stand-in
    for a disk that fills at that moment: no real input fails that late. The staged set was
    complete (manifest included) and still never seen; nothing is left."""
    home = tmp_path / "home"
    seen: list[dict[str, Any]] = []
    full = OSError(errno.ENOSPC, "No space left on device")
    watch(monkeypatch, manifest, "write_manifest", home, seen, after=True, then_fail=full)

    with pytest.raises(OSError, match="No space left on device"):
        build_model_set(options(home, tiny_models.cloud_dir, tiny_models.cloud_dir))

    [last] = seen
    assert last["outside"] == NOTHING
    [files] = last["staged"].values()
    assert {"manifest.json", "cloud/config.json", "edge-int4/genai_config.json"} <= files
    assert sorted(p.name for p in registry.models_home(home).iterdir()) == []
    assert registry.current_version(home) is None


def test_a_completed_build_appears_whole(
    tiny_models: ModelSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to its manifest the build is invisible; then it appears at once, whole: the files
    staged are the files installed, every one matching the manifest's sha256, and no staging
    folder is left."""
    home = tmp_path / "home"
    seen: list[dict[str, Any]] = []
    watch(monkeypatch, manifest, "write_manifest", home, seen, after=True)

    built = build_model_set(options(home, tiny_models.cloud_dir, tiny_models.cloud_dir))

    [last] = seen
    assert last["outside"] == NOTHING
    [staged_files] = last["staged"].values()
    assert seen_from_outside(home) == {
        "folders": [registry.CURRENT_NAME, VERSION],
        "listed": [VERSION],
        "resolved": VERSION,
    }
    assert built.root == registry.models_home(home) / VERSION
    assert files_under(built.root) == staged_files
    manifest.verify(registry.resolve(VERSION, home))
    assert set(built.manifest.files) == staged_files - {"manifest.json"}
    assert registry.current_version(home) == VERSION
