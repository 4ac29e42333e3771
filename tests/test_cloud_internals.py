"""transformers internals the cloud engine relies on, pinned (pyproject.toml) and checked here.

transformers offers no public getter for a model's attention implementation, and documents
`DynamicLayer`'s attributes and hooks for its own caches only. The engine reads the one
(`cloud.attention.implementation`) and subclasses the other (`cloud.batching.SlabLayer`); a
transformers upgrade that moves either fails these tests before it fails a request.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from cloud import attention
from cloud.batching import SlabLayer, new_cache


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.lab.random_model import make_random_llama

    return make_random_llama(tmp_path_factory.mktemp("internals_model"), context_length=64)


def test_the_attention_implementation_is_read_where_transformers_keeps_it(
    model_dir: Path,
) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    assert attention.implementation(model) == "eager"
    model.set_attn_implementation("sdpa")
    assert attention.implementation(model) == "sdpa"
    assert attention.install(model) is True  # switched to the engine's own SDPA
    assert attention.implementation(model) == attention.NAME


def test_a_slab_cache_gives_the_logits_and_sizes_of_transformers_own(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    layers = model.config.num_hidden_layers
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    slab, dynamic = new_cache(layers, capacity=4), DynamicCache(config=model.config)
    with torch.no_grad():
        # A prefill past the slab's first capacity (it grows), then two decode steps.
        for start, end in ((0, 7), (7, 8), (8, 9)):
            mine = model(ids[:, start:end], cache=slab, use_cache=True).logits
            theirs = model(ids[:, start:end], cache=dynamic, use_cache=True).logits
            assert torch.allclose(mine, theirs, atol=1e-5)
            for layer in slab.layers:
                assert isinstance(layer, SlabLayer)
                assert layer.get_seq_length() == end
                assert layer.get_mask_sizes(1) == (end + 1, 0)
    assert slab.get_seq_length() == dynamic.get_seq_length() == 9
