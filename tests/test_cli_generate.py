"""`kosmos-g generate` end to end on tiny folders: PNG + JSON sidecars, exact re-runs,
sampling defaults from the model folder, one-line errors without tracebacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import DOG, EXAMPLES, HAT

from kosmos_g.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KOSMOS_G_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def tiny_args(tiny_kosmos_dir, tiny_sd_dir):
    return ["--model", str(tiny_kosmos_dir), "--sd", str(tiny_sd_dir), "--steps", "2", "-q"]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_writes_png_and_sidecar_and_reruns_exactly(tiny_args, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, _ = _run(["generate", "<i> wearing <i>", "-i", DOG, "-i", HAT, *tiny_args, "--seed", "3",
                          "-n", "2", "--grid", "--negative", "blurry", "-o", str(out)], capsys)
    assert rc == 0
    pngs = sorted(out.glob("0000[01]-*-s*.png"))
    assert [p.name for p in pngs] == ["00000-wearing-s3.png", "00001-wearing-s4.png"]
    assert str(pngs[0]) in stdout
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # atomic writes leave nothing behind
    # 32x32 images side by side would be a 64x32 grid: each tile is scaled up 8x, nearest neighbour.
    grid = _pixels(out / "00000-wearing-grid.png")
    assert grid.shape == (256, 512, 3)
    for k, png in enumerate(pngs):
        np.testing.assert_array_equal(grid[:, 256 * k:256 * (k + 1)], _pixels(png).repeat(8, 0).repeat(8, 1))
    record = json.loads(pngs[1].with_suffix(".json").read_text())
    assert record["image_seed"] == 4 and record["image_index"] == 1
    assert (record["width"], record["height"]) == Image.open(pngs[1]).size == (32, 32)
    settings = record["settings"]
    assert settings["prompt"] == "<i> wearing <i>" and settings["images"] == [DOG, HAT]
    assert settings["negative"] == "blurry" and settings["scheduler"] == "dpm++"
    assert settings["steps"] == 2 and settings["guidance"] == 7.5 and settings["seed"] == 3
    assert set(record["input_sha256"]) == {DOG, HAT}

    again = tmp_path / "again"
    rc, _, _ = _run(["generate", "--from-json", str(pngs[1].with_suffix(".json")), "-o", str(again), "-q"],
                    capsys)
    assert rc == 0
    [rerun] = again.glob("*.png")
    assert rerun.name.endswith("-s4.png")
    np.testing.assert_array_equal(_pixels(rerun), _pixels(pngs[1]))
    assert np.abs(_pixels(pngs[0]).astype(int) - _pixels(pngs[1])).max() > 0  # seeds differ


def test_batched_images_rerun_exactly(tiny_args, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(["generate", "a dog", *tiny_args, "--seed", "9", "-n", "3", "--batch-size", "2",
                 "--size", "32x40", "-o", str(out)], capsys)[0] == 0
    third = out / "00002-a-dog-s11.png"
    assert Image.open(third).size == (32, 40)  # WIDTHxHEIGHT
    assert _run(["generate", "--from-json", str(third.with_suffix(".json")), "-o", str(tmp_path / "re"),
                 "-q"], capsys)[0] == 0
    np.testing.assert_array_equal(_pixels(next((tmp_path / "re").glob("*.png"))), _pixels(third))


def test_controlnet_lora_and_img2img_flags(tiny_args, tiny_sd_dir, tmp_path, capsys):
    from kosmos_g.testing import make_tiny_controlnet, make_tiny_lora

    cn = make_tiny_controlnet(tmp_path / "cn", tiny_sd_dir)
    lora = make_tiny_lora(tmp_path / "style.safetensors", tiny_sd_dir, fmt="kohya")
    edges = str(EXAMPLES / "edges.png")
    out = tmp_path / "out"
    rc, _, _ = _run(["generate", "<i> in a forest", "-i", DOG, *tiny_args, "--seed", "1", "--controlnet",
                     str(cn), "--control-image", edges, "--control-scale", "0.8", "--lora", f"{lora}:0.7",
                     "--scheduler", "euler-a", "--size", "32", "-o", str(out)], capsys)
    assert rc == 0
    settings = json.loads(next(out.glob("*.json")).read_text())["settings"]
    assert settings["controlnet"] == [str(cn)] and settings["control_scales"] == [0.8]
    assert settings["loras"] == [{"path": str(lora), "scale": 0.7}] and settings["scheduler"] == "euler-a"
    png = next(out.glob("*.png"))
    assert _run(["generate", "--from-json", str(png.with_suffix(".json")), "-o", str(tmp_path / "re"), "-q"],
                capsys)[0] == 0
    np.testing.assert_array_equal(_pixels(next((tmp_path / "re").glob("*.png"))), _pixels(png))

    scene, mask = tmp_path / "scene.png", str(EXAMPLES / "mask.png")
    Image.open(EXAMPLES / "scene.png").resize((48, 40)).save(scene)
    rc, _, _ = _run(["generate", "<i> make it snowy", "-i", str(scene), *tiny_args, "--init-image", str(scene),
                     "--strength", "0.6", "-o", str(tmp_path / "edit")], capsys)
    assert rc == 0 and Image.open(next((tmp_path / "edit").glob("*.png"))).size == (48, 40)  # the init's size
    rc, _, _ = _run(["generate", "<i> in the sky", "-i", HAT, *tiny_args, "--init-image", str(scene), "--mask",
                     mask, "--size", "32", "-o", str(tmp_path / "inpaint")], capsys)
    assert rc == 0 and Image.open(next((tmp_path / "inpaint").glob("*.png"))).size == (32, 32)


@pytest.fixture(scope="module")
def configured_kosmos_dir(tiny_kosmos_dir, tmp_path_factory):
    """The tiny Kosmos-G folder with its own sampling defaults (2 DDIM steps, guidance 3)."""
    from kosmos_g import GenerationConfig

    path = tmp_path_factory.mktemp("configured") / "kosmos-g"
    shutil.copytree(tiny_kosmos_dir, path)
    GenerationConfig(num_inference_steps=2, guidance_scale=3.0, scheduler="ddim").save_pretrained(path)
    return path


def test_model_folder_sets_the_defaults_and_the_python_pipeline_agrees(configured_kosmos_dir, tiny_sd_dir,
                                                                       tmp_path, capsys):
    from kosmos_g import KosmosGPipeline

    out = tmp_path / "out"
    rc, _, _ = _run(["generate", "<i> on grass", "-i", DOG, "--model", str(configured_kosmos_dir), "--sd",
                     str(tiny_sd_dir), "--seed", "5", "--device", "cpu", "-q", "--output-dir", str(out)], capsys)
    assert rc == 0
    [png] = out.glob("*.png")
    settings = json.loads(png.with_suffix(".json").read_text())["settings"]
    assert (settings["steps"], settings["guidance"], settings["scheduler"]) == (2, 3.0, "ddim")  # the values used

    pipe = KosmosGPipeline.from_pretrained(configured_kosmos_dir, tiny_sd_dir, dtype="fp32", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("<i> on grass", prompt_images=[DOG], generator=torch.Generator("cpu").manual_seed(5)).images[0]
    np.testing.assert_array_equal(np.asarray(image), _pixels(png))


def test_shipped_model_folder_and_the_default_model_give_the_same_image(tmp_path, capsys):
    from kosmos_g import micro

    star = micro.CHECKPOINTS / "examples" / "purple-dotted-star.png"
    argv = ["generate", "a large <i> on the left, on a green background", "-i", str(star), "--seed", "1",
            "--device", "cpu", "-q"]
    assert _run([*argv, "-o", str(tmp_path / "default")], capsys)[0] == 0
    assert _run([*argv, "--model", str(micro.CHECKPOINTS / "kosmos-g"), "-o", str(tmp_path / "given")],
                capsys)[0] == 0
    [default], [given] = (list((tmp_path / d).glob("*.png")) for d in ("default", "given"))
    assert default.read_bytes() == given.read_bytes()
    for png in (default, given):
        settings = json.loads(png.with_suffix(".json").read_text())["settings"]
        assert (settings["steps"], settings["guidance"], settings["scheduler"]) == (14, 3.0, "dpm++")


def test_random_tiny_runs_without_checkpoints_and_says_so(tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = _run(["generate", "<i> wearing <i>", "-i", DOG, "-i", HAT, "--random-tiny", "--steps", "2",
                       "-q", "-o", str(out)], capsys)
    assert rc == 0 and "RANDOM" in err and "noise" in err
    assert len(list(out.glob("*.png"))) == 1
    cache = Path(os.environ["KOSMOS_G_CACHE"]) / "random-tiny-v1"
    stamp = (cache / "kosmos-g" / "model.safetensors").stat().st_mtime_ns
    assert _run(["generate", "a dog", "--random-tiny", "--steps", "1", "-q", "-o", str(out)], capsys)[0] == 0
    assert (cache / "kosmos-g" / "model.safetensors").stat().st_mtime_ns == stamp  # built once
    assert len(list(out.glob("*.png"))) == 2


def _bad_cases(tmp_path: Path, tiny_args: list[str]) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "sd-no-unet" / "vae").mkdir(parents=True)
    model = tiny_args[1]
    return {
        "missing image": (["<i> on grass", "-i", str(tmp_path / "nope.png"), *tiny_args], "image not found"),
        "sd without unet": (["a dog", "--model", model, "--sd", str(tmp_path / "sd-no-unet")], "has no unet/"),
        "placeholder count": (["<i> wearing <i>", "-i", DOG, *tiny_args], "2 '<i>' placeholder(s) but 1 image"),
        "no model": (["a dog"], "--random-tiny"),
        "bad size": (["a dog", "--size", "30", *tiny_args], "multiples of 8"),
        "control count": (["a dog", "--controlnet", str(tmp_path), *tiny_args], "one control image per"),
        "bad scheduler": (["a dog", "--scheduler", "nope", *tiny_args], "Unknown scheduler"),
        "missing sidecar": (["--from-json", str(tmp_path / "x.json")], "sidecar not found"),
        "mask without init": (["a dog", "--mask", DOG, *tiny_args], "--mask needs --init-image"),
        "missing lora": (["a dog", "--lora", str(tmp_path / "l.safetensors:0.5"), *tiny_args],
                         "LoRA file not found"),
    }


@pytest.mark.parametrize("case", ["missing image", "sd without unet", "placeholder count", "no model",
                                  "bad size", "control count", "bad scheduler", "missing sidecar",
                                  "mask without init", "missing lora"])
def test_bad_inputs_exit_nonzero_with_one_line(case, tiny_args, tmp_path, capsys, monkeypatch):
    import kosmos_g.commands.generate as gen

    monkeypatch.setattr(gen, "DEFAULT_MODEL", tmp_path / "no-micro" / "kosmos-g")
    monkeypatch.setattr(gen, "DEFAULT_SD", tmp_path / "no-micro" / "sd")
    argv, expected = _bad_cases(tmp_path, tiny_args)[case]
    rc, _, err = _run(["generate", *argv], capsys)
    assert rc != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("kosmos-g generate: error: ") and expected in lines[0]
    assert "Traceback" not in err


def test_subprocess_error_has_no_traceback(tmp_path):
    env = {**os.environ, "KOSMOS_G_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("KOSMOS_G_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "kosmos_g.cli", "generate", "<i> on grass", "-i",
                           str(tmp_path / "missing.png"), "--random-tiny"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [f"kosmos-g generate: error: image not found: {tmp_path / 'missing.png'}"]
    assert "Traceback" not in proc.stderr


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--model", "--sd", "--random-tiny", "--controlnet", "--control-image", "--lora", "--from-json",
                 "--grid", "--size", "--scheduler", "--negative", "--dtype", "--device", "-o DIR, --output-dir DIR"]:
        assert flag in text
    words = " ".join(text.split())  # whatever width argparse wrapped to
    assert "output folder (default: outputs/)" in words and "the model folder's generation_config.json" in words


def test_help_imports_no_heavy_library():
    """`kosmos-g --help` builds every subcommand's parser without torch, diffusers or transformers."""
    code = ("import sys; from kosmos_g.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
