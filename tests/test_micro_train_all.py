"""`kosmos-g micro train-all --smoke`, the packaged micro recipes, the pixel-space paths they need,
and micro DreamBench's pieces."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

from kosmos_g.cli import main as cli_main
from kosmos_g.kernels import resolve_precision
from kosmos_g.micro import CHECKPOINTS
from kosmos_g.micro import evaluate as E
from kosmos_g.micro import world
from kosmos_g.micro.world import ObjectSpec, Scene


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro") / "run"
    torch.set_num_threads(1)
    assert cli_main(["micro", "train-all", "-o", str(out), "--smoke", "--no-progress"]) == 0
    return out


def test_train_all_smoke_runs_every_step_and_resumes(smoke_run):
    from safetensors import safe_open

    from kosmos_g.generation_config import GenerationConfig

    record = json.loads((smoke_run / "train_all.json").read_text())
    if (os.cpu_count() or 1) >= 2:  # micro-SD trained in a child process beside stages 1-2
        assert record["micro_sd_parallel_with_stages_1_2"] is True
        # stages 1-2 on one thread beside it, stage 3 as 2 data-parallel processes (accelerate launch)
        assert record["stage_processes"] == {"stage1": 1, "stage2": 1, "stage3": 2}
        assert (smoke_run / "stage3.yaml").is_file()  # the recipe the launched processes read
    assert set(record["seconds"]) == {"tokenizer", "micro-clip", "micro-sd", "shards", "stage1", "stage2", "stage3",
                                      "release"}
    stage1 = yaml.safe_load((smoke_run / "stage1" / "recipe.yaml").read_text())
    assert stage1["model"]["vision_init"] == str(smoke_run / "clip" / "vision")
    # micro-SD is two runs, the second continuing from the U-Net of the first
    runs = [json.loads((smoke_run / name / "train_log.json").read_text())["recipe"] for name in ("sd-phase1", "sd")]
    assert [(r["steps"], r["seed"], r["resumed_from"]) for r in runs] == [
        (3, 0, None), (2, 1, str(smoke_run / "sd-phase1" / "unet"))]
    assert (runs[1]["lr"], runs[1]["warmup"]) == (5e-4, 50)
    # each run shares the cores with stages 1-2 while they run, and takes them all after
    assert {r["threads"] for r in runs} <= {1, min(2, os.cpu_count() or 1)}
    assert {r["precision"] for r in runs} == {resolve_precision("auto")}
    assert yaml.safe_load((smoke_run / "stage3" / "recipe.yaml").read_text())["stage3"]["unet_precision"] == "auto"
    for stage in ("stage1", "stage2", "stage3"):
        summary = json.loads((smoke_run / stage / "final" / "config.json").read_text())
        assert summary["aligner"]["output_dim"] == 64  # micro-CLIP's text width
        assert summary["resampler"]["local_queries"] is True
    release = smoke_run / "release"
    assert {p.name for p in release.iterdir()} == {"kosmos-g", "kosmos-g-stage2", "sd", "clip", "examples"}
    for name in ("kosmos-g", "kosmos-g-stage2"):  # each model carries its sampling defaults
        assert GenerationConfig.from_pretrained(release / name) == GenerationConfig.from_pretrained(
            CHECKPOINTS / name) == GenerationConfig(num_inference_steps=14, guidance_scale=3.0, scheduler="dpm++")
    weights = release / "kosmos-g" / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    # a second run finds every step done and retrains nothing
    stamp = weights.stat().st_mtime_ns
    assert cli_main(["micro", "train-all", "--output-dir", str(smoke_run), "--smoke", "--no-progress"]) == 0
    assert weights.stat().st_mtime_ns == stamp


def test_train_all_on_given_standins_trains_only_stages_1_to_3(smoke_run, tmp_path):
    """--standins: the release folder's micro-CLIP and micro-SD are copied (float32, training
    layouts), never retrained; stage 3 and the release use them; other stand-ins are refused."""
    from safetensors.torch import load_file
    from transformers import CLIPModel, CLIPVisionModel

    from kosmos_g.micro.sd import load_micro_sd

    out = tmp_path / "run"
    out.mkdir()
    for name in ("tokenizer", "shards", "stage1", "stage2"):  # the smoke run's; only stage 3 and the release run
        (out / name).symlink_to(smoke_run / name)
    assert cli_main(["micro", "train-all", "-o", str(out), "--smoke", "--no-progress", "--standins", "shipped"]) == 0
    record = json.loads((out / "train_all.json").read_text())
    assert record["standins"] == str(CHECKPOINTS.resolve())
    assert record["seconds"]["micro-clip"] == 0.0 and record["seconds"]["micro-sd"] == 0.0
    assert not (out / "sd-phase1").exists()
    clip = CLIPModel.from_pretrained(CHECKPOINTS / "clip")
    vision = CLIPVisionModel.from_pretrained(out / "clip" / "vision")
    assert vision.dtype == torch.float32
    theirs, ours = clip.vision_model.state_dict(), getattr(vision, "vision_model", vision).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(v, theirs[k].float()) for k, v in ours.items())
    sd = load_micro_sd(out / "sd")
    assert yaml.safe_load((out / "stage3" / "recipe.yaml").read_text())["stage3"]["sd_path"] == str(out / "sd")
    released = load_file(str(out / "release" / "sd" / "unet" / "diffusion_pytorch_model.safetensors"))
    ours = sd.unet.state_dict()
    assert all(torch.equal(t, ours[k].half()) for k, t in released.items())  # the shipped U-Net, round trip exact
    before = (out / "train_all.json").read_bytes()
    assert cli_main(["micro", "train-all", "-o", str(out), "--smoke", "--no-progress",
                     "--standins", str(smoke_run / "release")]) == 2
    assert cli_main(["micro", "train-all", "-o", str(smoke_run), "--smoke", "--no-progress",
                     "--standins", "shipped"]) == 2  # micro-CLIP and micro-SD were trained there
    assert (out / "train_all.json").read_bytes() == before
    assert cli_main(["micro", "train-all", "-o", str(tmp_path / "new"), "--smoke", "--no-progress",
                     "--standins", str(tmp_path)]) == 2  # not a release folder
    assert not (tmp_path / "new" / "clip").exists()


class _Event:
    def __init__(self, after: int) -> None:
        self.calls, self.after = 0, after

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls > self.after


def test_micro_sd_runs_take_every_thread_once_stages_1_2_are_done(smoke_run, tmp_path):
    """train-all's micro-SD child: one thread until the event says stages 1-2 are done, then all."""
    from kosmos_g.micro.train_all import SMOKE, _train_sd_process

    n = torch.get_num_threads()
    out = tmp_path / "run"
    out.mkdir()
    (out / "clip").symlink_to(smoke_run / "clip")
    try:
        event = _Event(after=3)  # set from the 4th step on: the second run's first (the first run has 3)
        _train_sd_process(str(out), SMOKE.sd, "fp32", False, 2, event)
    finally:
        torch.set_num_threads(n)
    runs = [json.loads((out / name / "train_log.json").read_text())["recipe"] for name in ("sd-phase1", "sd")]
    assert [r["threads"] for r in runs] == [1, 2]
    assert event.calls == 5  # asked before every step (3 + 2), never after


