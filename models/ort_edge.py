"""An onnxruntime-genai edge build, loaded: the model, its text side, its prompt perplexity.

Torch-free. `EdgeModel` is what the edge runtime serves and what the build's calibration
measures, so both read a build the same way: one loader (explicit threads), one tokenizer,
the model's own chat template and stop tokens, one prompt-perplexity path
(`models.scoring.prefill`). `new_generator` opens a generator for one sequence (the calibration and
the benches' teacher forcing use it too); the small functions below run greedy decoding or teacher
forcing at batch 1 for the build checks, tests and the bench.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from broker.errors import BadRequest, NotFound
from models.chat import read_chat_template
from models.scoring import prefill


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


def new_generator(model: Any, max_length: int, **search: Any) -> Any:
    """A fresh `onnxruntime_genai.Generator` over `model` (an `og.Model`).

    `max_length` bounds the sequence it holds (prompt and generated tokens); `search` are
    further search options (for example `do_sample=False`).
    """
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, **search)
    return og.Generator(model, params)


class EdgeModel:
    """One onnxruntime-genai build folder, loaded with `threads` intra-op threads.

    Attributes:
        model_dir: the build folder.
        context_length, vocab_size: from its `genai_config.json`.
        model: the `og.Model`; `og_tokenizer`: its `og.Tokenizer` (streams, templates).
        tokenizer: the `tokenizers.Tokenizer` of its `tokenizer.json` (encode/decode).
        stop_token_ids: the model's own end tokens (end of text and end of turn), which the
            builder copies from the checkpoint's generation config.
        chat_template: the model's Jinja chat template, or None.

    Raises:
        NotFound: not an onnxruntime-genai model folder.
    """

    def __init__(self, model_dir: Path, threads: int = 1) -> None:
        import onnxruntime_genai as og
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir)
        config_path = self.model_dir / "genai_config.json"
        if not config_path.is_file():
            raise NotFound(f"{self.model_dir} is not an onnxruntime-genai model folder")
        genai_config = json.loads(config_path.read_text(encoding="utf-8"))["model"]
        self.context_length = int(genai_config["context_length"])
        self.vocab_size = int(genai_config["vocab_size"])
        self.model = load_model(self.model_dir, threads)
        self.og_tokenizer = og.Tokenizer(self.model)
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.stop_token_ids = {
            int(t) for t in np.atleast_1d(genai_config.get("eos_token_id", []))
        } | {int(t) for t in self.og_tokenizer.eos_token_ids}
        self.chat_template = read_chat_template(self.model_dir)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (special tokens such as `<|im_start|>` included)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens kept."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """The model's own chat template (its Jinja template, rendered by onnxruntime-genai's
        tokenizer) applied to `messages`, ending with the assistant's turn opened; `tools`
        (OpenAI's list) go to a template that reads them.

        Raises:
            BadRequest: the model has no chat template, or the template refuses the messages
                (for example a role it does not know).
        """
        if self.chat_template is None:
            raise BadRequest(
                f"the edge model {self.model_dir.name} has no chat template; use /v1/completions",
                param="messages",
            )
        try:
            return str(
                self.og_tokenizer.apply_chat_template(
                    template_str=self.chat_template,
                    messages=json.dumps(messages),
                    add_generation_prompt=True,
                    **({"tools": json.dumps(tools)} if tools else {}),
                )
            )
        except Exception as exc:  # the template's own refusals come back as RuntimeError
            raise BadRequest(
                f"the edge model's chat template refused the messages: {exc}", param="messages"
            ) from None

    def perplexity(self, ids: Sequence[int], span: tuple[int, int] | None = None) -> float | None:
        """Prompt perplexity of `ids` over `span`, exactly as the edge router reads it."""
        generator = new_generator(self.model, min(self.context_length, len(ids) + 1))
        return prefill(generator, ids, span)


def greedy(
    model: Any, prompt: Sequence[int], max_new_tokens: int, *, min_new_tokens: int = 0
) -> list[int]:
    """Greedy continuation of `prompt` (token ids), stopping at EOS or `max_new_tokens`."""
    generator = new_generator(
        model,
        len(prompt) + max_new_tokens,
        min_length=len(prompt) + min_new_tokens,
        do_sample=False,
    )
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt) :]]


def teacher_forced_argmax(model: Any, tokens: Sequence[int]) -> list[int]:
    """Argmax of the next-token logits after each prefix `tokens[:i+1]`, fed one at a time."""
    generator = new_generator(model, len(tokens), do_sample=False)
    predictions = []
    for token in tokens:
        generator.append_tokens(np.asarray([token], dtype=np.int32))
        logits = np.asarray(generator.get_logits())  # (1, 1, V)
        predictions.append(int(logits.reshape(-1).argmax()))
    return predictions
