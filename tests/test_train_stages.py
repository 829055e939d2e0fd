"""The three training stages on tiny models and tiny shards, through the CLI entry point.

Every run here is a few optimizer steps on CPU: what is checked is the wiring (what
trains, what stays frozen, what the loss reads, exact resumption, the export), not
learning quality.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kosmos_g import KosmosG, KosmosGProcessor
from kosmos_g.cli import main
from kosmos_g.data.shards import ShardWriter, iter_shards, expand_shards
from kosmos_g.train.testing import make_tiny_shards

SOURCES = {"stage1": ("text", "caption", "interleaved"), "stage2": ("caption", "text"),
           "stage3": ("caption", "edit", "compositional")}
STAGES = tuple(SOURCES)


def fresh_process_state() -> None:
    """accelerate keeps per-process singletons; each run here stands for a new process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run fastest on one thread, and 2-core CI machines are often shared.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_kosmos_dir, tiny_sd_dir):
    root = tmp_path_factory.mktemp("train")
    return {"kosmos": tiny_kosmos_dir, "sd": tiny_sd_dir, "root": root,
            "shards": make_tiny_shards(root / "shards", n=12, per_shard=4)}


def cli_args(world, stage: str, out: Path, *extra: str, shards: dict | None = None) -> list[str]:
    args = ["train", stage, "--config", f"tiny-{stage}", f"model.init={world['kosmos']}",
            f"train.output_dir={out}", "log.progress=false"]
    shards = shards or world["shards"]
    args += [f"data.sources.{i}.shards={shards[name]}" for i, name in enumerate(SOURCES[stage])]
    if stage == "stage2":
        args.append(f"stage2.clip_path={world['sd']}")
    if stage == "stage3":
        args.append(f"stage3.sd_path={world['sd']}")
    return args + list(extra)


def run_cli(args: list[str], capsys=None) -> dict:
    fresh_process_state()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(n)
    if capsys is not None:
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return {}