def test_every_micro_sd_run_keeps_the_layout_the_first_one_built(smoke_run, tmp_path):
    """The recipe's U-Net sizes build the first run's U-Net; the continuation trains that U-Net
    on, and every run's log records the layout it really has."""
    from kosmos_g.micro.sd import SMOKE_UNET, train_micro_sd
    from kosmos_g.micro.train_all import SMOKE

    eight = replace(SMOKE.sd, sizes=replace(SMOKE_UNET, attention_head_dim=8))
    train_micro_sd(tmp_path / "sd", smoke_run / "clip", eight, progress=False)
    for name in ("sd-phase1", "sd"):
        unet = json.loads((tmp_path / name / "unet" / "config.json").read_text())
        logged = json.loads((tmp_path / name / "train_log.json").read_text())["recipe"]["sizes"]
        assert unet["attention_head_dim"] == logged["attention_head_dim"] == 8, name
    default = json.loads((smoke_run / "sd" / "unet" / "config.json").read_text())
    assert default["attention_head_dim"] == SMOKE.sd.sizes.attention_head_dim


def test_train_all_refuses_to_resume_a_folder_under_another_recipe(smoke_run, capsys):
    """A folder trained with micro-CLIP's binding loss is not silently finished without it:
    the finished steps would be mixed into a run of another recipe."""
    from kosmos_g.micro.sd import SDRun
    from kosmos_g.micro.train_all import SMOKE, train_all

    record = (smoke_run / "train_all.json").read_bytes()
    assert cli_main(["micro", "train-all", "-o", str(smoke_run), "--smoke", "--no-progress",
                     "--clip-bind-weight", "0"]) == 2
    assert "differing: ['recipe.clip.bind_weight']" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"differing: \['recipe.sd.runs'\]"):
        train_all(smoke_run, replace(SMOKE, sd=replace(SMOKE.sd, runs=(SDRun(1),))), progress=False)
    assert cli_main(["micro", "train-all", "-o", str(smoke_run), "--smoke", "--no-progress",
                     "--unet-precision", "fp32"]) == 2  # the smoke run was started with "auto"
    assert "differing: ['unet_precision']" in capsys.readouterr().err
    assert (smoke_run / "train_all.json").read_bytes() == record
    assert cli_main(["micro", "train-all", "-o", str(smoke_run / "never"), "--smoke", "--clip-bind-weight", "-1"]) == 2
    assert "--clip-bind-weight -1.0 must be >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"precision='fp16' is unknown; use one of \['fp32', 'bf16', 'auto'\]"):
        train_all(smoke_run / "never", SMOKE, unet_precision="fp16")
    assert not (smoke_run / "never").exists()


