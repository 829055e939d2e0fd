"""Config validation and presets."""

from __future__ import annotations

import pytest

from kosmos_g.config import (AlignerConfig, KosmosGConfig, MLLMConfig, ResamplerConfig, VisionConfig,
                             get_preset, list_presets)


def test_presets():
    assert {"kosmos-g", "tiny"} <= set(list_presets())
    cfg = get_preset("kosmos-g")
    assert (cfg.mllm.num_layers, cfg.mllm.hidden_size, cfg.mllm.num_heads, cfg.mllm.ffn_dim) == (24, 2048, 32, 8192)
    assert (cfg.vision.hidden_size, cfg.vision.num_tokens, cfg.vision.hidden_act) == (1024, 257, "quick_gelu")
    assert (cfg.resampler.num_queries, cfg.resampler.num_heads) == (64, 32)
    assert (cfg.aligner.num_queries, cfg.aligner.output_dim, cfg.aligner.encoder_layers) == (77, 768, 12)
    assert cfg.mllm.vocab_size == 64007 and cfg.max_images == 10
    assert get_preset("tiny") is not get_preset("tiny")  # fresh copies


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        get_preset("huge")


@pytest.mark.parametrize("build,match", [
    (lambda: VisionConfig(image_size=225), "multiple of"),
    (lambda: MLLMConfig(hidden_size=100, num_heads=32), "not divisible"),
    (lambda: MLLMConfig(dropout=1.5), r"mllm.dropout must be in \[0, 1\)"),
    (lambda: MLLMConfig(backbone="gpt"), "'magneto' or 'hf'"),
    (lambda: MLLMConfig(backbone="hf"), "needs mllm.hf_config"),
    (lambda: ResamplerConfig(num_queries=0), "num_queries must be > 0"),
    (lambda: AlignerConfig(encoder_layers=-1), "encoder_layers must be >= 0"),
    (lambda: KosmosGConfig(resampler=ResamplerConfig(output_dim=1024, num_heads=16)), "must equal mllm.hidden_size"),
    (lambda: KosmosGConfig.from_dict({"bogus": 1}), "Unknown KosmosGConfig fields"),
    (lambda: ResamplerConfig(num_queries=12, local_queries=True), "square num_queries.*got 12.*9 or 16"),
    # the official 16 x 16 patch grid does not split into 3 x 3 tiles
    (lambda: KosmosGConfig(resampler=ResamplerConfig(num_queries=9, local_queries=True)),
     "16 x 16 patch grid does not split into 3 x 3 tiles"),
])
def test_validation_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_json_roundtrip(tmp_path):
    cfg = get_preset("tiny")
    cfg.save(tmp_path / "c.json")
    assert KosmosGConfig.load(tmp_path / "c.json") == cfg


def test_configs_written_before_local_queries_still_load():
    data = get_preset("tiny").to_dict()
    del data["resampler"]["local_queries"]
    assert KosmosGConfig.from_dict(data).resampler.local_queries is False


def test_sd2_sized_aligner_adds_projection():
    from kosmos_g.models import AlignerNet

    net = AlignerNet(AlignerConfig(input_dim=64, hidden_size=32, num_heads=4, ffn_dim=64, encoder_layers=1,
                                   decoder_layers=1, output_dim=48, max_positions=64))
    import torch

    out = net(torch.randn(1, 5, 64), torch.ones(1, 5, dtype=torch.long))
    assert out.shape == (1, 77, 48)
