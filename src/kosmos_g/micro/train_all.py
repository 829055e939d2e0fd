"""``kosmos-g micro train-all``: every model of the micro world, from scratch, in order.

1. ``tokenizer/``: the micro MLLM's SentencePiece BPE + fairseq ``dict.txt``;
2. ``clip/``: micro-CLIP (:func:`.clip.train_micro_clip`), the stand-in for CLIP ViT-L/14;
3. ``sd/``: micro-SD (:func:`.sd.train_micro_sd`), the stand-in for Stable Diffusion 1.5
   (its earlier runs in ``sd-phase1/``, ``sd-phase2/``, ...);
4. ``shards/``: the world's samples as WebDataset shards (the training schemas);
5. ``stage1/``, ``stage2/``, ``stage3/``: micro Kosmos-G, trained by the library's own
   :class:`kosmos_g.train.Trainer` on the packaged ``micro-stage1/2/3`` recipes, with only
   their paths pointed into the run folder;
6. ``release/``: what the package ships (fp16): ``kosmos-g/`` (after stage 3, with its
   ``generation_config.json``), ``kosmos-g-stage2/`` (the "before instruction tuning"
   baseline), ``sd/``, ``clip/``, ``examples/``.

Every step writes its folder atomically and is skipped when the folder exists, so an
interrupted run continues where it stopped (a stage or micro-SD run in progress resumes
from its last checkpoint). Seeds are fixed; ``train_all.json`` records each step's wall time.

Example:
    >>> record = train_all("runs/micro-smoke", SMOKE)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..fileio import atomic_dir, atomic_write_text
from ..generation_config import GenerationConfig
from . import world
from .clip import MicroCLIPRecipe
from .sd import MicroSDRecipe, SDRun

logger = logging.getLogger(__name__)

STAGES = ("stage1", "stage2", "stage3")
SAMPLING = GenerationConfig(num_inference_steps=14, guidance_scale=3.0, scheduler="dpm++")
"""The micro model's sampling defaults, written into the released ``kosmos-g/`` folders: 14
DPM-Solver++ steps score the same as 20 on micro DreamBench at 70% of the time."""


@dataclass(frozen=True)
class WorldData:
    """How many samples each shard set holds (the shipped recipe's defaults)."""

    stage1_captions: int = 12_000
    stage1_texts: int = 6_000
    stage1_entities: int = 8_000
    stage2_texts: int = 20_000
    stage3_captions: int = 4_000
    stage3_edits: int = 8_000
    stage3_compositional: int = 8_000
    per_shard: int = 1_000


@dataclass(frozen=True)
class TrainAllRecipe:
    """The stand-ins' recipes and the world's data; stages 1-3 follow the packaged YAML recipes."""

    clip: MicroCLIPRecipe = field(default_factory=MicroCLIPRecipe)
    sd: MicroSDRecipe = field(default_factory=MicroSDRecipe)
    data: WorldData = field(default_factory=WorldData)
    stage_steps: int | None = None
    """Cut every stage to this many steps (``--smoke``); None: each YAML recipe's own."""
    stage_batch: int | None = None
    """Every stage's batch size; None: each YAML recipe's own."""


SHIPPED = TrainAllRecipe()
"""The recipe of the shipped micro models."""
SMOKE = TrainAllRecipe(clip=MicroCLIPRecipe(steps=3, batch_size=8),
                       sd=MicroSDRecipe(runs=(SDRun(3), SDRun(2, 5e-4, 50, 1)), batch_size=4),
                       data=WorldData(16, 8, 8, 16, 8, 8, 8, per_shard=8), stage_steps=2, stage_batch=4)
"""Every step of the shipped models' sizes for a few iterations (tests, ``--smoke``)."""


# ============================================================================ shards


def _text_sample(rng: np.random.Generator) -> dict[str, Any]:
    """A ``text`` sample: a scene's caption, or an edit instruction (the world's language)."""
    scene = world.sample_scene(rng, exclude_held_out=True)
    if rng.random() < 0.5:
        return {"json": {"kind": "text", "text": scene.caption(rng)}}
    _, _, instruction = world.make_edit(rng, scene, exclude_held_out=True)
    return {"json": {"kind": "text", "text": instruction}}


def _caption_text(rng: np.random.Generator) -> dict[str, Any]:
    """A ``text`` sample holding one caption (stage 2 aligns captions only)."""
    return {"json": {"kind": "text", "text": world.sample_scene(rng, exclude_held_out=True).caption(rng)}}


@dataclass(frozen=True)
class ShardSet:
    """One shard set of the micro world: who reads it, its seed, its size and its samples."""

    stage: str
    source: str
    """The reading stage's recipe source (``data.sources[].name``)."""
    seed: int
    count: str
    """The :class:`WorldData` field holding its number of samples."""
    make: Callable[[np.random.Generator, int], dict[str, Any]]
    """``(rng, sd_resolution) -> sample``."""


SHARD_SETS = {
    # model inputs are 64 px (micro-CLIP's size); stage-3 targets are rendered natively at
    # micro-SD's resolution, with their exact object masks (stage3.foreground_weight)
    "stage1-caption": ShardSet("stage1", "caption", 101, "stage1_captions", lambda rng, sd: world.caption_sample(rng)),
    "stage1-text": ShardSet("stage1", "text", 102, "stage1_texts", lambda rng, sd: _text_sample(rng)),
    "stage1-entity": ShardSet("stage1", "entity", 103, "stage1_entities",
                              lambda rng, sd: world.entity_caption_sample(rng)),
    "stage2-text": ShardSet("stage2", "caption", 201, "stage2_texts", lambda rng, sd: _caption_text(rng)),
    "stage3-caption": ShardSet("stage3", "caption", 301, "stage3_captions", lambda rng, sd: world.caption_sample(
        rng, target_size=sd, with_foreground=True)),
    "stage3-edit": ShardSet("stage3", "edit", 302, "stage3_edits", lambda rng, sd: world.edit_sample(
        rng, target_size=sd, with_foreground=True)),
    "stage3-compositional": ShardSet("stage3", "compositional", 303, "stage3_compositional",
                                     lambda rng, sd: world.compositional_sample(rng, target_size=sd,
                                                                                with_foreground=True)),
}
"""Every shard set ``train-all`` writes, by folder name (evaluation uses
:data:`.world.EVAL_SEED` and the held-out subjects instead)."""


def write_shards(root: str | os.PathLike, data: WorldData = WorldData(), *, resolution: int = 32,
                 progress: bool = True) -> dict[str, Path]:
    """Write every shard set under ``root/<name>/`` (each set atomically; existing sets are kept);
    stage-3 targets are rendered at ``resolution`` (micro-SD's)."""
    from tqdm.auto import tqdm

    from ..data.shards import ShardWriter

    root = Path(root)
    out = {}
    for name, spec in SHARD_SETS.items():
        out[name] = root / name
        if out[name].is_dir():
            continue
        rng = np.random.default_rng(spec.seed)
        with atomic_dir(out[name]) as tmp, ShardWriter(tmp, max_samples=data.per_shard) as writer:
            for i in tqdm(range(getattr(data, spec.count)), desc=f"shards {name}", disable=not progress):
                writer.write(spec.make(rng, resolution), key=f"{name}-{i:07d}")
    return out


# ============================================================================ stages 1-3


def stage_recipe(stage: str, out: str | os.PathLike, recipe: TrainAllRecipe = SHIPPED, *,
                 unet_precision: str | None = None, progress: bool = True):
    """The packaged ``micro-<stage>`` recipe with its paths pointed into the run folder ``out``
    (and, for a smoke recipe, fewer steps and a smaller batch). Nothing else changes: the YAML
    file holds every option the shipped model was trained with.

    Example:
        >>> stage_recipe("stage2", "runs/micro").model.init
        'runs/micro/stage1/final'
    """
    from ..train.recipe import load_recipe

    out = Path(out)
    r = load_recipe(f"micro-{stage}")
    r.train.output_dir = str(out / stage)
    r.log.progress = progress
    if recipe.stage_steps is not None:
        r.train.max_steps = r.checkpoint.every = recipe.stage_steps
        r.optim.warmup_steps = min(r.optim.warmup_steps, recipe.stage_steps)
    if recipe.stage_batch is not None:
        r.data.batch_size = recipe.stage_batch
    sources = {s.name: s for s in r.data.sources}
    for name, spec in SHARD_SETS.items():
        if spec.stage == stage:
            sources[spec.source].shards = str(out / "shards" / name)
    if stage == "stage1":
        r.model.tokenizer, r.model.vision_init = str(out / "tokenizer"), str(out / "clip" / "vision")
    elif stage == "stage2":
        r.model.init, r.stage2.clip_path = str(out / "stage1" / "final"), str(out / "clip")
    else:
        r.model.init, r.stage3.sd_path = str(out / "stage2" / "final"), str(out / "sd")
        r.stage3.resolution = recipe.sd.resolution
        if unet_precision is not None:
            r.stage3.unet_precision = unet_precision
    r.validate(stage)
    return r


def train_stage(stage: str, recipe: Any, processes: int = 1) -> None:
    """Train ``stage`` on ``recipe`` with the library's :class:`kosmos_g.train.Trainer`, in this
    process, or with ``processes > 1`` under ``accelerate launch`` as that many one-thread
    data-parallel processes (gloo) reading the recipe from ``<output_dir>.yaml``. The micro
    recipes fix ``data.streams``, so both see the same global batches; each process takes the
    recipe's batch divided by ``processes``."""
    if processes > 1:
        return _launch_stage(stage, recipe, processes)
    from ..train.trainer import Trainer

    Trainer(recipe, stage).run()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_stage(stage: str, recipe: Any, processes: int) -> None:
    """``accelerate launch -m kosmos_g.cli train <stage> --config <output_dir>.yaml`` on
    ``processes`` CPU processes, forwarding its output; a rendezvous port taken between choosing
    it and binding it is retried once (the stage resumes from its last checkpoint)."""
    import subprocess
    import sys

    from ..train.recipe import load_recipe

    if recipe.data.batch_size % processes:
        raise ValueError(f"{stage}: data.batch_size={recipe.data.batch_size} is not divisible by {processes} "
                         f"processes; use --threads {processes - 1 or 1} or a batch size that divides.")
    per_process = load_recipe(recipe.to_dict())
    per_process.data.batch_size = recipe.data.batch_size // processes
    config = Path(f"{recipe.train.output_dir}.yaml")
    atomic_write_text(config, per_process.dump())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for attempt in (1, 2):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "kosmos_g.cli", "train", stage, "--config", str(config)]
        logger.info("%s", " ".join(cmd))
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        tail = b""
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(4096):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-20_000:]
        if proc.wait() == 0:
            return
        text = tail.decode(errors="replace")
        if attempt == 1 and any(m in text for m in ("address already in use", "EADDRINUSE", "rendezvous")):
            logger.warning("%s: the rendezvous port was taken; retrying once", stage)
            continue
        raise RuntimeError(f"{stage} failed under accelerate launch (exit {proc.returncode}); see the message "
                           f"above. Re-running train-all resumes it from {recipe.train.output_dir}.")


