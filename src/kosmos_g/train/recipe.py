"""Training recipes: one YAML file per run, typed and validated here.

A recipe has the sections ``model``, ``data``, ``optim``, ``train``, ``checkpoint``,
``log``, ``export`` and one section per stage (``stage1``, ``stage2``, ``stage3``); only
the section of the stage being run is read. Command-line overrides ``key.sub=value``
are parsed as YAML values (``train.max_steps=10``, ``train.precision=bf16``,
``data.sources.0.weight=2``, ``checkpoint.resume=null``).

Packaged recipes live in ``kosmos_g/recipes/`` and may be named without a path:
``--config stage2`` or ``--config tiny-stage2``.

Example:
    >>> from kosmos_g.train.recipe import load_recipe
    >>> r = load_recipe("tiny-stage2", ["train.max_steps=3"])
    >>> r.train.max_steps, r.optim.betas
    (3, (0.9, 0.98))
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

STAGES = ("stage1", "stage2", "stage3")
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class LoraSpec:
    """LoRA adapters (peft) on the MLLM's linear layers, for stages 1 and 3: only the adapters
    train in the LM (the resampler, vision block and AlignerNet train as usual); the export
    merges them into the LM's weights."""

    r: int = 16
    """Rank of each adapter."""
    alpha: float = 32.0
    """Scale numerator: an adapter adds ``alpha / r`` x B A to its layer."""
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names (last part) of the LM's linear layers that get an adapter."""

    def validate(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ValueError(f"model.lora.r and model.lora.alpha must be > 0, got r={self.r}, alpha={self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}.")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules is empty; name the LM's linear layers, e.g. [q_proj, v_proj].")


@dataclass
class ModelSpec:
    """Where the Kosmos-G weights come from."""

    init: str | None = None
    """A Kosmos-G folder (``KosmosG.save_pretrained`` + processor), e.g. the previous stage's export."""
    preset: str | None = None
    """Or: random weights from a config preset (``kosmos-g``, ``tiny``...), for stage 1 from scratch."""
    tokenizer: str | None = None
    """With ``preset``: a tokenizer folder (``sentencepiece.bpe.model`` + ``dict.txt``, or transformers)."""
    vision_init: str | None = None
    """Optional transformers ``CLIPVisionModel`` folder whose weights replace the vision tower's."""
    mllm_init: str | None = None
    """With ``preset``: a local transformers causal-LM folder (``AutoModelForCausalLM`` +
    ``AutoTokenizer``) that becomes the MLLM, weights and tokenizer (``<image>``/``</image>``
    added); the preset gives the vision tower, resampler and AlignerNet."""
    lora: LoraSpec | None = None
    """LoRA on the MLLM for stages 1 and 3 (``{r, alpha, target_modules}``), merged on export."""
    config: dict[str, Any] = field(default_factory=dict)
    """Config overrides, each setting one field: ``{"mllm.dropout": 0.0}``, nested
    ``{"mllm": {"dropout": 0.0}}``, or on the command line ``model.config.mllm.dropout=0.0``."""

    def validate(self) -> None:
        if (self.init is None) == (self.preset is None):
            raise ValueError("model: set exactly one of model.init (a Kosmos-G folder) or model.preset.")
        if self.mllm_init is not None:
            if self.preset is None:
                raise ValueError("model.mllm_init starts a new model: set model.preset (the vision, resampler and "
                                 "AlignerNet sizes) instead of model.init.")
            if self.tokenizer is not None:
                raise ValueError("model.mllm_init brings its own tokenizer; remove model.tokenizer.")
        elif self.preset is not None and self.tokenizer is None:
            raise ValueError("model.preset needs model.tokenizer (a tokenizer folder) or model.mllm_init "
                             "(a causal-LM folder).")
        if self.lora is not None:
            self.lora.validate()


@dataclass
class SourceSpec:
    """One named source of the data mixture."""

    name: str = ""
    shards: list[str] | str = field(default_factory=list)
    """A folder, glob, brace pattern (``x-{000..099}.tar``) or list of shard paths."""
    weight: float = 1.0
    """Relative sampling weight in the mixture (0 disables the source)."""


@dataclass
class DataSpec:
    sources: list[SourceSpec] = field(default_factory=list)
    batch_size: int = 8
    """Samples per process and micro-step; a step sees batch_size x grad_accum x processes."""
    num_workers: int = 2
    """DataLoader worker processes per training process (0: decode in the main process)."""
    streams: int | None = None
    """Independent deterministic data streams in the whole job (default: processes x max(1, workers)).
    Fix it to make the global batch independent of the number of processes (exact resume on a
    different world size, DDP == single-process runs); must be a multiple of the process count."""
    shuffle_buffer: int = 1000
    """Samples held by each stream's shuffle buffer (after the shard order is shuffled per epoch)."""

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("data.sources is empty; list at least one {name, shards, weight}.")
        names = [s.name for s in self.sources]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"data.sources need unique non-empty names, got {names}.")
        if any(s.weight < 0 for s in self.sources) or not any(s.weight > 0 for s in self.sources):
            raise ValueError("data.sources weights must be >= 0 with at least one > 0.")
        if self.batch_size <= 0 or self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("data.batch_size must be > 0, data.num_workers >= 0, data.shuffle_buffer >= 1.")
        if self.streams is not None and self.streams <= 0:
            raise ValueError(f"data.streams must be > 0, got {self.streams}.")


