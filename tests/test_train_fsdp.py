"""FSDP2 (``train.sharding=fsdp``) with 2 CPU processes (gloo) launched through ``accelerate launch``.

One launch runs every 2-process training of this file in turn (each process start costs seconds):
stage 1 sharded (uninterrupted, then stopped and resumed), stage 1 with DDP, stages 2 and 3 sharded.
Each process records what it saw (parameters are DTensors, the shards split every weight, the
frozen U-Net stays whole and out of the optimizer) in a JSON file the test reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from kosmos_g import KosmosG

from test_train_stages import cli_args, read_csv, run_cli, world  # noqa: F401  (fixture)


def _worker(spec_file: str) -> None:
    """What each launched process runs: the trainings listed in ``spec_file``, one after another."""
    import torch
    from accelerate.state import AcceleratorState, GradientState
    from torch.distributed.tensor import DTensor

    from kosmos_g.train import Trainer, load_recipe

    torch.set_num_threads(1)
    runs = json.loads(Path(spec_file).read_text())
    for run in runs:
        AcceleratorState._reset_state()  # a new Accelerator per training; the process group stays
        GradientState._reset_state()
        args = run["args"]  # ["train", stage, "--config", name, overrides...]
        trainer = Trainer(load_recipe(args[3], args[4:]), args[1])
        trained = [p for p in trainer.module.parameters() if p.requires_grad]
        sharded = [isinstance(p, DTensor) for p in trained]
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in trained)
        full = sum(p.numel() for p in trained)
        total = torch.tensor([float(local)])
        torch.distributed.all_reduce(total)  # the shards of all processes add up to every weight once
        facts = {"all_dtensor": all(sharded), "any_dtensor": any(sharded), "local": local, "full": full,
                 "sum_of_shards": int(total.item())}
        unet = getattr(trainer.stage, "unet", None)
        if unet is not None:
            in_optim = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
            facts["unet_whole"] = not any(isinstance(p, DTensor) for p in unet.parameters())
            facts["unet_frozen"] = not any(p.requires_grad for p in unet.parameters())
            facts["unet_in_optimizer"] = any(id(p) in in_optim for p in unet.parameters())
            facts["unet_dtypes"] = sorted({str(p.dtype) for p in unet.parameters()})
        trainer.run()
        rank = torch.distributed.get_rank()
        Path(run["facts"].format(rank=rank)).write_text(json.dumps(facts))
        del trainer


def _launch(tmp_path: Path, runs: list[dict]) -> None:
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"),  # no user accelerate config
           "KOSMOS_G_DEBUG": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                    os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           __file__, str(spec)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    if done.returncode and any(m in done.stderr for m in ("address already in use", "EADDRINUSE", "rendezvous")):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)  # a port race: once more
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-8000:]


def _facts(path: Path) -> list[dict]:
    return [json.loads(Path(str(path).format(rank=r)).read_text()) for r in range(2)]


def test_fsdp_two_processes(world, tmp_path):  # noqa: F811
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    full, cut, s2, s3 = tmp_path / "fsdp", tmp_path / "fsdp-cut", tmp_path / "fsdp-s2", tmp_path / "fsdp-s3"
    # data.streams is fixed, so the 2-process runs see the samples of the 1-process run with the doubled batch
    run_cli(cli_args(world, "stage1", one, "data.streams=2", "data.batch_size=4", "checkpoint.every=0"))
    two = ["data.streams=2", "data.batch_size=2", "data.num_workers=1"]
    fsdp = [*two, "train.sharding=fsdp"]
    runs = [
        {"args": cli_args(world, "stage1", full, *fsdp, "checkpoint.every=3"), "facts": f"{full}-{{rank}}.json"},
        {"args": cli_args(world, "stage1", cut, *fsdp, "checkpoint.every=0", "train.stop_after=3"),
         "facts": f"{cut}-a{{rank}}.json"},
        {"args": cli_args(world, "stage1", cut, *fsdp, "checkpoint.every=0", "checkpoint.resume=auto"),
         "facts": f"{cut}-b{{rank}}.json"},
        {"args": cli_args(world, "stage1", ddp, *two, "checkpoint.every=0"), "facts": f"{ddp}-{{rank}}.json"},
        {"args": cli_args(world, "stage2", s2, *fsdp, "train.max_steps=2", "checkpoint.every=0"),
         "facts": f"{s2}-{{rank}}.json"},
        {"args": cli_args(world, "stage3", s3, *fsdp, "train.max_steps=2", "checkpoint.every=0"),
         "facts": f"{s3}-{{rank}}.json"},
    ]
    _launch(tmp_path, runs)

    # the trained weights really are sharded: DTensors whose local parts add up to each weight once
    for facts in (_facts(f"{full}-{{rank}}.json"), _facts(f"{s2}-{{rank}}.json"), _facts(f"{s3}-{{rank}}.json")):
        for f in facts:
            assert f["all_dtensor"] and f["local"] < f["full"] and f["sum_of_shards"] == f["full"], f
    assert not any(f["any_dtensor"] for f in _facts(f"{ddp}-{{rank}}.json"))  # DDP keeps whole weights
    # stage 3: the frozen U-Net is neither sharded nor trained, and keeps its precision
    for f in _facts(f"{s3}-{{rank}}.json"):
        assert f["unet_whole"] and f["unet_frozen"] and not f["unet_in_optimizer"], f
        assert f["unet_dtypes"] == ["torch.float32"], f
    for out in (s2, s3):
        KosmosG.from_pretrained(out / "final")

    # ranks communicate: the loss curve is the 1-process run's with the doubled batch
    a, b = read_csv(one), read_csv(full)
    assert [r["samples"] for r in a] == [r["samples"] for r in b]
    np.testing.assert_allclose([float(r["loss"]) for r in b], [float(r["loss"]) for r in a], rtol=1e-5)
    np.testing.assert_allclose([float(r["grad_norm"]) for r in b], [float(r["grad_norm"]) for r in a], rtol=1e-4)
    # sharded checkpoints: one shard per process, and stop + resume repeats the uninterrupted run
    shards = {p.name for p in (full / "checkpoints" / "step-00000003" / "sharded").iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= shards, shards
    c = read_csv(cut)
    assert [r["step"] for r in c] == [r["step"] for r in b]
    np.testing.assert_allclose([float(r["loss"]) for r in c], [float(r["loss"]) for r in b], rtol=1e-6)
    # the export gathers a plain folder that loads, equal to the DDP run's and the resumed run's
    KosmosG.from_pretrained(full / "final")
    wf = load_file(str(full / "final" / "model.safetensors"))
    for other in (ddp, cut):
        wo = load_file(str(other / "final" / "model.safetensors"))
        assert set(wo) == set(wf)
        assert max((wf[k].float() - wo[k].float()).abs().max().item() for k in wf) <= 1e-5


def test_fsdp_one_process_matches_the_plain_run(world, tmp_path):  # noqa: F811
    """One process still shards (a process group of one, formed by the trainer): the same run as without."""
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    run_cli(cli_args(world, "stage1", plain, "checkpoint.every=0"))
    # in its own process: the process group it forms must not outlive the run
    cmd = [sys.executable, "-m", "kosmos_g.cli", *cli_args(world, "stage1", sharded, "checkpoint.every=0",
                                                          "train.sharding=fsdp")]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = read_csv(plain), read_csv(sharded)
    np.testing.assert_allclose([float(r["loss"]) for r in b], [float(r["loss"]) for r in a], rtol=1e-6)
    wa = load_file(str(plain / "final" / "model.safetensors"))
    wb = load_file(str(sharded / "final" / "model.safetensors"))
    assert set(wa) == set(wb) and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


if __name__ == "__main__":
    _worker(sys.argv[1])
