"""Loading the built models with the real runtimes, parity, and user checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from models import ort_edge, registry
from models.chat import END_OF_TURN, EOS_TOKEN, render_chat
from models.cli import main
from models.registry import ModelSet

logger = logging.getLogger(__name__)

PROMPT = "The following options are available:\n\n-a, --all"


def test_tokenizer_special_tokens_and_chat_template(tiny_models: ModelSet) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models.tokenizer_dir))
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.convert_tokens_to_ids(END_OF_TURN) == 2
    messages = [{"role": "user", "content": "hello"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == render_chat(messages)
    ids = tokenizer(rendered)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|user|>") in ids
    assert tokenizer.decode(tokenizer("ls -la /tmp")["input_ids"]) == "ls -la /tmp"


def test_cloud_loads_with_from_pretrained(tiny_models: ModelSet) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models.cloud_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models.cloud_dir))
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert model.config.max_position_embeddings == tiny_models.cloud_context_length


def test_edge_fp32_greedy_matches_torch(tiny_models: ModelSet) -> None:
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models.tokenizer_dir))
    prompt = tokenizer(PROMPT)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_models.edge_checkpoint_dir))
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False)
    torch_tokens = out[0, len(prompt) :].tolist()
    edge = ort_edge.load_model(tiny_models.edge_dir("fp32"), threads=1)
    ort_tokens = ort_edge.greedy(edge, prompt, 48)
    assert ort_tokens == torch_tokens, (ort_tokens, torch_tokens)
    assert len(ort_tokens) >= 1


def test_edge_int4_top1_agreement(tiny_models: ModelSet) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models.tokenizer_dir))
    tokens = tokenizer(PROMPT * 3)["input_ids"][:64]
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_models.edge_checkpoint_dir))
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([tokens])).logits[0].argmax(-1).tolist()
    for precision in ("int4", "fp32"):
        model = ort_edge.load_model(tiny_models.edge_dir(precision), threads=1)
        got = ort_edge.teacher_forced_argmax(model, tokens)
        agreement = sum(a == b for a, b in zip(expected, got, strict=True)) / len(tokens)
        logger.warning("edge %s top-1 agreement (teacher forced): %.3f", precision, agreement)
        assert agreement >= (0.999 if precision == "fp32" else 0.5), (precision, agreement)


def _save_tiny_llama(tiny_models: ModelSet, folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models.tokenizer_dir))
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=96,
        bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


@pytest.mark.slow
def test_build_from_user_checkpoint(tiny_models: ModelSet, tmp_path: Path) -> None:
    checkpoint = tmp_path / "my-llama"
    _save_tiny_llama(tiny_models, checkpoint)
    home = tmp_path / "home"
    argv = ["build", "--profile", "tiny", "--edge-from", str(checkpoint), "--version", "mine",
            "--precision", "int4", "--threads", "1", "--no-progress",
            "--home", str(home)]  # fmt: skip
    assert main(argv) == 0
    model_set = registry.resolve(home=home)
    assert model_set.version == "mine"
    edge = model_set.manifest.models.edge
    assert edge.source == "checkpoint" and edge.hidden_size == 32
    assert edge.training == {"from": str(checkpoint)}
    assert model_set.edge_context_length == 96
    assert model_set.model_info(registry.CLOUD_MODEL).source == "trained"
    assert model_set.manifest.tokenizer is not None
    assert model_set.manifest.tokenizer.source == f"checkpoint {checkpoint}"
    model = ort_edge.load_model(model_set.edge_dir("int4"), threads=1)
    assert len(ort_edge.greedy(model, [5, 6, 7], 4, min_new_tokens=4)) == 4
    # Building the same version again is refused, not overwritten.
    assert main(argv) == 1


def test_unsupported_architecture_is_refused(
    tmp_path: Path, tiny_models: ModelSet, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tiny_models.tokenizer_dir)).save_pretrained(str(folder))
    home = tmp_path / "home"
    rc = main(["build", "--profile", "tiny", "--edge-from", str(folder), "--home", str(home)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err
    assert not registry.list_model_sets(home)
    assert main(["build", "--profile", "tiny", "--edge-from", str(tmp_path / "missing"),
                 "--home", str(home)]) == 1  # fmt: skip
    assert "does not exist" in capsys.readouterr().err


def test_builder_architectures_match_the_installed_builder() -> None:
    """The builder has no public list of what it converts: the pinned table must follow the
    installed builder's dispatch (this fails on an upgrade that changes it)."""
    import importlib.util
    import re

    from models.lab.edge_build import BUILDER_ARCHITECTURES

    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text(encoding="utf-8")
    dispatch = set(re.findall(r'config\.architectures\[0\] == "([A-Za-z0-9_]+)"', source))
    assert dispatch == set(BUILDER_ARCHITECTURES)
