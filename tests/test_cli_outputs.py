"""`kosmos-g generate` output names: each PNG and its sidecar are claimed with an exclusive
create, so runs writing into one folder at once never overwrite each other or an existing file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import DOG

from kosmos_g.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def tiny_args(tiny_kosmos_dir, tiny_sd_dir):
    return ["--model", str(tiny_kosmos_dir), "--sd", str(tiny_sd_dir), "--steps", "1", "-q"]


def _check_pairs(out: Path, expected: int) -> None:
    """``expected`` PNGs, each with a sidecar of the same stem that names it."""
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == expected, sorted(p.name for p in out.iterdir())
    assert len({p.name for p in pngs}) == expected
    for png in pngs:
        record = json.loads(png.with_suffix(".json").read_text())
        assert record["file"] == png.name
    assert len(list(out.glob("*.json"))) == expected
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no claims or temporaries left


def test_concurrent_runs_into_one_folder_never_collide(tiny_args, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KOSMOS_G_CACHE": str(tmp_path / "cache")}
    env.pop("KOSMOS_G_DEBUG", None)
    argv = [sys.executable, "-m", "kosmos_g.cli", "generate", "<i> on grass", "-i", DOG, *tiny_args,
            "--seed", "7", "-n", "2", "-o", str(out)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    printed = [line for stdout, _ in results for line in stdout.splitlines()]
    assert len(printed) == 8 and len(set(printed)) == 8  # every run names its own files
    assert sorted(Path(p).name for p in printed) == sorted(p.name for p in out.glob("*.png"))
    _check_pairs(out, 8)


def test_a_single_run_never_overwrites_an_existing_file(tiny_args, tmp_path, capsys, monkeypatch):
    """Files that appear after the folder was scanned (another run's) are skipped, not replaced:
    the scan is made to miss them here."""
    import kosmos_g.commands.generate as gen

    out = tmp_path / "out"
    out.mkdir()
    theirs = {out / "00000-on-grass-s7.png": b"their image", out / "00000-on-grass-s7.json": b"their sidecar",
              out / "00001-on-grass-s7.json": b"an orphan sidecar", out / "00002-on-grass-grid.png": b"their grid"}
    for path, data in theirs.items():
        path.write_bytes(data)
    monkeypatch.setattr(gen, "_next_index", lambda outdir: 0)
    rc = main(["generate", "<i> on grass", "-i", DOG, *tiny_args, "--seed", "7", "-n", "2", "--grid",
               "-o", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0
    for path, data in theirs.items():
        assert path.read_bytes() == data, path.name
    mine = [Path(line).name for line in stdout.splitlines()]
    assert mine[:2] == ["00002-on-grass-s7.png", "00003-on-grass-s8.png"]
    assert mine[2].endswith("-on-grass-grid.png") and mine[2] != "00002-on-grass-grid.png"
    for name in mine[:2]:
        assert json.loads((out / name).with_suffix(".json").read_text())["file"] == name
