"""The three parts of a training method and how they compose (see training/methods/README.md).

A method = a **conditioner** (an `nn.Module`: conditioner inputs -> identity tokens;
`training.adapters.base.Conditioner`) x an **injection** (`training.adapters.base.Injection`: how
the tokens reach the UNet or the text encoder) x an **objective** (one `Phase` per training phase:
data, trainable parts, condition dropout, loss terms, batch sampler). A method file defines a
`Method` subclass, its `Phase`s and its params dataclass, and calls `register(...)` at import
(`training.methods` imports every module of the package). Generic code (training loop, data module,
generation, evaluation, registry) only talks to these interfaces.

Params: `train.methods.<method>` is validated by `Method.config` (a dataclass): the method's own
options (e.g. the conditioner's) plus one field per phase, whose type subclasses `PhaseConfig`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping, Optional, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.models.diffusion import DiffusionComponents
    from training.data import Sampler
    from training.step import StepContext


# ============================================================================================
# per-phase params (the generic keys; a method's phase config subclasses PhaseConfig)


@dataclass
class DropoutConfig:
    """Condition dropout for classifier-free guidance: one uniform per sample picks exactly one case
    (identity only with p `image`, text only with p `text`, both with p `both`)."""

    image: float = 0.05
    text: float = 0.05
    both: float = 0.05


@dataclass
class PhaseConfig:
    """`train.methods.<method>.<phase>:` the keys every phase has."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # per device
    accumulate: int = 1  # micro-batches per optimizer step
    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0  # linear warm-up from 0 to lr, then constant
    grad_clip: float = 1.0  # max grad norm; 0 = off
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    log_every: int = 10  # steps between logged history rows
    sample_every: int = 500  # steps between sample grids (0: only at the end)
    checkpoint_every: int = 500  # steps between Lightning checkpoints
    keep_last: int = 3  # checkpoints kept (plus last.ckpt)
    ema: float = 0.0  # EMA decay of the trained weights (0 = off); the exported adapter is the EMA
    gradient_checkpointing: bool = False
    init: Optional[str] = None  # adapter to start from (file, folder or models:/ uri); null: `Phase.init`'s output


# keys of PhaseConfig that cannot change the trained weights (left out of the run signature)
NON_TRAJECTORY_PHASE = ("max_steps", "log_every", "sample_every", "checkpoint_every", "keep_last")


# ============================================================================================
# objective: one Phase per training phase


