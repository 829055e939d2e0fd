"""The attention kernel choice for small U-Nets (kosmos_g.kernels)."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from kosmos_g.kernels import largest_attention_map, use_matmul_attention_if_small
from kosmos_g.micro import sd as micro_sd


def _processors(unet) -> set[type]:
    return {type(p) for p in unet.attn_processors.values()}


def _sd_like_unet() -> UNet2DConditionModel:
    # SD1.5's layout at toy width: attention from the first (64x64) level on
    return UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4)


def test_largest_attention_map_reads_the_config():
    micro = micro_sd.micro_unet(micro_sd.SMOKE_UNET, cross_attention_dim=8)  # attention at level 2 of 32 px
    assert largest_attention_map(micro) == 8 * 8
    assert largest_attention_map(_sd_like_unet()) == 64 * 64
    no_attention = UNet2DConditionModel(sample_size=16, block_out_channels=(8, 8), layers_per_block=1,
                                        down_block_types=("DownBlock2D", "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None,
                                        norm_num_groups=4, cross_attention_dim=8)
    assert largest_attention_map(no_attention) == 0


def test_small_maps_get_matmul_attention_with_the_same_outputs():
    torch.manual_seed(0)
    unet = micro_sd.micro_unet(micro_sd.SMOKE_UNET, cross_attention_dim=8).eval()
    assert _processors(unet) == {AttnProcessor2_0}
    x, t, c = torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), torch.randn(2, 5, 8)
    with torch.no_grad():
        fused = unet(x, t, c).sample
        assert use_matmul_attention_if_small(unet)
        assert _processors(unet) == {AttnProcessor}
        plain = unet(x, t, c).sample
    torch.testing.assert_close(plain, fused, rtol=1e-5, atol=1e-5)


def test_large_maps_keep_the_fused_kernel():
    unet = _sd_like_unet()
    assert not use_matmul_attention_if_small(unet)
    assert _processors(unet) == {AttnProcessor2_0}
    assert use_matmul_attention_if_small(unet, max_tokens=4096)  # the limit is the caller's


@pytest.mark.parametrize("loader", ["load_micro_sd", "pipeline"])
def test_micro_loaders_pick_matmul_attention(loader):
    from kosmos_g.micro.evaluate import embedded_models

    models = embedded_models()
    if loader == "load_micro_sd":
        unet = micro_sd.load_micro_sd(models / "sd").unet
        assert micro_sd.load_micro_sd(models / "sd").text_encoder.dtype == torch.float32  # stored fp16
    else:
        from kosmos_g.pipeline import KosmosGPipeline

        unet = KosmosGPipeline.from_pretrained(models / "kosmos-g", models / "sd").unet
    assert _processors(unet) == {AttnProcessor}


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    from kosmos_g import kernels

    for avx512_bf16, amx, want in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert kernels.cpu_has_native_bf16() is (want == "bf16")
        assert kernels.resolve_precision("auto") == want
        assert kernels.resolve_precision("auto", "cpu") == want
        assert kernels.resolve_precision("fp32") == "fp32" and kernels.resolve_precision("bf16") == "bf16"
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a build without the private check
    assert kernels.resolve_precision("auto") == "fp32"
    with pytest.raises(ValueError, match=r"precision='fp16' is unknown; use one of \['fp32', 'bf16', 'auto'\]"):
        kernels.resolve_precision("fp16")


def test_micro_train_benchmark_writes_json(tmp_path, monkeypatch):
    """benchmarks/micro_train.py stays runnable (batch 2, one timed repeat)."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "micro_train.py"
    spec = importlib.util.spec_from_file_location("bench_micro_train", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    n = torch.get_num_threads()
    try:
        bench.main(["--threads", "1", "--repeats", "1", "--batch", "2", "--out", str(tmp_path / "b.json")])
    finally:
        torch.set_num_threads(n)
    report = json.loads((tmp_path / "b.json").read_text())
    kernels = {"sdpa-fp32", "sdpa-bf16", "matmul-fp32", "matmul-bf16"}
    assert {k: set(v) for k, v in report["seconds_per_step"].items()} == {"micro_sd": kernels, "stage3_unet": kernels}
    assert all(t > 0 for v in report["seconds_per_step"].values() for t in v.values())
    assert isinstance(report["cpu_has_native_bf16"], bool)
