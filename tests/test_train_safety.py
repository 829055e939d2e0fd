"""What a run writes never destroys what it did not write, and a kill at any point loses nothing.

Each case is a tiny stage-2 run on CPU (a few seconds). Kills are real: the run goes on in a
child process that ends itself with ``os._exit`` (no ``finally``, no cleanup) at the named
point, and the next run resumes from what is on the disk.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from kosmos_g.cli import main
from kosmos_g.data.shards import ShardWriter

import test_train_stages as stages
from test_train_stages import cli_args, fresh_process_state, read_csv, run_cli

world, _one_thread = stages.world, stages._one_thread  # the tiny model, SD folder and shards; one CPU thread

STAGE = "stage2"


@pytest.fixture(scope="module")
def reference(world):
    """The uninterrupted 6-step run every interrupted one must end equal to."""
    out = world["root"] / "reference"
    run_cli(cli_args(world, STAGE, out))
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    a = load_file(str(reference / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    rows, want = read_csv(out), read_csv(reference)
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    np.testing.assert_allclose([float(r["loss"]) for r in rows], [float(r["loss"]) for r in want], rtol=1e-6)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def run_error(args: list[str], capsys, *, before_loading: bool = True) -> str:
    """Run the CLI expecting a user error: exit status 2 and one error line, the only line on
    stderr when the error comes before any model loads (loaders may print progress bars)."""
    fresh_process_state()
    capsys.readouterr()
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("kosmos-g train: error: ") and "Traceback" not in "".join(lines)
    assert len(lines) == 1 or not before_loading, lines
    return lines[-1]


# A child process that runs the CLI and kills itself at one point: just before a rename whose
# source and target names match, or at the first CSV header written.
KILLER = r"""
import csv, json, os, re, sys

spec = json.loads(sys.argv[1])
if spec["replace"]:
    src_re, dst_re = spec["replace"]
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if re.fullmatch(src_re, os.path.basename(src)) and re.fullmatch(dst_re, os.path.basename(dst)):
            os._exit(137)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
if spec["writeheader"]:
    csv.DictWriter.writeheader = lambda self: os._exit(137)
from kosmos_g.cli import main

