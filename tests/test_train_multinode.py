"""Several processes (nodes x GPUs) and several DataLoader workers each: one epoch sees every sample once.

Process ``r`` of ``W`` (its global rank, so nodes only add processes) owns streams
``[r*S/W, (r+1)*S/W)`` and its workers split them; each stream reads its own shards. Here 2 real
processes x 2 workers each read one epoch of a known shard set: the union is the dataset, with no
sample twice, and no shard is read by two processes.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from kosmos_g.train.data import Source, StreamLoader
from kosmos_g.train.testing import make_tiny_shards

WORLD, WORKERS = 2, 2


def _key_and_shard(raw, rng, source):
    return raw["__key__"], raw["__url__"]


def _collate(examples):
    return list(examples)


def _epoch(shards: list[str], rank: int) -> list[tuple[str, str]]:
    """Process ``rank``'s examples of epoch 0 (each of its streams read until its epoch 1 begins)."""
    streams = WORLD * WORKERS
    loader = StreamLoader([Source("caption", tuple(shards), 1.0)], _key_and_shard, _collate,
                          batch_size=streams // WORLD, num_workers=WORKERS, num_streams=streams, rank=rank,
                          world_size=WORLD, seed=3, shuffle_buffer=4)
    assert loader.num_workers == WORKERS
    seen, done = [], set()
    batches = iter(loader)
    while done != set(loader.streams):
        batch, position = next(batches)  # one example per local stream per batch, in stream order
        for j, example in zip(loader.streams, batch):
            if position[j]["sources"]["caption"]["epoch"] == 0:
                seen.append(example)
            else:
                done.add(j)
    batches.close()  # stops the workers now rather than when the process exits
    return seen


def _process(layouts: list[list[str]], rank: int, out: str) -> None:
    """One process of the job: an epoch of every shard layout, written to ``out`` as JSON."""
    multiprocessing.set_start_method("fork", force=True)  # workers as on Linux by default, not re-spawned
    Path(out).write_text(json.dumps([_epoch(shards, rank) for shards in layouts]))


LAYOUTS = {"4-shards": (12, 3), "6-shards": (18, 3), "2-shards": (12, 6)}  # name: (samples, per shard)


def test_two_processes_with_two_workers_see_each_sample_once_per_epoch(tmp_path):
    layouts = []
    for name, (n, per_shard) in LAYOUTS.items():
        folder = make_tiny_shards(tmp_path / name, n=n, per_shard=per_shard, kinds=("caption",))["caption"]
        layouts.append(sorted(str(p) for p in folder.glob("*.tar")))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_process, args=(layouts, r, str(tmp_path / f"rank{r}.json"))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, f"process exited with {p.exitcode}"
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for i, ((name, (n, _)), shards) in enumerate(zip(LAYOUTS.items(), layouts)):
        seen = [per_rank[r][i] for r in range(WORLD)]
        keys = [k for part in seen for k, _ in part]
        assert sorted(keys) == [f"caption-{k:05d}" for k in range(n)], name  # every sample, none twice
        if len(shards) >= WORLD * WORKERS:  # enough shards: each process reads shards of its own
            read = [{url for _, url in part} for part in seen]
            assert not read[0] & read[1] and read[0] | read[1] == set(shards), name


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    import kosmos_g

    folder = Path(kosmos_g.__file__).parent / "recipes" / "accelerate"
    kinds = {p.stem: load_config_from_file(str(p)) for p in sorted(folder.glob("*.yaml"))}
    assert set(kinds) == {"fsdp", "multinode", "deepspeed-zero2", "deepspeed-zero3"}
    assert kinds["multinode"].num_machines > 1 and kinds["multinode"].distributed_type.value == "MULTI_GPU"
    assert kinds["fsdp"].distributed_type.value == "MULTI_GPU"  # the trainer shards, not accelerate's plugin
    for stage in (2, 3):
        assert kinds[f"deepspeed-zero{stage}"].deepspeed_config["zero_stage"] == stage