SHIPPED_TRAINING = {
    "stage1": {"model.preset": "micro", "model.config": {"resampler.local_queries": True},
               "stage1.cell_label_weight": 4.0, "stage1.cell_classes": {"shape": 8, "color": 8, "pattern": 4},
               "stage1.cells": 9, "train.max_steps": 3600, "data.batch_size": 32, "optim.lr": 1e-3},
    "stage2": {"stage2.max_clip_tokens": 38, "stage2.max_mllm_tokens": 64, "train.max_steps": 5000,
               "data.batch_size": 64, "optim.lr": 1e-3},
    "stage3": {"stage3.resolution": 32, "stage3.entity_replace_prob": 0.9, "stage3.caption_drop": 0.9,
               "stage3.foreground_weight": 5.0, "stage3.text_align_weight": 1.0, "stage3.unet_precision": "auto",
               "train.max_steps": 4000, "data.batch_size": 32, "optim.lr": 5e-4},
}
"""Every option, beyond each stage's defaults, that the shipped micro Kosmos-G was trained with."""


def test_the_packaged_micro_recipes_train_the_shipped_model_through_the_cli(smoke_run, tmp_path):
    """``kosmos-g train stageN --config micro-stageN`` with only the paths (and, to be quick, the
    length) changed: the recipes hold every option the shipped model was trained with, and the
    three stages on the shipped stand-ins build a model of exactly the shipped architecture."""
    from kosmos_g.micro.train_all import SHARD_SETS, copy_standins

    copy_standins(CHECKPOINTS, tmp_path)  # the shipped micro-CLIP and micro-SD, float32
    quick = ["train.max_steps=2", "optim.warmup_steps=1", "checkpoint.every=2", "data.batch_size=4",
             "log.progress=false"]
    paths = {"stage1": [f"model.tokenizer={CHECKPOINTS / 'kosmos-g' / 'tokenizer'}",
                        f"model.vision_init={tmp_path / 'clip' / 'vision'}"],
             "stage2": [f"model.init={tmp_path / 'stage1' / 'final'}", f"stage2.clip_path={tmp_path / 'clip'}"],
             "stage3": [f"model.init={tmp_path / 'stage2' / 'final'}", f"stage3.sd_path={tmp_path / 'sd'}"]}
    for stage, expected in SHIPPED_TRAINING.items():
        packaged = yaml.safe_load(cli_recipe(stage))
        names = [source["name"] for source in packaged["data"]["sources"]]
        shards = [f"data.sources.{names.index(spec.source)}.shards={smoke_run / 'shards' / folder}"
                  for folder, spec in SHARD_SETS.items() if spec.stage == stage]
        for key, value in expected.items():
            section, _, name = key.partition(".")
            assert packaged[section][name] == value, (stage, key)
        assert cli_main(["train", stage, "--config", f"micro-{stage}", "-o", str(tmp_path / stage),
                         *paths[stage], *shards, *quick]) == 0
    ours = json.loads((tmp_path / "stage3" / "final" / "config.json").read_text())
    assert ours == json.loads((CHECKPOINTS / "kosmos-g" / "config.json").read_text())


