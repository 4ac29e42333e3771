"""Shared pytest fixtures. Each part's fixtures live in its own plugin module."""

import os

# Two cores: keep every runtime single-threaded unless a test says otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = [
    "tests.fixtures_home",
    "tests.fixtures_broker",
    "tests.fixtures_secure_bus",
    "tests.fixtures_models",
    "tests.fixtures_cloud",
    "tests.fixtures_gguf",
    "tests.fixtures_edge",
    "tests.fixtures_tui",
    "tests.fixtures_bus_catalogue",
    "tests.fixtures_otlp",
]
