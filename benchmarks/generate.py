"""Speed and memory of KosmosGPipeline next to diffusers' own StableDiffusionPipeline.

Both pipelines share ONE U-Net and VAE, use the same scheduler class and config, the
same steps, size, guidance and number of images; the only difference is the
condition: Kosmos-G reading "<i> wearing <i>" + two images (and the `<s>` null
condition) versus CLIP's text encoder reading a caption (and the empty prompt). All
weights are random (no downloads): speed and memory do not depend on their values.

    python benchmarks/generate.py --size-preset reduced --device cpu
    python benchmarks/generate.py --size-preset full --device cuda --dtype fp16

Presets:
  tiny     the test-suite models (77x32 condition, 32x32 images): a smoke run
  reduced  a narrower Kosmos-G, half-width SD1.5 U-Net/VAE, 6-layer CLIP; 256x256
  full     the `kosmos-g` preset (1.9B) + SD1.5's U-Net/VAE configs + CLIP ViT-L/14's
           text encoder; 512x512 (what the paper runs)

Writes JSON (default benchmarks/results/generate-<device>.json): seconds per image
(median of --repeats after --warmup), peak memory, and ours/diffusers ratios.
Peak memory = parameter bytes of the pipeline's models + the largest extra memory
seen during one call (CUDA: torch.cuda.max_memory_allocated above the level before
the call; CPU: resident set size sampled every millisecond from /proc, above the
level before the call; both pipelines live in the same process, so only extras are
comparable from RSS, and parameter bytes are counted separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kosmos_g.models import KosmosG, resolve_dtype
from kosmos_g.pipeline import KosmosGPipeline, make_scheduler
from kosmos_g.processing import KosmosGProcessor
from kosmos_g.testing import make_tiny_clip_tokenizer, make_tiny_tokenizer

from common import SD15_SCHEDULER, PeakRSS, param_bytes, sizes, sync


def time_interleaved(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, alternating them so drift hits both alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Largest memory above the pre-call level during one call (not timed)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with PeakRSS() as rss:
        fn()
    return int(rss.peak - rss.before)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-preset", default="reduced", choices=["tiny", "reduced", "full"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                    help="default: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--size", type=int, default=None, help="image side (default: the preset's)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--scheduler", default="dpm++")
    ap.add_argument("--num-images", type=int, default=1, help="images per prompt (one call)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/generate-<device>.json)")
    args = ap.parse_args(argv)

    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype or ("fp16" if device.type == "cuda" else "fp32"))
    workdir = Path(tempfile.mkdtemp(prefix="kosmos-g-bench-"))
    kcfg, unet_kw, vae_kw, clip_kw, default_size = sizes(args.size_preset)
    size = args.size or default_size

    torch.manual_seed(0)
    def place(module):
        # (casting only when needed: diffusers warns on any .to(dtype=...))
        module = module.eval().to(device)
        return module if dtype == torch.float32 else module.to(dtype)

    with device:  # random init where the model runs (a 1.9B init on the CPU alone takes minutes)
        kosmos = place(KosmosG(kcfg))
        unet = place(UNet2DConditionModel(**unet_kw))
        vae = place(AutoencoderKL(**vae_kw))
        clip = place(CLIPTextModel(CLIPTextConfig(**clip_kw)))
    processor = KosmosGProcessor.from_config(make_tiny_tokenizer(workdir / "spm"), kcfg)
    make_tiny_clip_tokenizer(workdir / "clip-tok")
    tokenizer = CLIPTokenizer.from_pretrained(str(workdir / "clip-tok"))

    ours = KosmosGPipeline(kosmos, processor, unet, vae, make_scheduler(args.scheduler, SD15_SCHEDULER))
    theirs = StableDiffusionPipeline(vae=vae, text_encoder=clip, tokenizer=tokenizer, unet=unet,
                                     scheduler=make_scheduler(args.scheduler, SD15_SCHEDULER),
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ours.set_progress_bar_config(disable=True)
    theirs.set_progress_bar_config(disable=True)

    rng = np.random.RandomState(0)
    dog, hat = (Image.fromarray((rng.rand(256, 256, 3) * 255).astype(np.uint8)) for _ in range(2))
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=size, width=size,
                  num_images_per_prompt=args.num_images, output_type="pil")

    def run_ours():
        return ours("<i> wearing <i>", prompt_images=[dog, hat], generator=torch.Generator("cpu").manual_seed(0), **common)

    def run_theirs():
        return theirs("a photo of a dog wearing a hat", generator=torch.Generator("cpu").manual_seed(0), **common)

    def encode_ours():
        return ours.encode_prompt("<i> wearing <i>", [dog, hat])

    def encode_theirs():
        with torch.no_grad():
            return theirs.encode_prompt("a photo of a dog wearing a hat", device, 1, True, "")

    print(f"timing {args.repeats} calls of each pipeline (after {args.warmup} warm-up) ...", file=sys.stderr)
    calls = time_interleaved({"kosmos_g": run_ours, "diffusers": run_theirs}, device, args.warmup, args.repeats)
    encodes = time_interleaved({"kosmos_g": encode_ours, "diffusers": encode_theirs}, device, 1,
                               max(args.repeats, 5))
    results = {}
    for name, fn, encoder in (("kosmos_g", run_ours, kosmos), ("diffusers", run_theirs, clip)):
        params = param_bytes(encoder, unet, vae)
        extra = peak_extra_bytes(fn, device)
        results[name] = {
            "seconds_per_image": statistics.median(calls[name]) / args.num_images,
            "seconds_per_call": [round(t, 4) for t in calls[name]],
            "encoder_seconds": statistics.median(encodes[name]),
            "encoder_params": sum(p.numel() for p in encoder.parameters()),
            "param_bytes": params, "peak_extra_bytes": extra, "peak_bytes": params + extra,
        }
    ratio = {k: results["kosmos_g"][k] / results["diffusers"][k]
             for k in ("seconds_per_image", "peak_bytes", "peak_extra_bytes") if results["diffusers"][k] > 0}
    report = {
        "benchmark": "generate", "size_preset": args.size_preset, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "dtype": str(dtype).replace("torch.", ""), "steps": args.steps, "height": size, "width": size,
        "guidance": args.guidance, "scheduler": args.scheduler, "num_images_per_prompt": args.num_images,
        "warmup": args.warmup, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__, "transformers": __import__("transformers").__version__,
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "kosmos_prompt": {"text": "<i> wearing <i>", "images": 2,
                          "tokens": len(processor.encode_prompt("<i> wearing <i>", [dog, hat]).input_ids)},
        "clip_prompt": "a photo of a dog wearing a hat",
        "results": results, "ratio_kosmos_g_over_diffusers": ratio,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = Path(args.out or f"benchmarks/results/generate-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps({"out": str(out), "ratio": ratio,
                      "seconds_per_image": {k: round(v["seconds_per_image"], 3) for k, v in results.items()}},
                     indent=2))
    return report


if __name__ == "__main__":
    main()