class Phase:
    """One training phase of a method. Subclass it and override what differs from the defaults.

    Class attributes:
      name       the phase name (`persona train --method M --phase NAME`; output `<out>/<method>/NAME`)
      config     its params dataclass (a `PhaseConfig` subclass)
      trains     parts trained in this phase: any of "conditioner", "injection" (the adapter) and
                 "unet", "text_encoder" (base parts; then saved with the adapter); the rest is frozen
      init       the phase whose output this one starts from by default (None: a fresh adapter)
      members    shard members the examples read (the method's `needs` are added)
      splits     shard splits it trains on (default the train split; a per-identity fine-tune may
                 read an identity from any split)
      per_identity  one run per identity: its config has an `identity` field, `output_name` names
                 the output per identity, and `persona personalize` runs it (one identity, or one
                 Ray task per identity)

    Data-bound phases: `bind(cfg, source)` returns the phase bound to the run's training source
    (called once per process by the data module, before any batch): what it derives from the data
    (e.g. the identity's photos, per-dimension statistics) lives on the returned instance, which the
    data loaders and the objective then use. `record(cfg)` (on the bound phase) adds JSON facts to
    the adapter record (`adapter.json["phase_record"]`, see there).
    """

    name: str = ""
    config: type = PhaseConfig
    trains: tuple[str, ...] = ("conditioner", "injection")
    init: Optional[str] = None
    members: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("train",)
    per_identity: bool = False

    # ---------------------------------------------------------------- binding to the data
    def bind(self, cfg: PhaseConfig, source: Any) -> "Phase":
        """The phase bound to the run's training source (`pipeline.shard_reader.ShardIndex` or
        `MemorySource` over `splits`): a new instance holding what it derives from the data, or self
        (default: nothing to derive). Raise `DataVerdict` when the data cannot serve the phase (e.g.
        too few photos of the identity): a recorded verdict, not a failure of the run."""
        return self

    def record(self, cfg: PhaseConfig) -> dict[str, Any]:
        """JSON facts of the (bound) phase for the adapter record, `adapter.json["phase_record"]`:
        anything informational (e.g. the identity, the adapter it started from), plus two keys
        generic code reads: `evaluation_faces` (shard keys: `persona evaluate` scores the adapter on
        these faces, from any split, instead of the held-out identities of `evaluate.split`) and
        `registry` ({"tags": {...}, "aliases": [...]}: added when the adapter is registered).
        For a per-identity phase it is also part of the personalisation cache key, so it must name
        everything of the data that shapes the weights. Default: {}."""
        return {}

    # ---------------------------------------------------------------- data (DataLoader workers)
    def trainable(self, cfg: PhaseConfig) -> tuple[str, ...]:
        """The parts trained with this config (e.g. + "unet" when a `train_unet` option is on)."""
        return self.trains

    def sampler(self, cfg: PhaseConfig) -> "Sampler":
        """Which samples make a batch (`training.data.PlainSampler` or `IdentityGroupedSampler`)."""
        from training.data import PlainSampler

        return PlainSampler()

    def decode_sizes(self, cfg: PhaseConfig, resolution: int) -> dict[str, int]:
        """{JPEG member: min side} it may be decoded at when `train.jpeg_draft` is on (a reduced,
        cheaper decode; the examples then resize from it). Default: none, full-size decodes."""
        return {}

    def example(self, sample: dict, *, resolution: int, cfg: PhaseConfig, rng: np.random.Generator) -> dict:
        """One decoded shard sample -> one training example: {"image": (3, R, R) float32 in [-1, 1],
        "prompt": str, ...any other tensors (e.g. "mask")}. `rng` is seeded by the sample's global
        position (draw every random choice from it). The conditioner inputs are added by the data
        module (`Method.inputs([sample])`) unless the example already has them."""
        raise NotImplementedError

    def collate(self, examples: Sequence[dict], groups: Sequence[int]) -> dict:
        """Examples -> batch: tensors stacked, strings listed. `groups`: the sampler's group label per
        example (identity-grouped batches; -1 = no group)."""
        out: dict[str, Any] = {}
        for k in examples[0]:
            vals = [e[k] for e in examples]
            out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else list(vals)
        return out

    def val_prompt(self, sample: dict, cfg: PhaseConfig) -> str:
        """The prompt of a sample-grid image of a validation sample."""
        return "a photo of a face"

    # ---------------------------------------------------------------- objective (the LightningModule)
    def dropout(self, cfg: PhaseConfig, step: int) -> tuple[float, float, float]:
        """(p_identity, p_text, p_both) at optimizer step `step` (override for a schedule)."""
        d = cfg.dropout
        return d.image, d.text, d.both

    def loss(self, ctx: "StepContext", cfg: PhaseConfig) -> dict[str, torch.Tensor]:
        """Loss terms of one batch; "loss" is the total (optimised), every other term is logged as
        `loss_<name>`. Default: noise MSE of the conditioned prediction."""
        from training.losses import noise_mse

        return {"loss": noise_mse(ctx.predict(), ctx.target)}

    def output_name(self, cfg: PhaseConfig) -> str:
        """Folder / run name of this phase's output (e.g. per identity for a personalisation phase)."""
        return self.name


