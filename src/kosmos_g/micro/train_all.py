"""``kosmos-g micro train-all``: every model of the micro world, from scratch, in order.

1. ``tokenizer/``: the micro MLLM's SentencePiece BPE + fairseq ``dict.txt``;
2. ``clip/``: micro-CLIP (:func:`.standins.train_micro_clip`), the stand-in for CLIP ViT-L/14;
   ``clip-dense/`` (only with ``Budget.clip_dense_steps``, off by default): its vision tower
   trained on (:func:`.standins.refine_micro_clip_vision`), the text tower unchanged, then the
   image encoder stages 1-3 read and the release ships;
3. ``sd/``: micro-SD (:func:`.standins.train_micro_sd`), the stand-in for Stable Diffusion 1.5;
4. ``shards/``: the world's samples as WebDataset shards (the training schemas);
5. ``stage1/``, ``stage2/``, ``stage3/``: micro Kosmos-G, trained ONLY by the project's own
   ``kosmos-g train stageN`` command on the packaged ``micro-stageN`` recipes;
6. ``release/``: what the package ships (fp16): ``kosmos-g/`` (after stage 3),
   ``kosmos-g-stage2/`` (the "before instruction tuning" baseline), ``sd/``, ``clip/``,
   ``examples/``.

Every step writes its folder atomically and is skipped when the folder exists, so an
interrupted run continues where it stopped (a stage or micro-SD run in progress resumes
from its last checkpoint). Seeds are fixed; ``train_all.json`` records each step's wall time.

Example:
    >>> summary = train_all("runs/micro", smoke=True)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import world
from .tokenizers import atomic_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """How much of everything ``train-all`` does (the full recipe, or ``--smoke``)."""

    clip_steps: int = 2000
    clip_batch: int = 64
    clip_bind_weight: float = 1.0
    """micro-CLIP's binding loss (:func:`.standins.train_micro_clip`'s ``bind_weight``): each
    object's position word must say its shape, colour, pattern and size, so micro-SD keeps two
    subjects' attributes apart (sessions 15-17, docs/micro-notes.md). 0: off (before session 17)."""
    clip_dense_steps: int = 0
    """Steps of micro-CLIP's second phase, into ``clip-dense/`` (:func:`.standins.refine_micro_clip_vision`,
    batch ``clip_batch``): the vision tower alone, the text tower frozen (so micro-SD, which reads
    ``clip/``'s text encoder, trains beside it), with a dense loss that makes every patch token say
    the shape, colour and pattern of the object under it; stages 1-3 then read its vision tower and
    the release ships it. 0 (the default): off. With 2000 steps a ridge probe read each occupied
    cell's shape from the tokens the MLLM gets 89% of the time (75% without), but a whole chain
    trained so followed 54.2% of the edits (shipped 52.1%) and drew 82.0% of single subjects
    right (shipped 94.5%): not better, so not in the recipe (docs/micro-notes.md, sessions 28-29)."""
    sd_steps: int = 1000
    sd_batch: int = 32
    sd_resolution: int = 32
    """micro-SD's resolution (= :data:`.standins.SD_SIZE`); stage-3 targets are rendered at it."""
    sd_continue_steps: tuple[int, ...] = (1000, 1500, 1500, 1500)
    """Further micro-SD runs, each continuing from the previous run's U-Net (lr 5e-4, 50 warm-up
    steps, fresh EMA, seed 1), one per entry; ``()``: none. The runs before the last are kept in
    ``sd-phase1/``, ``sd-phase2/``, ...; the last is ``sd/``."""
    sd_attention_heads: int = 4
    """Attention heads of micro-SD's U-Net (:class:`.standins.MicroUNetSizes`'s
    ``attention_head_dim``, which diffusers reads as the number of heads): 4 heads of 32
    channels, whose training steps are ~15-20% faster on 2 cores than the 32 heads of 4 channels
    of the recipe before session 26, with a micro-SD at least as good (docs/micro-notes.md,
    session 26). Only the first run builds a U-Net; the continuations keep its layout."""
    unet_precision: str = "auto"
    """The micro U-Net's precision in micro-SD's training and in stage 3's pass through it
    (:func:`.standins.train_micro_sd`'s ``precision``, ``stage3.unet_precision``): ``"auto"`` is
    bfloat16 autocast on CPUs that compute it natively (AVX512-BF16, AMX), where it halves a
    micro-SD step and takes a quarter off a stage-3 step, and float32 elsewhere, the recipe of
    session 17 (docs/micro-notes.md, session 21). ``"fp32"``, ``"bf16"``: that one everywhere."""
    stage1_steps: int | None = None
    """None: the ``micro-stage1`` recipe's ``train.max_steps`` (likewise for stages 2 and 3)."""
    stage2_steps: int | None = None
    stage3_steps: int | None = None
    stage_batch: int | None = None
    """None: each recipe's own ``data.batch_size``."""
    local_queries: bool = True
    """Stage 1 builds the resampler with local queries (``ResamplerConfig.local_queries``: each
    query reads one tile of micro-CLIP's patch grid), kept by stages 2-3. False: global queries,
    the official design (before session 17)."""
    cell_label_weight: float = 4.0
    """Stage 1's per-cell attribute loss (``stage1.cell_label_weight``) on the caption shards'
    ``cell_labels`` (each grid cell's shape, colour and pattern). 0: off (before session 17)."""
    stage3_cell_label_weight: float = 0.0
    """Stage 3's per-cell attribute loss (``stage3.cell_label_weight``) on the edit shards'
    ``src_cell_labels`` (each cell of the source scene): the resampler keeps the scene an edit
    redraws. 0: off (session 18's trial, docs/micro-notes.md)."""
    stage1_captions: int = 12_000
    stage1_texts: int = 6_000
    stage1_entities: int = 8_000
    stage2_texts: int = 20_000
    stage3_captions: int = 4_000
    stage3_edits: int = 8_000
    stage3_compositional: int = 8_000
    per_shard: int = 1_000