# ============================================================================ release


EXAMPLE_SUBJECTS = {  # held-out subjects: never a stage-3 subject, so generating them is zero-shot
    "purple-dotted-star.png": world.ObjectSpec("star", "purple", "dotted", "large", "center"),
    "pink-checkered-heart.png": world.ObjectSpec("heart", "pink", "checkered", "large", "center"),
    "yellow-checkered-circle.png": world.ObjectSpec("circle", "yellow", "checkered", "large", "center"),
}
EXAMPLE_SCENE = world.Scene("beige", (world.ObjectSpec("square", "blue", "striped", "large", "left"),
                                      world.ObjectSpec("triangle", "red", "solid", "small", "top right")))


def write_examples(dest: str | os.PathLike) -> Path:
    """The example prompt images shipped with the model: three held-out subjects
    (background-whitened, as prompts show subjects) and a scene to edit (``scene.png``)."""
    from PIL import Image

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, obj in EXAMPLE_SUBJECTS.items():
        Image.fromarray(world.subject_image(obj)).save(dest / name)
    Image.fromarray(world.render(EXAMPLE_SCENE).image).save(dest / "scene.png")
    return dest


def release(out: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """Write the shipped fp16 folders from a finished run into ``dest`` (default ``out/release``):
    ``kosmos-g`` and ``kosmos-g-stage2`` (each with :data:`SAMPLING` as its
    ``generation_config.json``), ``sd`` (micro-SD), ``clip`` (micro-CLIP: the image encoder of
    the shipped Kosmos-G, and the evaluation's CLIP-I/T analogues) and ``examples``."""
    import torch
    from transformers import CLIPModel

    from ..models.kosmos_g import KosmosG
    from ..processing import KosmosGProcessor
    from .sd import load_micro_sd, save_micro_sd

    out = Path(out)
    dest = Path(dest) if dest is not None else out / "release"
    with atomic_dir(dest) as tmp:
        for name, src in (("kosmos-g", out / "stage3" / "final"), ("kosmos-g-stage2", out / "stage2" / "final")):
            KosmosG.from_pretrained(src).save_pretrained(tmp / name, dtype=torch.float16)
            KosmosGProcessor.from_pretrained(src).save_pretrained(tmp / name)
            SAMPLING.save_pretrained(tmp / name)
        sd = load_micro_sd(out / "sd")
        save_micro_sd(tmp / "sd", unet=sd.unet.half(), text_encoder=sd.text_encoder.half(),
                      tokenizer=sd.tokenizer, scheduler=sd.scheduler)
        CLIPModel.from_pretrained(out / "clip" / "clip").half().save_pretrained(tmp / "clip")
        sd.tokenizer.save_pretrained(str(tmp / "clip"))
        write_examples(tmp / "examples")
    return dest


def copy_standins(models: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write ``out/clip`` and ``out/sd`` (float32, in the layouts micro-CLIP's and micro-SD's
    training write) from a release folder's ``clip/`` and ``sd/`` (``kosmos-g micro
    train-all --standins``), so that ``train-all`` skips both and trains stages 1-3 on them.
    Each folder is written atomically and skipped when it exists.

    Example:
        >>> from kosmos_g.micro import CHECKPOINTS
        >>> copy_standins(CHECKPOINTS, "runs/on-shipped")  # doctest: +SKIP
    """
    import torch
    from transformers import CLIPModel

    from .clip import micro_clip_text_tower, save_micro_clip_towers
    from .sd import load_micro_sd, save_micro_sd

    models, out = Path(models), Path(out)
    missing = [str(models / d) for d in ("clip", "sd/unet", "sd/text_encoder") if not (models / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"--standins {models}: {', '.join(missing)} not found; give a release folder "
                                "(one with clip/ and sd/, as train-all writes in DIR/release), or 'shipped'.")
    sd = load_micro_sd(models / "sd")
    clip = CLIPModel.from_pretrained(models / "clip", dtype=torch.float32).eval()
    text = micro_clip_text_tower(clip)
    ours, theirs = text.state_dict(), sd.text_encoder.float().state_dict()
    if ours.keys() != theirs.keys() or any(not torch.equal(ours[k], theirs[k]) for k in ours):
        raise ValueError(f"--standins {models}: clip/'s text tower is not sd/text_encoder; micro-SD must be "
                         "conditioned on that micro-CLIP's text encoder (a release folder of one train-all run).")
    if not (out / "clip").exists():
        with atomic_dir(out / "clip") as tmp:
            save_micro_clip_towers(clip, tmp)
            sd.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    if not (out / "sd").exists():
        with atomic_dir(out / "sd") as tmp:
            save_micro_sd(tmp, unet=sd.unet, text_encoder=text, tokenizer=sd.tokenizer, scheduler=sd.scheduler)


# ============================================================================ the whole run


def _train_sd_process(out: str, recipe: MicroSDRecipe, precision: str, progress: bool, threads: int,
                      others_done: Any) -> None:
    """Every micro-SD run, in a child process: on one thread while stages 1 and 2 run beside it,
    on ``threads`` once ``others_done`` (a multiprocessing event) is set."""
    import torch

    from .sd import train_micro_sd

    torch.set_num_threads(1)

    def more_threads(step: int) -> None:
        if others_done.is_set() and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    train_micro_sd(Path(out) / "sd", Path(out) / "clip", recipe, precision=precision, progress=progress,
                   step_callback=more_threads)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"clip": {"steps": 3}}`` -> ``{"clip.steps": 3}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class _Run:
    """A train-all run folder: its record (``train_all.json``) and the steps it has done."""

    def __init__(self, out: Path, recipe: TrainAllRecipe, unet_precision: str, threads: int,
                 standins: str | None) -> None:
        self.out, self.path = out, out / "train_all.json"
        self.record = json.loads(self.path.read_text()) if self.path.is_file() else {}
        # what the run's results depend on (tuples as JSON lists, like the record's)
        wanted = json.loads(json.dumps({"recipe": asdict(recipe), "unet_precision": unet_precision}))
        had = {k: self.record.get(k) for k in wanted}
        if self.record and had != wanted:
            a, b = _flat(wanted), _flat({k: v for k, v in had.items() if v is not None})
            differing = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            raise ValueError(f"{out} holds a train-all run with another recipe (differing: {differing}); resume "
                             "it with the options it was started with, or use a new output folder.")
        earlier = self.record.get("standins")
        if standins is not None and earlier != standins and (earlier or (out / "clip").exists()
                                                             or (out / "sd").exists()):
            raise ValueError(f"{out} already holds a micro-CLIP/micro-SD ({earlier or 'trained by train-all'}), "
                             f"not --standins {standins}; use a new output folder.")
        out.mkdir(parents=True, exist_ok=True)
        self.record.update(wanted, threads=threads)
        if standins is not None:
            self.record["standins"] = standins
        self.timings = self.record.setdefault("seconds", {})

    def step(self, name: str, done: Path, fn: Callable[[], Any]) -> None:
        """Run ``fn`` unless ``done`` exists; record its wall seconds."""
        if done.exists():
            logger.info("train-all: %s already done (%s)", name, done)
            self.timings.setdefault(name, 0.0)
            return
        t0 = time.time()
        fn()
        self.timings[name] = round(time.time() - t0, 1)
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.record, indent=1))


def train_all(out: str | os.PathLike, recipe: TrainAllRecipe = SHIPPED, *, progress: bool = True,
              threads: int | None = None, unet_precision: str | None = None,
              standins: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run every step into ``out`` (see the module docstring); returns and writes
    ``out/train_all.json`` with each step's wall seconds (0 for a step found done). A folder
    started with another recipe is refused (its finished steps would be mixed into this one).

    ``standins``: a release folder (``clip/``, ``sd/``; ``"shipped"``: the embedded one) whose
    micro-CLIP and micro-SD are used instead of training them (:func:`copy_standins`); stages
    1-3 are retrained on them. ``unet_precision``: the micro U-Net's precision in micro-SD's
    training and stage 3 (``auto``, the default, is bf16 on CPUs that compute it natively).

    With 2 or more ``threads`` (default: 2 if the machine has them), micro-SD trains in a child
    process, on one thread while stages 1 and 2 (which do not need it) run here on another, and
    on every thread once they are done; stage 3 then runs as ``threads`` one-thread
    data-parallel processes (small convolutions and matmuls scale poorly across threads: stage 3
    takes 0.79 s/step as 2 processes against 1.54 s/step on one thread, and two threads in one
    process give only 1.25x). Float results differ slightly with the process and thread counts.
    """
    import torch

    from ..kernels import resolve_precision
    from .clip import train_micro_clip
    from .sd import train_micro_sd
    from .tokenizers import build_spm_tokenizer

    started = time.time()
    threads = threads or min(2, os.cpu_count() or 1)
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    precision = resolve_precision(unet_precision or "auto")  # a ValueError naming the choices
    torch.set_num_threads(threads)
    out = Path(out)
    source = None
    if standins is not None:
        from . import CHECKPOINTS

        source = str((CHECKPOINTS if str(standins) == "shipped" else Path(standins)).resolve())
    run = _Run(out, recipe, unet_precision or "auto", threads, source)
    if source is not None:
        run.step("standins", out / "sd", lambda: copy_standins(source, out))
    run.step("tokenizer", out / "tokenizer", lambda: build_spm_tokenizer(out / "tokenizer"))
    run.step("micro-clip", out / "clip", lambda: train_micro_clip(out / "clip", recipe.clip, progress=progress))
    if threads >= 2 and not (out / "sd").exists():
        _stages_beside_micro_sd(run, recipe, precision, progress, threads, unet_precision)
    else:
        run.step("micro-sd", out / "sd", lambda: train_micro_sd(out / "sd", out / "clip", recipe.sd,
                                                               precision=precision, progress=progress))
        _shards_and_stages(run, recipe, progress, ("stage1", "stage2"), threads, unet_precision)
    _shards_and_stages(run, recipe, progress, ("stage3",), threads, unet_precision)
    run.step("release", out / "release", lambda: release(out))
    run.record["wall_s"] = round(time.time() - started, 1)  # this invocation (steps found done cost nothing)
    run.save()
    return run.record


def _shards_and_stages(run: _Run, recipe: TrainAllRecipe, progress: bool, stages: tuple[str, ...], processes: int,
                       unet_precision: str | None) -> None:
    out = run.out
    run.step("shards", out / "shards" / "DONE", lambda: (
        write_shards(out / "shards", recipe.data, resolution=recipe.sd.resolution, progress=progress),
        (out / "shards" / "DONE").touch()))
    for stage in stages:
        if not (out / stage / "final").exists():
            run.record.setdefault("stage_processes", {})[stage] = processes
        r = stage_recipe(stage, out, recipe, unet_precision=unet_precision, progress=progress)
        run.step(stage, out / stage / "final", lambda s=stage, r=r: train_stage(s, r, processes))


def _stages_beside_micro_sd(run: _Run, recipe: TrainAllRecipe, precision: str, progress: bool, threads: int,
                            unet_precision: str | None) -> None:
    """micro-SD in a child process on one thread while stages 1-2 train here on the other; then
    micro-SD takes every thread until it is done."""
    import multiprocessing

    import torch

    sd_start = time.time()
    context = multiprocessing.get_context("spawn")
    others_done = context.Event()
    job = context.Process(target=_train_sd_process, name="micro-sd",
                          args=(str(run.out), recipe.sd, precision, progress, threads, others_done))
    job.start()
    torch.set_num_threads(1)
    try:
        _shards_and_stages(run, recipe, progress, ("stage1", "stage2"), 1, unet_precision)
        others_done.set()  # micro-SD takes every thread from its next step
        run.record["stages_1_2_done_after_s"] = round(time.time() - sd_start, 1)
        job.join()
        if job.exitcode != 0:
            raise RuntimeError(f"micro-SD training failed (exit {job.exitcode}); re-run train-all to retry.")
        run.timings["micro-sd"] = round(time.time() - sd_start, 1)
        run.record["micro_sd_parallel_with_stages_1_2"] = True
    finally:
        if job.is_alive():
            job.terminate()
        torch.set_num_threads(threads)


def with_clip_bind_weight(recipe: TrainAllRecipe, weight: float) -> TrainAllRecipe:
    """``recipe`` with micro-CLIP's binding loss at ``weight`` (``--clip-bind-weight``; 0: off)."""
    return replace(recipe, clip=replace(recipe.clip, bind_weight=weight))


__all__ = ["SAMPLING", "SHIPPED", "SMOKE", "TrainAllRecipe", "WorldData", "copy_standins", "release",
           "stage_recipe", "train_all", "train_stage", "with_clip_bind_weight", "write_shards"]
