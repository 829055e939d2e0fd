"""``--engine ray``: the compose steps as Ray Data stages, for a cluster of many GPU nodes.

The stages are the local engine's own functions and classes (:mod:`kosmos_g.data.compose`):
decoding runs as CPU tasks, each model step as a ``map_batches`` stage on an actor pool (one
model per actor, ``num_gpus`` per actor when the cluster has GPUs), and a last CPU stage turns
records into encoded shard members. The driver only writes finished members into the same
shards, records and manifest as the local engine (:func:`kosmos_g.data.runner.finish_chunk`),
so a run resumes, splits with ``--shard i/n`` and logs failures the same way, and both engines
give the same samples for the same input and seed (each sample's randomness comes from its key).

Records travel between stages pickled in one column: they hold numpy images, entity objects and
masks that Arrow has no type for. Ray is an optional extra: ``pip install 'kosmos-g[data]'``.

Example:
    >>> compose("s3-mounted/openimages/", "shards/comp", cfg, engine="ray",  # doctest: +SKIP
    ...         ray_address="auto")
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Sequence

from .compose import (Captioner, ClipSegSegmenter, ComposeConfig, EntityExtractor, GroundedSamSegmenter,
                      _require_source_caption, decode_record, failure, to_sample)
from .runner import InputItem, Progress, finish_chunk, plan_chunks, write_manifest
from .shards import encode_member

STEP_CLASSES = {"caption": Captioner, "entities": EntityExtractor, "clipseg": ClipSegSegmenter,
                "grounded-sam": GroundedSamSegmenter}


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ValueError("--engine ray needs Ray Data: pip install 'kosmos-g[data]' (or 'ray[data]').") from e
    return ray


def _records(batch) -> list[dict]:
    return [pickle.loads(b) for b in batch["record"]]


def _decode(batch, config: ComposeConfig) -> dict:
    """CPU stage: input rows -> decoded records (the centre square at the output size)."""
    records = [decode_record(InputItem(**json.loads(text)), size=config.size, seed=config.seed)
               for text in batch["item"]]
    return {"record": [pickle.dumps(r) for r in records], "chunk": batch["chunk"], "pos": batch["pos"]}


def _keep_source_caption(batch) -> dict:
    records = _require_source_caption(_records(batch))
    return {"record": [pickle.dumps(r) for r in records], "chunk": batch["chunk"], "pos": batch["pos"]}


class _Step:
    """Actor stage: one model, loaded once per actor, applied to every batch it is given."""

    def __init__(self, config: ComposeConfig, step: str) -> None:
        self.step = STEP_CLASSES[step](config)

    def __call__(self, batch) -> dict:
        records = self.step(_records(batch))
        return {"record": [pickle.dumps(r) for r in records], "chunk": batch["chunk"], "pos": batch["pos"]}


def _encode(batch, config: ComposeConfig) -> dict:
    """CPU stage: records -> the encoded members of a kept sample, or its failure row."""
    out = []
    for record in _records(batch):
        if record["error"] is not None:
            out.append(pickle.dumps(("failure", failure(record))))
        else:
            sample = to_sample(record, config.image_format)
            members = {k: (v if k == "__key__" else encode_member(k, v)) for k, v in sample.items()}
            out.append(pickle.dumps(("sample", members)))
    return {"result": out, "chunk": batch["chunk"], "pos": batch["pos"]}


def _step_names(config: ComposeConfig) -> list[str]:
    return ["source-caption" if config.caption_from_source else "caption", "entities",
            "clipseg" if config.segmenter == "clipseg" else "grounded-sam"]


def compose_ray(items: Sequence[InputItem], out_dir: str | os.PathLike, config: ComposeConfig, *,
                chunk_size: int = 1000, shard: str | tuple[int, int] | None = None, progress: bool = True,
                run_info: dict | None = None, address: str | None = None, actors: int = 1,
                num_gpus: float | None = None) -> dict:
    """Run the compose steps on Ray Data; same arguments and result as the local engine.

    ``actors`` is each model stage's actor-pool size; ``num_gpus`` the GPUs per actor (default: 1
    when the cluster has GPUs, else 0).
    """
    ray = _require_ray()
    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}.")
    chunks, todo, run_info = plan_chunks(items, out_dir, chunk_size=chunk_size, prefix="compositional", shard=shard,
                                         run_info=run_info)
    if not todo:
        return write_manifest(out_dir, run_info)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": max(2, os.cpu_count() or 2)}))
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # chunks complete in order: the driver buffers one at a time
    ctx.enable_progress_bars = False
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    rows = [{"chunk": j, "pos": p, "item": json.dumps(item.__dict__)} for j in todo for p, item in enumerate(chunks[j])]
    wave = max(config.caption_batch_size, config.lm_batch_size)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // wave))
    ds = ds.map_batches(_decode, fn_args=(config,), batch_size=wave)  # tasks: no model to keep
    for name in _step_names(config):
        if name == "source-caption":  # no model: a task, not an actor pool
            ds = ds.map_batches(_keep_source_caption, batch_size=wave)
            continue
        size = config.caption_batch_size if name == "caption" else wave
        ds = ds.map_batches(_Step, fn_constructor_args=(config, name), batch_size=size, num_gpus=num_gpus,
                            compute=_pool(actors))
    ds = ds.map_batches(_encode, fn_args=(config,), batch_size=wave)

    bar = Progress(len(rows), "compose (ray)", progress)
    pending: dict[int, dict[int, tuple[str, object]]] = {j: {} for j in todo}
    try:
        for row in ds.iter_rows():
            j, pos = int(row["chunk"]), int(row["pos"])
            kind, value = pickle.loads(row["result"])
            pending[j][pos] = (kind, value)
            bar.update(1, kept=int(kind == "sample"), reasons=[value["reason"]] if kind == "failure" else [])
            if len(pending[j]) == len(chunks[j]):
                _finish(out_dir, j, pending.pop(j), chunk_size, run_info)
    finally:
        bar.close()
    return write_manifest(out_dir, run_info)


def _pool(size: int):
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=size)


def _finish(out_dir, j: int, results: dict[int, tuple[str, object]], chunk_size: int, run_info: dict) -> None:
    ordered = [results[p] for p in sorted(results)]  # input order, as the local engine writes
    samples = [v for k, v in ordered if k == "sample"]
    failures = [v for k, v in ordered if k == "failure"]
    finish_chunk(Path(out_dir), j, prefix="compositional", chunk_size=chunk_size, samples=samples,
                 failures=failures, run_info=run_info)
