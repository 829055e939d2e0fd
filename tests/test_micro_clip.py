"""Tests for the micro tokenizers and micro-CLIP (CPU, seconds)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from kosmos_g.micro import clip as C
from kosmos_g.micro import tokenizers as T
from kosmos_g.micro import world


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(T.build_clip_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return C.train_micro_clip(tmp_path_factory.mktemp("clip") / "clip", C.SMOKE_CLIP_RECIPE, progress=False)


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


def test_perturb_scene_changes_exactly_one_thing():
    rng = np.random.default_rng(1)
    scene = world.Scene("gray", (world.ObjectSpec("circle", "red", "solid", "small", "left"),
                                 world.ObjectSpec("star", "blue", "dotted", "large", "top")))
    for kind in C.PERTURBATIONS:
        new, got = C.perturb_scene(rng, scene, kind)
        assert got == kind and new != scene
        if kind.startswith("swap_"):
            attr = kind[5:]
            assert [getattr(o, attr) for o in new.objects] == [getattr(o, attr) for o in scene.objects][::-1]
    with pytest.raises(ValueError, match="does not apply"):
        C.perturb_scene(rng, replace(scene, objects=scene.objects[:1]), "swap_color")


# ---------------------------------------------------------------------------- micro-CLIP


def test_clip_loss_falls_when_overfitting_a_fixed_batch(clip_tokenizer):
    from transformers import CLIPModel

    torch.manual_seed(0)
    tok = clip_tokenizer
    model = CLIPModel(C.micro_clip_config(len(tok), C.SMOKE_CLIP, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id))
    images, captions, negatives = C.clip_batch(np.random.default_rng(0), 8, crop_fraction=0.25)
    ids = tok(captions + negatives, padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    pixels = C.images_to_clip_pixels(images)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss, _ = C.clip_loss(model, pixels, ids[:8], ids[8:])
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
    model = CLIPModel(C.micro_clip_config(len(tok), C.SMOKE_CLIP, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id))
    images, captions, _ = C.clip_batch(np.random.default_rng(1), 8, hard_negatives=False)
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    pixels = C.images_to_clip_pixels(images)
    plain, stats = C.clip_loss(model, pixels, ids)
    assert "token_loss" not in stats
    both, stats = C.clip_loss(model, pixels, ids, token_weight=0.5)
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
        loss, stats = C.clip_loss(model, pixels, ids, token_weight=1.0)
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
        targets = C.binding_targets(scene, caption, spans)
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
    plain = C.clip_batch(a, 12, crop_fraction=0.5)
    images, captions, negatives, binds = C.clip_batch(b, 12, crop_fraction=0.5, bindings=True)
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
    model = CLIPModel(C.micro_clip_config(len(tok), C.SMOKE_CLIP, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id))
    head = torch.nn.Linear(C.SMOKE_CLIP.text_width, sum(C.BIND_CLASSES))
    images, captions, _, binds = C.clip_batch(np.random.default_rng(2), 8, hard_negatives=False, bindings=True)
    ids = tok(captions, padding="longest", return_tensors="pt").input_ids
    pixels = C.images_to_clip_pixels(images)
    plain, stats = C.clip_loss(model, pixels, ids)
    assert "bind_loss" not in stats
    with pytest.raises(ValueError, match="bind_head"):
        C.clip_loss(model, pixels, ids, bind_weight=1.0)
    both, stats = C.clip_loss(model, pixels, ids, bind_weight=0.5, bind_head=head, bindings=binds)
    hidden = model.text_model(input_ids=ids).last_hidden_state
    ref = []
    for k, classes in enumerate(C.BIND_CLASSES):  # one attribute at a time, object by object
        offset = sum(C.BIND_CLASSES[:k])
        ref.append(torch.stack([F.cross_entropy(head(hidden[i, t[0]])[offset:offset + classes][None],
                                                torch.tensor([t[1 + k]]))
                                for i, per in enumerate(binds) for t in per]).mean())
    ref = torch.stack(ref).mean()
    assert stats["bind_loss"] == pytest.approx(ref.item(), rel=1e-5)
    assert both.item() == pytest.approx(plain.item() + 0.5 * ref.item(), rel=1e-5)

    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(60):
        loss, stats = C.clip_loss(model, pixels, ids, bind_weight=1.0, bind_head=head, bindings=binds)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert stats["bind_loss"] < 0.1 * ref.item()


def test_micro_clip_with_the_bind_loss_trains_it_and_saves_no_head(tmp_path, clip_dir):
    from safetensors import safe_open

    assert C.MicroCLIPRecipe().bind_weight == C.SMOKE_CLIP_RECIPE.bind_weight == 1.0  # the shipped recipe's
    log = json.loads((clip_dir / "train_log.json").read_text())
    assert log["recipe"]["bind_weight"] == 1.0
    assert all(np.isfinite(r["bind_loss"]) for r in log["log"])
    unbound = C.train_micro_clip(tmp_path / "clip", replace(C.SMOKE_CLIP_RECIPE, bind_weight=0.0), progress=False)
    assert "bind_loss" not in json.loads((unbound / "train_log.json").read_text())["log"][0]
    for sub in ("text_encoder", "clip"):
        with safe_open(str(unbound / sub / "model.safetensors"), "pt") as a, \
                safe_open(str(clip_dir / sub / "model.safetensors"), "pt") as b:
            assert set(a.keys()) == set(b.keys())  # the head is not part of the stand-in
    assert (unbound / "text_encoder" / "model.safetensors").read_bytes() != \
        (clip_dir / "text_encoder" / "model.safetensors").read_bytes()


def test_micro_clip_recipe_rejects_bad_values():
    with pytest.raises(ValueError, match="steps=0"):
        C.MicroCLIPRecipe(steps=0)
    with pytest.raises(ValueError, match="bind_weight=-1"):
        C.MicroCLIPRecipe(bind_weight=-1)


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
    pixels = C.images_to_clip_pixels(image[None])
    out = vision(pixel_values=pixels).last_hidden_state
    patches = (C.IMAGE_SIZE // vision.config.patch_size) ** 2
    assert out.shape == (1, patches + 1, vision.config.hidden_size)
    log = json.loads((clip_dir / "train_log.json").read_text())
    assert all(np.isfinite(r["loss"]) for r in log["log"])
    metrics = C.evaluate_micro_clip(clip_dir, n=16)
    assert 0.0 <= metrics["i2t"] <= 1.0 and "bind_swap_color" in metrics


def test_micro_clip_is_deterministic_for_a_seed(tmp_path, clip_dir):
    again = C.train_micro_clip(tmp_path / "clip", C.SMOKE_CLIP_RECIPE, progress=False)
    for sub in ("text_encoder", "vision"):
        weights = "model.safetensors"
        assert (again / sub / weights).read_bytes() == (clip_dir / sub / weights).read_bytes()




@pytest.mark.parametrize("module", [T, C])
def test_docstring_examples_run(module):
    import doctest

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
