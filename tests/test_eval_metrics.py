"""The evaluation protocols' tables and the metric math, against the spec and hand-computed values."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from eval_fixtures import make_dreambench, make_random_inception, make_tiny_clip, make_tiny_dino, random_image
from kosmos_g.eval import protocols as P
from kosmos_g.eval.inception import FIDInceptionV3
from kosmos_g.eval.metrics import ClipScorer, DinoScorer, FeatureStats, cosine, fid, protocol_mean, resize_center_crop
from kosmos_g.eval.runs import summarize

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC_REFERENCES = ("backpack/02.jpg backpack_dog/02.jpg bear_plushie/03.jpg berry_bowl/02.jpg can/01.jpg "
                   "candle/02.jpg cat/04.jpg cat2/02.jpg clock/03.jpg colorful_sneaker/01.jpg dog/02.jpg dog2/02.jpg "
                   "dog3/05.jpg dog5/00.jpg dog6/02.jpg dog7/01.jpg dog8/04.jpg duck_toy/01.jpg fancy_boot/02.jpg "
                   "grey_sloth_plushie/04.jpg monster_toy/04.jpg pink_sunglasses/04.jpg poop_emoji/00.jpg "
                   "rc_car/03.jpg red_cartoon/00.jpg robot_toy/00.jpg shiny_sneaker/01.jpg teapot/04.jpg vase/02.jpg "
                   "wolf_plushie/04.jpg").split()


def test_the_subject_table_is_the_spec_s():
    assert [f"{s}/{f}" for s, f in P.REFERENCE_IMAGES.items()] == SPEC_REFERENCES
    assert P.LIVE_SUBJECTS == {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}
    expected = {"bear_plushie": "stuffed animal", "grey_sloth_plushie": "stuffed animal",
                "wolf_plushie": "stuffed animal", "duck_toy": "toy", "monster_toy": "toy", "poop_emoji": "toy",
                "rc_car": "toy", "robot_toy": "toy", "pink_sunglasses": "glasses", "berry_bowl": "bowl",
                "colorful_sneaker": "sneaker", "shiny_sneaker": "sneaker", "fancy_boot": "boot",
                "red_cartoon": "cartoon", "backpack": "backpack", "backpack_dog": "backpack", "cat": "cat",
                "cat2": "cat", "can": "can", "candle": "candle", "clock": "clock", "teapot": "teapot", "vase": "vase",
                **{d: "dog" for d in ("dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8")}}
    assert P.CLASS_NOUNS == expected


def test_the_prompt_rewrites_item_by_item():
    rewritten = {"a red {}": "<i>, red", "a purple {}": "<i>, purple", "a shiny {}": "<i>, shiny",
                 "a wet {}": "<i>, wet", "a cube shaped {}": "<i>, cube shaped"}
    for template in P.OBJECT_PROMPTS + P.LIVE_PROMPTS:
        assert template.startswith("a {} ") or template in rewritten
        expected = rewritten.get(template, template[len("a "):].format("<i>"))
        assert P.model_prompt(template) == expected
        assert "a" not in P.model_prompt(template).split()[:1]
    assert P.model_prompt("a {} in the jungle") == "<i> in the jungle"
    assert P.model_prompt("a {} wearing a black top hat and a monocle") == "<i> wearing a black top hat and a monocle"
    assert P.clip_prompt("a {} in the jungle", "dog") == "a dog in the jungle"
    assert P.clip_prompt("a cube shaped {}", "stuffed animal") == "a cube shaped stuffed animal"
    assert len(P.OBJECT_PROMPTS) == len(P.LIVE_PROMPTS) == 25
    assert P.OBJECT_PROMPTS[:10] == P.LIVE_PROMPTS[:10] and P.OBJECT_PROMPTS[20:] == P.LIVE_PROMPTS[20:]
    assert [P.prompt_kind(t) for t in P.LIVE_PROMPTS] == ["recontextualization"] * 10 + ["accessorization"] * 10 \
        + ["property"] * 5
    assert [P.prompt_kind(t) for t in P.OBJECT_PROMPTS] == ["recontextualization"] * 20 + ["property"] * 5


def test_the_cases_cover_30_subjects_x_25_prompts_with_their_lists(tmp_path):
    root = make_dreambench(tmp_path, dict(P.REFERENCE_IMAGES))
    cases = P.dreambench_cases(root)
    assert len(cases) == 750
    dog = [c for c in cases if c.subject == "dog"]
    assert dog[10].prompt == "<i> wearing a red hat" and dog[10].clip_prompt == "a dog wearing a red hat"
    can = [c for c in cases if c.subject == "can"]
    assert can[10].prompt == "<i> with a wheat field in the background" and can[20].clip_prompt == "a red can"
    assert {c.reference.relative_to(root).as_posix() for c in cases} == set(SPEC_REFERENCES)
    with pytest.raises(ValueError, match="unknown DreamBench subject"):
        P.dreambench_cases(root, ["dog", "unicorn"])
    (root / "dog" / "02.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="dog/02.jpg"):
        P.dreambench_cases(root, ["dog"])


def test_coco_captions_are_a_seed_0_draw_and_a_limit_takes_its_first_ones(tmp_path):
    import json

    annotations = [{"image_id": k, "id": 10 * k, "caption": f"caption  {k} "} for k in range(50)]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"annotations": annotations}))
    drawn = P.sample_coco_captions(path)
    assert [a["id"] for a in drawn] == [a["id"] for a in random.Random(0).sample(annotations, 50)]
    assert drawn[0]["caption"] == " ".join(drawn[0]["caption"].split())
    assert P.sample_coco_captions(path, 7) == drawn[:7]
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a COCO captions file"):
        P.sample_coco_captions(path)


def test_protocol_mean_clamps_at_zero_and_averages_over_all_images():
    assert protocol_mean([0.5, -0.2, 1.0]) == pytest.approx(50.0)  # (50 + 0 + 100) / 3
    records = [{"subject": "a", "dino": 0.9}, {"subject": "a", "dino": 0.7}, {"subject": "a", "dino": -0.5},
               {"subject": "b", "dino": 0.1}]
    # one global mean over the 4 images, not the mean of the subjects' means ((53.33 + 10) / 2 = 31.67)
    assert summarize(records)["dino"] == pytest.approx((90 + 70 + 0 + 10) / 4)
    per = summarize(records, "subject")
    assert per["a"]["dino"] == pytest.approx(160 / 3) and per["b"] == {"n": 1, "dino": pytest.approx(10.0)}
    with pytest.raises(ValueError):
        protocol_mean([])
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(cosine(a, torch.tensor([[3.0, 0.0]])), torch.tensor([1.0, 0.0]))


def test_resize_center_crop_is_torchvision_s_resize_then_center_crop():
    im = random_image(0, (80, 40))  # 80 wide, 40 high -> 64 x 32 -> the middle 32 x 32
    out = resize_center_crop(im, 32, 32)
    assert out.shape == (32, 32, 3)
    from PIL import Image

    full = np.asarray(im.resize((64, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out, full[:, 16:48])


def test_identical_images_score_100_for_dino_and_clip_i(tmp_path):
    dino, clip = DinoScorer(make_tiny_dino(tmp_path / "dino")), ClipScorer(make_tiny_clip(tmp_path / "clip"))
    images = [random_image(k) for k in range(3)]
    others = [random_image(10 + k) for k in range(3)]
    same = {"dino": cosine(dino.features(images), dino.features(images)).tolist(),
            "clip_i": cosine(clip.image_features(images), clip.image_features(images)).tolist()}
    for key, values in same.items():
        assert protocol_mean(values) == pytest.approx(100.0, abs=1e-4), key
    assert protocol_mean(cosine(dino.features(images), dino.features(others)).tolist()) < 100.0 - 1e-3
    t = clip.text_features(["a dog in the jungle", "a red can"])
    assert t.shape == (2, 16)


def test_fid_of_a_set_with_itself_is_zero_and_a_shifted_set_is_farther():
    net = make_random_inception()
    x = torch.from_numpy(np.stack([np.asarray(random_image(k, (40, 40))) for k in range(6)])).permute(0, 3, 1, 2)
    real = FeatureStats.of(net(x))
    assert abs(fid(real, real)) < 1e-6
    shifted = FeatureStats.of(net((x.float() * 0.6 + 80).clamp(0, 255).byte()))
    assert fid(real, shifted) > 1e-3
    # float images in [0, 1] go in as torchmetrics' normalize=True does: truncated to uint8
    torch.testing.assert_close(net(x.float() / 255 + 1e-4), net(x))
    # statistics of parts add up to the statistics of the whole (processes, resumed runs)
    f = net(x)
    whole, parts = FeatureStats.of(f), FeatureStats.of(f[:2]) + FeatureStats.of(f[2:])
    torch.testing.assert_close(parts.cov_sum, whole.cov_sum)
    assert parts.n == whole.n == 6
    with pytest.raises(ValueError, match="at least 2"):
        fid(FeatureStats.of(f[:1]), whole)


def test_inception_weights_load_from_a_file_with_strict_keys(tmp_path):
    net = make_random_inception(tmp_path / "inception.pth")
    loaded = FIDInceptionV3.from_file(tmp_path / "inception.pth")
    loaded.input_size = net.input_size
    x = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    torch.testing.assert_close(loaded(x), net(x))
    assert not loaded.training and not loaded.train().training
    state = net.state_dict()
    state["AuxLogits.fc.weight"] = torch.zeros(1)
    del state["fc.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \['fc.bias'\], unexpected keys \['AuxLogits.fc.weight'\]"):
        FIDInceptionV3.from_file(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        FIDInceptionV3.from_file(tmp_path / "nowhere.pth")


@pytest.mark.skipif(not os.environ.get("KOSMOS_G_FID_INCEPTION"),
                    reason="set KOSMOS_G_FID_INCEPTION to the local pt_inception-2015-12-05-6726825d.pth")
def test_real_inception_weights_match_the_reference_features():
    """With the real weights: our features equal torch-fidelity's (through torchmetrics), where it is installed."""
    fidelity = pytest.importorskip("torch_fidelity")
    from torchmetrics.image.fid import NoTrainInceptionV3

    del fidelity
    path = os.environ["KOSMOS_G_FID_INCEPTION"]
    ours = FIDInceptionV3.from_file(path)
    reference = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                   feature_extractor_weights_path=path)
    x = torch.from_numpy(np.stack([np.asarray(random_image(k, (256, 256))) for k in range(2)])).permute(0, 3, 1, 2)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)