def read_csv(out: Path) -> list[dict[str, str]]:
    with open(out / "logs" / "train.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(world):
    """Each stage, 6 uninterrupted steps (the tiny recipes' length) through the CLI."""
    out = {}
    for stage in STAGES:
        out[stage] = world["root"] / f"full-{stage}"
        run_cli(cli_args(world, stage, out[stage]))
    return out


# ----------------------------------------------------------------------------- what trains

VISION_LAST = ("vision.clip.encoder.layers.1.", "vision.clip.post_layernorm.")
TRAINABLE = {
    "stage1": ("mllm.", "resampler.", *VISION_LAST),
    "stage2": ("aligner.",),
    "stage3": ("mllm.", "resampler.", "aligner.", *VISION_LAST),
}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_only_its_parts_and_exports_a_strict_folder(world, runs, stage):
    out = runs[stage]
    before = load_file(str(Path(world["kosmos"]) / "model.safetensors"))
    after = load_file(str(out / "final" / "model.safetensors"))
    assert set(before) == set(after)
    trained = [k for k in before if k.startswith(TRAINABLE[stage])]
    frozen = [k for k in before if not k.startswith(TRAINABLE[stage])]
    assert trained and frozen
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"{stage} changed frozen weight {k}"
    unchanged = [k for k in trained if torch.equal(before[k], after[k])]
    assert not unchanged, f"{stage} did not update {unchanged}"
    # the export is a normal inference folder
    model = KosmosG.from_pretrained(out / "final")
    processor = KosmosGProcessor.from_pretrained(out / "final")
    batch = processor(["a red hat"])
    assert model.encode(batch["input_ids"], batch["attention_mask"]).shape == (1, 77, 32)
    assert not model.config.aligner.reconstruction
    rows = read_csv(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert (out / "checkpoints" / "step-00000006").is_dir() and (out / "recipe.yaml").is_file()
    leftovers = [p for folder in (out, out / "checkpoints") for p in folder.iterdir() if p.name.startswith(".")]
    assert not leftovers, "temporary folders left behind"


def test_stage2_keeps_reconstruction_apart(runs):
    out = runs["stage2"]
    recon = load_file(str(out / "final-reconstruction" / "aligner_reconstruction.safetensors"))
    assert recon and all(k.startswith("aligner.recon_") for k in recon)
    assert not any(k.startswith("aligner.recon_") for k in load_file(str(out / "final" / "model.safetensors")))
    assert {"mse", "rec"} <= set(read_csv(out)[0])


def test_stage3_logs_a_loss_per_source(runs):
    row = read_csv(runs["stage3"])[0]
    assert {"loss/caption", "loss/edit", "loss/compositional"} <= set(row)


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("stage", STAGES)
def test_stop_and_resume_equals_uninterrupted(world, runs, tmp_path, stage):
    out = tmp_path / stage
    run_cli(cli_args(world, stage, out, "train.stop_after=3", "checkpoint.every=0"))
    assert not (out / "final").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003"]
    run_cli(cli_args(world, stage, out))  # checkpoint.resume=auto
    a = load_file(str(runs[stage] / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    full, resumed = read_csv(runs[stage]), read_csv(out)
    assert [int(r["step"]) for r in resumed] == list(range(1, 7))
    np.testing.assert_allclose([float(r["loss"]) for r in resumed], [float(r["loss"]) for r in full], rtol=1e-6)


def test_fresh_start_refuses_to_overwrite_checkpoints(world, runs, capsys):
    args = cli_args(world, "stage2", runs["stage2"], "checkpoint.resume=null")
    fresh_process_state()
    assert main(args) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


# ----------------------------------------------------------------------------- overfit

@pytest.fixture(scope="module")
def listening_sd(tmp_path_factory, tiny_sd_dir):
    """The tiny SD folder with a smaller U-Net whose cross-attention is amplified 3x.

    A randomly initialised U-Net barely reads its condition (its epsilon loss stays near
    var(noise) whatever the condition), while a trained SD U-Net follows its text
    condition closely. Scaling the cross-attention k/v/out projections gives the frozen
    U-Net that property, so the overfit test measures what stage 3 trains (the encoder
    behind the condition) rather than the limits of random weights.
    """
    from diffusers import UNet2DConditionModel

    path = tmp_path_factory.mktemp("listening-sd")
    shutil.copytree(tiny_sd_dir, path, dirs_exist_ok=True)
    shutil.rmtree(path / "unet")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                for lin in (module.to_k, module.to_v, module.to_out[0]):
                    lin.weight.mul_(3.0)
    unet.save_pretrained(str(path / "unet"))
    return path


OVERFIT = {  # lr, max steps, extra overrides
    "stage1": (3e-3, 60, ()),
    "stage2": (3e-3, 60, ()),
    "stage3": (1e-2, 300, ("data.batch_size=2", "stage3.resolution=16")),  # halves in ~150
}


@pytest.mark.parametrize("stage", STAGES)
def test_loss_halves_on_one_fixed_batch(world, listening_sd, tmp_path, stage):
    from kosmos_g.train import Trainer, load_recipe
    from kosmos_g.train.data import to_device

    lr, max_steps, extra = OVERFIT[stage]
    args = cli_args(world, stage, tmp_path / "run", f"optim.lr={lr}", "optim.warmup_steps=0",
                    "optim.schedule=constant", "optim.clip_grad_norm=null", *extra)
    if stage == "stage3":
        args.append(f"stage3.sd_path={listening_sd}")
    fresh_process_state()
    trainer = Trainer(load_recipe(f"tiny-{stage}", args[4:]), stage)
    trainer.stage.train_mode()
    batch, _ = next(iter(trainer._loader()))
    batch = trainer.stage.prepare_batch(to_device(batch, trainer.accelerator.device))  # noise, t fixed too
    losses = []
    for _ in range(max_steps):
        s, c = trainer.module(batch)["loss"]
        loss = s / c
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        losses.append(loss.item())
        if losses[-1] <= 0.5 * losses[0]:
            break
    assert losses[-1] <= 0.5 * losses[0], f"{stage}: {losses[0]:.4f} -> {min(losses):.4f} in {len(losses)} steps"


# ----------------------------------------------------------------------------- stage 1 loss mask

def test_stage1_loss_reads_text_targets_only(world):
    from kosmos_g.train.stage1 import LMModule, Stage1Builder, lm_target_mask

    model = KosmosG.from_pretrained(world["kosmos"])
    processor = KosmosGProcessor.from_pretrained(world["kosmos"])
    tok = processor.tokenizer
    builder = Stage1Builder(processor, max_length=256, image_first_prob=1.0)
    raws = [next(iter_shards(expand_shards(world["shards"][k]))) for k in ("interleaved", "caption", "text")]
    docs = [builder(raw, np.random.default_rng(0), "s") for raw in raws]
    assert all(d.input_ids[0] == tok.bos_id and d.input_ids[-1] == tok.eos_id for d in docs)
    batch = processor.collate(docs)
    ids, attn, slots = batch["input_ids"], batch["attention_mask"], batch["image_mask"]
    assert slots.any() and (attn == 0).any()
    module = LMModule(model, exclude_ids=(tok.bos_id, tok.boi_id, tok.eoi_id))
    base_sum, base_count = module(batch)["loss"]

    keep = lm_target_mask(ids, attn, slots, (tok.bos_id, tok.boi_id, tok.eoi_id))
    target = ids[:, 1:]
    assert not keep[slots[:, 1:]].any() and not keep[attn[:, 1:] == 0].any()
    assert not keep[(target == tok.boi_id) | (target == tok.eoi_id) | (target == tok.bos_id)].any()
    assert keep[target == tok.eos_id].all()
    assert int(base_count) == int(keep.sum())

    # any id in the image slots: same loss (slot embeddings are overwritten, slot targets ignored)
    scrambled = dict(batch)
    scrambled["input_ids"] = ids.clone()
    gen = torch.Generator().manual_seed(0)
    scrambled["input_ids"][slots] = torch.randint(4, len(tok), (int(slots.sum()),), generator=gen)
    s, c = module(scrambled)["loss"]
    assert torch.equal(s, base_sum) and int(c) == int(base_count)
    # ... while changing a text target does change it
    text_pos = keep.nonzero()[0]
    changed = dict(batch)
    changed["input_ids"] = ids.clone()
    b, t = int(text_pos[0]), int(text_pos[1]) + 1
    changed["input_ids"][b, t] = (ids[b, t] + 1) % len(tok)
    assert not torch.equal(module(changed)["loss"][0], base_sum)


# ----------------------------------------------------------------------------- bad data, filters

def test_training_skips_and_counts_bad_samples(world, tmp_path, capsys):
    dirty = tmp_path / "dirty"
    good = np.zeros((16, 16, 3), np.uint8)
    with ShardWriter(dirty, max_samples=100) as w:
        for i in range(4):
            w.write({"json": {"kind": "caption", "caption": "a red hat"}, "png": good}, key=f"ok{i}")
            w.write({"json": {"kind": "caption", "caption": "x"}, "png": b"not a png"}, key=f"bad-png{i}")
            w.write({"json": b"{", "png": good}, key=f"bad-json{i}")
            w.write({"json": {"kind": "interleaved", "segments": [{"image": 3}]}}, key=f"bad-member{i}")
    summary = run_cli(cli_args(world, "stage1", tmp_path / "run", f"data.sources.1.shards={dirty}",
                               "train.max_steps=3"), capsys)
    assert summary["step"] == 3 and summary["data"]["bad"] > 0
    assert int(read_csv(tmp_path / "run")[-1]["bad_samples"]) == summary["data"]["bad"]


def test_stage3_keeps_a_literal_placeholder_in_captions_as_text(world, tmp_path, capsys):
    """Web captions may hold HTML italics ("<i>"); in training data that is text, not a
    forgotten image placeholder, so such samples train instead of being skipped as bad."""
    italics = tmp_path / "italics"
    image = np.full((64, 64, 3), 200, np.uint8)
    with ShardWriter(italics, max_samples=100) as w:
        for i in range(4):
            w.write({"json": {"kind": "caption", "caption": "the <i>Mona Lisa</i> by a window"}, "png": image},
                    key=f"italics{i}")
    summary = run_cli(cli_args(world, "stage3", tmp_path / "run", f"data.sources.0.shards={italics}",
                               "train.max_steps=2"), capsys)
    assert summary["step"] == 2
    assert summary["data"] == {"bad": 0, "filtered": 0}


def test_stage2_filters_long_captions(world, tmp_path, capsys):
    long_caps = tmp_path / "long"
    with ShardWriter(long_caps, max_samples=100) as w:
        for i in range(6):
            w.write({"json": {"kind": "text", "text": "a photo of a dog " * 8}}, key=f"long{i}")  # > 75 CLIP tokens
            w.write({"json": {"kind": "text", "text": "a red hat"}}, key=f"short{i}")
    summary = run_cli(cli_args(world, "stage2", tmp_path / "run", f"data.sources.1.shards={long_caps}",
                               "train.max_steps=2"), capsys)
    assert summary["data"]["filtered"] > 0 and summary["data"]["bad"] == 0


# ----------------------------------------------------------------------------- stage 3 options

def test_stage3_latent_cache_gives_the_same_training(world, runs, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    run_cli(cli_args(world, "stage3", out, f"stage3.latent_cache={cache}", "stage3.precompute_latents=true"))
    entries = list(cache.glob("*/*.safetensors"))
    assert len(entries) == 3 * 12  # every target of every source, once
    assert json.loads((cache / "meta.json").read_text())["resolution"] == 32
    a = load_file(str(runs["stage3"] / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    with pytest.raises(ValueError, match="was made for"):
        from kosmos_g.train.latents import LatentCache
        LatentCache(cache, {"vae": "other", "resolution": 32, "latent_channels": 4})


def test_gradient_checkpointing_does_not_change_the_losses(world, runs, tmp_path):
    out = tmp_path / "ckpt"
    run_cli(cli_args(world, "stage3", out, "train.gradient_checkpointing=true", "train.stop_after=2"))
    got, want = read_csv(out), read_csv(runs["stage3"])[:2]
    np.testing.assert_allclose([float(r["loss"]) for r in got], [float(r["loss"]) for r in want], rtol=1e-5)


def test_gradient_accumulation_matches_the_big_batch(world, runs, tmp_path):
    """2 micro-batches of 2 == 1 batch of 4 (stage 3's loss is a per-sample mean, padding-free)."""
    out = tmp_path / "accum"
    run_cli(cli_args(world, "stage3", out, "data.batch_size=2", "train.grad_accum=2", "train.stop_after=3"))
    got, want = read_csv(out), read_csv(runs["stage3"])[:3]
    assert [r["samples"] for r in got] == [r["samples"] for r in want]
    np.testing.assert_allclose([float(r["loss"]) for r in got], [float(r["loss"]) for r in want], rtol=1e-5)


def test_v_prediction_and_tensorboard(world, tmp_path):
    out = tmp_path / "v"
    run_cli(cli_args(world, "stage3", out, "stage3.prediction_type=v_prediction", "train.max_steps=2",
                     "log.tensorboard=true", "checkpoint.every=0"))
    assert all(math.isfinite(float(r["loss"])) for r in read_csv(out))
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))


def test_only_complete_checkpoints_count(tmp_path):
    from kosmos_g.train.trainer import STATE_FILE, latest_checkpoint

    root = tmp_path / "checkpoints"
    for name, complete in (("step-00000002", True), ("step-00000004", True), ("step-00000006.tmp", True),
                           (".step-00000007.tmp-x1y2", True), ("step-00000008", False)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / STATE_FILE).write_text("{}")
    assert latest_checkpoint(root) == root / "step-00000004"
    assert latest_checkpoint(tmp_path / "none") is None


# ----------------------------------------------------------------------------- foreground weighting

MASK_STEM = {"caption": "fg", "edit": "tgt_fg", "compositional": "tgt_fg"}


def masked_shards(world, root: Path, mask_of) -> dict[str, Path]:
    """The world's stage-3 shards with a foreground mask member ``mask_of(target_hw)`` added."""
    from kosmos_g.data.shards import decode_image

    out = {}
    for kind in SOURCES["stage3"]:
        out[kind] = root / kind
        with ShardWriter(out[kind], max_samples=4) as writer:
            for raw in iter_shards(expand_shards(world["shards"][kind])):
                sample = {k: v for k, v in raw.items() if not k.startswith("__")}
                target = decode_image(raw, "" if kind == "caption" else "tgt")
                sample[f"{MASK_STEM[kind]}.png"] = mask_of((target.size[1], target.size[0]))
                writer.write(sample, key=raw["__key__"])
    return out


def left_half(hw):
    mask = np.zeros(hw, np.uint8)
    mask[:, : hw[1] // 2] = 255
    return mask


def test_stage3_foreground_weight_reads_masks_only_when_set(world, runs, tmp_path):
    shards = masked_shards(world, tmp_path / "shards", left_half)
    run_cli(cli_args(world, "stage3", tmp_path / "off", "train.stop_after=2", shards=shards))
    want = [float(r["loss"]) for r in read_csv(runs["stage3"])[:2]]  # weight 1.0 (the paper): masks ignored
    assert [float(r["loss"]) for r in read_csv(tmp_path / "off")] == want
    run_cli(cli_args(world, "stage3", tmp_path / "on", "train.stop_after=2", "stage3.foreground_weight=4",
                     shards=shards))
    got = [float(r["loss"]) for r in read_csv(tmp_path / "on")]
    assert all(math.isfinite(x) for x in got) and got[0] != want[0]


def test_foreground_weights_follow_the_target_geometry():
    from PIL import Image

    from kosmos_g.train.stage3 import foreground_weights

    mask = Image.fromarray(left_half((8, 16)))  # 16 wide, 8 high: the center crop keeps columns 4..11
    w = foreground_weights(mask, 8, 1, 5.0)
    assert w.shape == (1, 8, 8) and torch.allclose(w.mean(), torch.tensor(1.0))
    assert torch.allclose(w[0, :, :4], 5 * w[0, :, 4:])  # foreground (left of the crop) weighs 5x
    pooled = foreground_weights(Image.fromarray(left_half((8, 8))[:, ::-1].copy()), 8, 4, 3.0)
    assert pooled.shape == (1, 2, 2) and torch.allclose(pooled[0, :, 1], 3 * pooled[0, :, 0])
    uniform = foreground_weights(Image.fromarray(np.full((8, 8), 255, np.uint8)), 8, 2, 7.0)
    assert torch.equal(uniform, torch.ones(1, 4, 4))


def test_stage3_loss_weight_is_a_per_pixel_weighted_mean(world, tmp_path):
    """Weights 2 on one half and 0 on the other, then the reverse, average to the plain loss;
    a sample without a mask weighs every pixel alike; a mask of the wrong size is refused."""
    from accelerate import Accelerator

    from kosmos_g.data.shards import BadSample, iter_shards as shards_of
    from kosmos_g.train.recipe import load_recipe
    from kosmos_g.train.stage3 import Stage3

    shards = masked_shards(world, tmp_path / "shards", left_half)
    fresh_process_state()
    recipe = load_recipe("tiny-stage3", [f"model.init={world['kosmos']}", f"stage3.sd_path={world['sd']}",
                                         "stage3.foreground_weight=3",
                                         *[f"data.sources.{i}.shards={shards[k]}"
                                           for i, k in enumerate(SOURCES["stage3"])]])
    stage = Stage3(recipe, Accelerator(cpu=True))
    raws = list(shards_of(expand_shards(shards["edit"])))[:3]
    examples = [stage.builder(raw, np.random.default_rng(i), "edit") for i, raw in enumerate(raws)]
    h = recipe.stage3.resolution // stage.vae_factor
    assert examples[0]["loss_weight"].shape == (1, h, h)
    del examples[2]["loss_weight"]  # as if that sample had no mask
    batch = stage.collate(examples)
    assert torch.equal(batch["loss_weight"][2], torch.ones(1, h, h))
    batch = stage.prepare_batch(batch)
    with torch.no_grad():
        def loss(weight):
            return stage.module({**batch, "loss_weight": weight})["loss"][0].item()
        plain = loss(None)
        left = torch.zeros(len(examples), 1, h, h)
        left[..., : h // 2] = 2.0
        a, b = loss(left), loss(2.0 - left)
        assert loss(torch.ones_like(left)) == plain and a != b
        assert abs((a + b) / 2 - plain) <= 1e-5 * plain
    bad = dict(raws[0])
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(buf, format="PNG")
    bad["tgt_fg.png"] = buf.getvalue()
    with pytest.raises(BadSample, match="pixel for pixel"):
        stage.builder(bad, np.random.default_rng(0), "edit")

    class CacheHit:  # a latent-cache hit: the target itself is never decoded
        def get(self, source, key):
            return torch.zeros(8, h, h)

    stage.builder.latent_cache = CacheHit()
    hit = stage.builder(raws[0], np.random.default_rng(0), "edit")
    assert "target" not in hit and torch.equal(hit["loss_weight"], examples[0]["loss_weight"])
    with pytest.raises(BadSample, match="pixel for pixel"):  # checked against the target's header
        stage.builder(bad, np.random.default_rng(0), "edit")


def test_stage3_text_align_adds_the_caption_states_mse_for_samples_with_a_target_caption(world, tmp_path):
    """``text_align_weight`` adds w x MSE(condition, SD text states of the target's caption) for
    compositional samples and edits that carry a ``target_caption`` only; at 0 (the paper)
    nothing is computed and the loss is unchanged."""
    from accelerate import Accelerator

    from kosmos_g.data.shards import iter_shards as shards_of
    from kosmos_g.train.recipe import load_recipe
    from kosmos_g.train.stage2 import load_clip_text
    from kosmos_g.train.stage3 import Stage3

    def stage_with(weight):
        fresh_process_state()
        recipe = load_recipe("tiny-stage3", [f"model.init={world['kosmos']}", f"stage3.sd_path={world['sd']}",
                                             f"stage3.text_align_weight={weight}",
                                             *[f"data.sources.{i}.shards={world['shards'][k]}"
                                               for i, k in enumerate(SOURCES["stage3"])]])
        return Stage3(recipe, Accelerator(cpu=True))

    on, off = stage_with(2.0), stage_with(0.0)
    raws = [(raw, "compositional") for raw in list(shards_of(expand_shards(world["shards"]["compositional"])))[:3]]
    edits = list(shards_of(expand_shards(world["shards"]["edit"])))[:2]
    meta = json.loads(edits[0]["json"])
    meta["target_caption"] = "a large red striped circle on the left, on a green background"
    raws += [({**edits[0], "json": json.dumps(meta).encode()}, "edit"), (edits[1], "edit")]
    examples = [on.builder(raw, np.random.default_rng(i), src) for i, (raw, src) in enumerate(raws)]
    assert ["clip_ids" in ex for ex in examples] == [True, True, True, True, False]
    batch = on.prepare_batch(on.collate(examples))
    assert batch["align_mask"].tolist() == [True, True, True, True, False]
    with torch.no_grad():
        got = on.module(batch)
        plain = off.module({k: v for k, v in batch.items() if k not in ("text_target", "align_mask")})
        encoder, tokenizer = load_clip_text(str(world["sd"]))
        length = on.model.config.aligner.num_queries
        captions = [json.loads(raw["json"])["caption"] for raw, _ in raws[:3]] + [meta["target_caption"]]
        ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
        want_states = encoder(input_ids=ids).last_hidden_state  # (4, L, D)
        cond = on.model.encode(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                               batch["image_mask"])[:4]
    want = (cond - want_states).pow(2).mean(dim=(1, 2)).sum()
    assert got["align"][1].item() == 4 and torch.allclose(got["align"][0], want, rtol=1e-5)
    assert torch.allclose(got["loss"][0], plain["loss"][0] + 2.0 * want, rtol=1e-5)
    assert got["loss/edit"] == plain["loss/edit"]  # per-source metrics stay the denoising loss
    assert "align" not in plain and off.text_encoder is None and "align" not in off.metric_names
    with pytest.raises(ValueError, match="text_align_weight must be >= 0"):
        load_recipe("tiny-stage3", [f"stage3.sd_path={world['sd']}", "stage3.text_align_weight=-1"]).validate("stage3")


# ----------------------------------------------------------------------------- stage 1 cell labels

CELL_OVERRIDES = ("stage1.cell_classes={shape: 3, color: 2}", "stage1.cells=4")


def _cell_labelled_shards(root: Path, shards: dict) -> Path:
    """The tiny caption shard with random per-cell labels on every other sample."""
    rng = np.random.default_rng(5)
    out = root / "labelled-captions"
    with ShardWriter(out, max_samples=100) as writer:
        for i, raw in enumerate(iter_shards(expand_shards(shards["caption"]))):
            meta = json.loads(raw["json"])
            if i % 2 == 0:
                meta["cell_labels"] = {"shape": [None, *rng.integers(0, 3, 3).tolist()],
                                       "color": rng.integers(0, 2, 4).tolist(), "size": [7, 7, 7, 7]}
            writer.write({"json": meta, "png": raw["png"]}, key=f"c{i}")
    return out


def _stage1_with(world, weight, labelled):
    from accelerate import Accelerator

    from kosmos_g.train.recipe import load_recipe
    from kosmos_g.train.stage1 import Stage1

    fresh_process_state()
    shards = {**world["shards"], "caption": labelled}
    recipe = load_recipe("tiny-stage1", [f"model.init={world['kosmos']}", f"stage1.cell_label_weight={weight}",
                                         *CELL_OVERRIDES, *[f"data.sources.{i}.shards={shards[k]}"
                                                            for i, k in enumerate(SOURCES["stage1"])]])
    recipe.validate("stage1")
    stage = Stage1(recipe, Accelerator(cpu=True))
    stage.model.eval()
    return stage


def test_stage1_cell_labels_add_the_heads_cross_entropy_per_labelled_cell(world, tmp_path):
    """``cell_label_weight`` adds w x the mean cross-entropy of a linear head on the resampler's
    output over labelled (image, cell, attribute) entries; unlabelled images, cells and
    attributes (and attributes the recipe does not name) count for nothing; at 0 (the paper)
    the loss is unchanged and no head exists."""
    from kosmos_g.data.shards import BadSample
    from kosmos_g.train.stage1 import parse_cell_labels

    labelled = _cell_labelled_shards(tmp_path, world["shards"])
    on, off = _stage1_with(world, 2.0, labelled), _stage1_with(world, 0.0, labelled)
    captions = list(iter_shards(expand_shards(labelled)))[:2]
    raws = [*captions, next(iter_shards(expand_shards(world["shards"]["interleaved"]))),
            next(iter_shards(expand_shards(world["shards"]["text"])))]
    examples = [on.builder(raw, np.random.default_rng(i), "s") for i, raw in enumerate(raws)]
    meta = json.loads(captions[0]["json"])["cell_labels"]
    want_rows = [[-1 if s is None else s, c] for s, c in zip(meta["shape"], meta["color"])]
    assert examples[0].cell_labels == [want_rows]
    assert examples[1].cell_labels == [[[-1, -1]] * 4]  # a caption without labels
    assert examples[2].cell_labels == [[[-1, -1]] * 4] * 2  # interleaved: two unlabelled images
    assert examples[3].cell_labels == []
    batch = on.collate(examples)
    assert batch["cell_labels"].shape == (4, 4, 2) and int((batch["cell_labels"] >= 0).sum()) == 7

    got = on.module(batch)
    plain = off.module({k: v for k, v in batch.items() if k != "cell_labels"})
    with torch.no_grad():  # by hand: log-softmax per attribute, picked at each labelled entry
        feats = on.model.image_features(batch["pixel_values"])
        normed = (feats - feats.mean(-1, keepdim=True)) / (feats.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        logits = on.module.cell_head.proj(normed.flatten(1)).view(4, 4, 5)
        want = sum(-torch.log_softmax(logits[0, cell, :3], -1)[s] - torch.log_softmax(logits[0, cell, 3:], -1)[c]
                   for cell, (s, c) in enumerate(want_rows) if s >= 0)
        want = want - torch.log_softmax(logits[0, 0, 3:], -1)[want_rows[0][1]]  # cell 0: colour only
    assert int(got["cells"][1]) == 7 and torch.allclose(got["cells"][0], want, rtol=1e-5)
    tokens = plain["loss"][1]
    assert int(got["loss"][1]) == int(tokens)
    assert torch.allclose(got["loss"][0], plain["loss"][0] + 2.0 * want / 7 * tokens, rtol=1e-5)
    assert "cells" not in plain and off.module.cell_head is None and "cells" not in off.metric_names
    got["loss"][0].backward()
    assert on.module.cell_head.proj.weight.grad.abs().sum() > 0
    assert on.model.resampler.latents.grad.abs().sum() > 0

    # a text-only batch keeps the head in the graph (data-parallel wrappers need every weight)
    on.module.zero_grad()
    text = on.collate([examples[3]])
    out = on.module(text)
    out["loss"][0].backward()
    assert int(out["cells"][1]) == 0 and on.module.cell_head.proj.weight.grad is not None

    # bad labels are bad samples (skipped and counted), bad recipes are refused
    for bad, match in (({"shape": [0, 1]}, "must list 4 cells"), ({"color": [0, 2, 0, 0]}, r"not a class in \[0, 2\)"),
                       ({"shape": [0, True, 0, 0]}, "not a class"), ([1, 2], "must map attributes")):
        with pytest.raises(BadSample, match=match):
            parse_cell_labels(bad, {"shape": 3, "color": 2}, 4, "k")
    from kosmos_g.train.recipe import load_recipe

    for overrides, match in ((["stage1.cell_label_weight=1"], "needs stage1.cell_classes"),
                             (["stage1.cell_label_weight=-1"], "must be >= 0"),
                             (["stage1.cell_label_weight=1", "stage1.cell_classes={shape: 1}"], "class count >= 2"),
                             (["stage1.cell_label_weight=1", "stage1.cell_classes={shape: 3}", "stage1.cells=0"],
                              "cells must be >= 1")):
        with pytest.raises(ValueError, match=match):
            load_recipe("tiny-stage1", [f"model.init={world['kosmos']}", *overrides]).validate("stage1")


def test_stage1_cell_head_learns_and_resumes_exactly_and_is_not_exported(world, tmp_path):
    """The head's loss falls on a fixed batch; a run stopped and resumed with the head equals
    the uninterrupted one (the head is in the checkpoint); the export holds no head weight."""
    labelled = _cell_labelled_shards(tmp_path, world["shards"])
    stage = _stage1_with(world, 1.0, labelled)
    raws = list(iter_shards(expand_shards(labelled)))[::2][:3]
    batch = stage.collate([stage.builder(raw, np.random.default_rng(i), "s") for i, raw in enumerate(raws)])
    with torch.no_grad():
        feats = stage.model.image_features(batch["pixel_values"])
    opt = torch.optim.Adam(stage.module.cell_head.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        s, c = stage.module.cell_head(feats, batch["cell_labels"])
        ce = s / c
        first = first if first is not None else ce.item()
        opt.zero_grad()
        ce.backward()
        opt.step()
    assert ce.item() < 0.5 * first

    shards = {**world["shards"], "caption": labelled}
    extra = ("stage1.cell_label_weight=1", *CELL_OVERRIDES)
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_cli(cli_args(world, "stage1", full, *extra, shards=shards))
    run_cli(cli_args(world, "stage1", cut, *extra, "train.stop_after=3", "checkpoint.every=0", shards=shards))
    assert any(k.startswith("cell_head.") for k in load_file(str(next((cut / "checkpoints").iterdir())
                                                                  / "trainable.safetensors")))
    run_cli(cli_args(world, "stage1", cut, *extra, shards=shards))
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(cut / "final" / "model.safetensors"))
    assert set(a) == set(load_file(str(Path(world["kosmos"]) / "model.safetensors")))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    rows, resumed = read_csv(full), read_csv(cut)
    assert any(math.isfinite(float(r["cells"])) for r in rows)
    np.testing.assert_allclose([float(r["cells"]) for r in resumed], [float(r["cells"]) for r in rows], rtol=1e-6)


def test_stage3_unet_precision_bf16_autocasts_only_the_frozen_unet(world, runs, tmp_path, monkeypatch):
    """``stage3.unet_precision=bf16``: the U-Net's pass is bfloat16, the trained encoder and its
    exported weights stay float32, and the losses stay those of the float32 run to bf16 rounding."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    from kosmos_g.models.aligner import AlignerNet

    seen: dict[str, set] = {"unet": set(), "aligner": set(), "processors": set()}
    unet_forward, aligner_forward = UNet2DConditionModel.forward, AlignerNet.forward

    def unet_spy(self, *args, **kwargs):
        out = unet_forward(self, *args, **kwargs)
        seen["unet"].add(out.sample.dtype)
        seen["processors"] |= {type(p) for p in self.attn_processors.values()}
        return out

    def aligner_spy(self, *args, **kwargs):
        out = aligner_forward(self, *args, **kwargs)
        seen["aligner"].add(out.dtype)
        return out

    monkeypatch.setattr(UNet2DConditionModel, "forward", unet_spy)
    monkeypatch.setattr(AlignerNet, "forward", aligner_spy)
    out = tmp_path / "bf16"
    run_cli(cli_args(world, "stage3", out, "stage3.unet_precision=bf16", "train.stop_after=3"))
    assert seen == {"unet": {torch.bfloat16}, "aligner": {torch.float32}, "processors": {AttnProcessor}}
    got, want = read_csv(out), read_csv(runs["stage3"])[:3]
    np.testing.assert_allclose([float(r["loss"]) for r in got], [float(r["loss"]) for r in want], rtol=0.05)
    assert [float(r["loss"]) for r in got] != [float(r["loss"]) for r in want]  # bf16 did round
    (saved,) = out.glob("checkpoints/step-*/trainable.safetensors")
    assert {t.dtype for t in load_file(str(saved)).values()} == {torch.float32}


def test_stage3_unet_precision_rejects_other_values(world, tmp_path, capsys):
    fresh_process_state()
    assert main(cli_args(world, "stage3", tmp_path / "x", "stage3.unet_precision=fp16")) == 2
    assert "stage3.unet_precision must be fp32, bf16, auto or null, got 'fp16'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