def cli_recipe(stage: str) -> str:
    """The packaged recipe as ``kosmos-g train STAGE --config micro-STAGE --print-config`` prints it."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert cli_main(["train", stage, "--config", f"micro-{stage}", "--print-config"]) == 0
    return buffer.getvalue()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto", None])
def test_every_unet_precision_reaches_a_valid_stage3_recipe(smoke_run, precision):
    """``--unet-precision`` (each of kernels.PRECISIONS) becomes ``stage3.unet_precision`` in a
    recipe stage 3 accepts; without it the packaged recipe's own value stays."""
    from kosmos_g.micro.train_all import SMOKE, stage_recipe

    recipe = stage_recipe("stage3", smoke_run, SMOKE, unet_precision=precision, progress=False)
    assert recipe.stage3.unet_precision == (precision or "auto")
    assert recipe.train.max_steps == 2 and recipe.stage3.sd_path == str(smoke_run / "sd")


def test_stage3_pixel_space_matches_the_shard_targets(smoke_run):
    """Stage 3 on micro-SD (no vae/) trains on the target pixels themselves, in [-1, 1]."""
    from accelerate import Accelerator

    from kosmos_g.train.recipe import load_recipe
    from kosmos_g.train.stage3 import Stage3, draw_pixel_noise

    x = torch.rand(2, 3, 8, 8) * 2 - 1
    same, noise = draw_pixel_noise(x, [1, 2])
    assert same is x and noise.shape == x.shape
    assert torch.equal(noise[0], torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(1)))
    overrides = [f"stage3.sd_path={smoke_run / 'sd'}", f"model.init={smoke_run / 'stage2' / 'final'}",
                 f"stage3.latent_cache={smoke_run / 'cache'}",
                 *[f"data.sources.{i}.shards={smoke_run / 'shards' / n}"
                   for i, n in enumerate(("stage3-caption", "stage3-edit", "stage3-compositional"))]]
    recipe = load_recipe("micro-stage3", overrides)
    with pytest.raises(ValueError, match="pixel-space model"):
        Stage3(recipe, Accelerator(cpu=True))