@dataclass
class OptimSpec:
    """AdamW with warm-up then linear decay to 0 (fairseq ``polynomial_decay``, power 1)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    no_decay_norm_and_bias: bool = False
    """Exclude biases, LayerNorms and learned queries/positions from weight decay (the official
    fairseq run decays every parameter, so False reproduces it)."""
    warmup_steps: int = 375
    schedule: Literal["linear", "constant"] = "linear"
    clip_grad_norm: float | None = 2.0
    fused: bool | None = None
    """Fused AdamW kernel (one pass over each tensor; about 8x faster than the default loop on CPU).
    None: on when every trained weight is on a CPU or CUDA device and no DeepSpeed optimizer is used."""

    def validate(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("optim.lr must be > 0, optim.warmup_steps and optim.weight_decay >= 0.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}.")
        if self.schedule not in ("linear", "constant"):
            raise ValueError(f"optim.schedule must be 'linear' or 'constant', got {self.schedule!r}.")


@dataclass
class TrainSpec:
    output_dir: str = "runs/kosmos-g"
    max_steps: int = 1000
    """Optimizer steps."""
    grad_accum: int = 1
    precision: Literal["no", "fp16", "bf16"] | None = None
    """Mixed precision; None takes the accelerate launcher's setting."""
    gradient_checkpointing: bool = False
    seed: int = 0
    cpu: bool = False
    """Force CPU even when a GPU is visible."""
    sharding: Literal["none", "fsdp"] = "none"
    """``fsdp``: the trainer shards the trained module with torch's FSDP2 (``kosmos_g.train.sharding``), on
    CPU and GPU alike; launch with a plain multi-process accelerate config, not accelerate's own FSDP."""
    stop_after: int | None = None
    """Stop (after checkpointing) at this step without exporting, as if interrupted; for tests
    and for splitting a run over jobs of limited length."""

    def validate(self) -> None:
        if self.max_steps <= 0 or self.grad_accum <= 0:
            raise ValueError("train.max_steps and train.grad_accum must be > 0.")
        if self.precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"train.precision must be no, fp16, bf16 or null, got {self.precision!r}.")
        if self.sharding not in ("none", "fsdp"):
            raise ValueError(f"train.sharding must be none or fsdp, got {self.sharding!r}.")


@dataclass
class CheckpointSpec:
    every: int = 1000
    """Save a resumable checkpoint every N optimizer steps (0: only at the end)."""
    keep: int = 3
    """Checkpoints kept (oldest deleted first)."""
    resume: str | None = "auto"
    """"auto": continue from the newest checkpoint in output_dir if there is one; a path: from that
    checkpoint; null: start fresh (refuses to overwrite existing checkpoints)."""


@dataclass
class LogSpec:
    every: int = 10
    csv: bool = True
    tensorboard: bool = True
    progress: bool = True


@dataclass
class ExportSpec:
    dir: str | None = None
    """Inference export folder (default ``<output_dir>/final``)."""
    dtype: str | None = None
    """Cast the exported weights (``fp16``/``bf16``); None keeps fp32."""
    overwrite: bool = False
    """Replace an existing non-empty export folder that this run did not write (checked before
    training starts). Without it such a folder is refused; the run's own earlier export (a
    finished run started again) is always replaced."""


