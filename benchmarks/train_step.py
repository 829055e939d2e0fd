"""Stage-3 training step of Kosmos-G next to a plain SD1.5 U-Net fine-tuning step.

Both steps see the same batch size, target resolution and precision, and both encode
their targets with the same frozen VAE each step:

- **kosmos_g_stage3**: our stage-3 step (``kosmos_g.train.stage3``): the interleaved prompt
  (text + ``--images-per-prompt`` images, 64 slots each) through the vision tower,
  resampler, MLLM and AlignerNet M, the condition into the *frozen* U-Net, epsilon MSE,
  backward through the U-Net into the encoder, fused AdamW on what stage 3 trains (MLLM,
  resampler, last vision block, M: 1.6B of the 1.9B at full size).
- **sd_unet_finetune**: what diffusers' ``train_text_to_image.py`` does: CLIP's frozen
  text encoder reads 77 tokens, the *trainable* U-Net predicts the noise, fused AdamW on
  the U-Net (860M at full size).

Weights are random (no downloads); speed and memory do not depend on their values. Each
step runs in its own subprocess so that peak memory is measured in isolation.

    python benchmarks/train_step.py --size-preset reduced            # CPU, the committed JSON
    python benchmarks/train_step.py --size-preset full --precision bf16 --gradient-checkpointing

Presets (the same model sizes as benchmarks/generate.py):
  tiny     the test-suite models, 32x32 targets: a smoke run
  reduced  a narrower Kosmos-G (8-layer 1024-wide MLLM, 6-layer ViT at 224 px, 4+4-layer
           AlignerNet), a half-width 1-block-per-level SD1.5 U-Net/VAE, 6-layer CLIP text; 256x256
  full     the `kosmos-g` preset (1.9B) + SD1.5's U-Net/VAE + CLIP ViT-L/14 text; 512x512

Peak memory: CUDA: ``torch.cuda.max_memory_allocated`` over the steps (weights, gradients,
optimizer state, activations). CPU: parameter bytes + the largest resident-set growth
seen while stepping (sampled every millisecond from /proc; gradients, AdamW state and
activations all appear there).

Writes JSON (default ``benchmarks/results/train_step-<preset>-<device>.json``) with the
median step time of each, their peak memory, and the ratios kosmos_g / sd (goal at full
size on a GPU: step-time ratio <= 1.3).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from common import SD15_SCHEDULER, param_bytes, sizes, time_training_step

# ----------------------------------------------------------------------------- the two steps

def build_kosmos_step(args, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from kosmos_g.models import KosmosG
    from kosmos_g.train.modeling import enable_gradient_checkpointing, set_trainable
    from kosmos_g.train.stage3 import DiffusionModule, Stage3Options, draw_latents, encode_targets, vae_geometry

    kcfg, unet_kw, vae_kw, _, res = sizes(args.size_preset)
    res = args.resolution or res
    torch.manual_seed(0)
    with device:  # random init where the model runs (a 1.9B init on the CPU alone takes minutes)
        model = KosmosG(kcfg).to(device).train()
        unet = UNet2DConditionModel(**unet_kw).to(device, dtype).requires_grad_(False).eval()
        vae = AutoencoderKL(**vae_kw).to(device, dtype).requires_grad_(False).eval()
    set_trainable(model, mllm=True, resampler=True, vision_last_block=True, aligner=True)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
        unet.enable_gradient_checkpointing()
    options = Stage3Options(
        resolution=res, cond_dropout=0.1, caption_drop=0.5, entity_replace_prob=0.5, white_crop_prob=0.5,
        max_caption_tokens=256, min_caption_image_size=0, foreground_weight=1.0, text_align_weight=0.0,
        num_train_timesteps=1000, prediction_type="epsilon", latent_factor=vae_geometry(vae)[0],
        clip_length=kcfg.aligner.num_queries, unet_bf16=False)
    module = DiffusionModule(model, unet, DDPMScheduler.from_config(SD15_SCHEDULER), ["edit"], options)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, fused=True)

    # An edit-like prompt per sample: <s> 16 words <image> 64 slots </image> 8 words.
    B, n_img, q = args.batch_size, args.images_per_prompt, kcfg.num_image_tokens
    g = torch.Generator().manual_seed(0)
    rows, masks = [], []
    for _ in range(B):
        ids, mask = [0] + torch.randint(4, kcfg.mllm.vocab_size - 8, (16,), generator=g).tolist(), [False] * 17
        for _ in range(n_img):
            ids += [kcfg.mllm.vocab_size - 4] * (q + 1) + [kcfg.mllm.vocab_size - 3]
            mask += [False] + [True] * q + [False]
        ids += torch.randint(4, kcfg.mllm.vocab_size - 8, (8,), generator=g).tolist()
        mask += [False] * 8
        rows.append(ids)
        masks.append(mask)
    size = kcfg.vision.image_size
    batch = {
        "input_ids": torch.tensor(rows, device=device), "attention_mask": torch.ones(len(rows), len(rows[0]),
                                                                                     dtype=torch.long, device=device),
        "image_mask": torch.tensor(masks, device=device),
        "pixel_values": torch.randn(B * n_img, 3, size, size, generator=g).to(device),
        "timesteps": torch.randint(0, 1000, (B,), generator=g).to(device),
        "drop": torch.zeros(B, dtype=torch.bool, device=device),
        "source_ids": torch.zeros(B, dtype=torch.long, device=device),
    }
    targets = torch.rand(B, 3, res, res, generator=g).mul(2).sub(1).to(device)
    seeds = list(range(B))

    def step() -> None:
        latents, noise = draw_latents(encode_targets(vae, targets), seeds, vae.config.scaling_factor)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = module({**batch, "latents": latents, "noise": noise})
        loss = out["loss"][0] / B
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    info = {"params": sum(p.numel() for p in model.parameters()), "trainable_params": sum(p.numel() for p in params),
            "frozen_unet_params": sum(p.numel() for p in unet.parameters()),
            "prompt_positions": len(rows[0]), "param_bytes": param_bytes(model, unet, vae)}
    return step, info


def build_sd_step(args, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from kosmos_g.train.stage3 import draw_latents, encode_targets

    _, unet_kw, vae_kw, clip_kw, res = sizes(args.size_preset)
    res = args.resolution or res
    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel(**unet_kw).to(device).train()  # fp32 master weights, autocast
        vae = AutoencoderKL(**vae_kw).to(device, dtype).requires_grad_(False).eval()
        text = CLIPTextModel(CLIPTextConfig(**clip_kw)).to(device, dtype).requires_grad_(False).eval()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    sched = DDPMScheduler.from_config(SD15_SCHEDULER)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, fused=True)
    B = args.batch_size
    g = torch.Generator().manual_seed(0)
    clip_ids = torch.randint(0, clip_kw["vocab_size"] - 2, (B, 77), generator=g).to(device)
    t = torch.randint(0, 1000, (B,), generator=g).to(device)
    targets = torch.rand(B, 3, res, res, generator=g).mul(2).sub(1).to(device)
    seeds = list(range(B))

    def step() -> None:
        latents, noise = draw_latents(encode_targets(vae, targets), seeds, vae.config.scaling_factor)
        with torch.no_grad():
            cond = text(input_ids=clip_ids).last_hidden_state
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    info = {"params": sum(p.numel() for p in unet.parameters()),
            "trainable_params": sum(p.numel() for p in unet.parameters()),
            "param_bytes": param_bytes(unet, vae, text)}
    return step, info



def worker(args) -> dict:
    """Build one step, run warm-up + timed repeats, measure peak memory; print JSON."""
    device = torch.device(args.device)
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    if args.threads:
        torch.set_num_threads(args.threads)
    build = build_kosmos_step if args.worker == "kosmos_g_stage3" else build_sd_step
    step, info = build(args, device, dtype)
    return time_training_step(step, info, device, warmup=args.warmup, repeats=args.repeats)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-preset", default="reduced", choices=["tiny", "reduced", "full"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default=None, choices=["no", "bf16", "fp16"],
                    help="mixed precision for both steps (default: bf16 on CUDA, no on CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 2 (tiny/reduced), 4 (full)")
    ap.add_argument("--resolution", type=int, default=None, help="target side (default: the preset's)")
    ap.add_argument("--images-per-prompt", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "no")
    args.batch_size = args.batch_size or (4 if args.size_preset == "full" else 2)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}

    results = {}
    for name in ("kosmos_g_stage3", "sd_unet_finetune"):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", name]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]['step_s']:.3f} s/step, peak {results[name]['peak_mem_gib']:.2f} GiB",
              file=sys.stderr)
    k, s = results["kosmos_g_stage3"], results["sd_unet_finetune"]
    report = {
        "benchmark": "train_step", "size_preset": args.size_preset, "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor()
        or platform.machine(),
        "precision": args.precision, "batch_size": args.batch_size,
        "resolution": args.resolution or sizes(args.size_preset)[4], "images_per_prompt": args.images_per_prompt,
        "gradient_checkpointing": args.gradient_checkpointing, "warmup": args.warmup, "repeats": args.repeats,
        "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
        **results,
        "ratio": {"step_time": k["step_s"] / s["step_s"], "peak_memory": k["peak_mem_bytes"] / s["peak_mem_bytes"]},
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"train_step-{args.size_preset}-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratio"]), "->", out, file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
