"""The one trainer every stage runs on, built on ``accelerate``.

DDP and DeepSpeed come from ``accelerate launch`` and its config file; mixed
precision, gradient accumulation and gradient clipping from accelerate as well. Fully
sharded training (``train.sharding: fsdp``) is applied by :mod:`kosmos_g.train.sharding`
itself, on CPU and GPU alike, since accelerate sets FSDP up only on accelerators. This
file adds what a long run needs on top:

- AdamW (betas 0.9/0.98, weight decay 0.01 as in the paper), warm-up then linear decay;
- a loss normalised by the count summed over processes (token-level means are exact
  under data parallelism);
- per-step seeding (``seed``, step, micro-step, process) of every random op that is not
  tied to a sample (dropout), so a resumed run repeats an uninterrupted one;
- checkpoints every N steps: trainable weights, optimizer, LR schedule, RNG states
  (accelerate's ``save_state``) plus ``trainer_state.json`` (step, every data stream's
  position, the size of every other file), written last into a hidden temporary folder that
  is flushed to the disk and renamed to ``step-XXXXXXXX``; resuming skips a checkpoint that
  is incomplete or damaged for the previous good one;
- CSV + TensorBoard logs (a resumed run appends) and a tqdm bar with loss and samples/s;
- the final export: a ``KosmosG.from_pretrained`` folder with the processor. Before anything
  loads, the trainer refuses an output folder it cannot write and an export folder that holds
  files this run did not write (unless ``export.overwrite``).

Example:
    >>> from kosmos_g.train import Trainer, load_recipe  # doctest: +SKIP
    >>> Trainer(load_recipe("tiny-stage2", ["train.max_steps=5"]), "stage2").run()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..fileio import atomic_dir, atomic_write_text
from .data import StreamLoader, counters, to_device
from .modeling import RUN_FILE
from .recipe import Recipe
from .schedules import warmup_decay
from .sharding import (clip_grad_norm, fill_twin, gather_full_state, load_sharded, meta_twin, save_sharded,
                       shard_module)

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable{}.safetensors"
_CKPT_RE = re.compile(r"^step-(\d{8})$")
# hidden folders of checkpoint saves and deletions that a kill interrupted (fileio.atomic_dir, _prune)
_LEFTOVER_RE = re.compile(r"^\.step-\d{8}\.(tmp|old|del)-")


def _stage_class(name: str):
    if name == "stage1":
        from .stage1 import Stage1 as cls
    elif name == "stage2":
        from .stage2 import Stage2 as cls
    elif name == "stage3":
        from .stage3 import Stage3 as cls
    else:
        raise ValueError(f"Unknown stage {name!r}; choose stage1, stage2 or stage3.")
    return cls


def _step_folders(root: Path) -> list[Path]:
    """The ``step-XXXXXXXX`` folders under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_dir())
    return [p for _, p in reversed(found)]


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed (None when it can).

    ``trainer_state.json`` is written last and lists the size of every other file, so a
    folder missing a file, holding a truncated one, or whose state file is itself cut short
    is recognised without loading anything.
    """
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({type(e).__name__})"
    files = state.get("files", {}) if isinstance(state, dict) else None
    if not isinstance(files, dict):
        return f"{STATE_FILE} is not a checkpoint state"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} holds {file.stat().st_size} bytes, not the {size} written"
    return None


def find_checkpoint(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under ``root`` (or None), and the newer ones skipped with
    the reason (:func:`checkpoint_problem`). Hidden temporaries never count."""
    skipped = []
    for path in _step_folders(root):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (temporary and damaged ones never count)."""
    return find_checkpoint(root)[0]


def _unwritable(folder: Path) -> str | None:
    """Why ``folder`` (existing, or to be created) cannot be written, or None."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def written_by_run(folder: Path, output_dir: Path) -> bool:
    """Whether the export folder ``folder`` was written by the run whose output folder is
    ``output_dir`` (its :data:`~kosmos_g.train.modeling.RUN_FILE` names it)."""
    try:
        info = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
        return Path(info["output_dir"]).resolve() == output_dir.resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def check_outputs(output_dir: Path, export_dirs: list[Path], *, overwrite: bool = False) -> None:
    """Refuse, with a ``ValueError`` naming the path, an output folder the run cannot write and an
    export folder it must not replace: a file, or a non-empty folder that this run did not
    export, unless ``overwrite`` (``export.overwrite``)."""
    problem = _unwritable(output_dir)
    if problem:
        raise ValueError(f"train.output_dir={output_dir} cannot be written: {problem}; choose another folder.")
    for folder in export_dirs:
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"Export folder {folder} is a file, not a folder; choose another export.dir.")
        problem = _unwritable(folder.parent)
        if problem:
            raise ValueError(f"Export folder {folder} cannot be written: {problem}; choose another export.dir.")
        if overwrite or not folder.is_dir() or not any(folder.iterdir()) or written_by_run(folder, output_dir):
            continue
        raise ValueError(f"Export folder {folder} already exists, is not empty and was not written by this run "
                         f"(train.output_dir={output_dir}); choose another export.dir, or set "
                         "export.overwrite=true to replace it.")


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


