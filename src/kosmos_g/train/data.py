"""Deterministic, resumable, weighted streaming over WebDataset shards.

The job's data is split into ``S`` *streams* (``data.streams``). Stream ``j`` is an
endless sequence of examples that depends only on (seed, j, S, the shards): every epoch
of every source shuffles its shard order with a seed of its own, stream ``j`` reads
shards ``j, j+S, ...`` of that order (or, for a source with fewer shards than streams,
every S-th sample of all of them), a shuffle buffer seeded per (source, epoch, stream)
mixes samples, and the mixture draws its n-th sample's source from a generator seeded
by (seed, j, n). Each sample's own randomness (caption drop, crop choice, diffusion
noise) comes from a generator seeded by its position, so it is the same however the
streams are spread over processes and workers.

A stream's *position* is a few integers per source (epoch, samples consumed in that
epoch) plus its counters; resuming rebuilds the epoch's order and skips the consumed
raw samples without decoding them. Process ``r`` of ``W`` owns streams
``[r*S/W, (r+1)*S/W)``; each of its DataLoader workers runs a subset of them and yields
single examples tagged with their stream and position. :class:`StreamLoader` (main
process) assembles each batch from ``batch_size / (S/W)`` examples of every local stream,
in stream order, so a batch is a deterministic function of the positions, never of
worker timing, and the position of the last example taken from each stream is exactly
the state to checkpoint.

With ``S`` fixed, the global batch of step k is the same set of samples for any number of
processes that divides ``S`` (what makes a 2-process run match a 1-process run with the
doubled batch).

A sample that fails validation or decoding is counted per stream, logged (the first few
in full, then every 100th) and skipped; a source none of whose samples in an epoch can be
used raises :class:`DataSourceError`, since that is a broken dataset rather than a bad
sample. :func:`check_source` finds the commonest such dataset (a glob that matches nothing,
shards none of whose samples follow the schema) before any model is loaded.
"""

from __future__ import annotations

import collections
import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data.shards import BadSample, expand_shards, iter_shard, iter_shards, validate_sample

logger = logging.getLogger(__name__)

# Namespaces that keep the seeds of different random decisions apart.
_SHARD_ORDER, _BUFFER, _MIX, _SAMPLE = 1, 2, 3, 4


class SampleFiltered(Exception):
    """Raised by a builder for a valid sample that the recipe's filters exclude."""


class DataSourceError(ValueError):
    """A data source that can give no usable sample: no shard matches it, or none of its samples
    builds. The message names the source and the reason; the CLI prints it as one line."""


@dataclass(frozen=True)
class Source:
    """A named list of shards with a mixture weight."""

    name: str
    shards: tuple[str, ...]
    weight: float

    @classmethod
    def from_spec(cls, name: str, shards: Any, weight: float) -> "Source":
        """Expand ``shards`` (folder, glob, brace pattern or list); raises :class:`DataSourceError`
        naming the source when they match no shard."""
        try:
            paths = tuple(expand_shards(shards))
        except FileNotFoundError as e:
            raise DataSourceError(f"Data source {name!r}: {e}") from None
        if not paths and weight > 0:
            raise DataSourceError(f"Data source {name!r} lists no shards.")
        return cls(name, paths, float(weight))


def check_source(source: Source) -> None:
    """Raise :class:`DataSourceError` unless some sample of ``source`` follows the schema.

    Reads up to the first sample that does (one sample for a sound dataset), so a source whose
    every sample is broken fails with one clear message before a model is loaded, instead of in
    the first training step.
    """
    read, last = 0, None
    damaged: list[str] = []
    for raw in iter_shards(source.shards, on_error=lambda path, e: damaged.append(f"{path} ({e})")):
        read += 1
        try:
            validate_sample(raw)
            return
        except BadSample as e:
            last = f"BadSample: {e}"
    detail = f"none of the {read} samples of its {len(source.shards)} shard(s) follows docs/data-format.md"
    if read == 0:
        detail = f"its {len(source.shards)} shard(s) hold no sample"
    if damaged:
        detail += f"; damaged: {damaged[-1]}"
    raise DataSourceError(f"Data source {source.name!r} has no usable sample: {detail}."
                          + (f" Last error: {last}" if last else ""))


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def sample_seed(seed: int, source_index: int, epoch: int, stream: int, offset: int) -> int:
    """The seed of one sample's own randomness (a function of its position only)."""
    return int(_rng(seed, _SAMPLE, source_index, epoch, stream, offset).integers(0, 2 ** 62))