FULL = Budget()
"""The shipped recipe (session 17; micro-SD's U-Net with 4 attention heads since session 26)."""

SMOKE = Budget(clip_steps=3, clip_batch=8, clip_dense_steps=2, sd_steps=3, sd_batch=4, sd_continue_steps=(2, 1),
               stage1_steps=2, stage2_steps=2, stage3_steps=2, stage_batch=4, stage1_captions=16, stage1_texts=8,
               stage1_entities=8, stage2_texts=16, stage3_captions=8, stage3_edits=8, stage3_compositional=8,
               per_shard=8)

BEFORE_FIELDS = {"sd_attention_heads": 32, "clip_dense_steps": 0}
"""What train-all did before each of these Budget fields existed: a run folder whose record
lacks the field was trained so, and resumes under that value (not the field's default)."""

REMOVED_FIELDS = {"sd_cond_noise": 0.0, "sd_position_word_mix": 0.0}
"""Budget fields that no longer exist (experiments of sessions 24-25, off by default, removed in
session 27; docs/micro-notes.md), at the value that left them off: a run folder whose record
holds them at that value resumes; one trained with them on is refused."""


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
    source: int
    """The reading stage's recipe source (``data.sources.<source>.shards``)."""
    seed: int
    count: str
    """The :class:`Budget` field holding its number of samples."""
    make: Callable[[np.random.Generator, int], dict[str, Any]]
    """``(rng, sd_resolution) -> sample``."""


SHARD_SETS = {
    # model inputs are 64 px (micro-CLIP's size); stage-3 targets are rendered natively at
    # micro-SD's resolution, with their exact object masks (stage3.foreground_weight)
    "stage1-caption": ShardSet("stage1", 0, 101, "stage1_captions", lambda rng, sd: world.caption_sample(rng)),
    "stage1-text": ShardSet("stage1", 1, 102, "stage1_texts", lambda rng, sd: _text_sample(rng)),
    "stage1-entity": ShardSet("stage1", 2, 103, "stage1_entities",
                              lambda rng, sd: world.entity_caption_sample(rng)),
    "stage2-text": ShardSet("stage2", 0, 201, "stage2_texts", lambda rng, sd: _caption_text(rng)),
    "stage3-caption": ShardSet("stage3", 0, 301, "stage3_captions", lambda rng, sd: world.caption_sample(
        rng, target_size=sd, with_foreground=True)),
    "stage3-edit": ShardSet("stage3", 1, 302, "stage3_edits", lambda rng, sd: world.edit_sample(
        rng, target_size=sd, with_foreground=True)),
    "stage3-compositional": ShardSet("stage3", 2, 303, "stage3_compositional",
                                     lambda rng, sd: world.compositional_sample(rng, target_size=sd,
                                                                                with_foreground=True)),
}
"""Every shard set ``train-all`` writes, by folder name (evaluation uses
:data:`.standins.EVAL_SEED` and the held-out subjects instead)."""