sys.exit(main(spec["args"]))
"""


def run_killed(args: list[str], *, replace: tuple[str, str] | None = None, writeheader: bool = False) -> None:
    spec = json.dumps({"args": args, "replace": replace, "writeheader": writeheader})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILLER, spec], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 137, f"the kill point was not reached:\n{done.stderr[-3000:]}"


# ----------------------------------------------------------------------------- export folder

def test_export_never_replaces_a_folder_this_run_did_not_write(world, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    out = tmp_path / "run"
    args = cli_args(world, STAGE, out, f"export.dir={mine}", "train.max_steps=2")
    err = run_error(args, capsys)
    assert str(mine) in err and "export.overwrite=true" in err
    assert (mine / "notes.txt").read_text() == "keep me"
    assert not (out / "checkpoints").exists(), "refused only after training"

    run_cli(args + ["export.overwrite=true"])  # asked for: replaced
    assert (mine / "config.json").is_file() and not (mine / "notes.txt").exists()
    run_cli(args)  # the finished run again: its own export is rewritten without asking
    assert (mine / "config.json").is_file()
    other = cli_args(world, STAGE, tmp_path / "other-run", f"export.dir={mine}", "train.max_steps=2")
    assert str(mine) in run_error(other, capsys)  # ... but another run's is not
    assert not (tmp_path / "other-run" / "checkpoints").exists()


def test_default_export_inside_a_used_output_dir_is_refused(world, tmp_path, capsys):
    out = tmp_path / "project"
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.safetensors").write_bytes(b"someone else's model")
    err = run_error(cli_args(world, STAGE, out, "train.max_steps=2"), capsys)
    assert str(out / "final") in err
    assert (out / "final" / "model.safetensors").read_bytes() == b"someone else's model"
    (out / "final" / "model.safetensors").unlink()  # an empty folder is fine
    run_cli(cli_args(world, STAGE, out, "train.max_steps=2"))
    assert (out / "final" / "config.json").is_file()


def test_stage2_reconstruction_folder_is_guarded_too(world, tmp_path, capsys):
    out = tmp_path / "run"
    recon = out / "final-reconstruction"
    recon.mkdir(parents=True)
    (recon / "notes.txt").write_text("keep me")
    assert str(recon) in run_error(cli_args(world, STAGE, out, "train.max_steps=2"), capsys)
    assert (recon / "notes.txt").read_text() == "keep me"
    run_cli(cli_args(world, STAGE, out, "train.max_steps=2", "stage2.keep_reconstruction=false"))


@pytest.mark.parametrize("case", ["output-dir-is-a-file", "file-in-the-way", "export-dir-is-a-file", "read-only"])
def test_unwritable_outputs_are_refused_before_the_model_loads(world, tmp_path, capsys, monkeypatch, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out, extra = tmp_path / "run", []
    if case == "output-dir-is-a-file":
        out = named = blocker
    elif case == "file-in-the-way":
        out, named = blocker / "run", blocker
    elif case == "export-dir-is-a-file":
        extra, named = [f"export.dir={blocker}"], blocker
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        out, named = locked / "run", locked
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    # a model.init that does not exist: were the model loaded first, the error would name it
    err = run_error(cli_args(world, STAGE, out, *extra, f"model.init={tmp_path / 'no-model'}"), capsys)
    assert str(named) in err and "no-model" not in err
    assert blocker.read_text() == "a file"


# ----------------------------------------------------------------------------- checkpoints

def _state(ckpt: Path) -> Path:
    return ckpt / "trainer_state.json"


DAMAGE = {
    "no-optimizer": lambda ckpt: (ckpt / "optimizer.bin").unlink(),
    "garbage-state": lambda ckpt: _state(ckpt).write_bytes(_state(ckpt).read_bytes()[:40] + b"\x00\xffgarbage"),
    "truncated-weights": lambda ckpt: (ckpt / "trainable.safetensors").write_bytes(
        (ckpt / "trainable.safetensors").read_bytes()[:100]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_skips_a_damaged_checkpoint_for_the_previous_good_one(world, reference, tmp_path, caplog, damage):
    out = tmp_path / "run"
    run_cli(cli_args(world, STAGE, out))
    DAMAGE[damage](out / "checkpoints" / "step-00000006")
    with caplog.at_level(logging.INFO):
        run_cli(cli_args(world, STAGE, out))
    assert "step-00000006" in caplog.text and "resumed from" in caplog.text
    assert str(out / "checkpoints" / "step-00000003") in caplog.text
    assert_same_run(out, reference)
    assert (out / "checkpoints" / "step-00000006" / "optimizer.bin").is_file()  # written anew


def test_resume_starts_fresh_when_no_checkpoint_is_usable(world, reference, tmp_path, caplog):
    out = tmp_path / "run"
    run_cli(cli_args(world, STAGE, out, "train.stop_after=3", "checkpoint.every=0"))
    DAMAGE["garbage-state"](out / "checkpoints" / "step-00000003")
    with caplog.at_level(logging.INFO):
        run_cli(cli_args(world, STAGE, out))
    assert "step-00000003" in caplog.text and "resumed from" not in caplog.text
    assert_same_run(out, reference)


def test_explicit_resume_of_a_damaged_checkpoint_is_an_error(world, tmp_path, capsys):
    out = tmp_path / "run"
    run_cli(cli_args(world, STAGE, out, "train.stop_after=3", "checkpoint.every=0"))
    ckpt = out / "checkpoints" / "step-00000003"
    (ckpt / "optimizer.bin").unlink()
    err = run_error(cli_args(world, STAGE, out, f"checkpoint.resume={ckpt}"), capsys)
    assert str(ckpt) in err and "optimizer.bin" in err


@pytest.mark.parametrize("point", ["publish", "swap"])
def test_a_kill_while_a_checkpoint_is_renamed_loses_nothing(world, reference, tmp_path, caplog, point):
    """``publish``: killed just before step 6's new folder is renamed into place; ``swap``: step 6
    already exists (a finished run resumed from step 3) and the kill falls between its old folder
    being renamed aside and the new one being renamed in. Either way the next run resumes from
    step 3, removes the leftovers and ends equal to the uninterrupted run."""
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    kill_at = (r"\.step-00000006\.tmp-.*", "step-00000006")
    if point == "publish":
        run_killed(cli_args(world, STAGE, out), replace=kill_at)
    else:
        run_cli(cli_args(world, STAGE, out))
        run_killed(cli_args(world, STAGE, out, f"checkpoint.resume={ckpts / 'step-00000003'}"), replace=kill_at)
        assert any(name.startswith(".step-00000006.old-") for name in hidden(ckpts))
    assert [p.name for p in ckpts.iterdir() if not p.name.startswith(".")] == ["step-00000003"]
    with caplog.at_level(logging.INFO):
        run_cli(cli_args(world, STAGE, out))
    assert str(ckpts / "step-00000003") in caplog.text and "interrupted" in caplog.text
    assert_same_run(out, reference)
    assert hidden(ckpts) == [] and hidden(out) == []


# ----------------------------------------------------------------------------- logs

def test_resume_appends_to_the_csv_log(world, reference, tmp_path):
    out = tmp_path / "run"
    run_cli(cli_args(world, STAGE, out, "train.stop_after=3", "checkpoint.every=0"))
    inode = (out / "logs" / "train.csv").stat().st_ino
    run_cli(cli_args(world, STAGE, out))
    assert (out / "logs" / "train.csv").stat().st_ino == inode  # appended, never rewritten
    assert_same_run(out, reference)


@pytest.mark.parametrize("point", ["while-writing", "before-rename"])
def test_a_kill_while_the_csv_is_cut_back_keeps_the_old_log(world, reference, tmp_path, point):
    """Rows past the checkpoint (from the run that was interrupted) are dropped on resume by
    rewriting the log; a kill during that rewrite leaves the old log whole."""
    out = tmp_path / "run"
    run_cli(cli_args(world, STAGE, out, "train.stop_after=3", "checkpoint.every=0"))
    log = out / "logs" / "train.csv"
    with open(log, "a", newline="") as f:  # what the interrupted run logged after its checkpoint
        f.write("4,0.5,0.001,1.0,16,1.0,0,0,0.25,0.25\r\n5,0.4,0.001,1.0,20,1.0,0,0,0.2,0.2\r\n6,0.3")
    before = log.read_bytes()
    if point == "while-writing":
        run_killed(cli_args(world, STAGE, out), writeheader=True)
    else:
        run_killed(cli_args(world, STAGE, out), replace=(r"\.train\.csv\.tmp-.*", "train.csv"))
    assert log.read_bytes() == before
    run_cli(cli_args(world, STAGE, out))
    assert_same_run(out, reference)
    assert hidden(out / "logs") == []


# ----------------------------------------------------------------------------- data sources

def _bad_shards(path: Path) -> Path:
    with ShardWriter(path, max_samples=4) as w:
        for i in range(6):
            w.write({"json": b"{not json"}, key=f"bad{i}")
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_a_source_without_any_usable_sample_is_one_clear_error(world, tmp_path, capsys, workers):
    args = cli_args(world, STAGE, tmp_path / "run", f"data.sources.0.shards={_bad_shards(tmp_path / 'bad')}",
                    f"data.num_workers={workers}")
    err = run_error(args, capsys)
    assert "'caption'" in err and "no usable sample" in err and "not valid JSON" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_glob_that_matches_no_shard_is_one_clear_error(world, tmp_path, capsys):
    pattern = tmp_path / "nowhere" / "shard-*.tar"
    err = run_error(cli_args(world, STAGE, tmp_path / "run", f"data.sources.1.shards={pattern}"), capsys)
    assert "'text'" in err and str(pattern) in err


def test_a_source_whose_samples_are_all_filtered_is_one_clear_error(world, tmp_path, capsys):
    long = tmp_path / "long"
    with ShardWriter(long, max_samples=10) as w:
        for i in range(4):
            w.write({"json": {"kind": "text", "text": "a photo of a dog " * 8}}, key=f"long{i}")  # > 75 CLIP tokens
    # filters need the stage's tokenizers: this one is found in the first step
    err = run_error(cli_args(world, STAGE, tmp_path / "run", f"data.sources.1.shards={long}"), capsys,
                    before_loading=False)
    assert "'text'" in err and "4 filtered" in err