@dataclass
class Stage1Spec:
    """Multimodal language modelling (Kosmos-1 style)."""

    train_vision_last_block: bool = True
    """Train the vision tower's last block + final LayerNorm (Kosmos-1 freezes the rest of CLIP)."""
    max_length: int | None = None
    """Truncate documents to this many positions (default: the MLLM's max_positions)."""
    image_first_prob: float = 1.0
    """For caption samples: probability of ``<s> image caption </s>`` rather than ``<s> caption image </s>``."""
    cell_label_weight: float = 0.0
    """Weight of an extra loss (not in the paper; 0: off): a linear head reads each labelled
    image's attributes per grid cell from the resampler's output (all its slots together),
    scored by cross-entropy against a caption sample's ``"cell_labels"``
    (docs/data-format.md) and added to the loss as ``w x`` its mean over labelled (image,
    cell, attribute) entries. Next-token loss alone lets the resampler average a scene's
    objects away; this asks it to keep which object is where. The head is trained with the
    stage and never exported."""
    cell_classes: dict[str, int] = field(default_factory=dict)
    """With ``cell_label_weight``: each labelled attribute and its number of classes, e.g.
    ``{shape: 8, color: 8, pattern: 4}``; samples' labels of other attributes are ignored."""
    cells: int = 9
    """With ``cell_label_weight``: grid cells per image (the length of every label list)."""
    freeze_lm_steps: int = 0
    """Keep the MLLM (or its LoRA adapters) frozen for this many first steps, so that only the
    resampler (and, with ``train_vision_last_block``, the last vision block) learns to speak
    to a pretrained LM before the LM moves; 0: the LM trains from the start."""

    def validate(self) -> None:
        if self.freeze_lm_steps < 0:
            raise ValueError(f"stage1.freeze_lm_steps must be >= 0 (0: off), got {self.freeze_lm_steps}.")
        if not self.cell_label_weight >= 0:
            raise ValueError(f"stage1.cell_label_weight must be >= 0 (0: off), got {self.cell_label_weight}.")
        if self.cell_label_weight == 0:
            return
        if not self.cell_classes:
            raise ValueError("stage1.cell_label_weight needs stage1.cell_classes, the labelled attributes and "
                             "their class counts, e.g. stage1.cell_classes={shape: 8, color: 8}.")
        for name, n in self.cell_classes.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise ValueError(f"stage1.cell_classes.{name} must be a class count >= 2, got {n!r}.")
        if self.cells < 1:
            raise ValueError(f"stage1.cells must be >= 1, got {self.cells}.")


@dataclass
class Stage2Spec:
    """Image-decoder aligning: AlignerNet M (and N) on captions only."""

    clip_path: str | None = None
    """A folder with the CLIP text encoder and tokenizer: an SD1.5 folder (``text_encoder/`` +
    ``tokenizer/``) or one transformers CLIP folder."""
    max_clip_tokens: int = 75
    max_mllm_tokens: int = 85
    reconstruction_weight: float = 1.0
    keep_reconstruction: bool = True
    """Also write N's weights next to the export, in ``<export.dir>-reconstruction`` (by default
    ``<output_dir>/final-reconstruction``)."""

    def validate(self) -> None:
        if not self.clip_path:
            raise ValueError("stage2.clip_path is required (e.g. an SD1.5 diffusers folder).")


@dataclass
class Stage3Spec:
    """Instruction tuning through the frozen U-Net."""

    sd_path: str | None = None
    """A diffusers SD1.5-layout folder (``unet/``, ``vae/``, ``scheduler/``). Without ``vae/``
    an RGB U-Net (3 channels in and out, e.g. micro-SD) is trained in pixel space on
    targets in [-1, 1]."""
    resolution: int = 512
    cond_dropout: float = 0.1
    """Share of conditions replaced by the null condition (``<s>`` alone), for guidance."""
    caption_drop: float = 0.5
    """Edit samples: probability of dropping the source caption."""
    entity_replace_prob: float = 0.5
    """Compositional samples: probability that the images replace the entity words (else follow them)."""
    white_crop_prob: float = 0.5
    """Compositional samples: probability of the background-whitened crop (else the square crop)."""
    prediction_type: str | None = None
    """Override the scheduler's prediction_type (``epsilon`` / ``v_prediction``)."""
    foreground_weight: float = 1.0
    """Weight of a target's foreground pixels in the denoising loss, against 1 for the rest,
    read from the sample's optional foreground mask (``fg.png`` / ``tgt_fg.png``, see
    docs/data-format.md); each sample's weights are scaled to mean 1. 1.0 (the paper): a
    plain mean, masks ignored. Samples without a mask weigh every pixel alike."""
    text_align_weight: float = 0.0
    """Weight of an extra loss (not in the paper; 0: off): the MSE between a sample's
    condition and the frozen SD text encoder's ``last_hidden_state`` of its target's caption
    (a compositional sample's full caption, the words its crops stand for; an edit's optional
    ``target_caption``; read from ``sd_path``'s ``text_encoder/`` and ``tokenizer/``), added
    to the denoising loss of those samples. It tells the image path
    directly what condition the words give, where the denoising loss only says so through
    the U-Net's pixels."""
    max_caption_tokens: int = 128
    """Caption samples longer than this (MLLM tokens) are filtered, as the official loader does."""
    min_caption_image_size: int = 0
    """Caption samples whose image is smaller than this on either side are filtered (official: 384)."""
    train_vision_last_block: bool = True
    unet_precision: str | None = None
    """``bf16``: the frozen U-Net runs under bfloat16 autocast whatever ``train.precision`` is
    (the trained encoder keeps it); ``auto``: so where the hardware computes bfloat16 natively
    (:func:`kosmos_g.kernels.resolve_precision`: AVX512-BF16/AMX CPUs, bf16 GPUs), else as
    ``train.precision``; null or ``fp32`` (what ``kosmos-g micro train-all --unet-precision fp32``
    writes): as ``train.precision``. For CPU training, where the U-Net is most
    of a step and the encoder's small matmuls are faster in float32 (the micro recipe)."""
    latent_cache: str | None = None
    """Folder caching the VAE posterior of each target, keyed by source and sample key."""
    precompute_latents: bool = False
    """Fill the latent cache for every sample before training (else it fills as samples come)."""

    def validate(self) -> None:
        if not self.sd_path:
            raise ValueError("stage3.sd_path is required (a diffusers SD1.5 folder).")
        for name in ("cond_dropout", "caption_drop", "entity_replace_prob", "white_crop_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"stage3.{name} must be in [0, 1], got {value}.")
        if not self.text_align_weight >= 0:
            raise ValueError(f"stage3.text_align_weight must be >= 0 (0: off), got {self.text_align_weight}.")
        if not self.foreground_weight > 0:
            raise ValueError(f"stage3.foreground_weight must be > 0 (1.0: off), got {self.foreground_weight}.")
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"stage3.resolution must be a positive multiple of 8, got {self.resolution}.")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(f"stage3.prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}.")
        if self.unet_precision not in (None, "fp32", "bf16", "auto"):
            raise ValueError(f"stage3.unet_precision must be fp32, bf16, auto or null, got {self.unet_precision!r}.")
        if self.precompute_latents and not self.latent_cache:
            raise ValueError("stage3.precompute_latents needs stage3.latent_cache (a folder).")