def iter_source_epoch(source: Source, *, source_index: int, epoch: int, stream: int, num_streams: int,
                      seed: int, shuffle_buffer: int,
                      on_error: Callable[[str, Exception], None] | None = None) -> Iterator[dict[str, Any]]:
    """The raw samples stream ``stream`` reads from ``source`` in ``epoch``, in order."""
    order = _rng(seed, _SHARD_ORDER, source_index, epoch).permutation(len(source.shards))
    shards = [source.shards[i] for i in order]
    if len(shards) >= num_streams:
        raw_iter = (s for path in shards[stream::num_streams] for s in iter_shard(path, on_error))
    else:  # fewer shards than streams: every stream reads them all and keeps every S-th sample
        quiet = on_error if (stream == 0 or on_error is None) else _quiet  # report damage once
        everything = (s for path in shards for s in iter_shard(path, quiet))
        raw_iter = (s for i, s in enumerate(everything) if i % num_streams == stream)
    rng = _rng(seed, _BUFFER, source_index, epoch, stream)
    buffer: list[dict[str, Any]] = []
    for sample in raw_iter:
        if len(buffer) < shuffle_buffer:
            buffer.append(sample)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], sample = sample, buffer[i]
        yield sample
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def _quiet(path: str, exc: Exception) -> None:
    """Damaged shards read by every stream are reported by stream 0 only."""