class DataVerdict(ValueError):
    """The training data cannot serve a phase (e.g. an identity with too few usable photos): a
    verdict about the input, recorded as such with its `reason` code (not retried), never a failure
    of the run."""

    def __init__(self, message: str, reason: str = "unusable_data"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return (type(self), (str(self), self.reason))


# ============================================================================================
# generation inputs


@dataclass
class Identity:
    """One identity in a generation request: reference photos (mixed by `weights`, default equal)
    and, with several identities, the image region it occupies (mask file, white = this person)."""

    references: list[str] = field(default_factory=list)
    weights: Optional[list[float]] = None
    region: Optional[str] = None


@dataclass
class Prepared:
    """A method's conditioner inputs for one identity (unbatched arrays) + what to record about them."""

    inputs: dict[str, np.ndarray]
    record: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodFlag:
    """A `persona generate` flag of a method: `<flag> VALUE` means `--input <target>=VALUE` (kind
    "input": a file) or `--option <target>=VALUE` (kind "option"); `Method.prepare` reads it."""

    flag: str  # e.g. "--style-ref"
    kind: Literal["input", "option"]
    target: str  # the input / option name
    metavar: str = "VALUE"
    help: str = ""


# ============================================================================================
# the method


class Method:
    """A registered composition. Subclass it in the method file; see the module doc.

    Class attributes:
      name          registry name (params `train.methods.<name>`, adapter metadata, `persona-<name>`)
      conditioner   the conditioner class (built with `conditioner_config(...)` as kwargs)
      injection     the injection class (built with `injection_config(...)` as kwargs)
      config        dataclass of `train.methods.<name>` (one field per phase + method options)
      phases        {phase name: Phase instance}, in training order
      needs         shard members the conditioner inputs are made from
      input_keys    names of the conditioner inputs (batch keys)
      stage_aliases `persona train --stage N` -> phase name (e.g. {"1": "stage1"})
      flags         `MethodFlag`s `persona generate` accepts for this method (read by `prepare`)

    Optional hooks (defaults do nothing): `calibrate` (data-dependent init of a fresh conditioner),
    `prompt` (the prompt the model sees for a prompt written for any method), `extra_metrics` /
    `evaluation_metrics` (method-specific metrics of `persona evaluate`).
    """

    name: str = ""
    conditioner: type = torch.nn.Module
    injection: type = torch.nn.Module
    config: type = object
    phases: Mapping[str, Phase] = {}
    needs: tuple[str, ...] = ()
    input_keys: tuple[str, ...] = ()
    stage_aliases: Mapping[str, str] = {}
    flags: tuple[MethodFlag, ...] = ()

    def phase(self, name: str) -> Phase:
        if name not in self.phases:
            raise KeyError(f"method '{self.name}' has no phase '{name}' (phases: {', '.join(self.phases)})")
        return self.phases[name]

    # ---------------------------------------------------------------- building the adapter
    def conditioner_config(self, cfg: Any, comps: "DiffusionComponents") -> dict:
        """Constructor kwargs of a fresh conditioner for this params section and base model."""
        return {}

    def injection_config(self, cfg: Any, comps: "DiffusionComponents") -> dict:
        """Constructor kwargs of a fresh injection."""
        return {}

    def calibrate(self, conditioner: torch.nn.Module, source: Any, cfg: Any) -> dict:
        """Data-dependent initialisation of a FRESH conditioner from the training samples, before
        training (e.g. input standardisation statistics held in buffers, which the adapter file keeps).
        `source`: the training data's random-access reader (`len(source)`, `source.get(i, members)`
        -> a decoded sample); `cfg`: the method's params section. Called once per phase that starts
        from a fresh adapter (an init adapter brings its own). Returns what to record in adapter.json
        (`calibration`). Default: nothing."""
        return {}

    def inference_scale(self, cfg: Any) -> float:
        """The identity scale lambda generation and evaluation use when their params leave it
        unset (recorded as `scale` in adapter.json). Default 1.0."""
        return 1.0

    # ---------------------------------------------------------------- conditioner inputs
    def inputs(self, samples: Sequence[dict], weights: Optional[Sequence[float]] = None) -> dict[str, np.ndarray]:
        """Decoded shard samples of ONE identity (its references; training: the sample itself) ->
        unbatched conditioner inputs {name: float32 array}, mixed by `weights` (default equal)."""
        raise NotImplementedError

    def prepare(self, identity: Identity, files: Mapping[str, str], options: Mapping[str, str], kit: Any) -> Prepared:
        """Generation: one requested identity -> conditioner inputs. `files` / `options`: the
        request's method-specific named input files and options (`persona generate --input NAME=PATH
        --option KEY=VALUE`, or `--KEY VALUE` for the names in `options`); `kit`
        (`training.references.ReferenceKit`) turns reference photos into shard-like samples holding
        the members in `needs`; `kit.content` is the request's content photo (image-to-image), or
        None. Default: `inputs(kit.samples(refs))`."""
        if files or options:
            raise ValueError(f"method '{self.name}' takes no --input / --option (got {sorted(files)} {sorted(options)})")
        if not identity.references:
            raise ValueError(f"method '{self.name}': give reference photo(s)")
        samples = kit.samples(identity.references, self.needs)
        return Prepared(self.inputs(samples, identity.weights), {"references": kit.records(identity.references)})

    # ---------------------------------------------------------------- evaluation
    def extra_metrics(self, images: Sequence[np.ndarray], samples: Sequence[Mapping[str, Any]],
                      references: Sequence[np.ndarray]) -> dict[str, dict]:
        """Method-specific evaluation metrics (`persona evaluate` adds them to its own): `images` the
        generated (H, W, 3) uint8 images, `samples` one record per image ("identity", "key" (the
        evaluated face), "prompt", "prompt_index", "seed", "face_detected", "identity_similarity"),
        `references` the reference face (uint8) of each image. Returns {name: entry} in the
        evaluation's format (`training.evaluate.value(v, n, ...)` / `missing(reason, ...)`). Default: none."""
        return {}

    def prompt(self, prompt: str, adapter: Any) -> str:
        """The prompt the model sees for `prompt`, a prompt written for any method (the evaluation
        prompts, `persona generate --prompt`), with this method's `adapter` (a `PersonaAdapter`):
        e.g. a method whose identity enters through an identifier word puts the word in. Default:
        unchanged."""
        return prompt

    def evaluation_metrics(self, run: Any) -> dict[str, dict]:
        """Method-specific metrics that need more than the evaluation's images (`extra_metrics` is
        enough otherwise): `run` (`training.evaluate.EvalRun`) holds the faces, their conditioner
        inputs, the generated images, `generate(...)` with the evaluation's sampler settings (extra
        images, e.g. with other inputs) and the scorer, still open (its detector). Returns {name:
        `training.evaluate.value(...)` or `missing(reason)`}, reported beside the evaluation's own
        metrics (whose names they may not take). Default: none."""
        return {}


def mix(arrays: Sequence[np.ndarray], weights: Optional[Sequence[float]] = None) -> np.ndarray:
    """Weighted mean of same-shape arrays as float32 (weights normalised; one array: itself)."""
    arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
    if not arrays:
        raise ValueError("mix: no arrays")
    if len(arrays) == 1:
        return arrays[0]
    w = np.ones(len(arrays), np.float64) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(arrays),) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"mix: need {len(arrays)} non-negative weights with a positive sum, got {weights}")
    if weights is None:
        return np.mean(np.stack(arrays), axis=0).astype(np.float32)
    return np.tensordot(w / w.sum(), np.stack(arrays).astype(np.float64), axes=1).astype(np.float32)


def phase_configs(method: Method, cfg: Any) -> dict[str, PhaseConfig]:
    """{phase name: its config} of a built method section."""
    out = {}
    for name in method.phases:
        pc = getattr(cfg, name, None)
        if not isinstance(pc, PhaseConfig):
            raise TypeError(f"method '{method.name}': config field '{name}' must be a PhaseConfig subclass")
        out[name] = pc
    return out


def config_fields(cfg: Any, exclude: Sequence[str] = ()) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in exclude}