def _step_seed(seed: int, *parts: int) -> int:
    return int(np.random.default_rng([seed & 0xFFFFFFFF, *parts]).integers(0, 2 ** 62))


class _Window:
    """Sums and counts of the logged metrics, and the samples trained, since the last log row."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.reset()

    def reset(self) -> None:
        self.sums = {n: torch.zeros(2, dtype=torch.float64) for n in self.names}
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, out: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for n in self.names:
            if n in out:
                s, c = out[n]
                self.sums[n] += torch.tensor([float(s.detach()), float(c)], dtype=torch.float64)


class Trainer:
    """Runs one stage of a recipe; ``run()`` trains, checkpoints and exports.

    Args:
        recipe: the validated run description (:func:`~kosmos_g.train.recipe.load_recipe`).
        stage: ``"stage1"``, ``"stage2"`` or ``"stage3"``.
    """

    def __init__(self, recipe: Recipe, stage: str) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, set_seed

        recipe.validate(stage)
        self.recipe, self.stage_name = recipe, stage
        self.out = Path(recipe.train.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        stage_class = _stage_class(stage)
        self.export_dir = Path(recipe.export.dir or self.out / "final")
        self.export_dirs = stage_class.export_dirs(recipe, self.export_dir)
        check_outputs(self.out, self.export_dirs, overwrite=recipe.export.overwrite)  # before any model loads
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # accelerate only forms a CPU process group (gloo) when asked for the CPU; without a GPU,
        # `accelerate launch --multi_gpu` would otherwise start independent single-process runs.
        cpu = recipe.train.cpu or (world > 1 and not _has_accelerator())
        self.accelerator = acc = Accelerator(
            mixed_precision=recipe.train.precision, gradient_accumulation_steps=recipe.train.grad_accum,
            cpu=cpu, step_scheduler_with_optimizer=False,
        )
        if acc.num_processes != world:
            raise RuntimeError(f"Launched as {world} processes but accelerate formed a group of "
                               f"{acc.num_processes}; check the accelerate launch flags.")
        self._sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self._fsdp = recipe.train.sharding == "fsdp"
        if self._fsdp and self._sharded:
            raise ValueError(f"train.sharding=fsdp shards the model itself, but accelerate was launched with "
                             f"{acc.distributed_type.value}; launch with a plain multi-process config "
                             "(recipes/accelerate/fsdp.yaml) or set train.sharding=none.")
        if acc.is_main_process:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
        self.resume_from = self._resume_path()
        set_seed(recipe.train.seed)
        self.stage = stage_class(recipe, acc)
        module = self.stage.module
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"{stage}: nothing to train (every parameter is frozen).")
        self._twin = None
        if self._fsdp:
            self._twin = meta_twin(self.stage.model)  # the export's plain copy, before the weights are sharded
            if not torch.distributed.is_initialized():  # one process: FSDP2 still needs a group
                backend = "nccl" if acc.device.type == "cuda" else "gloo"
                torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0,
                                                     world_size=1)
            shard_module(module, device_type=acc.device.type, precision=acc.mixed_precision,
                         whole=(self.stage.model.vision,))
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = self._optimizer(module)
        if acc.distributed_type == DistributedType.DEEPSPEED:
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = recipe.data.batch_size
        if self._fsdp:  # sharded already: accelerate must not wrap it in DDP nor save the optimizer's shards
            self.module, self.scheduler = module, acc.prepare(self.scheduler)
        else:
            self.module, self.optimizer, self.scheduler = acc.prepare(module, self.optimizer, self.scheduler)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        # what a checkpoint holds: fixed here, though a stage may freeze some of it for a while
        self._trainable_names = {n for n, p in self.module.named_parameters() if p.requires_grad}
        acc.register_save_state_pre_hook(self._save_trainable)
        acc.register_load_state_pre_hook(self._load_trainable)
        self.num_streams = recipe.data.streams or acc.num_processes * max(1, recipe.data.num_workers)
        if self.num_streams % acc.num_processes:
            raise ValueError(f"data.streams={self.num_streams} is not a multiple of the {acc.num_processes} "
                             "processes.")
        self.step = 0
        self.samples = 0
        self.position: dict[int, Any] = {}
        self.history: list[dict[str, float]] = []
        self.grad_norm = float("nan")  # the last clipped step's, logged with each row

    # ------------------------------------------------------------------ setup helpers
    def _optimizer(self, module: torch.nn.Module):
        """AdamW over the trained parameters and its warm-up + decay LR schedule."""
        from accelerate.utils import DistributedType

        acc, opt = self.accelerator, self.recipe.optim
        fused = opt.fused
        if fused is None:
            fused = acc.distributed_type != DistributedType.DEEPSPEED and not self._fsdp and all(
                p.is_floating_point() and acc.device.type in ("cpu", "cuda") for p in self.params)
        optimizer = torch.optim.AdamW(self._param_groups(module), lr=opt.lr, betas=tuple(opt.betas),
                                      eps=opt.eps, weight_decay=opt.weight_decay, fused=fused)
        # step / warmup: the first step runs at lr 0, as every run of this trainer has
        factor = warmup_decay(opt.warmup_steps, self.recipe.train.max_steps, opt.schedule, warmup_from_zero=True)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def _param_groups(self, module: torch.nn.Module) -> list[dict[str, Any]]:
        if not self.recipe.optim.no_decay_norm_and_bias:
            return [{"params": [p for p in module.parameters() if p.requires_grad]}]
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name or name.endswith(("queries", "positions", "latents"))
                 else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _save_trainable(self, models, weights, output_dir) -> None:
        """accelerate hook: store only the trainable weights, by their unwrapped names."""
        if self._sharded:  # FSDP / DeepSpeed save their own (sharded) states
            return
        for i, model in enumerate(models):
            inner = self.accelerator.unwrap_model(model)
            state = {n: p.detach().cpu().contiguous() for n, p in inner.named_parameters()
                     if p.requires_grad or n in self._trainable_names}
            if self.accelerator.is_main_process:
                save_file(state, os.path.join(output_dir, TRAINABLE_FILE.format(f"_{i}" if i else "")))
        weights.clear()

    def _load_trainable(self, models, input_dir) -> None:
        if self._sharded:
            return
        for i, model in enumerate(models):
            inner = self.accelerator.unwrap_model(model)
            path = os.path.join(input_dir, TRAINABLE_FILE.format(f"_{i}" if i else ""))
            state = load_file(path)
            wanted = {n for n, p in inner.named_parameters() if p.requires_grad or n in self._trainable_names}
            if set(state) != wanted:
                raise ValueError(f"Checkpoint {input_dir} holds other trainable weights than this run trains "
                                 f"(missing {sorted(wanted - set(state))[:5]}, extra "
                                 f"{sorted(set(state) - wanted)[:5]}); was the recipe changed?")
            inner.load_state_dict(state, strict=False)
        models.clear()

    # ------------------------------------------------------------------ checkpoints
    def _resume_path(self) -> Path | None:
        """The checkpoint to resume (chosen before any model loads); ``auto`` passes over damaged ones."""
        resume = self.recipe.checkpoint.resume
        if resume in (None, "none", "null", ""):
            if _step_folders(self.ckpt_root):
                raise ValueError(f"{self.ckpt_root} already holds checkpoints; set checkpoint.resume=auto to "
                                 "continue, or use a new train.output_dir.")
            return None
        if resume == "auto":
            path, skipped = find_checkpoint(self.ckpt_root)
            if self.accelerator.is_main_process:
                for bad, problem in skipped:
                    logger.warning("checkpoint %s is incomplete or damaged (%s); resuming from %s instead", bad,
                                   problem, path or "the start")
            return path
        path = Path(resume)
        problem = checkpoint_problem(path)
        if problem:
            raise FileNotFoundError(f"checkpoint.resume={path} is not a complete checkpoint ({problem}).")
        return path

    def _remove_leftovers(self) -> None:
        """Delete the hidden folders of checkpoint saves or deletions that a kill interrupted."""
        if not self.ckpt_root.is_dir():
            return
        for path in sorted(self.ckpt_root.iterdir()):
            if _LEFTOVER_RE.match(path.name):
                logger.warning("removing %s, left by an interrupted checkpoint save", path)
                shutil.rmtree(path, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / STATE_FILE).read_text())
        if state["num_streams"] != self.num_streams:
            raise ValueError(f"Checkpoint {path} was written with data.streams={state['num_streams']}, this run "
                             f"has {self.num_streams}; set data.streams={state['num_streams']} to resume.")
        if state["stage"] != self.stage_name:
            raise ValueError(f"Checkpoint {path} is from {state['stage']}, not {self.stage_name}.")
        self.accelerator.load_state(str(path))
        if self._fsdp:
            load_sharded(path, self.module, self.optimizer)
        self.step = int(state["step"])
        self.samples = int(state["samples"])
        self.position = {int(k): v for k, v in state["position"].items()}
        logger.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> Path:
        """Write ``step-XXXXXXXX``: every process saves its part into one temporary folder, the
        main process writes ``trainer_state.json`` last (with every other file's size), flushes
        the folder to the disk and renames it. An existing folder of the same step is renamed
        aside first and deleted after, never modified in place."""
        from accelerate.utils import broadcast_object_list, gather_object

        acc = self.accelerator
        final = self.ckpt_root / f"step-{self.step:08d}"
        positions = gather_object([self.position]) if acc.num_processes > 1 else [self.position]
        with contextlib.ExitStack() as main_only:
            folder: list[str | None] = [None]
            if acc.is_main_process:
                folder[0] = str(main_only.enter_context(atomic_dir(final, replace=True, fsync=True)))
            broadcast_object_list(folder)  # the temporary's name, from the main process to every other
            tmp = Path(folder[0])
            acc.save_state(str(tmp))
            if self._fsdp:  # each process its shard of the weights and optimizer state
                save_sharded(tmp, self.module, self.optimizer)
            acc.wait_for_everyone()  # every process has written its part (its RNG states) before the rename
            if acc.is_main_process:
                merged = {str(k): v for pos in positions for k, v in pos.items()}
                files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
                state = {"stage": self.stage_name, "step": self.step, "samples": self.samples,
                         "num_streams": self.num_streams, "world_size": acc.num_processes, "position": merged,
                         "files": files, "recipe": self.recipe.to_dict()}
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))  # last: it marks the folder complete
        if acc.is_main_process:
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        """Keep the newest ``checkpoint.keep`` checkpoints up to this step. Newer ones (left by a run
        that got further before it was resumed from an earlier checkpoint) stay until replaced."""
        keep = max(1, self.recipe.checkpoint.keep)
        done = [p for p in reversed(_step_folders(self.ckpt_root)) if int(p.name[5:]) <= self.step]
        for old in done[:-keep]:
            # hidden first, so that a kill while deleting never leaves part of a checkpoint in view
            aside = Path(tempfile.mkdtemp(prefix=f".{old.name}.del-", dir=self.ckpt_root))
            os.replace(old, aside / "x")
            shutil.rmtree(aside, ignore_errors=True)

    # ------------------------------------------------------------------ logging
    def _open_logs(self, resumed: bool):
        acc, log = self.accelerator, self.recipe.log
        self._csv_fields = ["step", "loss", "lr", "grad_norm", "samples", "samples_per_s", "bad_samples",
                            "filtered_samples", *self.stage.metric_names]
        self._csv = self._tb = None
        if not acc.is_main_process:
            return
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        if log.csv:
            path = logs / "train.csv"
            for stale in logs.glob(".train.csv.tmp-*"):  # an earlier rewrite that a kill interrupted
                stale.unlink()
            self._cut_csv(path, self.step if resumed else 0)
            self._csv = open(path, "a", newline="")
            self._csv_writer = csv.DictWriter(self._csv, fieldnames=self._csv_fields, extrasaction="ignore")
        if log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(logs / "tensorboard"), purge_step=self.step + 1 if resumed else None)
            except ImportError:
                logger.warning("tensorboard is not installed; logging to CSV only (pip install tensorboard).")

    def _cut_csv(self, path: Path, step: int) -> None:
        """Keep the CSV log's rows up to ``step`` (a resumed run drops what the interrupted one
        logged after its checkpoint, and a row a kill cut short); new rows are then appended.
        When rows must go the log is rewritten atomically, so a kill never loses its history."""
        text = ""
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                text = f.read()
        whole = text[: text.rfind("\n") + 1]  # without a last row cut short
        reader = csv.DictReader(io.StringIO(whole, newline=""))
        rows = list(reader)
        kept = [r for r in rows if None not in r and None not in r.values() and r["step"].isdigit()
                and int(r["step"]) <= step]
        if text and whole == text and reader.fieldnames == self._csv_fields and len(kept) == len(rows):
            return
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=self._csv_fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(path, out.getvalue(), fsync=True)

    def _write_log(self, row: dict[str, float]) -> None:
        self.history.append(row)
        if self._csv is not None:
            self._csv_writer.writerow(row)
            self._csv.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None and not (isinstance(v, float) and math.isnan(v)):
                    self._tb.add_scalar(f"train/{k}", v, row["step"])

    def _close_logs(self) -> None:
        if self._csv is not None:
            self._csv.close()
        if self._tb is not None:
            self._tb.close()

    # ------------------------------------------------------------------ training
    def _loader(self) -> StreamLoader:
        acc, data = self.accelerator, self.recipe.data
        return StreamLoader(self.stage.sources, self.stage.builder, self.stage.collate,
                            batch_size=data.batch_size, num_workers=data.num_workers,
                            num_streams=self.num_streams, rank=acc.process_index, world_size=acc.num_processes,
                            seed=self.recipe.train.seed, shuffle_buffer=data.shuffle_buffer, states=self.position)

    def run(self) -> dict[str, Any]:
        """Train to ``train.max_steps`` (or ``train.stop_after``); returns a summary.

        On completion the inference export is written to ``export.dir`` (default
        ``<output_dir>/final``).
        """
        from tqdm.auto import tqdm

        acc, recipe = self.accelerator, self.recipe
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "recipe.yaml", recipe.dump())
            self._remove_leftovers()
        self._open_logs(resumed=self.resume_from is not None)
        self.stage.before_training()
        self.stage.train_mode()
        loader = iter(self._loader())
        max_steps = recipe.train.max_steps
        stop = min(max_steps, recipe.train.stop_after or max_steps)
        window = _Window(["loss", *self.stage.metric_names])
        bar = tqdm(total=max_steps, initial=self.step, desc=self.stage_name, dynamic_ncols=True,
                   disable=not (acc.is_main_process and recipe.log.progress))
        try:
            while self.step < stop:
                self._train_step(loader, window)
                bar.update(1)
                if self.step % max(1, recipe.log.every) == 0 or self.step == stop:
                    row = self._log_window(window)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{row['samples_per_s']:.1f}")
                every = recipe.checkpoint.every
                if (every and self.step % every == 0) or self.step == stop:
                    self.save_checkpoint()
        finally:
            bar.close()
            del loader  # stops DataLoader workers
            self._close_logs()
        summary: dict[str, Any] = {"step": self.step, "samples": self.samples, "data": self._counts(),
                                   "final_loss": self.history[-1]["loss"] if self.history else None}
        if self.step >= max_steps:
            summary["export"] = str(self.export())
        return summary

    def _train_step(self, loader, window: "_Window") -> None:
        """One optimizer step over ``train.grad_accum`` micro-batches; advances step, samples and
        the data position."""
        acc, recipe = self.accelerator, self.recipe
        self.stage.before_step(self.step)
        for micro in range(recipe.train.grad_accum):
            batch, position = next(loader)
            batch = self.stage.prepare_batch(to_device(batch, acc.device))
            torch.manual_seed(_step_seed(recipe.train.seed, self.step, micro, acc.process_index))  # dropout
            with acc.accumulate(self.module):
                out = self.module(batch)
                loss_sum, count = out["loss"]
                total = acc.reduce(count.detach().float().reshape(1), "sum")
                acc.backward(loss_sum * acc.num_processes / total.clamp(min=1))  # the mean over all processes
                if acc.sync_gradients:
                    self._optimizer_step()
            window.add(out)
        per_step = recipe.data.batch_size * recipe.train.grad_accum * acc.num_processes
        self.step += 1
        self.samples += per_step
        self.position = position
        window.samples += per_step

    def _optimizer_step(self) -> None:
        clip = self.recipe.optim.clip_grad_norm
        if clip and self._fsdp:
            self.grad_norm = clip_grad_norm(self.params, clip)
        elif clip:
            self.grad_norm = float(self.accelerator.clip_grad_norm_(self.params, clip))
        self.optimizer.step()
        if not getattr(self.optimizer, "step_was_skipped", False):
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _log_window(self, window: "_Window") -> dict[str, float]:
        """The log row of the steps since the last one (metrics averaged over every process)."""
        acc = self.accelerator
        stacked = acc.reduce(torch.stack([window.sums[n] for n in window.names]).to(acc.device), "sum").cpu()
        elapsed = time.perf_counter() - window.start
        counts = self._counts()
        row = {"step": self.step, "lr": self.scheduler.get_last_lr()[0], "grad_norm": self.grad_norm,
               "samples": self.samples, "samples_per_s": window.samples / max(elapsed, 1e-9),
               "bad_samples": counts["bad"], "filtered_samples": counts["filtered"]}
        for n, (s, c) in zip(window.names, stacked.tolist()):
            row[n] = s / c if c else float("nan")
        if acc.is_main_process:
            self._write_log(row)
        window.reset()
        return row

    def _counts(self) -> dict[str, int]:
        """Bad/filtered samples over all processes (each process counts its own streams)."""
        local = counters(self.position)
        t = torch.tensor([local["bad"], local["filtered"]], device=self.accelerator.device, dtype=torch.float64)
        t = self.accelerator.reduce(t, "sum").cpu().tolist()
        return {"bad": int(t[0]), "filtered": int(t[1])}

    def export(self) -> Path:
        """Write the inference folder (main process) from the trained weights, with a
        :data:`~kosmos_g.train.modeling.RUN_FILE` that marks it as this run's."""
        acc = self.accelerator
        acc.wait_for_everyone()
        check_outputs(self.out, self.export_dirs, overwrite=self.recipe.export.overwrite)  # filled since the start?
        # Without sharding the stage's model was trained in place; FSDP / DeepSpeed gather it here.
        state = acc.get_state_dict(self.module) if self._sharded else {}
        if self._fsdp:  # every weight gathered into a plain copy of the model, which the stage exports
            full = gather_full_state(self.stage.model, keep=acc.is_main_process)
            if acc.is_main_process:
                self.stage.model = fill_twin(self._twin, full)
        if acc.is_main_process:
            run_info = {"output_dir": str(self.out.resolve()), "stage": self.stage_name, "step": self.step}
            self.stage.export(state, self.export_dir, overwrite=True, run_info=run_info)  # checked just above
            logger.info("exported %s to %s", self.stage_name, self.export_dir)
        acc.wait_for_everyone()
        return self.export_dir


def train(stage: str, recipe: Recipe) -> dict[str, Any]:
    """Run one stage of ``recipe``: ``train("stage2", load_recipe("tiny-stage2"))``."""
    return Trainer(recipe, stage).run()
