"""Tests for micro-SD, the micro world's stand-in for Stable Diffusion (CPU, seconds)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from kosmos_g.micro import sd as S
from kosmos_g.micro.clip import SMOKE_CLIP_RECIPE, train_micro_clip

PROMPT = "a large red solid star in the center, on a gray background"
ONE_RUN = replace(S.SMOKE_SD_RECIPE, runs=(S.SDRun(4, warmup=1),))
"""A smoke micro-SD of one 4-step run."""


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return train_micro_clip(tmp_path_factory.mktemp("clip") / "clip", SMOKE_CLIP_RECIPE, progress=False)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory, clip_dir):
    return S.train_micro_sd(tmp_path_factory.mktemp("sd") / "sd", clip_dir, ONE_RUN, progress=False)


def test_micro_sd_loss_falls_when_overfitting_a_fixed_batch(clip_dir):
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer")
    text = CLIPTextModel.from_pretrained(clip_dir / "text_encoder")
    unet = S.micro_unet(S.SMOKE_UNET, cross_attention_dim=text.config.hidden_size)
    scenes, images, _ = S._scenes_and_images(np.random.default_rng(0), 4, S.SD_SIZE)
    with torch.no_grad():
        cond = S.encode_captions(text, tok, [s.caption() for s in scenes])
    x0 = S.images_to_sd_pixels(images)
    sched = DDPMScheduler(**S.NOISE_SCHEDULE, prediction_type="v_prediction")
    noise, t = torch.randn_like(x0), torch.tensor([100, 300, 500, 700])
    target = sched.get_velocity(x0, noise, t)
    noisy = sched.add_noise(x0, noise, t)
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.mse_loss(unet(noisy, t, cond).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]


def test_micro_sd_folder_loads_and_generates(sd_dir):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    assert sorted(p.name for p in sd_dir.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "train_log.json", "unet"]
    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet")
    sched = DPMSolverMultistepScheduler.from_pretrained(sd_dir / "scheduler")
    assert sched.config.lambda_min_clipped == -5.1 and sched.config.prediction_type == "v_prediction"
    assert unet.config.sample_size == S.SD_SIZE and unet.config.in_channels == 3
    images = S.generate_micro_sd(sd_dir, [PROMPT, ""], num_inference_steps=3, seeds=[5, 6])
    assert images.shape == (2, S.SD_SIZE, S.SD_SIZE, 3) and images.dtype == np.uint8
    again = S.generate_micro_sd(sd_dir, [PROMPT, ""], num_inference_steps=3, seeds=[5, 6])
    assert np.array_equal(images, again)
    alone = S.generate_micro_sd(sd_dir, [""], num_inference_steps=3, seeds=[6])
    assert np.array_equal(alone[0], images[1])  # each image from its own seed, whatever the batch
    with pytest.raises(ValueError, match="1 seeds for 2 captions"):
        S.generate_micro_sd(sd_dir, [PROMPT, ""], seeds=[1])
    # diffusers' own pipeline reads the folder too (vae=None: the samples are pixels)
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, vae=None, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    side = S.SD_SIZE * pipe.vae_scale_factor
    out = pipe(["a red star"], height=side, width=side, num_inference_steps=2, output_type="latent").images
    assert out.shape == (1, 3, S.SD_SIZE, S.SD_SIZE)


def test_resaved_micro_sd_keeps_no_local_path(tmp_path, sd_dir):
    # a folder loaded from disk and saved again (as release() does) must not carry the
    # local path it was loaded from into the shipped config
    loaded = S.load_micro_sd(sd_dir)
    assert str(loaded.unet.config._name_or_path) == str(sd_dir / "unet")
    S.save_micro_sd(tmp_path / "copy", unet=loaded.unet, text_encoder=loaded.text_encoder,
                    tokenizer=loaded.tokenizer, scheduler=loaded.scheduler)
    config = json.loads((tmp_path / "copy" / "unet" / "config.json").read_text())
    assert "_name_or_path" not in config and config["sample_size"] == S.SD_SIZE
    again = S.load_micro_sd(tmp_path / "copy")
    assert again.unet.config.sample_size == loaded.unet.config.sample_size


def test_train_micro_sd_rejects_bad_arguments(tmp_path, clip_dir):
    with pytest.raises(ValueError, match="prediction_type"):
        replace(ONE_RUN, prediction_type="x0")
    with pytest.raises(ValueError, match="runs is empty"):
        replace(ONE_RUN, runs=())
    with pytest.raises(ValueError, match="steps must be >= 1"):
        S.SDRun(0)
    with pytest.raises(FileNotFoundError, match="micro-CLIP"):
        S.train_micro_sd(tmp_path / "sd", tmp_path / "missing", ONE_RUN, progress=False)
    with pytest.raises(ValueError, match=r"precision='fp8' is unknown; use one of \['fp32', 'bf16', 'auto'\]"):
        S.train_micro_sd(tmp_path / "sd", clip_dir, ONE_RUN, precision="fp8", progress=False)
    assert not (tmp_path / "sd").exists()


@pytest.fixture
def unet_feed(monkeypatch):
    """``(clean, fed)``: lists that micro-SD's training fills, per step, with ``(captions, their
    text states)`` from ``encode_captions`` and with the condition the training U-Net is fed."""
    from diffusers import UNet2DConditionModel

    clean, fed = [], []
    encode, forward = S.encode_captions, UNet2DConditionModel.forward

    def spy_encode(text_encoder, tokenizer, captions):
        states = encode(text_encoder, tokenizer, captions)
        clean.append((list(captions), states))
        return states

    def spy_forward(self, sample, timestep, cond, *args, **kwargs):
        if self.training:
            fed.append(cond.detach().clone())
        return forward(self, sample, timestep, cond, *args, **kwargs)

    monkeypatch.setattr(S, "encode_captions", spy_encode)
    monkeypatch.setattr(UNet2DConditionModel, "forward", spy_forward)
    return clean, fed


def test_micro_sd_feeds_the_unet_exactly_its_captions_states(tmp_path, clip_dir, unet_feed):
    """The training U-Net's condition is the frozen text encoder's states of each sample's
    caption, unchanged, and the empty prompt's for dropped captions (classifier-free guidance's
    unconditional states)."""
    clean, fed = unet_feed
    S.train_micro_sd(tmp_path / "sd", clip_dir, replace(ONE_RUN, caption_dropout=0.5), progress=False)
    assert len(clean) == len(fed) == 4
    kinds = [bool(c) for captions, _ in clean for c in captions]
    assert any(kinds) and not all(kinds)  # both kinds were seen
    assert all(torch.equal(states, conds) for (_, states), conds in zip(clean, fed))


def test_bf16_micro_sd_runs_the_unet_in_bf16_and_keeps_fp32_weights(tmp_path, clip_dir, sd_dir, monkeypatch):
    from diffusers import UNet2DConditionModel

    seen = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, *args, **kwargs):
        out = forward(self, sample, *args, **kwargs)
        seen.append((self.training, (out[0] if isinstance(out, tuple) else out.sample).dtype))
        return out

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    bf16 = S.train_micro_sd(tmp_path / "sd", clip_dir, ONE_RUN, progress=False, precision="bf16")
    assert seen and all(dtype == torch.bfloat16 for training, dtype in seen if training)
    recipe = json.loads((bf16 / "train_log.json").read_text())["recipe"]
    assert recipe["precision"] == "bf16"
    a, b = (UNet2DConditionModel.from_pretrained(d / "unet") for d in (bf16, sd_dir))
    assert a.dtype == torch.float32
    diffs = [(p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())]
    assert 0 < max(diffs) < 0.1  # the same recipe, rounded differently
    images = S.generate_micro_sd(bf16, [PROMPT], num_inference_steps=2)
    assert images.shape == (1, S.SD_SIZE, S.SD_SIZE, 3)


def test_interrupted_micro_sd_run_resumes_to_the_same_weights(tmp_path, clip_dir, monkeypatch):
    from safetensors.torch import load_file

    whole = S.train_micro_sd(tmp_path / "whole", clip_dir, ONE_RUN, progress=False)  # 4 steps, no checkpoint
    clip_grad = torch.nn.utils.clip_grad_norm_
    calls = []

    def power_cut_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return clip_grad(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", power_cut_at_step_3)
    every2 = replace(ONE_RUN, checkpoint_every=2)
    with pytest.raises(RuntimeError, match="power cut"):
        S.train_micro_sd(tmp_path / "cut", clip_dir, every2, progress=False)
    monkeypatch.undo()
    partial = tmp_path / ".cut.partial.pt"
    assert partial.is_file() and not (tmp_path / "cut").exists()
    assert torch.load(partial, weights_only=True)["step"] == 2
    with pytest.raises(ValueError, match=r"another recipe \(differing: \['lr'\]\)"):
        S.train_micro_sd(tmp_path / "cut", clip_dir, replace(every2, runs=(S.SDRun(4, 1e-4, 1),)), progress=False)
    cut = S.train_micro_sd(tmp_path / "cut", clip_dir, every2, progress=False)
    assert not partial.exists()
    a, b = (load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads((d / "train_log.json").read_text())["log"] for d in (whole, cut)]
    assert [(r["step"], r["loss"]) for r in logs[0]] == [(r["step"], r["loss"]) for r in logs[1]]


def test_micro_sd_trains_and_draws_at_another_resolution(tmp_path, clip_dir, sd_dir):
    from kosmos_g.micro import evaluate as E

    sd64 = S.train_micro_sd(tmp_path / "sd64", clip_dir, replace(ONE_RUN, resolution=64), progress=False)
    assert E.sd_resolution(sd64) == 64 and E.sd_resolution(sd_dir) == S.SD_SIZE
    assert json.loads((sd64 / "train_log.json").read_text())["recipe"]["resolution"] == 64
    images = S.generate_micro_sd(sd64, [PROMPT], num_inference_steps=2)
    assert images.shape == (1, 64, 64, 3)
    case = E.single_cases(1)[0]
    assert E.oracle([case], [0], size=64).shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="resolution=50 must be >= 16 and divisible by 4"):
        replace(ONE_RUN, resolution=50)
    (tmp_path / "bad-phase1").symlink_to(sd_dir, target_is_directory=True)  # a 32 px first run ...
    with pytest.raises(ValueError, match="trained at 32 px"):  # ... is not continued at 64 px
        S.train_micro_sd(tmp_path / "bad", clip_dir, replace(S.SMOKE_SD_RECIPE, resolution=64), progress=False)


def test_the_recipe_chains_its_runs_each_from_the_last(tmp_path, clip_dir):
    """Every run but the last is kept in ``<sd>-phase<i>``; each later run starts from the one
    before it (its recorded origin), and a finished run is never redone."""
    out = S.train_micro_sd(tmp_path / "sd", clip_dir, S.SMOKE_SD_RECIPE, progress=False)
    assert S.run_folders(out, S.SMOKE_SD_RECIPE) == [tmp_path / "sd-phase1", out]
    first, last = (json.loads((d / "train_log.json").read_text())["recipe"] for d in (tmp_path / "sd-phase1", out))
    assert first["resumed_from"] is None and last["resumed_from"] == str(tmp_path / "sd-phase1" / "unet")
    assert (first["steps"], first["seed"], last["steps"], last["lr"], last["seed"]) == (3, 0, 2, 5e-4, 1)
    stamp = (out / "train_log.json").stat().st_mtime_ns
    S.train_micro_sd(tmp_path / "sd", clip_dir, S.SMOKE_SD_RECIPE, progress=False)
    assert (out / "train_log.json").stat().st_mtime_ns == stamp


def test_shipped_micro_sd_recipe_is_four_heads_of_32_channels():
    from diffusers import UNet2DConditionModel

    from kosmos_g.micro import CHECKPOINTS

    shipped = UNet2DConditionModel.load_config(CHECKPOINTS / "sd" / "unet")
    assert S.MicroSDRecipe().sizes.attention_head_dim == shipped["attention_head_dim"] == 4
    assert tuple(shipped["block_out_channels"]) == S.MicroSDRecipe().sizes.block_out_channels
    assert sum(run.steps for run in S.MicroSDRecipe().runs) == 6500


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(S, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
