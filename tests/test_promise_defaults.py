"""The defaults and setting names README.md, docs/edge.md and docs/security.md state.

Each figure here is one a user relies on without setting it (a port, a drain time, a policy
field, a per-user bound); each name is one the documents tell a user to set. Pure: the
settings models, the command-line parsers and the launcher's child specs, no server.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from broker.settings import hg_home
from cloud.settings import ApiSettings
from edge.cli import build_parser as edge_parser
from edge.cli import settings_from_args
from edge.personal.store import UserStore
from edge.settings import EdgeSettings
from fleet.policy import PolicySettings
from hybridgen.up.children import default_children
from hybridgen.up.cli import _parser
from hybridgen.up.supervisor import Backoff
from serving.slow_clients import deadline_protocol

# --------------------------------------------------------------------- docs/edge.md


def test_the_policy_fields_default_as_the_policy_table_says() -> None:
    """docs/edge.md, "Changing the policy live" and "Deadlines": the policy's defaults."""
    policy = PolicySettings()
    assert policy.perplexity_threshold is None  # unset: the model set's calibrated one
    assert policy.second_stage_k == 0
    assert policy.draft_logprob_threshold == -math.inf
    assert policy.latency_budget_ms == 2000
    assert policy.cloud_timeout_ms == 2000
    assert policy.cloud_idle_timeout_ms == 10000
    assert policy.request_timeout_ms == 120_000  # 120 s, also a client's most
    breaker = policy.breaker
    assert (breaker.failure_threshold, breaker.open_seconds, breaker.half_open_probes) == (3, 5, 1)


def test_an_edge_serves_on_loopback_8400_with_a_1_mib_body_limit() -> None:
    """docs/edge.md, "Running it" and "Input limits": 127.0.0.1:8400, 1 MiB bodies, a
    heartbeat every second, no browser origin allowed."""
    settings = EdgeSettings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8400)
    assert settings.max_body_bytes == 1 << 20
    assert settings.telemetry_interval_s == 1.0
    assert settings.allowed_origins == [] and settings.allowed_hosts == []
    assert (settings.allow_open, settings.metrics_require_key) == (False, False)


def test_personalization_settings_default_as_the_settings_table_says() -> None:
    """docs/edge.md, the `HG_EDGE_PERSONALIZE_*` table, and the 1000 newest samples kept."""
    settings = EdgeSettings()
    assert settings.personalize_memory_mb == 64
    assert settings.personalize_samples == 8
    assert settings.personalize_sample_tokens == 256
    assert settings.personalize_sample_gain == 2.0
    assert settings.personalize_persist_s == 2


def test_the_user_store_keeps_the_newest_1000_samples_and_waits_5_s_for_a_lock(
    tmp_path: Path,
) -> None:
    """docs/edge.md, "What stays on the device" and "A damaged or locked file"."""
    store = UserStore(tmp_path / "users.sqlite3")
    try:
        assert store.max_feedback == 1000
        assert store.busy_timeout_s == 5.0  # then a 503 with Retry-After
    finally:
        store.close()


def test_slow_client_deadlines_default_to_10_and_30_seconds() -> None:
    """docs/edge.md, "Slow clients": `--read-timeout-s` 10, `--write-timeout-s` 30, and a
    silent new connection closed after 30 s."""
    args = edge_parser().parse_args([])
    assert (args.read_timeout_s, args.write_timeout_s) == (10.0, 30.0)
    protocol = deadline_protocol()
    assert protocol.read_timeout_s == 10.0  # type: ignore[attr-defined]
    assert protocol.write_timeout_s == 30.0  # type: ignore[attr-defined]
    assert protocol.first_byte_timeout_s == 30.0  # type: ignore[attr-defined]
    assert args.drain_timeout_s == 10.0  # the edge's drain (README, "up")


