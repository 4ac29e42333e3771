"""Build profiles: how much text, how large the models and how long they train.

`tiny` is for tests (the whole set in seconds), `quick` is what `make up` builds on first run
(a few minutes on 2 cores), `full` takes longer and gives better models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: The default "profile": no training, SmolLM2-135M-Instruct imported from its wheel (see
#: models.lab.pretrained). The trained profiles below are the routing lab.
PRETRAINED_PROFILE = "smollm2"


@dataclass(frozen=True)
class ModelSpec:
    """Shape and training schedule of one Llama model."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    context_length: int
    steps: int
    batch_size: int
    learning_rate: float
    #: Training windows are this long (<= context_length; shorter windows train faster).
    train_length: int = 0

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def window(self) -> int:
        return self.train_length or self.context_length

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Profile:
    """One build profile."""

    name: str
    #: Bytes of cleaned text read per corpus source.
    budgets: dict[str, int]
    vocab_size: int
    edge: ModelSpec
    cloud: ModelSpec
    #: Held-out evaluation: at most this many windows per domain.
    eval_windows: int
    #: Minimum bytes of in-domain text before the domain falls back (see corpus.build_corpus).
    min_domain_bytes: int = 20_000
    precisions: tuple[str, ...] = ("int4",)
    extra: dict[str, Any] = field(default_factory=dict)


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        budgets={
            "man": 120_000,
            "info": 60_000,
            "licenses": 40_000,
            "python-topics": 100_000,
            "python-docstrings": 80_000,
        },
        vocab_size=512,
        edge=ModelSpec(64, 2, 2, 1, 128, 128, steps=30, batch_size=8, learning_rate=3e-3),
        cloud=ModelSpec(128, 2, 4, 2, 256, 256, steps=30, batch_size=8, learning_rate=3e-3,
                        train_length=128),
        eval_windows=8,
        min_domain_bytes=5_000,
        precisions=("int4", "fp32"),
    ),
    "quick": Profile(
        name="quick",
        budgets={
            "man": 2_500_000,
            "info": 1_500_000,
            "licenses": 300_000,
            "python-topics": 500_000,
            "python-docstrings": 1_500_000,
        },
        vocab_size=4096,
        # Most of the compute goes to the cloud: small batches, many updates (early in
        # training, updates matter more than tokens per update).
        edge=ModelSpec(160, 4, 5, 5, 448, 256, steps=420, batch_size=8, learning_rate=3e-3,
                       train_length=128),
        cloud=ModelSpec(256, 6, 4, 2, 704, 512, steps=360, batch_size=8, learning_rate=3e-3,
                        train_length=128),
        eval_windows=48,
        precisions=("int4",),
    ),
    "full": Profile(
        name="full",
        budgets={
            "man": 12_000_000,
            "info": 5_000_000,
            "licenses": 400_000,
            "python-topics": 600_000,
            "python-docstrings": 3_000_000,
        },
        vocab_size=8192,
        edge=ModelSpec(256, 4, 4, 2, 704, 512, steps=1200, batch_size=16, learning_rate=2e-3,
                       train_length=256),
        cloud=ModelSpec(384, 8, 6, 2, 1024, 1024, steps=1000, batch_size=16, learning_rate=1e-3,
                        train_length=256),
        eval_windows=128,
        precisions=("int4", "int8"),
    ),
}  # fmt: skip
