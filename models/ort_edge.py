"""Small helpers around onnxruntime-genai for the build checks, tests and the bench.

Torch-free. The edge node has its own runtime; these helpers only load a built folder with an
explicit thread count and run greedy decoding or teacher forcing at batch 1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def load_model(folder: Path, threads: int = 1) -> Any:
    """An `onnxruntime_genai.Model` from a builder folder, with intra-op threads set."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    overlay = {
        "model": {
            "decoder": {
                "session_options": {
                    "intra_op_num_threads": threads,
                    "inter_op_num_threads": 1,
                }
            }
        }
    }
    config.overlay(json.dumps(overlay))
    return og.Model(config)


def greedy(
    model: Any, prompt: Sequence[int], max_new_tokens: int, *, min_new_tokens: int = 0
) -> list[int]:
    """Greedy continuation of `prompt` (token ids), stopping at EOS or `max_new_tokens`."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(prompt) + max_new_tokens
    params.set_search_options(
        max_length=total, min_length=len(prompt) + min_new_tokens, do_sample=False
    )
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt) :]]


def teacher_forced_argmax(model: Any, tokens: Sequence[int]) -> list[int]:
    """Argmax of the next-token logits after each prefix `tokens[:i+1]`, fed one at a time."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(tokens), do_sample=False)
    generator = og.Generator(model, params)
    predictions = []
    for token in tokens:
        generator.append_tokens(np.asarray([token], dtype=np.int32))
        logits = np.asarray(generator.get_logits())  # (1, 1, V)
        predictions.append(int(logits.reshape(-1).argmax()))
    return predictions