def test_the_eval_extra_does_not_pull_torch_fidelity_or_torchvision():
    """torchmetrics[image] -> torch-fidelity, torchvision -> a CUDA torch in place of the user's CPU one."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["eval"]
    assert any(r.startswith("torchmetrics") for r in extra)
    assert not any("[image]" in r or "fidelity" in r or "torchvision" in r for r in extra)


@pytest.mark.skipif(not (os.environ.get("KOSMOS_G_DINO") and os.environ.get("KOSMOS_G_CLIP")),
                    reason="set KOSMOS_G_DINO and KOSMOS_G_CLIP to local dino-vits16 / clip-vit-base-patch32 folders")
def test_real_dino_and_clip_folders_load_and_score_identical_images_100():
    dino, clip = DinoScorer(os.environ["KOSMOS_G_DINO"]), ClipScorer(os.environ["KOSMOS_G_CLIP"])
    images = [random_image(k, (300, 260)) for k in range(2)]
    assert dino.features(images).shape == (2, 384) and clip.image_features(images).shape == (2, 512)
    assert protocol_mean(cosine(dino.features(images), dino.features(images)).tolist()) == pytest.approx(100, abs=1e-3)


def test_micro_dreambench_uses_the_same_cosine_and_tables():
    from kosmos_g.eval import metrics
    from kosmos_g.micro import evaluate

    assert evaluate.cosine is metrics.cosine and evaluate.markdown_table is metrics.markdown_table