class MixtureStream:
    """One stream: an endless, deterministic, resumable sequence of built examples.

    ``build(raw, rng, source_name) -> example`` turns a raw sample into a training
    example; it raises :class:`SampleFiltered` to filter and anything else for a bad
    sample. ``state`` (from :meth:`state`) resumes the stream exactly.
    """

    def __init__(self, sources: Sequence[Source], build: Callable[..., Any], *, stream: int, num_streams: int,
                 seed: int, shuffle_buffer: int, state: dict[str, Any] | None = None) -> None:
        self.sources = [s for s in sources if s.weight > 0]
        self.index = {s.name: i for i, s in enumerate(sources)}  # stable ids, zero weights included
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        self.cum = np.cumsum(weights / weights.sum())
        self.build = build
        self.stream, self.num_streams = stream, num_streams
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self._state = copy.deepcopy(state) if state else {
            "drawn": 0, "bad": 0, "filtered": 0,
            "sources": {s.name: {"epoch": 0, "offset": 0, "good": 0} for s in self.sources},
        }
        for s in self.sources:
            self._state["sources"].setdefault(s.name, {"epoch": 0, "offset": 0, "good": 0})
        # bad and filtered samples of each source's current epoch, for the error of a source that
        # gives none (reset with the epoch; counted from where this process started reading)
        self._epoch_counts = {s.name: {"bad": 0, "filtered": 0} for s in self.sources}
        self._iters: dict[str, Iterator[dict[str, Any]]] = {}

    def state(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    # ------------------------------------------------------------------ raw samples
    def _open(self, source: Source) -> Iterator[dict[str, Any]]:
        st = self._state["sources"][source.name]
        it = iter_source_epoch(source, source_index=self.index[source.name], epoch=st["epoch"],
                               stream=self.stream, num_streams=self.num_streams, seed=self.seed,
                               shuffle_buffer=self.shuffle_buffer, on_error=self._shard_error)
        self._skipping = True  # damaged shards met while skipping were counted before
        for _ in range(st["offset"]):
            if next(it, None) is None:
                break
        self._skipping = False
        return it

    def _shard_error(self, path: str, exc: Exception) -> None:
        if getattr(self, "_skipping", False):
            return
        self._state["bad"] += 1
        logger.warning("stream %d: damaged shard %s (%s); skipping the rest of it.", self.stream, path, exc)

    def _next_raw(self, source: Source) -> tuple[dict[str, Any], int, int]:
        st = self._state["sources"][source.name]
        for _ in range(2):
            it = self._iters.get(source.name)
            if it is None:
                it = self._iters[source.name] = self._open(source)
            raw = next(it, None)
            if raw is not None:
                epoch, offset = st["epoch"], st["offset"]
                st["offset"] += 1
                return raw, epoch, offset
            # epoch over
            if st["good"] == 0:
                last = getattr(self, "_last_error", None)
                counts = self._epoch_counts[source.name]
                raise DataSourceError(
                    f"Data source {source.name!r} gave no usable sample to stream {self.stream} of "
                    f"{self.num_streams} in epoch {st['epoch']} ({st['offset']} read: {counts['bad']} bad, "
                    f"{counts['filtered']} filtered); check its shards and the stage's filters, or use fewer "
                    "data.streams than it has samples."
                    + (f" Last error: {last}" if last else "")
                )
            st["epoch"], st["offset"], st["good"] = st["epoch"] + 1, 0, 0
            self._epoch_counts[source.name] = {"bad": 0, "filtered": 0}
            self._iters.pop(source.name)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ examples
    def __iter__(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        while True:
            u = _rng(self.seed, _MIX, self.stream, self._state["drawn"]).random()
            source = self.sources[min(int(np.searchsorted(self.cum, u, side="right")), len(self.sources) - 1)]
            self._state["drawn"] += 1
            while True:
                raw, epoch, offset = self._next_raw(source)
                rng = np.random.default_rng(sample_seed(self.seed, self.index[source.name], epoch,
                                                        self.stream, offset))
                try:
                    example = self.build(raw, rng, source.name)
                except SampleFiltered:
                    self._state["filtered"] += 1
                    self._epoch_counts[source.name]["filtered"] += 1
                    continue
                except Exception as e:  # a bad sample never stops a run
                    self._last_error = f"{type(e).__name__}: {e}"
                    self._state["bad"] += 1
                    self._epoch_counts[source.name]["bad"] += 1
                    n = self._state["bad"]
                    if n <= 10 or n % 100 == 0:
                        logger.warning("stream %d: skipping bad sample %r from %s (%s: %s) [%d bad so far]",
                                       self.stream, raw.get("__key__"), raw.get("__url__"),
                                       type(e).__name__, e, n)
                    continue
                self._state["sources"][source.name]["good"] += 1
                yield example, self.state()
                break


class StreamDataset(IterableDataset):
    """The local streams of one process, split over DataLoader workers; yields single items."""

    def __init__(self, sources: Sequence[Source], build: Callable[..., Any], *, streams: Sequence[int],
                 num_streams: int, seed: int, shuffle_buffer: int,
                 states: dict[int, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.sources, self.build = list(sources), build
        self.streams, self.num_streams = list(streams), num_streams
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.states = dict(states or {})

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = [j for i, j in enumerate(self.streams) if i % nworkers == wid]
        iters = [iter(MixtureStream(self.sources, self.build, stream=j, num_streams=self.num_streams,
                                    seed=self.seed, shuffle_buffer=self.shuffle_buffer,
                                    state=self.states.get(j))) for j in mine]
        while True:
            for j, it in zip(mine, iters):
                try:
                    example, state = next(it)
                except DataSourceError as e:
                    # handed on as an item for StreamLoader to raise: raised in a DataLoader worker it
                    # would reach the main process as a traceback text
                    yield {"stream": j, "error": str(e)}
                    return
                yield {"stream": j, "example": example, "state": state}


def _identity(x: Any) -> Any:
    return x


class StreamLoader:
    """Batches of examples from this process's streams, with the data position of each batch.

    Iterating yields ``(batch, position)``: ``batch = collate(examples)`` and ``position``
    maps each local stream to its state after the last example in the batch.
    """

    def __init__(self, sources: Sequence[Source], build: Callable[..., Any], collate: Callable[[list], Any], *,
                 batch_size: int, num_workers: int, num_streams: int, rank: int, world_size: int, seed: int,
                 shuffle_buffer: int, states: dict[int, dict[str, Any]] | None = None) -> None:
        if num_streams % world_size:
            raise ValueError(f"data.streams={num_streams} must be a multiple of the number of processes "
                             f"({world_size}).")
        local = num_streams // world_size
        if batch_size % local:
            raise ValueError(f"data.batch_size={batch_size} must be a multiple of the streams per process "
                             f"({local} = data.streams / processes).")
        self.streams = list(range(rank * local, (rank + 1) * local))
        self.per_stream = batch_size // local
        if num_workers > local:
            logger.warning("data.num_workers=%d exceeds the %d streams of this process; using %d workers "
                           "(raise data.streams to use more).", num_workers, local, local)
            num_workers = local
        while num_workers > 1 and local % num_workers:  # workers must split the streams evenly
            num_workers -= 1
        self.num_workers = num_workers
        self.collate = collate
        self.states = {j: copy.deepcopy(s) for j, s in (states or {}).items() if j in self.streams}
        self.dataset = StreamDataset(sources, build, streams=self.streams, num_streams=num_streams, seed=seed,
                                     shuffle_buffer=shuffle_buffer, states=self.states)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[Any, dict[int, dict[str, Any]]]]:
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": max(2, 2 * self.batch_size // self.num_workers),
                      "persistent_workers": False}
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            collate_fn=_identity, **kwargs)
        queues: dict[int, collections.deque] = {j: collections.deque() for j in self.streams}
        position = {j: copy.deepcopy(self.states.get(j)) for j in self.streams}
        for item in loader:
            if "error" in item:
                raise DataSourceError(item["error"])
            queues[item["stream"]].append(item)
            if all(len(q) >= self.per_stream for q in queues.values()):
                examples = []
                for j in self.streams:
                    for _ in range(self.per_stream):
                        taken = queues[j].popleft()
                        examples.append(taken["example"])
                        position[j] = taken["state"]
                yield self.collate(examples), copy.deepcopy(position)


def counters(position: dict[int, dict[str, Any] | None]) -> dict[str, int]:
    """Bad / filtered sample counts summed over streams."""
    out = {"bad": 0, "filtered": 0}
    for st in position.values():
        if st:
            out["bad"] += st["bad"]
            out["filtered"] += st["filtered"]
    return out


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
