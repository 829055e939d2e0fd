"""KosmosG at tiny size: shapes, causality, padding invariance, splicing, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from kosmos_g import KosmosG, get_preset
from kosmos_g.config import KosmosGConfig, MLLMConfig

RED = Image.new("RGB", (40, 30), (220, 20, 20))
BLUE = Image.new("RGB", (30, 50), (20, 20, 220))
GREEN = Image.new("RGB", (33, 33), (20, 200, 20))


def test_encode_shape_and_unconditional(tiny):
    model, proc = tiny
    batch = proc("<i> wearing <i>", images=[RED, BLUE])
    with torch.no_grad():
        cond = model.encode(**batch)
        uncond = model.unconditional(3)
        bos_only = model.encode(torch.tensor([[proc.tokenizer.bos_id]]), torch.ones(1, 1, dtype=torch.long))
    assert cond.shape == (1, 77, 32)
    assert uncond.shape == (3, 77, 32)
    torch.testing.assert_close(uncond[0], bos_only[0], rtol=0, atol=0)


def test_causality(tiny):
    model, _ = tiny
    ids = torch.randint(4, 60, (1, 12))
    mask = torch.ones_like(ids)
    changed = ids.clone()
    changed[0, 8:] = torch.randint(4, 60, (4,))
    with torch.no_grad():
        a = model.hidden_states(ids, mask)
        b = model.hidden_states(changed, mask)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4  # later tokens do see the change


def test_batch_equals_each_prompt_alone(tiny):
    model, proc = tiny
    prompts = ["<i> wearing <i>", "a dog on the beach", ["a photo of", GREEN, "in the city"], "<i>"]
    images = [[RED, BLUE], [], None, [BLUE]]
    with torch.no_grad():
        batched = model.encode(**proc(prompts, images=images))
        for i, (p, im) in enumerate(zip(prompts, images)):
            alone = model.encode(**proc([p], images=[im]))
            torch.testing.assert_close(batched[i], alone[0], rtol=0, atol=1e-5)


def test_image_splicing_writes_exactly_the_slots(tiny):
    model, proc = tiny
    batch = proc(["x <i> y <i>", "z"], images=[[RED, BLUE], []])
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_mask"])
        tokens = model.mllm.embed(batch["input_ids"])
        feats = model.image_features(batch["pixel_values"])  # (2, Q, C)
    slots = batch["image_mask"]
    q = model.config.num_image_tokens
    assert int(slots.sum()) == 2 * q
    torch.testing.assert_close(embeds[~slots], tokens[~slots], rtol=0, atol=0)
    torch.testing.assert_close(embeds[slots], feats.reshape(2 * q, -1), rtol=0, atol=0)
    # Layout: <image>, q slots, </image> per image, slots hold the <image> id.
    ids = batch["input_ids"][0].tolist()
    start = ids.index(proc.tokenizer.boi_id)
    assert ids[start + q + 1] == proc.tokenizer.eoi_id
    assert slots[0, start + 1:start + 1 + q].all() and not slots[0, start]


def test_vision_tokens_are_l2_normalised(tiny):
    model, proc = tiny
    with torch.no_grad():
        tokens = model.vision(proc("<i>", images=[RED])["pixel_values"])
    assert tokens.shape == (1, model.config.vision.num_tokens, 32)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(1, 5), rtol=0, atol=1e-5)


def test_save_load_roundtrip_is_bit_exact(tiny, tmp_path):
    model, proc = tiny
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temporaries
    again = KosmosG.from_pretrained(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    batch = proc("<i> on the beach", images=[RED])
    with torch.no_grad():
        assert torch.equal(model.encode(**batch), again.encode(**batch))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loads_in_half_precision(tiny_kosmos_dir, dtype):
    from kosmos_g import KosmosGProcessor

    model = KosmosG.from_pretrained(tiny_kosmos_dir, dtype=dtype, device="cpu")
    assert {p.dtype for p in model.parameters()} == {dtype}
    proc = KosmosGProcessor.from_pretrained(tiny_kosmos_dir)
    ref = KosmosG.from_pretrained(tiny_kosmos_dir)
    batch = proc("<i> wearing a hat", images=[RED])
    with torch.no_grad():
        half = model.encode(**batch)
        full = ref.encode(**batch)
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()


def test_strict_loading_lists_missing_and_unexpected(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = tiny
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop("aligner.queries")
    state["aligner.bogus"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)missing keys \(1\): \['aligner.queries'\]"
                                         r".*unexpected keys \(1\): \['aligner.bogus'\]"):
        KosmosG.from_pretrained(tmp_path)


def test_shape_mismatch_is_reported(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["aligner"]["num_queries"] = 76
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="aligner.queries: checkpoint \\(77, 32\\) vs model \\(76, 32\\)"):
        KosmosG.from_pretrained(tmp_path)


def test_missing_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        KosmosG.from_pretrained(tmp_path)


def test_lock_and_unlock_last_block(tiny):
    model, _ = tiny
    model.vision.unlock_last_block()
    trainable = {n for n, p in model.vision.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("clip.encoder.layers.1.", "clip.post_layernorm.")) for n in trainable)
    model.vision.lock()
    assert not any(p.requires_grad for p in model.vision.parameters())


def test_gradient_checkpointing_matches(tiny):
    model, proc = tiny
    model.train()
    batch = proc("<i> wearing <i>", images=[RED, BLUE])
    out = model.encode(**batch).square().mean()
    out.backward()
    grads = {n: p.grad.clone() for n, p in model.mllm.named_parameters()}
    model.zero_grad()
    model.mllm.gradient_checkpointing = True
    out2 = model.encode(**batch).square().mean()
    out2.backward()
    torch.testing.assert_close(out, out2)
    for n, p in model.mllm.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6)


def test_local_queries_read_only_their_own_tile():
    """With ``local_queries`` each of the k x k queries reads the class token, its own tile of
    the patch grid and the latents: changing a patch moves exactly the query whose tile holds
    it. Off (the released model), every query reads every patch."""
    from kosmos_g.config import ResamplerConfig
    from kosmos_g.models.resampler import Resampler

    torch.manual_seed(0)
    local = Resampler(ResamplerConfig(input_dim=8, output_dim=16, num_queries=4, num_heads=2, local_queries=True))
    tokens = torch.randn(1, 1 + 16, 8)  # class token + a 4 x 4 patch grid: 2 x 2 tiles of 2 x 2 patches
    base = local(tokens)
    for row, col in [(0, 0), (1, 3), (3, 0), (2, 2)]:
        changed = tokens.clone()
        changed[0, 1 + row * 4 + col] += 1.0
        moved = (local(changed) - base).abs().amax(-1)[0] > 1e-6  # (4,) which queries moved
        owner = (row // 2) * 2 + col // 2
        assert moved.tolist() == [q == owner for q in range(4)], (row, col)
    changed = tokens.clone()
    changed[0, 0] += 1.0  # the class token reaches every query
    assert ((local(changed) - base).abs().amax(-1) > 1e-6).all()

    glob = Resampler(ResamplerConfig(input_dim=8, output_dim=16, num_queries=4, num_heads=2))
    glob.load_state_dict(local.state_dict())
    changed = tokens.clone()
    changed[0, 1] += 1.0
    assert ((glob(changed) - glob(tokens)).abs().amax(-1) > 1e-6).all()
    with pytest.raises(ValueError, match="got 16 tokens"):
        local(torch.randn(1, 16, 8))


def test_aligner_reconstruction_shapes():
    cfg = get_preset("tiny")
    cfg.aligner.reconstruction = True
    model = KosmosG(cfg)
    hidden = torch.randn(2, 9, 64)
    cond = model.aligner(hidden, torch.ones(2, 9, dtype=torch.long))
    assert model.aligner.reconstruct(cond, 9).shape == (2, 9, 64)
    with pytest.raises(ValueError, match="no N"):
        KosmosG(get_preset("tiny")).aligner.reconstruct(cond, 9)


def test_too_long_sequence_errors(tiny):
    model, _ = tiny
    ids = torch.zeros(1, 300, dtype=torch.long)
    with pytest.raises(ValueError, match="max_positions=256"):
        model.hidden_states(ids, torch.ones_like(ids))


def test_hf_causal_lm_backbone_roundtrip(tmp_path):
    from transformers import LlamaConfig

    llama = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        tie_word_embeddings=True)
    cfg = get_preset("tiny")
    cfg.mllm = MLLMConfig(backbone="hf", hf_config=llama.to_dict(), vocab_size=300, hidden_size=64,
                          num_layers=2, num_heads=4, ffn_dim=128, max_positions=128,
                          dropout=0.0, attention_dropout=0.0)
    cfg = KosmosGConfig.from_dict(cfg.to_dict())
    torch.manual_seed(0)
    model = KosmosG(cfg).eval()
    ids = torch.randint(3, 300, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        cond = model.encode(ids, mask)
        alone = model.encode(ids[1:, :5], mask[1:, :5])
    assert cond.shape == (2, 77, 32)
    torch.testing.assert_close(cond[1], alone[0], rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    again = KosmosG.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again.encode(ids, mask), cond)
    # The tied LM head stays tied after loading.
    lm = again.mllm.model
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight


def test_paper_parameter_counts_on_meta_device():
    with torch.device("meta"):
        model = KosmosG(get_preset("kosmos-g"))

    def count(module):
        return sum(p.numel() for p in module.parameters())

    encoder = count(model.vision) + count(model.resampler) + count(model.mllm)
    aligner = count(model.aligner)
    assert 1.55e9 < encoder < 1.70e9, encoder  # "about 1.6B"
    assert 220e6 < aligner < 230e6, aligner  # "about 225M" incl. 32,768 learned positions
    assert 1.85e9 < encoder + aligner < 1.95e9  # "Kosmos-G-1.9B"
    assert model.aligner.in_positions.shape == (32768, 768)
    assert count(model.vision) == 303_179_776  # CLIP ViT-L/14 without its projection
