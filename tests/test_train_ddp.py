"""Data parallelism: `accelerate launch` with 2 CPU processes (gloo) == 1 process with the doubled batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from safetensors.torch import load_file

from test_train_stages import cli_args, read_csv, run_cli, world  # noqa: F401  (fixture)


def test_two_processes_match_one_process_with_the_doubled_batch(world, tmp_path):  # noqa: F811
    one, two = tmp_path / "one", tmp_path / "two"
    # data.streams is fixed, so both runs see the same samples in every global batch
    run_cli(cli_args(world, "stage1", one, "data.streams=2", "data.batch_size=4", "checkpoint.every=0"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"),  # no user accelerate config
           "KOSMOS_G_DEBUG": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "kosmos_g.cli", *cli_args(world, "stage1", two, "data.streams=2", "data.batch_size=2",
                                            "checkpoint.every=3", "data.num_workers=1")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode and any(m in done.stderr for m in ("address already in use", "EADDRINUSE", "rendezvous")):
        # a port taken between accelerate picking it and torchrun binding it: an infra race, retry once
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = read_csv(one), read_csv(two)
    assert [r["samples"] for r in a] == [r["samples"] for r in b]  # 2 x 2 == 1 x 4 per step
    np.testing.assert_allclose([float(r["loss"]) for r in b], [float(r["loss"]) for r in a], rtol=1e-5)
    np.testing.assert_allclose([float(r["grad_norm"]) for r in b], [float(r["grad_norm"]) for r in a], rtol=1e-4)
    wa = load_file(str(one / "final" / "model.safetensors"))
    wb = load_file(str(two / "final" / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
    # the 2-process checkpoint holds both streams' positions, so any process count can resume it
    state = json.loads((two / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and sorted(state["position"]) == ["0", "1"]
    # ... and each process's own part: no process may still be writing when the folder is renamed
    for ckpt in (two / "checkpoints").iterdir():
        assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
