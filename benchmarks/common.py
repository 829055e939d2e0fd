"""Model sizes and measuring helpers shared by the benchmarks (not a test module)."""

from __future__ import annotations

import os
import statistics
import threading
import time

import torch

from kosmos_g.config import AlignerConfig, KosmosGConfig, MLLMConfig, ResamplerConfig, VisionConfig, get_preset

# SD1.5's unet/config.json, vae/config.json and scheduler_config.json, written out so
# that nothing is downloaded.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu",
)
SD15_VAE = dict(
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True,
    prediction_type="epsilon",
)
# CLIP ViT-L/14's text tower (SD1.5's text_encoder/config.json).
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def reduced_kosmos() -> KosmosGConfig:
    """A narrower Kosmos-G with the paper's structure (64 slots, 77x768 condition)."""
    return KosmosGConfig(
        vision=VisionConfig(hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048),
        resampler=ResamplerConfig(input_dim=512, output_dim=1024, num_queries=64, num_heads=16),
        mllm=MLLMConfig(hidden_size=1024, num_layers=8, num_heads=16, ffn_dim=4096, dropout=0.0,
                        attention_dropout=0.0),
        aligner=AlignerConfig(input_dim=1024, hidden_size=768, num_heads=12, ffn_dim=3072,
                              encoder_layers=4, decoder_layers=4, output_dim=768),
    )


def sizes(preset: str) -> tuple[KosmosGConfig, dict, dict, dict, int]:
    """(Kosmos-G config, U-Net kwargs, VAE kwargs, CLIP text kwargs, resolution)."""
    if preset == "tiny":
        unet = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                    attention_head_dim=8, norm_num_groups=8)
        vae = dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4)
        clip = dict(vocab_size=520, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=77, bos_token_id=512,
                    eos_token_id=513, pad_token_id=513)
        return get_preset("tiny"), unet, vae, clip, 32
    if preset == "reduced":
        unet = {**SD15_UNET, "block_out_channels": (160, 320, 640, 640), "layers_per_block": 1,
                "sample_size": 32}
        vae = {**SD15_VAE, "block_out_channels": (64, 128, 256, 256), "layers_per_block": 1}
        clip = {**CLIP_L_TEXT, "num_hidden_layers": 6}
        return reduced_kosmos(), unet, vae, clip, 256
    if preset == "full":
        return get_preset("kosmos-g"), SD15_UNET, SD15_VAE, CLIP_L_TEXT, 512
    raise ValueError(f"Unknown --size-preset {preset!r}; use tiny, reduced or full.")


def param_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())


class PeakRSS:
    """Largest resident set size seen while the block runs (Linux /proc sampling)."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux: fall back to the lifetime high-water mark
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.before = self.rss()
        self.peak = self.before
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training_step(step, info: dict, device: torch.device, *, warmup: int, repeats: int) -> dict:
    """Run ``step`` ``warmup`` + ``repeats`` times; ``info`` plus the median step seconds and the
    peak memory (CUDA: ``max_memory_allocated``; CPU: ``info["param_bytes"]`` plus the largest
    resident-set growth while stepping)."""
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as rss:
        for i in range(warmup + repeats):
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
    else:
        peak = info["param_bytes"] + int(rss.peak - rss.before)
    return {**info, "step_s": statistics.median(times), "step_s_all": times, "peak_mem_bytes": peak,
            "peak_mem_gib": peak / 2 ** 30}