def write_shards(root: str | os.PathLike, budget: Budget = FULL, *, progress: bool = True) -> dict[str, Path]:
    """Write every shard set under ``root/<name>/`` (each set atomically; existing sets are kept)."""
    from tqdm.auto import tqdm

    from ..data.shards import ShardWriter

    root = Path(root)
    out = {}
    for name, spec in SHARD_SETS.items():
        out[name] = root / name
        if out[name].is_dir():
            continue
        rng = np.random.default_rng(spec.seed)
        with atomic_dir(out[name]) as tmp, ShardWriter(tmp, max_samples=budget.per_shard) as writer:
            for i in tqdm(range(getattr(budget, spec.count)), desc=f"shards {name}", disable=not progress):
                writer.write(spec.make(rng, budget.sd_resolution), key=f"{name}-{i:07d}")
    return out


def _train_stage(stage: str, out: Path, overrides: list[str], processes: int = 1) -> None:
    """``kosmos-g train <stage> --config micro-<stage> ...``: the project's own command, in this
    process, or with ``processes > 1`` under ``accelerate launch`` as that many one-thread
    data-parallel processes (gloo). The recipes fix ``data.streams``, so both see the same
    global batches; the per-process batch is the recipe's divided by ``processes``."""
    argv = ["train", stage, "--config", f"micro-{stage}", *overrides]
    if processes > 1:
        return _launch_stage(stage, out, argv, processes)
    from ..cli import main as cli_main

    logger.info("kosmos-g %s", " ".join(argv))
    code = cli_main(argv)
    if code:
        raise RuntimeError(f"`kosmos-g {' '.join(argv)}` failed (exit {code}); see the message above. "
                           f"Re-running train-all resumes it from {out / stage}.")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_stage(stage: str, out: Path, argv: list[str], processes: int) -> None:
    """Run ``argv`` under ``accelerate launch`` with ``processes`` CPU processes, forwarding
    its output (progress bars included); a rendezvous port taken between choosing it and
    binding it is retried once (the stage resumes from its last checkpoint)."""
    import subprocess
    import sys

    from ..train.recipe import load_recipe

    batch = load_recipe(f"micro-{stage}", [a for a in argv[4:] if a.startswith("data.batch_size=")]).data.batch_size
    if batch % processes:
        raise ValueError(f"{stage}: data.batch_size={batch} is not divisible by {processes} processes; "
                         f"use --threads {processes - 1 or 1} or a batch size that divides.")
    argv = [*argv, f"data.batch_size={batch // processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for attempt in (1, 2):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "kosmos_g.cli", *argv]
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
        raise RuntimeError(f"`accelerate launch ... kosmos-g {' '.join(argv)}` failed (exit {proc.returncode}); "
                           f"see the message above. Re-running train-all resumes it from {out / stage}.")


def _stage_overrides(stage: str, out: Path, budget: Budget, progress: bool) -> list[str]:
    sh = out / "shards"
    common = [f"train.output_dir={out / stage}", f"log.progress={str(progress).lower()}"]
    steps = {"stage1": budget.stage1_steps, "stage2": budget.stage2_steps, "stage3": budget.stage3_steps}[stage]
    if steps is not None:
        common += [f"train.max_steps={steps}", f"optim.warmup_steps={min(100, steps)}",
                   f"checkpoint.every={steps}"]
    if budget.stage_batch is not None:
        common.append(f"data.batch_size={budget.stage_batch}")
    common += [f"data.sources.{spec.source}.shards={sh / name}"
               for name, spec in SHARD_SETS.items() if spec.stage == stage]
    if stage == "stage1":
        common += [f"model.tokenizer={out / 'tokenizer'}", f"model.vision_init={_final_clip(out) / 'vision'}"]
        if budget.local_queries:
            common.append("model.config.resampler.local_queries=true")
        return common + _cell_overrides("stage1", budget.cell_label_weight)
    if stage == "stage2":
        return common + [f"model.init={out / 'stage1' / 'final'}", f"stage2.clip_path={out / 'clip'}"]
    return common + [f"model.init={out / 'stage2' / 'final'}", f"stage3.sd_path={out / 'sd'}",
                     f"stage3.resolution={budget.sd_resolution}", f"stage3.unet_precision={budget.unet_precision}",
                     *_cell_overrides("stage3", budget.stage3_cell_label_weight)]


def _final_clip(out: Path) -> Path:
    """The micro-CLIP whose vision tower the MLLM gets: ``clip-dense/`` once micro-CLIP's second
    phase has run there (``Budget.clip_dense_steps``), else ``clip/`` (that phase off, or stand-ins
    given, whose micro-CLIP is used as it is)."""
    return out / "clip-dense" if (out / "clip-dense").is_dir() else out / "clip"


def _cell_overrides(stage: str, weight: float) -> list[str]:
    """``<stage>.cell_label_weight`` on the world's per-cell labels (none when ``weight`` is 0)."""
    if not weight:
        return []
    classes = ", ".join(f"{name}: {len(values)}" for name, values in world.CELL_ATTRIBUTES.items())
    return [f"{stage}.cell_label_weight={weight}", f"{stage}.cell_classes={{{classes}}}",
            f"{stage}.cells={len(world.POSITIONS)}"]


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
    """Write the shipped fp16 folders from a finished run: ``kosmos-g``, ``kosmos-g-stage2``,
    ``sd`` (micro-SD), ``clip`` (micro-CLIP after its second phase if it had one: the image
    encoder of the shipped Kosmos-G, and the evaluation's CLIP-I/T analogues) and ``examples``
    (prompt images)."""
    import torch
    from transformers import CLIPModel

    from ..models.kosmos_g import KosmosG
    from ..processing import KosmosGProcessor
    from .standins import load_micro_sd, save_micro_sd

    out = Path(out)
    dest = Path(dest) if dest is not None else out / "release"
    with atomic_dir(dest) as tmp:
        for name, src in (("kosmos-g", out / "stage3" / "final"), ("kosmos-g-stage2", out / "stage2" / "final")):
            KosmosG.from_pretrained(src).save_pretrained(tmp / name, dtype=torch.float16)
            KosmosGProcessor.from_pretrained(src).save_pretrained(tmp / name)
        sd = load_micro_sd(out / "sd")
        save_micro_sd(tmp / "sd", unet=sd.unet.half(), text_encoder=sd.text_encoder.half(),
                      tokenizer=sd.tokenizer, scheduler=sd.scheduler)
        CLIPModel.from_pretrained(_final_clip(out) / "clip").half().save_pretrained(tmp / "clip")
        sd.tokenizer.save_pretrained(str(tmp / "clip"))
        write_examples(tmp / "examples")
    return dest


def _sd_folders(out: Path, budget: Budget) -> list[Path]:
    """micro-SD's run folders: ``sd-phase1/``, ``sd-phase2/``, ... and the last run's ``sd/``."""
    runs = 1 + len(budget.sd_continue_steps)
    return [out / f"sd-phase{i}" for i in range(1, runs)] + [out / "sd"]


def train_sd(out: str | os.PathLike, budget: Budget, progress: bool = True, *,
             step_callback: Callable[[int], None] | None = None) -> Path:
    """micro-SD into ``out/sd``: a first run, then one continuation per entry of
    ``budget.sd_continue_steps``; every run but the last goes to ``out/sd-phase<i>``. Each run
    is skipped when its folder exists, so an interrupted ``train-all`` resumes at the run it
    was in. ``step_callback`` is passed to every run (:func:`.standins.train_micro_sd`).
    Returns the last folder."""
    from .standins import MicroUNetSizes, train_micro_sd

    out = Path(out)
    folders = _sd_folders(out, budget)
    common = dict(batch_size=budget.sd_batch, resolution=budget.sd_resolution, precision=budget.unet_precision,
                  progress=progress, step_callback=step_callback)
    if not folders[0].exists():
        train_micro_sd(folders[0], out / "clip", steps=budget.sd_steps, **common,
                       sizes=replace(MicroUNetSizes(), attention_head_dim=budget.sd_attention_heads))
    for previous, folder, steps in zip(folders, folders[1:], budget.sd_continue_steps):
        if not folder.exists():
            train_micro_sd(folder, out / "clip", steps=steps, lr=5e-4, warmup=50, seed=1,
                           resume_unet=previous / "unet", **common)
    return folders[-1]


def _train_sd_process(out: str, budget: Budget, progress: bool, threads: int, others_done: Any) -> None:
    """Every micro-SD run, in a child process: on one thread while stages 1 and 2 run beside it,
    on ``threads`` once ``others_done`` (a multiprocessing event) is set."""
    import torch

    torch.set_num_threads(1)

    def more_threads(step: int) -> None:
        if others_done.is_set() and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    train_sd(out, budget, progress, step_callback=more_threads)


def copy_standins(models: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write ``out/clip`` and ``out/sd`` (float32, in the layouts micro-CLIP's and micro-SD's
    training write) from a release folder's ``clip/`` and ``sd/`` (``kosmos-g micro
    train-all --standins``), so that ``train-all`` skips both and trains stages 1-3 on them.
    Each folder is written atomically and skipped when it exists.

    Example:
        >>> from kosmos_g.micro.evaluate import embedded_models
        >>> copy_standins(embedded_models(), "runs/on-shipped")  # doctest: +SKIP
    """
    import torch
    from transformers import CLIPModel

    from .standins import load_micro_sd, micro_clip_text_tower, save_micro_clip_towers, save_micro_sd

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


def train_all(out: str | os.PathLike, *, smoke: bool = False, progress: bool = True,
              threads: int | None = None, clip_bind_weight: float | None = None,
              unet_precision: str | None = None, budget: Budget | None = None,
              standins: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run every step into ``out`` (see the module docstring); returns and writes
    ``out/train_all.json`` with each step's wall seconds (0 for a step found done).

    ``standins``: a release folder (``clip/``, ``sd/``; ``"shipped"``: the embedded one) whose
    micro-CLIP and micro-SD are used instead of training them (:func:`copy_standins`): stages
    1-3 are retrained on them (~70 min on 2 cores). The folder is recorded, and a run folder
    holding other stand-ins is refused.

    ``budget`` replaces the recipe (:data:`FULL`, or :data:`SMOKE` with ``smoke``; a trial recipe
    from Python). ``clip_bind_weight`` and ``unet_precision`` replace the budget's fields of those names. A folder
    started with another budget is refused (its finished steps would be mixed into this one).

    With 2 or more ``threads`` (default: 2 if the machine has them), micro-SD's runs train in a
    child process, on one thread while stages 1 and 2 (which do not need it) run here on
    another, and on ``threads`` threads from the step after they finish (micro-SD's 32-px batch
    of 32 in bfloat16 on a CPU that has it: ~0.8 s/step on one thread, ~0.5 on two), and stage 3
    (and stages 1-2 when micro-SD is already done) runs as ``threads`` one-thread data-parallel processes
    under ``accelerate launch``: on a 2-core laptop two one-thread jobs do nearly twice the work
    of one two-thread job (small convolutions and matmuls scale poorly across threads; stage 3
    measured 0.79 s/step as 2 processes against 1.54 s/step on one thread, and two threads in
    one process give only ~1.25x). The recipes fix ``data.streams``, so the global batches are
    the same for 1 or 2 processes; float results still differ slightly with the process and
    thread counts. micro-CLIP trains on ``threads`` threads.
    """
    import multiprocessing

    import torch

    from ..kernels import resolve_precision
    from ..tokenizer import FairseqTokenizer  # noqa: F401  (fail early if sentencepiece is missing)
    from .standins import refine_micro_clip_vision, train_micro_clip, without_removed
    from .tokenizers import build_spm_tokenizer

    started = time.time()
    threads = threads or min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    if budget is None:
        budget = SMOKE if smoke else FULL
    if clip_bind_weight is not None:
        if clip_bind_weight < 0:
            raise ValueError(f"clip_bind_weight={clip_bind_weight} must be >= 0 (0: off; the shipped recipe: "
                             f"{FULL.clip_bind_weight})")
        budget = replace(budget, clip_bind_weight=clip_bind_weight)
    if unet_precision is not None:
        resolve_precision(unet_precision)  # a ValueError naming the choices
        budget = replace(budget, unet_precision=unet_precision)
    out = Path(out)
    record_path = out / "train_all.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if "budget" in record:
        wanted = json.loads(json.dumps(asdict(budget)))  # tuples as JSON lists, like the record's
        had = without_removed(record["budget"], REMOVED_FIELDS)
        differing = sorted(k for k in wanted.keys() | had.keys() if wanted.get(k) != had.get(k, BEFORE_FIELDS.get(k)))
        gone = [k for k in differing if k in REMOVED_FIELDS]
        if gone:
            raise ValueError(f"{out} holds a train-all run started with {', '.join(f'{k}={had[k]}' for k in gone)}, "
                             f"an experiment train-all no longer has (docs/micro-notes.md, session 27); resume it "
                             f"with a checkout from before its removal (commit d86802d), or use a new --out folder.")
        if differing:
            raise ValueError(f"{out} holds a train-all run with another budget (differing: {differing}); "
                             f"resume it with the options it was started with, or use a new --out folder.")
    out.mkdir(parents=True, exist_ok=True)
    record.update(budget=asdict(budget), smoke=smoke, threads=torch.get_num_threads())
    timings = record.setdefault("seconds", {})

    def step(name: str, done: Path, fn: Callable[[], Any]) -> None:
        if done.exists():
            logger.info("train-all: %s already done (%s)", name, done)
            timings.setdefault(name, 0.0)
            return
        t0 = time.time()
        fn()
        timings[name] = round(time.time() - t0, 1)
        record_path.write_text(json.dumps(record, indent=1))

    if standins is not None:
        from .evaluate import embedded_models

        source = str((embedded_models() if str(standins) == "shipped" else Path(standins)).resolve())
        earlier = record.get("standins")
        if earlier != source and (earlier is not None or (out / "clip").exists() or (out / "sd").exists()):
            raise ValueError(f"{out} already holds a micro-CLIP/micro-SD ({earlier or 'trained by train-all'}), "
                             f"not --standins {source}; use a new --out folder.")
        record["standins"] = source
        step("standins", out / "sd", lambda: copy_standins(source, out))
    step("tokenizer", out / "tokenizer", lambda: build_spm_tokenizer(out / "tokenizer"))
    step("micro-clip", out / "clip", lambda: train_micro_clip(
        out / "clip", steps=budget.clip_steps, batch_size=budget.clip_batch, bind_weight=budget.clip_bind_weight,
        progress=progress))
    sd_job = None
    sd_start = time.time()
    if threads >= 2 and not (out / "sd").exists():
        context = multiprocessing.get_context("spawn")
        others_done = context.Event()
        sd_job = context.Process(target=_train_sd_process, args=(str(out), budget, progress, threads, others_done),
                                 name="micro-sd")
        sd_job.start()
        torch.set_num_threads(1)
    else:
        step("micro-sd", out / "sd", lambda: train_sd(out, budget, progress))
    try:
        step("shards", out / "shards" / "DONE", lambda: (write_shards(out / "shards", budget, progress=progress),
                                                         (out / "shards" / "DONE").touch()))
        if budget.clip_dense_steps and standins is None:  # given stand-ins keep their own vision tower
            step("micro-clip-dense", out / "clip-dense", lambda: refine_micro_clip_vision(
                out / "clip", out / "clip-dense", steps=budget.clip_dense_steps, batch_size=budget.clip_batch,
                progress=progress))
        for stage in ("stage1", "stage2"):  # one thread beside micro-SD, else data-parallel
            procs = 1 if sd_job is not None else threads
            if not (out / stage / "final").exists():
                record.setdefault("stage_processes", {})[stage] = procs
            step(stage, out / stage / "final", lambda s=stage, n=procs: _train_stage(
                s, out, _stage_overrides(s, out, budget, progress), n))
        if sd_job is not None:
            others_done.set()  # micro-SD takes every thread from its next step
            record["stages_1_2_done_after_s"] = round(time.time() - sd_start, 1)  # micro-SD alone after this
            sd_job.join()
            if sd_job.exitcode != 0:
                raise RuntimeError(f"micro-SD training failed (exit {sd_job.exitcode}); re-run train-all to retry.")
            timings["micro-sd"] = round(time.time() - sd_start, 1)
            record["micro_sd_parallel_with_stages_1_2"] = True
            torch.set_num_threads(threads)
    finally:
        if sd_job is not None and sd_job.is_alive():
            sd_job.terminate()
    if not (out / "stage3" / "final").exists():
        record.setdefault("stage_processes", {})["stage3"] = threads
    step("stage3", out / "stage3" / "final", lambda: _train_stage(
        "stage3", out, _stage_overrides("stage3", out, budget, progress), threads))
    step("release", out / "release", lambda: release(out))
    record["wall_s"] = round(time.time() - started, 1)  # this invocation (steps found done cost nothing)
    record_path.write_text(json.dumps(record, indent=1))
    return record


__all__ = ["Budget", "FULL", "SMOKE", "release", "train_all", "write_shards"]
