"""Model-set registry, manifest verification and the `hybridgen models` CLI (tiny set)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from broker.errors import BadRequest, NotFound
from models import registry
from models.cli import main
from models.manifest import IntegrityError, verify
from models.registry import ModelSet
from tests.fixtures_models import copy_model_set


def test_registry_and_manifest_are_torch_free() -> None:
    code = (
        "import sys, models.registry, models.manifest, models.ort_edge, models.chat\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'onnx', 'onnxruntime_genai')]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_resolve_without_models_hints_at_build(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="hybridgen models build"):
        registry.resolve(home=tmp_path)
    with pytest.raises(NotFound, match="not installed"):
        registry.resolve("nope", home=tmp_path)
    with pytest.raises(BadRequest, match="invalid"):
        registry.resolve("../etc", home=tmp_path)
    assert registry.list_model_sets(tmp_path) == []


def test_model_set_layout(tiny_models: ModelSet, tiny_models_home: Path) -> None:
    assert registry.resolve(home=tiny_models_home) == tiny_models  # CURRENT
    assert tiny_models.is_current(tiny_models_home)
    assert tiny_models.edge_context_length == 128
    assert tiny_models.cloud_context_length == 256
    assert tiny_models.edge_precisions == ["int4", "fp32"]
    assert (tiny_models.edge_dir() / "genai_config.json").is_file()
    assert (tiny_models.edge_dir("fp32") / "model.onnx").is_file()
    with pytest.raises(NotFound, match="no int8 edge build"):
        tiny_models.edge_dir("int8")
    with pytest.raises(BadRequest):
        tiny_models.edge_dir("fp16")
    assert (tiny_models.cloud_dir / "model.safetensors").is_file()
    assert (tiny_models.edge_checkpoint_dir / "config.json").is_file()
    assert (tiny_models.tokenizer_dir / "tokenizer.json").is_file()
    assert [s.version for s in registry.list_model_sets(tiny_models_home)] == ["tiny-test"]
    # No staging leftovers are visible.
    assert not [p for p in registry.models_home(tiny_models_home).iterdir() if p.name[0] == "."]


def test_manifest_contents(tiny_models: ModelSet) -> None:
    m = tiny_models.manifest
    assert m["version"] == "tiny-test" and m["profile"] == "tiny" and m["created"]
    edge, cloud = m["models"][registry.EDGE_MODEL], m["models"][registry.CLOUD_MODEL]
    assert edge["architecture"] == cloud["architecture"] == "LlamaForCausalLM"
    assert cloud["parameters"] > 2 * edge["parameters"]
    for name in (registry.EDGE_MODEL, registry.CLOUD_MODEL):
        assert set(tiny_models.perplexity[name]) == {"overall", "in_domain", "out_of_domain"}
    assert m["corpus"]["sources"]["python-topics"]["bytes"] > 0
    assert m["runtime"]["onnxruntime-genai"]
    assert m["tokenizer"]["eos_token"] == "<|endoftext|>"
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert "edge-int4/model.onnx" in m["files"]
    agreement = m["edge_builds"]["int4"]["top1_agreement_teacher_forced"]
    assert m["edge_builds"]["fp32"]["top1_agreement_teacher_forced"] == 1.0
    assert agreement >= 0.5, agreement


def test_verify_ok_and_refuses_truncated_and_tampered(tiny_models: ModelSet, tmp_path: Path):
    verify(tiny_models)
    copy = copy_model_set(tiny_models, tmp_path)
    verify(copy)
    data = copy.edge_dir() / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    weights = copy.cloud_dir / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    (copy.root / "edge" / "extra.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError) as info:
        verify(copy)
    message = str(info.value)
    assert "edge-int4/model.onnx.data" in message and "truncated" in message
    assert "cloud/model.safetensors" in message and "sha256" in message
    assert "edge/extra.bin" in message


def test_cli_verify_list_use(
    tiny_models: ModelSet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = copy_model_set(tiny_models, tmp_path)
    home = ["--home", str(tmp_path)]
    # The copy has no CURRENT file: `verify VERSION` works, `verify` alone says what to do.
    assert main(["verify", copy.version, *home]) == 0
    assert main(["verify", *home]) == 1
    assert "hybridgen models build" in capsys.readouterr().err
    assert main(["use", copy.version, *home]) == 0
    assert main(["verify", *home]) == 0
    assert "files OK" in capsys.readouterr().out
    assert main(["list", "--json", *home]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["version"] == "tiny-test" and listed[0]["current"] is True
    assert main(["list", *home]) == 0
    assert "tiny-test" in capsys.readouterr().out
    (copy.tokenizer_dir / "tokenizer.json").write_text("{}")
    assert main(["verify", *home]) == 1
    assert "tokenizer/tokenizer.json" in capsys.readouterr().err


def test_profiles_fit_the_edge_runtime() -> None:
    from models.edge_build import check_head_size
    from models.profiles import PROFILES

    contexts = {
        name: (p.edge.context_length, p.cloud.context_length) for name, p in PROFILES.items()
    }
    assert contexts == {"tiny": (128, 256), "quick": (256, 512), "full": (512, 1024)}
    for profile in PROFILES.values():
        check_head_size(profile.edge.hidden_size, profile.edge.num_heads)
    with pytest.raises(BadRequest, match="multiple of 16"):
        check_head_size(160, 4)
