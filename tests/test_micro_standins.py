"""Tests for the micro tokenizers and the micro-CLIP / micro-SD stand-ins (CPU, seconds)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from kosmos_g.micro import standins as S
from kosmos_g.micro import tokenizers as T
from kosmos_g.micro import world


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(T.build_clip_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return S.train_micro_clip(tmp_path_factory.mktemp("clip") / "clip", smoke=True, progress=False)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory, clip_dir):
    return S.train_micro_sd(tmp_path_factory.mktemp("sd") / "sd", clip_dir, smoke=True, progress=False)


# ---------------------------------------------------------------------------- tokenizers


def test_world_words_cover_sampled_captions_and_instructions():
    words = set(T.world_words())
    for line in T.world_text(1, 3000):
        assert set(T._WORD_RE.findall(line)) <= words, line


def test_clip_tokenizer_gives_one_id_per_world_word(clip_tokenizer):
    tok = clip_tokenizer
    for line in T.world_text(2, 500):
        ids = tok(line).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == len(T._WORD_RE.findall(line)) + 2, line
        assert tok.unk_token_id not in ids[1:-1]
        assert len(ids) <= tok.model_max_length == T.CLIP_MAX_LENGTH
    assert [tok.convert_ids_to_tokens(i) for i in tok("hexagon").input_ids[1:-1]] == ["hexagon</w>"]
    assert tok.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]  # unknown words fall back to characters


def test_clip_tokenizer_files_alone_give_the_same_ids(clip_tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    path = T.build_clip_tokenizer(tmp_path / "tok")
    (path / "tokenizer.json").unlink()  # only vocab.json + merges.txt (+ config) left
    slow = CLIPTokenizer.from_pretrained(path)
    line = T.world_text(3, 1)[0]
    assert slow(line).input_ids == clip_tokenizer(line).input_ids


def test_spm_tokenizer_round_trips_world_text_deterministically(tmp_path):
    from kosmos_g.tokenizer import FairseqTokenizer, load_tokenizer

    a = T.build_spm_tokenizer(tmp_path / "a", n_lines=2000)
    b = T.build_spm_tokenizer(tmp_path / "b", n_lines=2000)
    for name in ("sentencepiece.bpe.model", "dict.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    tok = load_tokenizer(a)
    assert isinstance(tok, FairseqTokenizer)
    for line in T.world_text(4, 300):
        ids = tok.encode(line)
        assert tok.unk_id not in ids and tok.decode(ids) == line
    assert all(len(tok.encode(w)) == 1 for w in T.world_words())  # a word is a piece


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with T.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_output_has_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with T.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "weights.bin").write_bytes(b"x")
            os.chmod(tmp / "sub" / "weights.bin", 0o600)  # as some writers leave files
    finally:
        os.umask(umask)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "out") == mode(tmp_path / "out" / "sub") == 0o755
    assert mode(tmp_path / "out" / "sub" / "weights.bin") == 0o644


# ---------------------------------------------------------------------------- scene reading


def test_read_scene_is_exact_on_renders():
    rng = np.random.default_rng(0)
    for size in (32, 64):
        for _ in range(10):
            scene = world.sample_scene(rng)
            seen = S.read_scene(world.render(scene, size).image)
            assert seen.background == scene.background and set(seen.objects) == set(scene.objects)
            assert S.match_scene(scene, seen)["subject"] == 1.0


def test_perturb_scene_changes_exactly_one_thing():
    rng = np.random.default_rng(1)
    scene = world.Scene("gray", (world.ObjectSpec("circle", "red", "solid", "small", "left"),
                                 world.ObjectSpec("star", "blue", "dotted", "large", "top")))
    for kind in S.PERTURBATIONS:
        new, got = S.perturb_scene(rng, scene, kind)
        assert got == kind and new != scene
        if kind.startswith("swap_"):
            attr = kind[5:]
            assert [getattr(o, attr) for o in new.objects] == [getattr(o, attr) for o in scene.objects][::-1]
    with pytest.raises(ValueError, match="does not apply"):
        S.perturb_scene(rng, replace(scene, objects=scene.objects[:1]), "swap_color")


# ---------------------------------------------------------------------------- micro-CLIP


def test_clip_loss_falls_when_overfitting_a_fixed_batch(clip_tokenizer):
    from transformers import CLIPModel

    torch.manual_seed(0)
    tok = clip_tokenizer
    model = CLIPModel(S.micro_clip_config(len(tok), S.SMOKE_CLIP, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id))
    images, captions, negatives = S.clip_batch(np.random.default_rng(0), 8, crop_fraction=0.25)
    ids = tok(captions + negatives, padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    pixels = S.images_to_clip_pixels(images)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss, _ = S.clip_loss(model, pixels, ids[:8], ids[8:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.85 * losses[0]


def test_clip_token_loss_teaches_each_state_its_own_word_and_ignores_padding(clip_tokenizer):
    """The token-identity term: off, the loss is InfoNCE alone; on, it is the cross-entropy
    of each state (up to the first end token, never the padding) against its own word, and
    a few steps of it make the states name their words."""
    import torch.nn.functional as F
    from transformers import CLIPModel

    torch.manual_seed(0)
    tok = clip_tokenizer
    model = CLIPModel(S.micro_clip_config(len(tok), S.SMOKE_CLIP, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id))
    images, captions, _ = S.clip_batch(np.random.default_rng(1), 8, hard_negatives=False)
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    pixels = S.images_to_clip_pixels(images)
    plain, stats = S.clip_loss(model, pixels, ids)
    assert "token_loss" not in stats
    both, stats = S.clip_loss(model, pixels, ids, token_weight=0.5)
    # Reference: the same cross-entropy over an explicit list of (row, position) up to each end token.
    hidden = model.text_model(input_ids=ids).last_hidden_state
    emb = model.text_model.embeddings.token_embedding.weight
    rows = [(i, j) for i in range(len(ids)) for j in range(ids.shape[1])
            if j <= ids[i].tolist().index(tok.eos_token_id)]
    ref = F.cross_entropy(torch.stack([hidden[i, j] @ emb.t() for i, j in rows]),
                          torch.stack([ids[i, j] for i, j in rows]))
    assert len(rows) < ids.numel()  # the padding really is excluded
    assert stats["token_loss"] == pytest.approx(ref.item(), rel=1e-5)
    assert both.item() == pytest.approx(plain.item() + 0.5 * ref.item(), rel=1e-5)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(90):
        loss, stats = S.clip_loss(model, pixels, ids, token_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    hidden = model.text_model(input_ids=ids).last_hidden_state
    named = torch.stack([(hidden[i, j] @ emb.t()).argmax() == ids[i, j] for i, j in rows]).float().mean()
    assert named > 0.9 and stats["token_loss"] < 0.15 * ref.item()  # at the start: ~1/698 named


def test_binding_targets_name_each_objects_position_word_and_attributes(clip_tokenizer):
    """Every target points at the last word of its OWN object's position phrase (in every
    grammar variant, with 1-3 objects), carries that object's classes, and asking for
    targets leaves the batch (and the generator) exactly as it was."""
    tok = clip_tokenizer
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(300):
        scene = world.sample_scene(rng)
        caption, spans = scene.caption_with_spans(rng)
        tokens = [t.removesuffix("</w>") for t in tok.convert_ids_to_tokens(tok(caption).input_ids)]
        targets = S.binding_targets(scene, caption, spans)
        assert len(targets) == len(scene.objects)
        for obj, (start, end), (index, shape, color, pattern, size) in zip(scene.objects, spans, targets):
            phrase = world.POSITION_PHRASES[obj.position].split()
            assert tokens[index - len(phrase) + 1: index + 1] == phrase, (caption, obj)
            assert tokens[index - len(phrase)] == obj.shape  # right after this object's own entity words
            assert (world.SHAPES[shape], list(world.COLORS)[color], world.PATTERNS[pattern],
                    list(world.SIZES)[size]) == (obj.shape, obj.color, obj.pattern, obj.size)
            checked += 1
    assert checked > 400
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    plain = S.clip_batch(a, 12, crop_fraction=0.5)
    images, captions, negatives, binds = S.clip_batch(b, 12, crop_fraction=0.5, bindings=True)
    assert np.array_equal(plain[0], images) and plain[1] == captions and plain[2] == negatives
    assert a.integers(1 << 30) == b.integers(1 << 30)
    assert any(not t for t in binds) and any(len(t) > 1 for t in binds)  # crops have none


def test_clip_bind_loss_reads_each_object_from_its_position_word(clip_tokenizer):
    """The binding term is the mean of the four attribute cross-entropies of ``bind_head`` at
    the labelled states; it needs its head and targets; trained, the head reads them."""
    import torch.nn.functional as F
    from transformers import CLIPModel

    torch.manual_seed(0)
    tok = clip_tokenizer
    model = CLIPModel(S.micro_clip_config(len(tok), S.SMOKE_CLIP, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id))
    head = torch.nn.Linear(S.SMOKE_CLIP.text_width, sum(S.BIND_CLASSES))
    images, captions, _, binds = S.clip_batch(np.random.default_rng(2), 8, hard_negatives=False, bindings=True)
    ids = tok(captions, padding="longest", return_tensors="pt").input_ids
    pixels = S.images_to_clip_pixels(images)
    plain, stats = S.clip_loss(model, pixels, ids)
    assert "bind_loss" not in stats
    with pytest.raises(ValueError, match="bind_head"):
        S.clip_loss(model, pixels, ids, bind_weight=1.0)
    both, stats = S.clip_loss(model, pixels, ids, bind_weight=0.5, bind_head=head, bindings=binds)
    hidden = model.text_model(input_ids=ids).last_hidden_state
    ref = []
    for k, classes in enumerate(S.BIND_CLASSES):  # one attribute at a time, object by object
        offset = sum(S.BIND_CLASSES[:k])
        ref.append(torch.stack([F.cross_entropy(head(hidden[i, t[0]])[offset:offset + classes][None],
                                                torch.tensor([t[1 + k]]))
                                for i, per in enumerate(binds) for t in per]).mean())
    ref = torch.stack(ref).mean()
    assert stats["bind_loss"] == pytest.approx(ref.item(), rel=1e-5)
    assert both.item() == pytest.approx(plain.item() + 0.5 * ref.item(), rel=1e-5)

    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(60):
        loss, stats = S.clip_loss(model, pixels, ids, bind_weight=1.0, bind_head=head, bindings=binds)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert stats["bind_loss"] < 0.1 * ref.item()


def test_micro_clip_with_the_bind_loss_trains_it_and_saves_no_head(tmp_path, clip_dir):
    from safetensors import safe_open

    bound = S.train_micro_clip(tmp_path / "clip", smoke=True, progress=False, bind_weight=1.0)
    log = json.loads((bound / "train_log.json").read_text())
    assert log["recipe"]["bind_weight"] == 1.0
    assert all(np.isfinite(r["bind_loss"]) for r in log["log"])
    for sub in ("text_encoder", "clip"):
        with safe_open(str(bound / sub / "model.safetensors"), "pt") as a, \
                safe_open(str(clip_dir / sub / "model.safetensors"), "pt") as b:
            assert set(a.keys()) == set(b.keys())  # the head is not part of the stand-in
    assert (bound / "text_encoder" / "model.safetensors").read_bytes() != \
        (clip_dir / "text_encoder" / "model.safetensors").read_bytes()


def test_micro_clip_folders_load_and_give_the_right_shapes(clip_dir):
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModel

    tok = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer")
    text = CLIPTextModel.from_pretrained(clip_dir / "text_encoder")
    vision = CLIPVisionModel.from_pretrained(clip_dir / "vision")
    clip = CLIPModel.from_pretrained(clip_dir / "clip")
    ids = tok(["a small red striped circle on the left, on a gray background"], padding="max_length",
              max_length=tok.model_max_length, return_tensors="pt").input_ids
    hidden = text(ids).last_hidden_state
    assert hidden.shape == (1, T.CLIP_MAX_LENGTH, text.config.hidden_size)
    torch.testing.assert_close(hidden, clip.text_model(ids).last_hidden_state)
    image = world.render(world.sample_scene(np.random.default_rng(0))).image  # (64, 64, 3)
    pixels = S.images_to_clip_pixels(image[None])
    out = vision(pixel_values=pixels).last_hidden_state
    patches = (S.IMAGE_SIZE // vision.config.patch_size) ** 2
    assert out.shape == (1, patches + 1, vision.config.hidden_size)
    log = json.loads((clip_dir / "train_log.json").read_text())
    assert all(np.isfinite(r["loss"]) for r in log["log"])
    metrics = S.evaluate_micro_clip(clip_dir, n=16)
    assert 0.0 <= metrics["i2t"] <= 1.0 and "bind_swap_color" in metrics


def test_micro_clip_is_deterministic_for_a_seed(tmp_path, clip_dir):
    again = S.train_micro_clip(tmp_path / "clip", smoke=True, progress=False)
    for sub in ("text_encoder", "vision"):
        weights = "model.safetensors"
        assert (again / sub / weights).read_bytes() == (clip_dir / sub / weights).read_bytes()


def test_patch_labels_name_the_object_covering_most_of_each_tile():
    """Every tile an object covers a quarter of or more carries that object's shape, colour and
    pattern (the one covering most of it, after occlusion); every other tile is "none"."""
    rng = np.random.default_rng(3)
    names = list(world.CELL_ATTRIBUTES)
    seen = set()
    for _ in range(40):
        scene = world.sample_scene(rng)
        result = world.render(scene, 64)
        for patch in (8, 16):
            labels = S.patch_labels(result.masks, scene, patch)
            grid = 64 // patch
            assert labels.shape == (grid * grid, 3)
            for t, row in enumerate(labels):
                r, c = divmod(t, grid)
                tile = (slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch))
                cover = [int(m[tile].sum()) for m in result.masks]
                if not cover or max(cover) * 4 < patch * patch:
                    assert row.tolist() == [n - 1 for n in S.PATCH_CLASSES]
                    continue
                obj = scene.objects[int(np.argmax(cover))]
                assert row.tolist() == [world.CELL_ATTRIBUTES[n].index(getattr(obj, n)) for n in names]
                seen.add(row[0])
    assert len(seen) >= 6  # the check ran over most shapes
    empty = world.Scene("gray", ())
    assert (S.patch_labels(world.render(empty, 64).masks, empty, 8) == np.array(S.PATCH_CLASSES) - 1).all()


def test_clip_batch_patch_labels_change_no_draw_and_skip_crops():
    a = S.clip_batch(np.random.default_rng(1), 12, crop_fraction=0.5)
    b = S.clip_batch(np.random.default_rng(1), 12, crop_fraction=0.5, patch_size=8)
    assert len(a) == 3 and len(b) == 4
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    crops = [lab is None for lab in b[3]]
    assert any(crops) and not all(crops)
    assert all(lab.shape == (64, 3) for lab in b[3] if lab is not None)


def test_refine_micro_clip_vision_trains_the_vision_tower_only(tmp_path, clip_dir):
    """The second phase keeps the text tower (micro-SD's condition) value for value, moves the
    vision tower, and its dense loss falls; the head is not saved."""
    from safetensors.torch import load_file

    out = S.refine_micro_clip_vision(clip_dir, tmp_path / "dense", steps=40, batch_size=8, lr=3e-3, warmup=1,
                                     log_every=1, progress=False)
    for sub, same in (("text_encoder", True), ("vision", False)):
        ours, theirs = load_file(str(out / sub / "model.safetensors")), load_file(str(clip_dir / sub / "model.safetensors"))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours) is same, sub
    clip = load_file(str(out / "clip" / "model.safetensors"))
    assert not any(k.startswith("head") for k in clip)
    log = json.loads((out / "train_log.json").read_text())
    dense = [r["dense_loss"] for r in log["log"]]
    assert np.mean(dense[-10:]) < 0.7 * np.mean(dense[:5])
    assert log["recipe"]["init"] == str(clip_dir) and log["recipe"]["steps"] == 40
    with pytest.raises(FileNotFoundError, match="micro-CLIP folder"):
        S.refine_micro_clip_vision(tmp_path / "missing", tmp_path / "x", steps=1, progress=False)
    with pytest.raises(ValueError, match="dense_weight=-1"):
        S.refine_micro_clip_vision(clip_dir, tmp_path / "x", steps=1, dense_weight=-1, progress=False)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- micro-SD


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
    images = S.generate_micro_sd(sd_dir, ["a large red solid star in the center, on a gray background", ""],
                                 num_inference_steps=3)
    assert images.shape == (2, S.SD_SIZE, S.SD_SIZE, 3) and images.dtype == np.uint8
    again = S.generate_micro_sd(sd_dir, ["a large red solid star in the center, on a gray background", ""],
                                num_inference_steps=3)
    assert np.array_equal(images, again)
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
        S.train_micro_sd(tmp_path / "sd", clip_dir, prediction_type="x0", smoke=True, progress=False)
    with pytest.raises(FileNotFoundError, match="micro-CLIP"):
        S.train_micro_sd(tmp_path / "sd", tmp_path / "missing", smoke=True, progress=False)
    with pytest.raises(ValueError, match=r"precision='fp8' is unknown; use one of \['fp32', 'bf16', 'auto'\]"):
        S.train_micro_sd(tmp_path / "sd", clip_dir, precision="fp8", smoke=True, progress=False)
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
    S.train_micro_sd(tmp_path / "sd", clip_dir, smoke=True, progress=False, caption_dropout=0.5)
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
        seen.append((self.training, out.sample.dtype))
        return out

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    bf16 = S.train_micro_sd(tmp_path / "sd", clip_dir, smoke=True, progress=False, precision="bf16")
    assert seen and all(dtype == torch.bfloat16 for training, dtype in seen if training)
    recipe = json.loads((bf16 / "train_log.json").read_text())["recipe"]
    assert recipe["precision"] == "bf16"
    a, b = (UNet2DConditionModel.from_pretrained(d / "unet") for d in (bf16, sd_dir))
    assert a.dtype == torch.float32
    diffs = [(p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())]
    assert 0 < max(diffs) < 0.1  # the same recipe, rounded differently
    images = S.generate_micro_sd(bf16, ["a large red solid star in the center, on a gray background"],
                                 num_inference_steps=2)
    assert images.shape == (1, S.SD_SIZE, S.SD_SIZE, 3)


def test_interrupted_micro_sd_run_resumes_to_the_same_weights(tmp_path, clip_dir, monkeypatch):
    from safetensors.torch import load_file

    whole = S.train_micro_sd(tmp_path / "whole", clip_dir, smoke=True, progress=False)  # 4 steps, no checkpoint
    clip_grad = torch.nn.utils.clip_grad_norm_
    calls = []

    def power_cut_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return clip_grad(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", power_cut_at_step_3)
    with pytest.raises(RuntimeError, match="power cut"):
        S.train_micro_sd(tmp_path / "cut", clip_dir, smoke=True, progress=False, checkpoint_every=2)
    monkeypatch.undo()
    partial = tmp_path / ".cut.partial.pt"
    assert partial.is_file() and not (tmp_path / "cut").exists()
    assert torch.load(partial, weights_only=True)["step"] == 2
    with pytest.raises(ValueError, match=r"other arguments \(differing: \['lr'\]\)"):
        S.train_micro_sd(tmp_path / "cut", clip_dir, smoke=True, progress=False, checkpoint_every=2, lr=1e-4)
    state = torch.load(partial, weights_only=True)  # as saved before two arguments were removed: on ...
    state["recipe"].update(cond_noise=0.5, position_word_mix=0.0)
    torch.save(state, partial)
    with pytest.raises(ValueError, match=r"differing: \['cond_noise'\]"):
        S.train_micro_sd(tmp_path / "cut", clip_dir, smoke=True, progress=False, checkpoint_every=2)
    state["recipe"]["cond_noise"] = 0.0  # ... and off, which resumes
    torch.save(state, partial)
    cut = S.train_micro_sd(tmp_path / "cut", clip_dir, smoke=True, progress=False, checkpoint_every=2)
    assert not partial.exists()
    a, b = (load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads((d / "train_log.json").read_text())["log"] for d in (whole, cut)]
    assert [(r["step"], r["loss"]) for r in logs[0]] == [(r["step"], r["loss"]) for r in logs[1]]


@pytest.mark.parametrize("module", [T, S])
def test_docstring_examples_run(module):
    import doctest

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_micro_sd_trains_and_draws_at_another_resolution(tmp_path, clip_dir, sd_dir):
    from kosmos_g.micro import evaluate as E

    sd64 = S.train_micro_sd(tmp_path / "sd64", clip_dir, smoke=True, progress=False, resolution=64)
    assert E.sd_resolution(sd64) == 64 and E.sd_resolution(sd_dir) == S.SD_SIZE
    assert json.loads((sd64 / "train_log.json").read_text())["recipe"]["resolution"] == 64
    images = S.generate_micro_sd(sd64, ["a large red solid star in the center, on a gray background"],
                                 num_inference_steps=2)
    assert images.shape == (1, 64, 64, 3)
    case = E.single_cases(1)[0]
    assert E.oracle([case], [0], size=64).shape == (1, 64, 64, 3)
    assert S.read_scene(E.oracle([case], [0], size=64)[0]) == S.read_scene(E.oracle([case], [0])[0])
    with pytest.raises(ValueError, match="resolution=50 must be >= 16 and divisible by 4"):
        S.train_micro_sd(tmp_path / "bad", clip_dir, smoke=True, progress=False, resolution=50)
    with pytest.raises(ValueError, match="trained at 32 px"):
        S.train_micro_sd(tmp_path / "bad", clip_dir, smoke=True, progress=False, resolution=64,
                         resume_unet=sd_dir / "unet")
