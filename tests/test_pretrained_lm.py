"""An MLLM started from a pretrained causal LM (``model.mllm_init``), at tiny size.

Tiny random Llama- and Qwen2-style LMs with real (word-level) tokenizers are saved as
folders here; the checks: their weights arrive unchanged, ``<image>``/``</image>`` are
added, the export reloads bit-exactly without the LM folder, the three stages and
generation run through the usual entry points, the frozen-LM phase of stage 1 leaves the
LM untouched, and LoRA's merged export equals the unmerged model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kosmos_g import KosmosG, KosmosGProcessor
from kosmos_g.testing import TINY_CORPUS
from kosmos_g.train.modeling import add_lora, export_kosmos_g, load_kosmos_g
from kosmos_g.train.recipe import LoraSpec, ModelSpec
from kosmos_g.train.testing import make_tiny_shards

from test_train_stages import fresh_process_state, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RED = Image.new("RGB", (40, 30), (220, 20, 20))
LM_PREFIX = "mllm.model."


def make_tiny_lm(path: Path, family: str) -> Path:
    """A random tiny causal LM and a word-level tokenizer over the tiny corpus, saved as one folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = sorted({w for line in TINY_CORPUS for w in line.split()} | {".", ","})
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":  # BOS/EOS/UNK, untied head, the matrix exactly the vocabulary
        vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        fast = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), bos_token_id=1, eos_token_id=2,
                                          tie_word_embeddings=False, **sizes))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    else:  # no BOS, tied head, unused rows after the vocabulary (as Qwen2 pads its matrix)
        # byte-level BPE like Qwen2's own: AutoTokenizer loads a Qwen2 folder's tokenizer as
        # Qwen2Tokenizer, whose byte-level pre-tokenizer would leave a word-level vocabulary no words
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(TINY_CORPUS, trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        fast = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=tok.get_vocab_size() + 8, eos_token_id=0,
                                          tie_word_embeddings=True, **sizes))
    lm.save_pretrained(str(path))
    PreTrainedTokenizerFast(tokenizer_object=tok, **fast).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    torch.manual_seed(1)
    return {family: make_tiny_lm(root / family, family) for family in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_tiny_shards(tmp_path_factory.mktemp("shards"), n=8, per_shard=4)


def lm_state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).state_dict()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mllm_init_keeps_the_lm_and_adds_the_image_tokens(lms, family):
    from transformers import AutoTokenizer

    model, processor = load_kosmos_g(ModelSpec(preset="tiny", mllm_init=str(lms[family])))
    tok = processor.tokenizer
    original = AutoTokenizer.from_pretrained(str(lms[family]))
    assert "<image>" not in original.get_vocab() and tok.added_tokens == ("<image>", "</image>")
    new = [tok.boi_id, tok.eoi_id]
    ids = original.encode("a dog on the beach", add_special_tokens=False)
    assert len(ids) >= 5 and original.decode(ids) == "a dog on the beach"  # the tokenizer really reads text
    assert tok.encode("a dog on the beach") == ids
    assert tok.bos_id == (original.bos_token_id if family == "llama" else original.eos_token_id)
    cfg = model.config
    assert cfg.mllm.backbone == "hf" and cfg.mllm.init_from == str(lms[family].resolve())
    assert cfg.resampler.output_dim == cfg.aligner.input_dim == 64 and cfg.mllm.bos_token_id == tok.bos_id
    want = lm_state(lms[family])
    got = {k[len(LM_PREFIX):]: v for k, v in model.state_dict().items() if k.startswith(LM_PREFIX)}
    assert set(got) == set(want)
    emb = "model.embed_tokens.weight"
    for key, w in want.items():
        g = got[key]
        if g.shape[0] != w.shape[0] or key in (emb, "lm_head.weight"):
            rows = torch.ones(g.shape[0], dtype=torch.bool)
            rows[new] = False
            assert torch.equal(g[rows][: w.shape[0] - (~rows[: w.shape[0]]).sum()], w[rows[: w.shape[0]]]), key
            torch.testing.assert_close(g[new], w[: min(new)].mean(0).expand(2, -1), rtol=0, atol=0)
        else:
            assert torch.equal(g, w), key
    assert len(tok) <= cfg.mllm.vocab_size == got[emb].shape[0]
    if family == "qwen2":  # its spare rows hold the new tokens: the matrix keeps its size
        assert got[emb].shape == want[emb].shape
        assert model.mllm.model.get_output_embeddings().weight is model.mllm.model.get_input_embeddings().weight
    # the image slots: <image>, Q slots, </image>, overwritten by the resampler's output
    batch = processor(["a dog <i> on the beach"], images=[[RED]])
    ids, slots = batch["input_ids"][0].tolist(), batch["image_mask"][0]
    q = cfg.num_image_tokens
    start = ids.index(tok.boi_id)
    assert ids[0] == tok.bos_id and ids[start + q + 1] == tok.eoi_id and int(slots.sum()) == q
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_mask"])
        feats = model.image_features(batch["pixel_values"])
    assert torch.equal(embeds[0, slots], feats[0])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_export_reloads_bit_exactly_without_the_lm_folder(lms, tmp_path, family):
    lm = shutil.copytree(lms[family], tmp_path / "lm")
    model, processor = load_kosmos_g(ModelSpec(preset="tiny", mllm_init=str(lm)))
    model.eval()
    out = export_kosmos_g(model, processor, tmp_path / "kg")
    shutil.rmtree(lm)
    again, proc = KosmosG.from_pretrained(out), KosmosGProcessor.from_pretrained(out)
    assert again.config.mllm.init_from == str(lm.resolve())
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    batch = processor(["a red hat <i>", "a cat"], images=[[RED], []])
    again_batch = proc(["a red hat <i>", "a cat"], images=[[RED], []])
    assert all(torch.equal(batch[k], again_batch[k]) for k in batch)
    with torch.no_grad():
        assert torch.equal(model.encode(**batch), again.encode(**again_batch))
        # one position: a matrix-vector product, whose CPU kernel may round differently with
        # the weights' memory alignment (the weights themselves are bit-equal, checked above)
        torch.testing.assert_close(model.unconditional(), again.unconditional(), rtol=0, atol=1e-5)


