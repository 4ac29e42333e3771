"""Model-set registry, the typed manifest and its formats, verification, `hybridgen models`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.errors import BadRequest, Internal, NotFound
from models import registry
from models.cli import main
from models.manifest import (
    IntegrityError,
    file_table,
    routing_calibration,
    verify,
    write_manifest,
)
from models.manifest_schema import MANIFEST_FORMAT, ManifestError
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
    assert m.format == MANIFEST_FORMAT == 2
    assert m.version == "tiny-test" and m.profile == "tiny" and m.created
    edge, cloud = m.models.edge, m.models.cloud
    assert tiny_models.model_info(registry.EDGE_MODEL) is edge
    assert edge.architecture == cloud.architecture == "LlamaForCausalLM"
    assert (edge.source, edge.checkpoint_dir, cloud.checkpoint_dir) == ("trained", "edge", "cloud")
    assert cloud.parameters > 2 * edge.parameters
    for name in (registry.EDGE_MODEL, registry.CLOUD_MODEL):
        assert set(tiny_models.perplexity[name]) == {"overall", "in_domain", "out_of_domain"}
    assert m.corpus is not None and m.corpus["sources"]["python-topics"]["bytes"] > 0
    assert m.runtime["onnxruntime-genai"]
    assert m.tokenizer is not None and m.tokenizer.eos_token == "<|endoftext|>"
    assert all(len(f.sha256) == 64 for f in m.files.values())
    assert "edge-int4/model.onnx" in m.files
    agreement = m.edge_builds["int4"].top1_agreement_teacher_forced
    assert m.edge_builds["fp32"].top1_agreement_teacher_forced == 1.0
    assert agreement is not None and agreement >= 0.5, agreement
    assert m.routing is not None and m.routing.mode == "calibrated"
    assert m.timings.total_s > 0 and "calibration_s" in m.timings.steps()
    # The file holds exactly the typed manifest's JSON form (format 2 spells out the mode).
    on_disk = json.loads((tiny_models.root / "manifest.json").read_text())
    assert on_disk == m.to_json() and on_disk["format"] == 2
    assert on_disk["routing"]["mode"] == "calibrated"
    assert on_disk["models"]["hg-edge"]["checkpoint_dir"] == "edge"
    # Dict-style reads (older callers) give the JSON form of a section.
    assert m["routing"] == on_disk["routing"] and m["files"] == on_disk["files"]


#: A lab set's manifest as builds before the typed manifest wrote it (format 1): no
#: `routing.mode` (calibrated), no `checkpoint_dir`; corpus, runtime and files shortened.
FORMAT_1_MANIFEST: dict[str, Any] = {
    "version": "old-lab",
    "created": "2026-11-29T14:29:18+00:00",
    "profile": "tiny",
    "seed": 0,
    "models": {
        "hg-edge": {
            "source": "trained", "architecture": "LlamaForCausalLM", "parameters": 106816,
            "context_length": 128, "vocab_size": 512, "hidden_size": 64, "num_layers": 2,
            "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128,
            "training": {"steps": 30, "final_loss": 5.2956, "seed": 0, "data": "in-domain"},
        },
        "hg-cloud": {
            "source": "trained", "architecture": "LlamaForCausalLM", "parameters": 361088,
            "context_length": 256, "vocab_size": 512, "hidden_size": 128, "num_layers": 2,
            "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256,
            "training": {"steps": 30, "final_loss": 5.2972, "seed": 1, "data": "all"},
        },
    },
    "tokenizer": {
        "dir": "tokenizer", "source": "trained", "vocab_size": 512,
        "eos_token": "<|endoftext|>", "eos_token_id": 0, "pad_token": "<|pad|>",
        "pad_token_id": 1,
    },
    "edge_builds": {
        "int4": {"dir": "edge-int4", "top1_agreement_teacher_forced": 0.9583, "bytes": 126769}
    },
    "corpus": {"domain": ["man", "info", "licenses"], "train_in_domain_bytes": 226436},
    "metrics": {
        "perplexity": {
            "hg-edge": {"overall": 235.561, "in_domain": 203.664, "out_of_domain": 272.453},
            "hg-cloud": {"overall": 207.099, "in_domain": 202.104, "out_of_domain": 212.217},
        },
        "eval_window": 128,
        "eval_windows_per_domain": 8,
    },
    "routing": {
        "perplexity_threshold": 209.818,
        "thresholds_by_length": [
            {"max_tokens": 12, "threshold": 203.62, "auc": 0.5872, "balanced_accuracy": 0.5885,
             "prompts": {"in_domain": 96, "out_of_domain": 96}},
            {"max_tokens": None, "threshold": 222.23, "auc": 0.7333,
             "balanced_accuracy": 0.6927, "prompts": {"in_domain": 96, "out_of_domain": 96}},
        ],
        "prompts": {"in_domain": 384, "out_of_domain": 384},
        "prompt_tokens": [4, 96],
        "precision": "int4",
        "seed": 0,
        "auc": 0.6519,
        "balanced_accuracy": 0.625,
        "median_perplexity": {"in_domain": 202.387, "out_of_domain": 239.947},
        "seconds": 1.15,
    },
    "timings": {"corpus_s": 1.5, "calibration_s": 1.2, "total_s": 6.6},
    "runtime": {"python": "3.11.7", "onnxruntime-genai": "0.18.0"},
    "format": 1,
    "files": {},
}  # fmt: skip


def _install_manifest(home: Path, data: dict[str, Any]) -> Path:
    """An installed set of one small file per folder under `home`, with manifest `data`."""
    root = registry.models_home(home) / data["version"]
    for rel in ("edge/config.json", "edge-int4/genai_config.json", "cloud/config.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("{}")
    files = {rel: entry.to_json() for rel, entry in file_table(root).items()}
    (root / "manifest.json").write_text(json.dumps({**data, "files": files}, indent=2))
    return root


def test_format_1_manifest_still_loads(tmp_path: Path) -> None:
    root = _install_manifest(tmp_path, FORMAT_1_MANIFEST)
    written = (root / "manifest.json").read_bytes()
    model_set = registry.resolve("old-lab", tmp_path)
    m = model_set.manifest
    assert m.format == 1 and m.version == "old-lab"
    assert model_set.edge_checkpoint_dir == root / "edge"
    assert (m.models.edge.checkpoint_dir, m.models.cloud.checkpoint_dir) == ("edge", "cloud")
    assert model_set.edge_context_length == 128 and model_set.cloud_context_length == 256
    assert model_set.perplexity["hg-edge"]["in_domain"] == 203.664
    assert m.routing is not None and m.routing.mode == "calibrated"
    assert [b.max_tokens for b in m.routing.thresholds_by_length] == [12, None]
    assert m.timings.steps()["calibration_s"] == 1.2
    verify(model_set)
    # The edge reads the same calibration as before; reading rewrote nothing.
    found = routing_calibration(root / "edge-int4")
    assert found is not None and found["perplexity_threshold"] == 209.818
    assert found["thresholds_by_length"][0]["threshold"] == 203.62
    assert (root / "manifest.json").read_bytes() == written
    assert main(["list", "--json", "--home", str(tmp_path)]) == 0


def test_format_1_pretrained_manifest_still_loads(tmp_path: Path) -> None:
    """A format-1 same-weights set (already spelling out its mode and checkpoint folder)."""
    data = json.loads(json.dumps(FORMAT_1_MANIFEST))
    source = {"kind": "gguf", "path": "/x.gguf", "sha256": "0" * 64, "license": "see it"}
    for entry in data["models"].values():
        entry.update(source="gguf", checkpoint_dir="cloud", training={})
        entry["from"] = source
    data.update(version="old-pretrained", profile="pretrained")
    data["license"] = {"hg-edge": "see it", "hg-cloud": "see it"}
    del data["tokenizer"], data["corpus"]
    data["routing"] = {"perplexity_threshold": None, "mode": "same_weights", "skipped": "why"}
    _install_manifest(tmp_path, data)
    model_set = registry.resolve("old-pretrained", tmp_path)
    assert model_set.edge_checkpoint_dir == model_set.cloud_dir
    entry = model_set.model_info(registry.EDGE_MODEL)
    assert entry.from_ is not None and entry.from_.kind == "gguf"
    assert model_set.manifest.license is not None
    assert model_set.manifest.license.cloud == "see it"
    assert model_set.manifest.routing is not None
    assert model_set.manifest.routing.mode == "same_weights"


def test_mistyped_manifest_field_is_refused_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = json.loads(json.dumps(FORMAT_1_MANIFEST))
    data["models"]["hg-edge"]["context_length"] = "long"
    root = _install_manifest(tmp_path, data)
    with pytest.raises(ManifestError) as info:
        registry.resolve("old-lab", tmp_path)
    assert isinstance(info.value, Internal)
    assert info.value.fields == ["models.hg-edge.context_length"]
    message = info.value.message
    assert str(root / "manifest.json") in message
    assert "models.hg-edge.context_length" in message and "'long'" in message
    # Listing skips it with the reason; the edge finds no calibration in it.
    assert registry.list_model_sets(tmp_path) == []
    assert "models.hg-edge.context_length" in caplog.text
    assert routing_calibration(root / "edge-int4") is None
    # A missing section and an unknown routing mode are named too.
    del data["timings"]
    data["routing"]["mode"] = "guessed"
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError) as info:
        registry.resolve("old-lab", tmp_path)
    assert set(info.value.fields) == {"models.hg-edge.context_length", "routing.mode", "timings"}
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        registry.resolve("old-lab", tmp_path)


def test_unknown_manifest_fields_are_kept(tmp_path: Path) -> None:
    """A manifest from a newer build loads; what this version does not know survives a write."""
    data = json.loads(json.dumps(FORMAT_1_MANIFEST))
    data.update(format=3, signed_by="someone")
    data["routing"]["mode"] = "calibrated"
    for name, folder in (("hg-edge", "edge"), ("hg-cloud", "cloud")):
        data["models"][name]["checkpoint_dir"] = folder
    data["models"]["hg-edge"]["quantization"] = {"bits": 4}
    data["edge_builds"]["int4"]["latency_ms"] = 3.5
    root = _install_manifest(tmp_path, data)
    model_set = registry.resolve("old-lab", tmp_path)
    assert model_set.manifest.format == 3
    assert model_set.manifest.model_extra == {"signed_by": "someone"}
    assert model_set.manifest["signed_by"] == "someone"
    rewritten = write_manifest(root, model_set.manifest)
    on_disk = json.loads((root / "manifest.json").read_text())
    assert rewritten.format == on_disk["format"] == MANIFEST_FORMAT
    assert on_disk["signed_by"] == "someone"
    assert on_disk["models"]["hg-edge"]["quantization"] == {"bits": 4}
    assert on_disk["edge_builds"]["int4"]["latency_ms"] == 3.5
    verify(registry.resolve("old-lab", tmp_path))


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
    from models.lab.edge_build import check_head_size
    from models.lab.profiles import PROFILES

    contexts = {
        name: (p.edge.context_length, p.cloud.context_length) for name, p in PROFILES.items()
    }
    assert contexts == {"tiny": (128, 256), "quick": (256, 512), "full": (512, 1024)}
    for profile in PROFILES.values():
        check_head_size(profile.edge.hidden_size, profile.edge.num_heads)
    with pytest.raises(BadRequest, match="multiple of 16"):
        check_head_size(160, 4)
