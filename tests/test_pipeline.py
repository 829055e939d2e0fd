"""KosmosGPipeline: parity with diffusers, guidance, encode-once, LoRA, ControlNet, tasks.

Tiny random Kosmos-G (77x32 condition) + tiny SD1.5-layout folder; 32x32 images, 2-4
steps, CPU. Parity tests feed our pipeline the tiny CLIP text encoder's embeddings and
compare against diffusers' own pipelines loaded from the same folder.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kosmos_g.generation_config import GenerationConfig
from kosmos_g.pipeline import SCHEDULERS, KosmosGPipeline, as_batch, kosmos_g_prompt_embeds
from kosmos_g.processing import is_image, split_prompt

STEPS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _np(seed: int, hw: int = 32, channels: int = 3) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(hw, hw, channels) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def pics():
    return {"dog": _np(1, 40), "hat": _np(2, 24), "ctrl": _np(3), "init": _np(4),
            "mask": Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8)).convert("RGB")}


def _load(tiny_kosmos_dir, tiny_sd_dir, **kw) -> KosmosGPipeline:
    pipe = KosmosGPipeline.from_pretrained(tiny_kosmos_dir, tiny_sd_dir, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_kosmos_dir, tiny_sd_dir):
    """Shared, never mutated (tests that change schedulers or LoRAs load their own)."""
    return _load(tiny_kosmos_dir, tiny_sd_dir)


@pytest.fixture(scope="module")
def reference(tiny_sd_dir):
    """diffusers' own StableDiffusionPipeline with the CLIP text encoder, and its embeddings."""
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None,
                                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pe, npe = ref.encode_prompt("a dog on the beach", "cpu", 1, True, "")
    return ref, pe, npe


@pytest.fixture(scope="module")
def controlnet_dir(tiny_sd_dir, tmp_path_factory):
    from kosmos_g.testing import make_tiny_controlnet

    return make_tiny_controlnet(tmp_path_factory.mktemp("tiny-cn"), tiny_sd_dir)


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("scheduler", ["dpm++", "euler-a"])
def test_parity_with_diffusers_stable_diffusion(tiny_kosmos_dir, tiny_sd_dir, reference, scheduler):
    import diffusers

    ref, pe, npe = reference
    original = ref.scheduler
    ref.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(original.config)
    try:
        expected = ref("a dog on the beach", num_inference_steps=STEPS, generator=_gen(3),
                       output_type="np").images
    finally:
        ref.scheduler = original
    ours = _load(tiny_kosmos_dir, tiny_sd_dir, scheduler=scheduler)
    got = ours(prompt_embeds=pe, negative_prompt_embeds=npe, num_inference_steps=STEPS, generator=_gen(3),
               output_type="np").images
    assert got.shape == expected.shape == (1, 32, 32, 3)
    assert np.abs(got - expected).max() < 1e-5


