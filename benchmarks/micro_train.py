"""Seconds per training step of the micro U-Net on the CPU, by attention kernel and precision.

    python benchmarks/micro_train.py                   # writes results/micro-train-cpu.json
    python benchmarks/micro_train.py --repeats 20

Two passes, each the median of ``--repeats`` after two warm-ups, at micro-SD's size (32 px,
the shipped ``MicroUNetSizes``, 40 x 64 conditions), with random weights and inputs:

- ``micro_sd``: one micro-SD training step (forward, v-prediction MSE, backward into every
  weight, AdamW), batch ``--batch`` (32) on ``--threads`` threads: what ``train-all``'s micro-SD runs do;
- ``stage3_unet``: the frozen U-Net's forward and the backward into its condition only,
  half that batch on one thread: what each of stage 3's two data-parallel processes does per step.

Each is timed with diffusers' fused attention (``sdpa``: ``AttnProcessor2_0``) and with plain
matmuls (``matmul``: ``AttnProcessor``, what :func:`kosmos_g.kernels.use_matmul_attention_if_small`
picks), in float32 and under bfloat16 autocast. The JSON records whether the CPU computes
bfloat16 natively (:func:`kosmos_g.kernels.cpu_has_native_bf16`), which decides the
``"auto"`` precision.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        fn()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> dict:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from kosmos_g.kernels import cpu_has_native_bf16
    from kosmos_g.fileio import atomic_write_text
    from kosmos_g.micro.sd import SD_SIZE, micro_unet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="micro-SD's batch; stage 3's is half of it")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "micro-train-cpu.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    unet = micro_unet(cross_attention_dim=64)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    kernels = {"sdpa": AttnProcessor2_0, "matmul": AttnProcessor}
    results: dict[str, dict[str, float]] = {"micro_sd": {}, "stage3_unet": {}}

    def passes(batch: int, precision: str, train_weights: bool):
        x = torch.randn(batch, 3, SD_SIZE, SD_SIZE)
        cond = torch.randn(batch, 40, 64, requires_grad=not train_weights)
        t = torch.randint(0, 1000, (batch,))

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                pred = unet(x, t, cond).sample
            F.mse_loss(pred.float(), x).backward()
            if train_weights:
                opt.step()
                opt.zero_grad(set_to_none=True)

        return step

    for name, kernel in kernels.items():
        unet.set_attn_processor(kernel())
        for precision in ("fp32", "bf16"):
            key = f"{name}-{precision}"
            unet.train().requires_grad_(True)
            torch.set_num_threads(args.threads)
            results["micro_sd"][key] = round(_median_seconds(passes(args.batch, precision, True), args.repeats), 4)
            unet.eval().requires_grad_(False)
            torch.set_num_threads(1)
            results["stage3_unet"][key] = round(_median_seconds(passes(max(1, args.batch // 2), precision, False), args.repeats), 4)
            print(key, results["micro_sd"][key], results["stage3_unet"][key], flush=True)
    result = {"threads_micro_sd": args.threads, "threads_stage3_unet": 1, "repeats": args.repeats, "batch": args.batch,
              "seconds_per_step": results,
              "speedup_matmul_bf16_over_sdpa_fp32": {
                  k: round(v["sdpa-fp32"] / v["matmul-bf16"], 3) for k, v in results.items()},
              "cpu_has_native_bf16": cpu_has_native_bf16(),
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