def test_pixel_space_pipeline_generates_and_refuses_img2img(smoke_run):
    from kosmos_g.pipeline import KosmosGPipeline

    release = smoke_run / "release"
    pipe = KosmosGPipeline.from_pretrained(release / "kosmos-g", release / "sd", dtype=torch.float32)
    assert pipe.vae is None
    pipe.set_progress_bar_config(disable=True)
    image = world.subject_image(ObjectSpec("star", "red", "dotted", "large", "left"))
    kw = dict(prompt_images=[image], num_inference_steps=2, guidance_scale=2.0)
    raw = pipe("a large <i> on the left", output_type="latent", generator=torch.Generator().manual_seed(0), **kw)
    pt = pipe("a large <i> on the left", output_type="pt", generator=torch.Generator().manual_seed(0), **kw)
    assert raw.images.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pt.images, ((raw.images.float() + 1) / 2).clamp(0, 1))
    pil = pipe("a large <i> on the left", generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert pil.size == (32, 32)
    with pytest.raises(ValueError, match="pixel space"):
        pipe("a large <i>", image=image, **kw)


def test_world_targets_render_natively_without_changing_the_sample():
    a = world.compositional_sample(np.random.default_rng(5))
    b = world.compositional_sample(np.random.default_rng(5), target_size=32)
    assert a["json"] == b["json"] and b["tgt.png"].shape == (32, 32, 3) and a["e0_white.png"].shape == (64, 64, 3)
    c = world.edit_sample(np.random.default_rng(6), target_size=32)
    assert c["src.png"].shape == (64, 64, 3) and c["tgt.png"].shape == (32, 32, 3)


# ---------------------------------------------------------------------------- micro DreamBench


def test_dreambench_prompts_show_held_out_subjects_and_never_name_them():
    names = set(world.SHAPES) | set(world.COLORS) | set(world.PATTERNS)
    cases = E.single_cases(2) + E.two_cases(8)
    assert len(cases) == 32 + 8
    for case in cases:
        assert case.prompt.count("<i>") == len(case.images) == len(case.target.objects)
        words = case.prompt.replace(",", " ").replace(f"{case.target.background} background", "").split()
        assert not names & set(words), case.prompt  # only the background may share a colour's name
        assert all(o.subject in world.held_out_subjects() for o in case.target.objects)
    assert {c.target.objects[0].subject for c in E.single_cases(1)} == set(world.held_out_subjects())


def _read(scene: Scene) -> Scene:
    """What the shipped attribute reader sees in the render of ``scene``."""
    from kosmos_g.micro.reader import load_reader, read_scenes

    return read_scenes(load_reader(), world.render(scene, 32).image[None])[0]


def test_scores_are_perfect_on_real_renders_and_fail_on_wrong_ones():
    for case in E.single_cases(1)[:4] + E.two_cases(2):
        right = E.score_scene(case, _read(case.target))
        assert right["subject"] == right["context"] == 1.0
        obj = case.target.objects[0]
        other = next(c for c in world.COLORS if c != obj.color)
        wrong = Scene(case.target.background, (ObjectSpec(obj.shape, other, obj.pattern, obj.size, obj.position),
                                               *case.target.objects[1:]))
        scored = E.score_scene(case, _read(wrong))
        assert scored["color"] < 1.0 and scored["subject"] < 1.0 and scored["shape"] == 1.0


def test_edit_scores_check_the_instruction_and_break_down_by_kind():
    cases = E.edit_cases(12)
    right = [E.score_scene(case, _read(case.target)) for case in cases]
    unchanged = [E.score_scene(case, _read(case.source)) for case in cases]
    assert all(r["edit"] == r["edit_kept"] == 1.0 for r in right)
    assert all(u["edit"] == 0.0 and u["edit_kept"] == 1.0 for u in unchanged)
    for case, u in zip(cases, unchanged):  # the part that fails names what was not done
        kind = world.edit_kind(case.source, case.target)
        assert u["edit_background"] == float(kind != "background")
        assert u["edit_new"] == float(kind in ("background", "remove"))
        assert u["edit_gone"] == float(kind in ("background", "add"))
    by_kind = E.edits_by_kind(cases, right[:6] + unchanged[6:])
    assert sum(k["n"] for k in by_kind.values()) == 12 and list(by_kind) == [k for k in world.EDIT_KINDS if k in by_kind]
    for kind, row in by_kind.items():
        ids = [i for i, c in enumerate(cases) if world.edit_kind(c.source, c.target) == kind]
        assert row["edit"] == pytest.approx(sum(i < 6 for i in ids) / len(ids))


def test_eval_quick_on_the_smoke_release_writes_table_and_grid(smoke_run, tmp_path):
    result = E.evaluate(smoke_run / "release", out_dir=tmp_path, quick=True, num_inference_steps=2,
                        rows=["Kosmos-G", "real renders (oracle)"])
    oracle = result["rows"]["real renders (oracle)"]
    assert oracle["subject"] == oracle["context"] == oracle["edit"] == 1.0
    assert set(result["rows"]["Kosmos-G"]) >= {"subject", "two", "edit", "clip_i", "clip_t", "dino"}
    assert (tmp_path / "grid.png").is_file() and "| Kosmos-G |" in (tmp_path / "table.md").read_text()
    by_kind = result["rows"]["Kosmos-G"]["edit_by_kind"]
    assert sum(k["n"] for k in by_kind.values()) == result["settings"]["cases"]["edit"]
    assert "| edits followed |" in (tmp_path / "table.md").read_text()
    with pytest.raises(FileNotFoundError, match="release folder"):
        E.evaluate(tmp_path / "nowhere", quick=True)


def test_micro_commands_refuse_an_unusable_output_folder_before_any_work(tmp_path, capsys, monkeypatch):
    """A file in the way of -o is one line and exit 2, before any model is loaded or trained."""
    import kosmos_g.micro.evaluate as evaluate
    import kosmos_g.micro.train_all as train_all

    def never(*args, **kwargs):
        raise AssertionError("the work started")

    monkeypatch.setattr(evaluate, "evaluate", never)
    monkeypatch.setattr(train_all, "train_all", never)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv in (["micro", "eval", "--quick", "-o", str(blocker / "ev")],
                 ["micro", "train-all", "--smoke", "-o", str(blocker)],
                 ["micro", "train-reader", "-o", str(blocker / "r")]):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(blocker) in err[0] and "is a file" in err[0], err


def test_micro_eval_command_prints_the_table_and_writes_files(smoke_run, tmp_path, capsys):
    code = cli_main(["micro", "eval", "--models", str(smoke_run / "release"), "--quick", "--steps", "1",
                     "-o", str(tmp_path / "ev")])
    assert code == 0
    out = capsys.readouterr().out
    for row in ("| Kosmos-G |", "| Kosmos-G, stage 2 only |", "| micro-SD, context words only |",
                "| real renders (oracle) |"):
        assert row in out
    table = json.loads((tmp_path / "ev" / "table.json").read_text())
    assert table["settings"]["cases"] == {"single": 16, "two": 8, "edit": 16}
    assert (tmp_path / "ev" / "grid.png").is_file()