@dataclass
class Recipe:
    stage: str | None = None
    """The stage this recipe is written for (checked against the command)."""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    log: LogSpec = field(default_factory=LogSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    stage1: Stage1Spec = field(default_factory=Stage1Spec)
    stage2: Stage2Spec = field(default_factory=Stage2Spec)
    stage3: Stage3Spec = field(default_factory=Stage3Spec)

    def validate(self, stage: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"Unknown stage {stage!r}; choose one of {STAGES}.")
        if self.stage is not None and self.stage != stage:
            raise ValueError(f"This recipe is for {self.stage} but {stage} was asked for.")
        for section in ("model", "data", "optim", "train"):
            getattr(self, section).validate()
        if stage == "stage2" and self.model.lora is not None:
            raise ValueError("model.lora applies to stages 1 and 3; stage 2 keeps the MLLM frozen: remove model.lora.")
        getattr(self, stage).validate()

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- parsing

def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type (dataclasses, lists, tuples, numbers)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: bad value {value!r}.")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}.")
        return _build(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: must be one of {list(args)}, got {value!r}.")
        return value
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}.")
        return [_coerce(args[0], v, f"{where}.{i}") for i, v in enumerate(value)] if args else list(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {value!r}.")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}.")
        return dict(value)
    if tp is Any:
        return value
    return _coerce_scalar(tp, value, where)


def _coerce_scalar(tp: Any, value: Any, where: str) -> Any:
    """A YAML scalar as ``bool``, ``int``, ``float`` or ``str`` (other types pass through)."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{where}: expected an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}: expected a string, got {value!r}.")
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"Unknown recipe key(s) {[prefix + u for u in unknown]}; known under "
                         f"{where or 'the top level'}: {sorted(names)}.")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = int(part)
            node = node[idx]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        if idx == len(node):
            node.append(value)
        else:
            node[idx] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ValueError(f"Override {dotted!r}: {'.'.join(parts[:-1])} is not a section.")


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.max_steps=10"`` -> ``("train.max_steps", 10)`` (the value is read as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"Override {text!r} is not of the form key.sub=value.")
    return key, yaml.safe_load(raw) if raw.strip() else None


def resolve_recipe_path(config: str | os.PathLike) -> Path:
    """A recipe file path, or the name of a packaged recipe (``stage2``, ``tiny-stage1``)."""
    path = Path(config)
    if path.is_file():
        return path
    packaged = RECIPES_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if packaged.is_file() and len(path.parts) == 1:
        return packaged
    available = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"Recipe {config} not found; give a YAML path or a packaged recipe: {available}.")


def load_recipe(config: str | os.PathLike | dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """Read a recipe (path, packaged name or dict) and apply ``key=value`` overrides."""
    if isinstance(config, dict):
        data = _to_plain(config)
    else:
        path = resolve_recipe_path(config)
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"Recipe {path} must be a YAML mapping.")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(data, key, value)
    return _build(Recipe, data)