def test_parity_with_diffusers_controlnet(tiny_kosmos_dir, tiny_sd_dir, reference, controlnet_dir, pics):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    _, pe, npe = reference
    ref = StableDiffusionControlNetPipeline.from_pretrained(
        str(tiny_sd_dir), controlnet=ControlNetModel.from_pretrained(str(controlnet_dir)),
        safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ours = _load(tiny_kosmos_dir, tiny_sd_dir, controlnet=controlnet_dir)
    kw = dict(num_inference_steps=STEPS, output_type="np", controlnet_conditioning_scale=0.7)
    expected = ref("a dog on the beach", image=pics["ctrl"], generator=_gen(1), **kw).images
    got = ours(prompt_embeds=pe, negative_prompt_embeds=npe, control_image=pics["ctrl"], generator=_gen(1),
               **kw).images
    assert np.abs(got - expected).max() < 1e-5
    # The ControlNet acts (its zero convolutions were randomised) and so does its scale.
    weaker = ours(prompt_embeds=pe, negative_prompt_embeds=npe, control_image=pics["ctrl"], generator=_gen(1),
                  **{**kw, "controlnet_conditioning_scale": 0.0}).images
    assert np.abs(got - weaker).max() > 1e-3


def test_embeds_helper_drives_any_diffusers_pipeline(pipe, reference, tiny_kosmos_dir, pics):
    """kosmos_g_prompt_embeds() into diffusers' own pipeline == our pipeline."""
    ref, _, _ = reference
    pe, npe = kosmos_g_prompt_embeds(pipe.kosmos_g, pipe.processor, "<i> on the beach", [pics["dog"]],
                                     device=ref.device, dtype=ref.unet.dtype)
    theirs = ref(prompt_embeds=pe, negative_prompt_embeds=npe, num_inference_steps=STEPS, generator=_gen(),
                 output_type="np").images
    ours = pipe("<i> on the beach", prompt_images=[pics["dog"]], num_inference_steps=STEPS, generator=_gen(),
                output_type="np").images
    assert np.abs(theirs - ours).max() < 1e-5


# ----------------------------------------------------------------------------- guidance and encoding

def _count_unet(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args, kw: calls.append(args[0].shape[0]),
                                                 with_kwargs=True)
    return calls, handle


def test_guidance_one_skips_unconditional_branch(pipe):
    calls, handle = _count_unet(pipe)
    try:
        pipe("a dog", num_images_per_prompt=2, guidance_scale=1.0, num_inference_steps=STEPS, output_type="np")
        assert calls == [2] * STEPS
        calls.clear()
        pipe("a dog", num_images_per_prompt=2, guidance_scale=7.5, num_inference_steps=STEPS, output_type="np")
        assert calls == [4] * STEPS  # conditional + unconditional in one doubled batch
    finally:
        handle.remove()


def test_encoder_runs_once_per_call(tiny_kosmos_dir, tiny_sd_dir, pics, monkeypatch):
    pipe = _load(tiny_kosmos_dir, tiny_sd_dir)
    calls = []
    real = pipe.kosmos_g.encode
    monkeypatch.setattr(pipe.kosmos_g, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    pipe("a dog", num_inference_steps=2, output_type="np")
    assert len(calls) == 2  # the first call also encodes the null condition, once for good
    for kw in [dict(negative_prompt="blurry"), dict(), dict(guidance_scale=1.0)]:
        calls.clear()
        pipe(["<i> wearing <i>", "a cat next to <i>"], prompt_images=[[pics["dog"], pics["hat"]], [pics["dog"]]],
             num_images_per_prompt=3, num_inference_steps=4, output_type="np", **kw)
        assert len(calls) == 1, kw


def test_null_condition_is_encoded_once_per_model_state(tiny_kosmos_dir, tiny_sd_dir, monkeypatch):
    pipe = _load(tiny_kosmos_dir, tiny_sd_dir)
    rows = []
    real = pipe.kosmos_g.encode
    monkeypatch.setattr(pipe.kosmos_g, "encode", lambda input_ids, *a, **k: rows.append(input_ids.shape[0])
                        or real(input_ids, *a, **k))
    first = pipe.encode_prompt(["a dog", "a cat"])
    second = pipe.encode_prompt(["a dog", "a cat"])
    assert rows == [1, 2, 2]  # the null alone (one token) once, then only the prompts
    for a, b in zip(first, second):  # the same batches every call: bit-identical
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(second[1][0], pipe.kosmos_g.unconditional(1)[0], atol=0, rtol=0)
    rows.clear()
    with torch.no_grad():  # new weights (in place) -> the null is encoded again
        next(pipe.kosmos_g.aligner.parameters()).mul_(1.5)
    third = pipe.encode_prompt(["a dog", "a cat"])
    assert rows == [1, 2] and (third[1] - second[1]).abs().max() > 0


def test_cached_embeddings_skip_the_encoder(pipe, pics, monkeypatch):
    pe, npe = pipe.encode_prompt("<i> in the snow", [pics["dog"]])
    assert pe.dtype == npe.dtype == pipe.unet.dtype and pe.shape == npe.shape == (1, 77, 32)
    direct = pipe("<i> in the snow", prompt_images=[pics["dog"]], num_inference_steps=STEPS, generator=_gen(),
                  output_type="np").images
    monkeypatch.setattr(pipe.kosmos_g, "encode", lambda *a, **k: pytest.fail("encoder ran"))
    cached = pipe(prompt_embeds=pe, negative_prompt_embeds=npe, num_inference_steps=STEPS, generator=_gen(),
                  output_type="np").images
    np.testing.assert_array_equal(direct, cached)


def test_unconditional_is_official_null_condition(pipe):
    """No negative / an empty negative = `<s>` alone through MLLM + AlignerNet."""
    _, npe = pipe.encode_prompt(["a dog", "a cat"])
    null = pipe.kosmos_g.unconditional(1)
    for row in npe:
        torch.testing.assert_close(row, null[0], atol=1e-6, rtol=0)
    _, empty = pipe.encode_prompt("a dog", negative_prompt="")
    torch.testing.assert_close(empty, null, atol=1e-6, rtol=0)
    _, text = pipe.encode_prompt("a dog", negative_prompt="blurry")
    assert (text - null).abs().max() > 1e-4


def test_encode_prompt_repeats_per_image(pipe):
    pe, npe = pipe.encode_prompt(["a dog", "a cat"], num_images_per_prompt=3)
    assert pe.shape == npe.shape == (6, 77, 32)
    torch.testing.assert_close(pe[0], pe[2])
    assert (pe[0] - pe[3]).abs().max() > 0
    pe1, npe1 = pipe.encode_prompt("a dog", do_classifier_free_guidance=False)
    assert npe1 is None and pe1.shape == (1, 77, 32)


# ----------------------------------------------------------------------------- names

def test_prompt_images_are_named_apart_from_the_init_image(pipe, pics):
    """`prompt_images=` fill the `<i>` placeholders, `image=` is diffusers' img2img / inpainting
    picture; the old `images=` is refused with the new name, not handed on to diffusers."""
    kw = dict(num_inference_steps=2, output_type="np")
    with pytest.raises(TypeError, match="`prompt_images=`"):
        pipe("<i> on grass", images=[pics["dog"]], **kw)
    with pytest.raises(TypeError, match="`negative_prompt_images=`"):
        pipe("a dog", negative_prompt="<i>", negative_images=[pics["hat"]], **kw)
    with pytest.raises(TypeError, match="`prompt_images=`"):
        pipe.encode_prompt("<i> on grass", images=[pics["dog"]])
    with pytest.raises(TypeError, match="`prompt_images=`"):
        kosmos_g_prompt_embeds(pipe.kosmos_g, pipe.processor, "<i> on grass", images=[pics["dog"]])
    pe, _ = pipe.encode_prompt("<i> on grass", prompt_images=[pics["dog"]])
    with pytest.raises(ValueError, match="`prompt_images` belong to `prompt`"):
        pipe(prompt_embeds=pe, prompt_images=[pics["dog"]], **kw)
    _, null = pipe.encode_prompt("a dog")
    _, negative = pipe.encode_prompt("a dog", negative_prompt="<i>", negative_prompt_images=[pics["hat"]])
    assert (negative - null).abs().max() > 1e-4


def test_top_level_exports():
    import kosmos_g

    assert kosmos_g.KosmosGPipeline is KosmosGPipeline
    assert kosmos_g.kosmos_g_prompt_embeds is kosmos_g_prompt_embeds
    assert kosmos_g.GenerationConfig is GenerationConfig
    assert {"KosmosGPipeline", "kosmos_g_prompt_embeds", "GenerationConfig"} <= set(kosmos_g.__all__)


# ----------------------------------------------------------------------------- generation config

def test_generation_config_round_trip(tmp_path):
    assert GenerationConfig.from_pretrained(tmp_path) == GenerationConfig()  # no file: the defaults
    config = GenerationConfig(num_inference_steps=14, guidance_scale=3, scheduler="DPM-Solver++")
    assert config.scheduler == "dpm++" and isinstance(config.guidance_scale, float)
    path = config.save_pretrained(tmp_path)
    assert path == tmp_path / "generation_config.json"
    assert json.loads(path.read_text()) == {"num_inference_steps": 14, "guidance_scale": 3.0, "scheduler": "dpm++"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # written atomically, no temporary left
    assert GenerationConfig.from_pretrained(tmp_path) == config
    with pytest.raises(NotADirectoryError, match="Model folder not found"):
        GenerationConfig.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("text, expected", [
    ("{not json", "is not valid JSON"),
    ("[14]", "must hold a JSON object"),
    ('{"steps": 14}', "unknown key(s) ['steps']"),
    ('{"num_inference_steps": 0}', "num_inference_steps must be an integer >= 1, got 0"),
    ('{"num_inference_steps": 2.5}', "got 2.5"),
    ('{"guidance_scale": -1}', "guidance_scale must be a number >= 0, got -1"),
    ('{"scheduler": "heun-9000"}', "Unknown scheduler 'heun-9000'"),
])
def test_generation_config_bad_files_name_the_file_and_value(tmp_path, text, expected):
    path = tmp_path / "generation_config.json"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        GenerationConfig.from_pretrained(tmp_path)
    assert str(path) in str(error.value) and expected in str(error.value)


@pytest.fixture(scope="module")
def configured_kosmos_dir(tiny_kosmos_dir, tmp_path_factory):
    """The tiny Kosmos-G folder with its own sampling defaults: 2 euler-a steps without guidance."""
    path = tmp_path_factory.mktemp("configured") / "kosmos-g"
    shutil.copytree(tiny_kosmos_dir, path)
    GenerationConfig(num_inference_steps=2, guidance_scale=1.0, scheduler="euler-a").save_pretrained(path)
    return path


def test_model_folder_sets_the_sampling_defaults(configured_kosmos_dir, tiny_sd_dir):
    pipe = _load(configured_kosmos_dir, tiny_sd_dir)
    assert pipe.generation_config == GenerationConfig(num_inference_steps=2, guidance_scale=1.0, scheduler="euler-a")
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    calls, handle = _count_unet(pipe)
    try:
        default = pipe("a dog", generator=_gen(), output_type="np").images
        assert calls == [1, 1]  # the folder's 2 steps, and guidance 1: no unconditional branch
        calls.clear()
        pipe("a dog", num_inference_steps=3, guidance_scale=7.5, generator=_gen(), output_type="np")
        assert calls == [2, 2, 2]  # the call's own values win
    finally:
        handle.remove()
    explicit = pipe("a dog", num_inference_steps=2, guidance_scale=1.0, generator=_gen(), output_type="np").images
    np.testing.assert_array_equal(default, explicit)
    assert type(_load(configured_kosmos_dir, tiny_sd_dir, scheduler="ddim").scheduler).__name__ == "DDIMScheduler"


# ----------------------------------------------------------------------------- prompts

def test_deterministic_for_a_seed(pipe, pics):
    run = lambda seed: pipe("<i> wearing <i>", prompt_images=[pics["dog"], pics["hat"]], num_inference_steps=STEPS,
                            generator=_gen(seed), output_type="np").images
    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_list_form_equals_placeholder_form(pipe, pics):
    listed, _ = pipe.encode_prompt(["A photo of", pics["dog"], "on the beach"])
    placed, _ = pipe.encode_prompt("A photo of<i>on the beach", [pics["dog"]])
    torch.testing.assert_close(listed, placed, atol=0, rtol=0)


def test_batch_with_different_image_counts(pipe, pics):
    prompts = ["<i> on the grass", "a cat wearing <i> next to <i>", "a plain red square"]
    images = [[pics["dog"]], [pics["hat"], pics["dog"]], []]
    batch = pipe(prompts, prompt_images=images, num_inference_steps=STEPS, output_type="np",
                 generator=[_gen(k) for k in range(3)]).images
    assert batch.shape == (3, 32, 32, 3)
    for k, (p, ims) in enumerate(zip(prompts, images)):
        alone = pipe(p, prompt_images=ims, num_inference_steps=STEPS, generator=_gen(k), output_type="np").images
        assert np.abs(alone[0] - batch[k]).max() < 1e-4  # padding does not leak between prompts


def test_as_batch_forms():
    assert as_batch("<i> x", ["a.png"]) == [("<i> x", ["a.png"])]
    assert as_batch(["a", "b"]) == [("a", None), ("b", None)]
    one = ["A photo of", Path("dog.png"), "on the beach"]
    assert as_batch(one) == [(one, None)]  # a list holding an image is one prompt
    assert as_batch([one, "a cat"]) == [(one, None), ("a cat", None)]
    assert as_batch(None, batch_size=2) == [(None, None), (None, None)]
    assert as_batch("neg", batch_size=2) == [("neg", None), ("neg", None)]
    with pytest.raises(ValueError, match="pass `prompt_images` as one list of images per prompt"):
        as_batch(["<i> a", "<i> b"], ["x.png", "y.png"])
    with pytest.raises(ValueError, match="negative_prompt_images given without a negative_prompt"):
        as_batch(None, ["x.png"], name="negative_prompt")
    with pytest.raises(ValueError, match="2 negative_prompts for 3 prompts"):
        as_batch(["n1", "n2"], name="negative_prompt", batch_size=3)
    with pytest.raises(ValueError, match=r"for an image alone pass \[image\]"):
        as_batch(Path("dog.png"))


def test_a_str_image_name_in_a_list_prompt_is_refused(pipe):
    """`["A photo of", "dog.png", "on the beach"]` is a batch of three text prompts by the rule
    (every str is text); that cannot be what was meant, so it raises instead of drawing three images."""
    with pytest.raises(ValueError, match=r"'dog.png' looks like an image file.*Path\('dog.png'\)"):
        pipe(["A photo of", "dog.png", "on the beach"], num_inference_steps=1)


def _doc_list_form_calls() -> list[str]:
    """The ``pipe([...])`` calls in docs/generation.md's Python blocks: its list-form examples."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "generation.md").read_text(encoding="utf-8")
    calls = []
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        for node in ast.walk(ast.parse(block)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pipe"
                    and node.args and isinstance(node.args[0], ast.List)):
                calls.append(ast.get_source_segment(block, node))
    return calls


def test_generation_doc_list_form_examples(pipe, tmp_path, monkeypatch):
    """Each list-form example of docs/generation.md runs as written and means what the doc says:
    the first is ONE prompt with one image, the second a batch of three (1, 2 and 0 images)."""
    calls = _doc_list_form_calls()
    expected = [[1], [1, 2, 0]]  # per example: the images of each prompt
    assert len(calls) == len(expected), calls
    examples = files("kosmos_g") / "assets" / "examples"
    for name in ("dog.png", "hat.png"):
        shutil.copy(examples / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    seen = []

    def doc_pipe(prompt, prompt_images=None, **kwargs):
        pairs = as_batch(prompt, prompt_images)
        seen.append([sum(is_image(s) for s in split_prompt(p, im)) for p, im in pairs])
        return pipe(prompt, prompt_images, num_inference_steps=1, output_type="np", **kwargs)

    for call, want in zip(calls, expected):
        out = eval(call, {"pipe": doc_pipe, "Path": Path})
        assert seen[-1] == want, call
        assert out.images.shape[0] == len(want)


def _vae_roundtrip(pipe, image: Image.Image) -> np.ndarray:
    """What the (random) VAE makes of an image: the best img2img can keep of it."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
    return ((y[0].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)


def test_instruction_editing_prompt_runs_text2img_and_img2img(pipe, pics):
    edit = pipe("<i> make it snowy", prompt_images=[pics["init"]], num_inference_steps=STEPS, generator=_gen(),
                output_type="np").images
    assert edit.shape == (1, 32, 32, 3)
    run = lambda strength: pipe("<i> make it snowy", prompt_images=[pics["init"]], image=pics["init"],
                                strength=strength, num_inference_steps=4, generator=_gen(),
                                output_type="np").images[0]
    kept, redrawn = run(0.25), run(1.0)
    recon = _vae_roundtrip(pipe, pics["init"])
    # A low strength stays close to the init image (as the VAE renders it).
    assert np.abs(kept - recon).mean() < np.abs(redrawn - recon).mean()


def test_inpainting_keeps_unmasked_pixels_closer(pipe, pics):
    out = pipe("<i> in the hole", prompt_images=[pics["dog"]], image=pics["init"], mask_image=pics["mask"],
               num_inference_steps=4, generator=_gen(), output_type="np").images[0]
    assert out.shape == (32, 32, 3)
    recon = _vae_roundtrip(pipe, pics["init"])
    inside = np.asarray(pics["mask"])[..., 0] > 127
    assert np.abs(out - recon)[~inside].mean() < np.abs(out - recon)[inside].mean()


# ----------------------------------------------------------------------------- ControlNet

def test_several_controlnets(tiny_kosmos_dir, tiny_sd_dir, controlnet_dir, pics):
    pipe = _load(tiny_kosmos_dir, tiny_sd_dir, controlnet=[controlnet_dir, controlnet_dir])
    kw = dict(num_inference_steps=STEPS, output_type="np")
    both = pipe("<i> on grass", prompt_images=[pics["dog"]], control_image=[pics["ctrl"], pics["init"]],
                controlnet_conditioning_scale=[0.5, 0.5], generator=_gen(), **kw).images
    one = pipe("<i> on grass", prompt_images=[pics["dog"]], control_image=[pics["ctrl"], pics["init"]],
               controlnet_conditioning_scale=[0.5, 0.0], generator=_gen(), **kw).images
    assert both.shape == (1, 32, 32, 3) and np.abs(both - one).max() > 1e-4
    # img2img and inpainting with ControlNet use diffusers' ControlNet variants.
    assert pipe("<i> x", prompt_images=[pics["dog"]], image=pics["init"], control_image=[pics["ctrl"]] * 2,
                **kw).images.shape == (1, 32, 32, 3)
    assert pipe("<i> x", prompt_images=[pics["dog"]], image=pics["init"], mask_image=pics["mask"],
                control_image=[pics["ctrl"]] * 2, **kw).images.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="pass `control_image="):
        pipe("a dog", **kw)


# ----------------------------------------------------------------------------- LoRA

def test_lora_changes_output_and_unload_restores_exactly(tiny_kosmos_dir, tiny_sd_dir, tmp_path):
    from kosmos_g.testing import make_tiny_lora

    style = make_tiny_lora(tmp_path / "style.safetensors", tiny_sd_dir, seed=1)
    # kohya keys + a CLIP text-encoder part, like most community SD1.5 LoRA files.
    detail = make_tiny_lora(tmp_path / "detail.safetensors", tiny_sd_dir, fmt="kohya",
                            with_text_encoder=True, seed=2)
    pipe = _load(tiny_kosmos_dir, tiny_sd_dir)
    run = lambda **kw: pipe("a dog", num_inference_steps=STEPS, generator=_gen(), output_type="np", **kw).images
    base = run()
    assert pipe.load_lora(style, scale=1.0) == ["style"]
    one = run()
    assert np.abs(one - base).max() > 1e-3
    assert pipe.load_lora([detail], scale=[0.5]) == ["detail"]
    assert pipe.loras == {"style": 1.0, "detail": 0.5}
    two = run()
    assert np.abs(two - one).max() > 1e-4
    np.testing.assert_array_equal(run(lora_scale=0.0), base)  # scale 0 = no LoRA
    np.testing.assert_array_equal(run(), two)  # the per-call scale is undone exactly
    np.testing.assert_array_equal(run(cross_attention_kwargs={"scale": 0.0}), base)  # diffusers' spelling
    pipe.set_lora_scale({"detail": 0.0})
    np.testing.assert_array_equal(run(), one)
    pipe.unload_lora()
    assert pipe.loras == {}
    np.testing.assert_array_equal(run(), base)


def test_lora_errors(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="LoRA file not found"):
        pipe.load_lora(tmp_path / "missing.safetensors")
    (tmp_path / "old.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .safetensors"):
        pipe.load_lora(tmp_path / "old.bin")


# ----------------------------------------------------------------------------- schedulers, dtypes

def test_schedulers_by_name_and_instance(tiny_kosmos_dir, tiny_sd_dir):
    import diffusers

    pipe = _load(tiny_kosmos_dir, tiny_sd_dir)
    assert pipe.generation_config == GenerationConfig()  # a folder without generation_config.json
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"  # the official default
    for name in ["ddim", "pnpm", "pndm", "euler", "euler-a", "unipc", "dpm++"]:
        pipe.scheduler = name
        assert type(pipe.scheduler).__name__ == SCHEDULERS[{"pnpm": "pndm"}.get(name, name)]
        out = pipe("a dog", num_inference_steps=STEPS, output_type="np").images
        assert np.isfinite(out).all()
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    assert pipe.diffusers_pipeline("text2img").scheduler is pipe.scheduler
    with pytest.raises(ValueError, match="Unknown scheduler"):
        pipe.scheduler = "heun-9000"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision(tiny_kosmos_dir, tiny_sd_dir, dtype):
    pipe = _load(tiny_kosmos_dir, tiny_sd_dir, dtype=dtype)
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert pipe.dtype == expected and pipe.kosmos_g.dtype == expected
    pe, _ = pipe.encode_prompt("a dog")
    assert pe.dtype == expected
    out = pipe("a dog", num_inference_steps=2, output_type="np").images
    assert np.isfinite(out).all()


def test_attention_kernel_follows_the_map_size_and_callbacks_run(pipe, tiny_kosmos_dir, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from kosmos_g.testing import make_tiny_sd

    # the tiny U-Net's largest map is 16x16 = 256 tokens: plain matmul attention (kernels.py)
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor}
    big = _load(tiny_kosmos_dir, make_tiny_sd(tmp_path / "sd32", sample_size=32))
    assert {type(p) for p in big.unet.attn_processors.values()} == {AttnProcessor2_0}
    seen = []
    pipe("a dog", num_inference_steps=STEPS, output_type="np",
         callback_on_step_end=lambda p, i, t, kw: seen.append(i) or kw)
    assert seen == list(range(STEPS))


# ----------------------------------------------------------------------------- errors

def test_missing_sd_parts_are_named(tiny_kosmos_dir, tiny_sd_dir, tmp_path):
    (tmp_path / "sd" / "vae").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no unet/"):
        KosmosGPipeline.from_pretrained(tiny_kosmos_dir, tmp_path / "sd")
    with pytest.raises(FileNotFoundError, match="SD folder not found"):
        KosmosGPipeline.from_pretrained(tiny_kosmos_dir, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="Kosmos-G folder not found"):
        KosmosGPipeline.from_pretrained(tmp_path / "nowhere", tiny_sd_dir)
    with pytest.raises(FileNotFoundError, match="ControlNet folder not found"):
        KosmosGPipeline.from_pretrained(tiny_kosmos_dir, tiny_sd_dir, controlnet=tmp_path / "nocn")



@pytest.mark.parametrize("cut", [lambda b: b"", lambda b: b[:30], lambda b: b[:len(b) // 2]],
                         ids=["empty", "30 bytes", "truncated"])
def test_damaged_weights_are_named(tiny_kosmos_dir, tiny_sd_dir, tmp_path, cut):
    from kosmos_g import KosmosG

    kosmos, sd = tmp_path / "kosmos-g", tmp_path / "sd"
    shutil.copytree(tiny_kosmos_dir, kosmos)
    shutil.copytree(tiny_sd_dir, sd)
    for weights in (kosmos / "model.safetensors", sd / "unet" / "diffusion_pytorch_model.safetensors"):
        weights.write_bytes(cut(weights.read_bytes()))
    damaged = f"{kosmos / 'model.safetensors'} is damaged or incomplete"
    with pytest.raises(ValueError, match=re.escape(damaged)):
        KosmosG.from_pretrained(kosmos)
    with pytest.raises(ValueError, match=re.escape(damaged)):
        KosmosGPipeline.from_pretrained(kosmos, sd)
    shutil.copy(tiny_kosmos_dir / "model.safetensors", kosmos / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape(f"U-Net {sd / 'unet'} could not be loaded")):
        KosmosGPipeline.from_pretrained(kosmos, sd)


def test_condition_width_must_match_unet(tiny_kosmos_dir, tmp_path):
    from kosmos_g.testing import make_tiny_sd

    sd = make_tiny_sd(tmp_path / "sd48", cross_attention_dim=48)
    with pytest.raises(ValueError, match="cross_attention_dim is 48"):
        KosmosGPipeline.from_pretrained(tiny_kosmos_dir, sd)


def test_bad_call_arguments(pipe, pics):
    kw = dict(num_inference_steps=2, output_type="np")
    with pytest.raises(ValueError, match="placeholder"):
        pipe("<i> and <i>", prompt_images=[pics["dog"]], **kw)
    with pytest.raises(ValueError, match="no ControlNet is loaded"):
        pipe("a dog", control_image=pics["ctrl"], **kw)
    with pytest.raises(ValueError, match="strength not supported for text2img"):
        pipe("a dog", strength=0.5, **kw)
    with pytest.raises(ValueError, match="height, width not supported for img2img"):
        pipe("a dog", image=pics["init"], height=32, width=32, **kw)
    with pytest.raises(ValueError, match="exactly one of `prompt`"):
        pipe(**kw)
    with pytest.raises(ValueError, match="`mask_image` needs `image`"):
        pipe("a dog", mask_image=pics["mask"], **kw)


def test_example_assets_are_small_and_readable():
    from kosmos_g.processing import load_image

    folder = files("kosmos_g") / "assets" / "examples"
    for name in ["dog", "hat", "scene", "mask", "edges"]:
        path = folder / f"{name}.png"
        assert path.is_file() and len(path.read_bytes()) < 10_000
        assert load_image(str(path)).size == (128, 128)


def test_benchmark_script_writes_json(tmp_path, monkeypatch):
    """benchmarks/generate.py stays runnable (tiny preset, one step)."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "generate.py"
    monkeypatch.syspath_prepend(str(script.parent))  # as `python benchmarks/generate.py` has it
    spec = importlib.util.spec_from_file_location("bench_generate", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--size-preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--repeats", "1",
                "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"kosmos_g", "diffusers"}
    assert report["ratio_kosmos_g_over_diffusers"]["seconds_per_image"] > 0