def test_every_option_reads_hg_edge_option_and_the_command_line_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/edge.md, "Running it": `HG_EDGE_PORT=8401`, `HG_EDGE_THREADS=2`; the options
    of the examples, `--policy` as the local policy, keys repeated on the command line."""
    monkeypatch.setenv("HG_EDGE_PORT", "8401")
    monkeypatch.setenv("HG_EDGE_THREADS", "2")
    from_env = settings_from_args(edge_parser().parse_args([]))
    assert (from_env.port, from_env.threads) == (8401, 2)
    given = settings_from_args(
        edge_parser().parse_args(
            ["--port", "8402", "--node-id", "edge-kitchen", "--nats", "nats://10.0.0.5:4222",
             "--precision", "int8", "--no-cloud", "--policy", '{"perplexity_threshold": 250}',
             "--api-key", "k1", "--api-key", "k2", "--user-key", "k7Qx2@alice+bob"]
        )
    )  # fmt: skip
    assert (given.port, given.threads, given.node_id) == (8402, 2, "edge-kitchen")
    assert (given.nats_url, given.precision, given.no_cloud) == (
        "nats://10.0.0.5:4222",
        "int8",
        True,
    )
    assert given.policy == {"perplexity_threshold": 250}
    assert given.api_keys == ["k1", "k2"]
    assert [(e.key, e.users) for e in given.key_ring().entries] == [
        ("k1", frozenset()),
        ("k2", frozenset()),
        ("k7Qx2", frozenset({"alice", "bob"})),
    ]


# ------------------------------------------------------------- docs/security.md names


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("HG_EDGE_API_KEYS", "k1,k2", "api_keys", ["k1", "k2"]),
        ("HG_EDGE_API_KEYS", '["k1", "k2"]', "api_keys", ["k1", "k2"]),
        ("HG_EDGE_USER_KEYS", "k@alice+bob", "user_keys", ["k@alice+bob"]),
        ("HG_EDGE_ALLOWED_ORIGINS", "http://localhost:3000", "allowed_origins",
         ["http://localhost:3000"]),
        ("HG_EDGE_ALLOWED_HOSTS", "edge.lan", "allowed_hosts", ["edge.lan"]),
        ("HG_EDGE_ALLOW_OPEN", "1", "allow_open", True),
        ("HG_EDGE_METRICS_REQUIRE_KEY", "1", "metrics_require_key", True),
        ("HG_EDGE_MAX_BODY_BYTES", "4096", "max_body_bytes", 4096),
        ("HG_EDGE_USERS_DB", "/srv/users.sqlite3", "users_db", Path("/srv/users.sqlite3")),
        ("HG_EDGE_PERSONALIZE_MAX_USERS", "7", "personalize_max_users", 7),
        ("HG_EDGE_PERSONALIZE_MAX_USER_BYTES", "2048", "personalize_max_user_bytes", 2048),
        ("HG_EDGE_PERSONALIZE_FEEDBACK_PER_MINUTE", "6", "personalize_feedback_per_minute", 6),
        ("HG_EDGE_PERSONALIZE_FEEDBACK_BURST", "3", "personalize_feedback_burst", 3),
        ("HG_EDGE_PERSONALIZE_MAX_CONTEXTS", "500", "personalize_max_contexts", 500),
        ("HG_EDGE_PERSONALIZE_SAMPLES", "0", "personalize_samples", 0),
    ],
)  # fmt: skip
def test_the_edge_settings_the_documents_name_are_read(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(EdgeSettings(), field) == expected


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("HG_CLOUD_API_KEYS", "k1,k2", "api_keys", ["k1", "k2"]),
        ("HG_CLOUD_API_KEYS", '["k1", "k2"]', "api_keys", ["k1", "k2"]),
        ("HG_CLOUD_MODELS", '["hg-cloud", "hg-cloud-b"]', "models", ["hg-cloud", "hg-cloud-b"]),
        ("HG_CLOUD_ALLOWED_ORIGINS", "https://app.example", "allowed_origins",
         ["https://app.example"]),
        ("HG_CLOUD_ALLOWED_HOSTS", "api.lan", "allowed_hosts", ["api.lan"]),
        ("HG_CLOUD_ALLOW_OPEN", "1", "allow_open", True),
        ("HG_CLOUD_METRICS_REQUIRE_KEY", "1", "metrics_require_key", True),
    ],
)  # fmt: skip
def test_the_cloud_api_settings_the_documents_name_are_read(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(ApiSettings(), field) == expected


def test_the_cloud_api_serves_on_loopback_8500_and_lets_no_origin_in() -> None:
    settings = ApiSettings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8500)
    assert settings.allowed_origins == [] and settings.allowed_hosts == []


# ---------------------------------------------------------------------------- README.md


def test_hg_home_defaults_to_dot_hybridgen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HG_HOME")
    assert hg_home() == Path.home() / ".hybridgen"
    monkeypatch.setenv("HG_HOME", "/srv/hg")
    assert hg_home() == Path("/srv/hg")


def test_a_dead_service_is_restarted_after_half_a_second_doubling_up_to_30() -> None:
    """README, "up": back-off 0.5 s, doubling up to 30 s, reset after a minute up."""
    backoff = Backoff()
    assert [backoff.delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert backoff.delay(30) == 30.0
    assert backoff.stable_s == 60.0


def test_up_starts_the_services_on_the_documented_ports_and_drain_times() -> None:
    """README, "up": broker 4222, cloud API 8500, edge 8400; on stop the edge and the cloud
    API get 10 s to drain, the workers 30 s, then SIGKILL."""
    args = _parser().parse_args([])
    assert (args.port, args.api_port, args.edge_port) == (4222, 8500, 8400)
    assert (args.workers, args.edges) == (1, 1)
    children = {spec.name: spec for spec in default_children(args)}
    assert list(children) == ["cloud-worker", "cloud-api", "edge"]  # start order
    drains = {name: spec.argv[spec.argv.index("--drain-timeout-s") + 1] for name, spec in
              children.items()}  # fmt: skip
    assert drains == {"cloud-worker": "30", "cloud-api": "10", "edge": "10"}
    for spec in children.values():  # SIGKILL only after the drain bound
        assert spec.stop_timeout > float(drains[spec.name])
    assert children["cloud-api"].url == "http://127.0.0.1:8500"
    assert children["edge"].url == "http://127.0.0.1:8400"


def test_edge_i_listens_on_edge_port_plus_i_with_its_own_node_id() -> None:
    """README, "up": `--workers N` and `--edges N`, edge `i` on `--edge-port` + `i`."""
    args = _parser().parse_args(["--workers", "2", "--edges", "3", "--edge-port", "9000"])
    children = default_children(args)
    edges = [spec for spec in children if spec.role == "edge"]
    workers = [spec for spec in children if spec.role == "cloud"]
    assert [spec.url for spec in edges] == [f"http://127.0.0.1:{9000 + i}" for i in range(3)]
    assert len({spec.node_id for spec in edges}) == 3
    assert len(workers) == 2 and len({spec.node_id for spec in workers}) == 2