def test_bad_model_specs_are_refused(lms, tmp_path):
    from kosmos_g.train.recipe import load_recipe

    cases = [(dict(init=str(tmp_path), mllm_init=str(lms["llama"])), "set model.preset"),
             (dict(preset="tiny", mllm_init=str(lms["llama"]), tokenizer="x"), "brings its own tokenizer"),
             (dict(preset="tiny", mllm_init=str(lms["llama"]), lora=LoraSpec(r=0)), "lora.r")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            ModelSpec(**kwargs).validate()
    with pytest.raises(FileNotFoundError, match="not a transformers causal-LM folder"):
        load_kosmos_g(ModelSpec(preset="tiny", mllm_init=str(tmp_path)))
    with pytest.raises(ValueError, match="stage 2 keeps the MLLM frozen"):
        load_recipe("tiny-stage2", ["model.lora={r: 4}", "stage2.clip_path=x"]).validate("stage2")
    with pytest.raises(ValueError, match="freeze_lm_steps must be >= 0"):
        load_recipe("tiny-stage1", ["stage1.freeze_lm_steps=-1"]).validate("stage1")
    model, _ = load_kosmos_g(ModelSpec(preset="tiny", mllm_init=str(lms["llama"])))
    with pytest.raises(ValueError, match="not linear layers of the MLLM"):
        add_lora(model, LoraSpec(target_modules=["qkv"]))


def _args(stage: str, out: Path, model: list[str], shards: dict, sd: Path, *extra: str) -> list[str]:
    kinds = {"stage1": ("text", "caption", "interleaved"), "stage2": ("caption", "text"),
             "stage3": ("caption", "edit", "compositional")}[stage]
    args = ["train", stage, "--config", f"tiny-{stage}", *model, f"train.output_dir={out}", "log.progress=false",
            "train.max_steps=4", "checkpoint.every=0", *[f"data.sources.{i}.shards={shards[k]}"
                                                          for i, k in enumerate(kinds)]]
    if stage == "stage2":
        args.append(f"stage2.clip_path={sd}")
    if stage == "stage3":
        args += [f"stage3.sd_path={sd}", "stage3.resolution=16"]
    return args + list(extra)


def test_stages_one_to_three_and_generation_with_a_pretrained_lm(lms, shards, tiny_sd_dir, tmp_path):
    """Stage 1 keeps the LM frozen for 2 steps (checked on the step-2 checkpoint), resumes
    and unfreezes it; stages 2 and 3 start from the previous export; the result generates."""
    from kosmos_g.pipeline import KosmosGPipeline

    init = ["model.init=null", "model.preset=tiny", f"model.mllm_init={lms['llama']}"]
    s1 = tmp_path / "s1"
    run_cli(_args("stage1", s1, init, shards, tiny_sd_dir, "stage1.freeze_lm_steps=2", "train.stop_after=2"))
    (ckpt,) = (s1 / "checkpoints").iterdir()
    trained = load_file(str(ckpt / "trainable.safetensors"))
    lm = lm_state(lms["llama"])
    frozen = {k: v for k, v in trained.items() if k.startswith("model." + LM_PREFIX)}
    assert frozen and all(torch.equal(v, lm[k[len("model." + LM_PREFIX):]]) for k, v in frozen.items()
                          if "embed_tokens" not in k and "lm_head" not in k)
    start, _ = load_kosmos_g(ModelSpec(preset="tiny", mllm_init=str(lms["llama"])))
    start_state = start.state_dict()
    assert all(torch.equal(v, start_state[k[len("model."):]]) for k, v in frozen.items())  # new rows too
    assert not torch.equal(trained["model.resampler.latents"], start_state["resampler.latents"])
    run_cli(_args("stage1", s1, init, shards, tiny_sd_dir, "stage1.freeze_lm_steps=2"))  # resumes, unfreezes
    exported = load_file(str(s1 / "final" / "model.safetensors"))
    key = LM_PREFIX + "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(exported[key], start_state[key])

    s2, s3 = tmp_path / "s2", tmp_path / "s3"
    run_cli(_args("stage2", s2, [f"model.init={s1 / 'final'}"], shards, tiny_sd_dir))
    run_cli(_args("stage3", s3, [f"model.init={s2 / 'final'}"], shards, tiny_sd_dir))
    after = load_file(str(s3 / "final" / "model.safetensors"))
    assert not torch.equal(after[key], exported[key])
    pipe = KosmosGPipeline.from_pretrained(s3 / "final", tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a dog <i> on the beach", prompt_images=[RED], num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_lora_trains_adapters_only_and_its_merged_export_equals_the_unmerged_model(lms, shards, tiny_sd_dir,
                                                                                   tmp_path):
    init = ["model.init=null", "model.preset=tiny", f"model.mllm_init={lms['qwen2']}",
            "model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj, down_proj]}", "optim.lr=1e-2"]
    out = tmp_path / "lora"
    run_cli(_args("stage1", out, init, shards, tiny_sd_dir))
    (ckpt,) = (out / "checkpoints").iterdir()
    trained = load_file(str(ckpt / "trainable.safetensors"))
    lm_keys = [k for k in trained if k.startswith("model." + LM_PREFIX)]
    assert lm_keys and all(".lora_A." in k or ".lora_B." in k for k in lm_keys)
    assert any(".lora_B." in k and trained[k].abs().sum() > 0 for k in lm_keys)  # B starts at 0: it moved
    # the unmerged model: the start + adapters + the checkpoint's trained weights
    from accelerate.utils import set_seed

    spec = ModelSpec(preset="tiny", mllm_init=str(lms["qwen2"]), lora=LoraSpec(r=4, alpha=8, target_modules=[
        "q_proj", "v_proj", "down_proj"]))
    set_seed(0)  # as the trainer does before it builds the model: the untrained parts start the same
    unmerged, processor = load_kosmos_g(spec)
    add_lora(unmerged, spec.lora)
    missing, unexpected = unmerged.load_state_dict({k[len("model."):]: v for k, v in trained.items()}, strict=False)
    assert not unexpected
    merged = KosmosG.from_pretrained(out / "final")
    assert not any("lora" in k for k in merged.state_dict())
    batch = processor(["a dog <i> on the beach", "a red hat"], images=[[RED], []])
    with torch.no_grad():
        want = unmerged.eval().encode(**batch)
        got = merged.encode(**batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    lm = lm_state(lms["qwen2"])  # base weights outside the adapted layers never moved
    state = merged.state_dict()
    assert torch.equal(state[LM_PREFIX + "model.layers.0.self_attn.k_proj.weight"],
                       lm["model.layers.0.self_attn.k_proj.weight"])
    assert not torch.equal(state[LM_PREFIX + "model.layers.0.self_attn.q_proj.weight"],
                           lm["model.layers.0.self_attn.q_proj.weight"])
    # stage 3 with LoRA on the merged stage-1 result (stage 2 skipped: AlignerNet is random anyway)
    s3 = tmp_path / "s3"
    run_cli(_args("stage3", s3, [f"model.init={out / 'final'}", "model.lora={r: 4, alpha: 8}"], shards, tiny_sd_dir))
    assert not any("lora" in k for k in load_file(str(s3 / "final" / "model.safetensors")))


def test_a_run_frozen_throughout_leaves_the_lm_out_of_training(lms, shards):
    """``freeze_lm_steps >= max_steps``: the LM never trains, so it is not handed to the optimizer
    or a data-parallel wrapper at all (how the frozen phase runs under DDP: as its own run)."""
    from accelerate import Accelerator

    from kosmos_g.train.recipe import load_recipe
    from kosmos_g.train.stage1 import Stage1

    def stage(freeze: int) -> Stage1:
        fresh_process_state()
        recipe = load_recipe("tiny-stage1", ["model.init=null", "model.preset=tiny", f"model.mllm_init={lms['llama']}",
                                             "train.max_steps=4", f"stage1.freeze_lm_steps={freeze}",
                                             *[f"data.sources.{i}.shards={shards[k]}"
                                               for i, k in enumerate(("text", "caption", "interleaved"))]])
        recipe.validate("stage1")
        return Stage1(recipe, Accelerator(cpu=True))

    whole, phase = stage(4), stage(2)
    assert whole.trainable["mllm"] == 0 and whole.trainable["resampler"] > 0 and not whole.lm_params
    assert phase.trainable["mllm"] == sum(p.numel() for p in phase.model.mllm.parameters())
    phase.before_step(1)
    assert not any(p.requires_grad for p in phase.model.mllm.parameters())
    phase.before_step(2)
    assert all(p.requires_grad for p in phase.model.mllm.parameters())
