"""`kosmos-g generate` on bad input: exit status 2 and exactly one line on stderr naming the
file or value, no traceback unless KOSMOS_G_DEBUG=1; inputs that can be checked without a
model (paths, image headers, the output folder) are refused before any model loads."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pytest
from helpers import DOG, forged_png

from kosmos_g.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch, tmp_path):
    monkeypatch.delenv("KOSMOS_G_DEBUG", raising=False)
    monkeypatch.setenv("KOSMOS_G_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def tiny_args(tiny_kosmos_dir, tiny_sd_dir):
    return ["--model", str(tiny_kosmos_dir), "--sd", str(tiny_sd_dir), "--steps", "1", "-q"]


def _damaged_model(tmp_path: Path, tiny_kosmos_dir: Path, cut: Callable[[bytes], bytes]) -> Path:
    model = tmp_path / "damaged-kosmos-g"
    shutil.copytree(tiny_kosmos_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(cut(weights.read_bytes()))
    return model


def _not_writable(monkeypatch, folder: Path) -> None:
    """What a read-only folder does to a writer, even where the tests run as root."""
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(13, "Permission denied", str(Path(dir) / "probe"))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


# name -> (setup(tmp_path, tiny_args, tiny_kosmos_dir, monkeypatch) -> argv, text the line names, model may load)
CASES: dict[str, tuple[Callable, Callable[[Path], str], bool]] = {
    "image is a folder": (
        lambda t, a, k, m: ["<i> on grass", "-i", str(t), *a], lambda t: f"is a directory, not a file: {t}", False),
    "init image is a folder": (
        lambda t, a, k, m: ["a dog", "--init-image", str(t), *a], lambda t: f"is a directory, not a file: {t}", False),
    "LoRA is a folder": (
        lambda t, a, k, m: ["a dog", "--lora", str(t), *a], lambda t: f"is a directory, not a file: {t}", False),
    "sidecar is a folder": (
        lambda t, a, k, m: ["--from-json", str(t)], lambda t: f"is a directory, not a file: {t}", False),
    "model is a file": (
        lambda t, a, k, m: ["a dog", "--model", DOG, *a[2:]], lambda t: f"not a folder: {DOG}", False),
    "image is not an image": (
        lambda t, a, k, m: (t / "notes.png").write_text("hello") and ["<i>", "-i", str(t / "notes.png"), *a],
        lambda t: f"Cannot read image file {t / 'notes.png'}", False),
    "image of 30000x30000": (
        lambda t, a, k, m: ["<i>", "-i", str(forged_png(t / "huge.png", 30000, 30000)), *a],
        lambda t: f"{t / 'huge.png'} is 30000x30000 (900,000,000 pixels); image files above 40,000,000 pixels "
                  "(40 megapixels", False),
    "mask of 10000x10000": (
        lambda t, a, k, m: ["a dog", "--init-image", DOG, "--mask", str(forged_png(t / "m.png", 10000, 10000)),
                            *a], lambda t: f"{t / 'm.png'} is 10000x10000", False),
    "control image of 8000x5001": (
        lambda t, a, k, m: ["a dog", "--controlnet", str(t), "--control-image",
                            str(forged_png(t / "c.png", 8000, 5001)), *a], lambda t: f"{t / 'c.png'} is 8000x5001",
        False),
    "output is a file": (
        lambda t, a, k, m: ["a dog", *a, "-o", DOG], lambda t: f"output folder {DOG} is a file", False),
    "output under a file": (
        lambda t, a, k, m: ["a dog", *a, "-o", str(Path(DOG) / "out")], lambda t: f"{DOG} is a file", False),
    "output not writable": (
        lambda t, a, k, m: _not_writable(m, t / "ro") or ["a dog", *a, "-o", str(t / "ro")],
        lambda t: f"output folder {t / 'ro'} is not writable", False),
    "weights of 0 bytes": (
        lambda t, a, k, m: ["a dog", "--model", str(_damaged_model(t, k, lambda b: b"")), *a[2:]],
        lambda t: f"{t / 'damaged-kosmos-g' / 'model.safetensors'} is damaged or incomplete", True),
    "weights of 30 bytes": (
        lambda t, a, k, m: ["a dog", "--model", str(_damaged_model(t, k, lambda b: b[:30])), *a[2:]],
        lambda t: f"{t / 'damaged-kosmos-g' / 'model.safetensors'} is damaged or incomplete", True),
    "weights truncated": (
        lambda t, a, k, m: ["a dog", "--model", str(_damaged_model(t, k, lambda b: b[:len(b) // 2])), *a[2:]],
        lambda t: f"{t / 'damaged-kosmos-g' / 'model.safetensors'} is damaged or incomplete", True),
}


def _refuse_loading(monkeypatch) -> None:
    from kosmos_g.pipeline import KosmosGPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model started loading before the bad input was refused")

    monkeypatch.setattr(KosmosGPipeline, "from_pretrained", refuse)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, tiny_args, tiny_kosmos_dir, monkeypatch, capsys):
    setup, names, may_load = CASES[case]
    argv = ["generate", *setup(tmp_path, tiny_args, tiny_kosmos_dir, monkeypatch)]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "out")]
    if not may_load:
        _refuse_loading(monkeypatch)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("kosmos-g generate: error: ") and names(tmp_path) in lines[0], lines[0]
    assert "Traceback" not in err and not out

    monkeypatch.setenv("KOSMOS_G_DEBUG", "1")  # the same input, now with the exception itself
    with pytest.raises(Exception) as info:
        main(argv)
    assert not isinstance(info.value, AssertionError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, tiny_args, monkeypatch, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    _refuse_loading(monkeypatch)
    try:
        assert main(["generate", "a dog", *tiny_args, "-o", str(folder)]) == 2
    finally:
        folder.chmod(stat.S_IRWXU)
    assert f"output folder {folder} is not writable" in capsys.readouterr().err


def test_the_output_folder_is_checked_after_the_model_folders(tmp_path, tiny_args, capsys):
    """A run refused for a missing SD part leaves no empty output folder behind."""
    (tmp_path / "sd-no-unet" / "vae").mkdir(parents=True)
    out = tmp_path / "out"
    assert main(["generate", "a dog", *tiny_args[:2], "--sd", str(tmp_path / "sd-no-unet"), "-o", str(out)]) == 2
    assert "has no unet/" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("error", [FileExistsError("x exists"), PermissionError(13, "Permission denied", "/x/y"),
                                   IsADirectoryError("x is a directory"), NotADirectoryError("x is not a folder")])
def test_cli_reports_file_system_errors_in_one_line(error, monkeypatch, capsys):
    import kosmos_g.commands.generate as gen

    def fail(args):
        raise error

    monkeypatch.setattr(gen, "main", fail)
    assert main(["generate", "a dog"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kosmos-g generate: error: ") and "x" in err
    assert "Errno" not in err


def test_debug_shows_the_traceback_in_a_real_process(tmp_path, tiny_kosmos_dir, tiny_sd_dir):
    model = _damaged_model(tmp_path, tiny_kosmos_dir, lambda b: b[:30])
    argv = [sys.executable, "-m", "kosmos_g.cli", "generate", "a dog", "--model", str(model), "--sd",
            str(tiny_sd_dir), "-q", "-o", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KOSMOS_G_DEBUG", None)
    quiet = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    loud = subprocess.run(argv, capture_output=True, text=True, env={**env, "KOSMOS_G_DEBUG": "1"}, timeout=120)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    [line] = [line for line in quiet.stderr.splitlines() if line.strip()]
    assert line.startswith(f"kosmos-g generate: error: {model / 'model.safetensors'} is damaged or incomplete (")
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "damaged or incomplete" in loud.stderr
