"""Seconds per image of the embedded micro Kosmos-G on the CPU (goal: <= 0.5 s on 2 cores).

    python benchmarks/micro.py                       # 2 threads, writes results/micro-cpu.json
    python benchmarks/micro.py --threads 1 --repeats 3

One image = the whole call of ``KosmosGPipeline`` (prompt and subject image encoded,
the model's ``generation_config.json`` (14 DPM-Solver++ steps, guidance 3.0),
output as pixels), batch 1, after
one warm-up call; the median of ``--repeats`` runs is reported, with the batch-16
throughput micro DreamBench sees.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    from kosmos_g.fileio import atomic_write_text
    from kosmos_g.generation_config import GenerationConfig
    from kosmos_g.micro import evaluate as E

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="a micro release folder (default: the embedded one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's generation_config.json")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "micro-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = Path(args.models) if args.models else E.embedded_models()
    sampling = GenerationConfig.from_pretrained(models / "kosmos-g")
    steps = args.steps or sampling.num_inference_steps
    gen = E.KosmosGGenerator(models / "kosmos-g", models / "sd", steps=steps, guidance=sampling.guidance_scale)
    one = E.time_one_image(gen, repeats=args.repeats)
    cases = E.single_cases(1)
    gen(cases[:2], [0, 1])  # warm-up at batch size > 1
    t0 = time.perf_counter()
    gen(cases, list(range(len(cases))))
    batched = (time.perf_counter() - t0) / len(cases)
    result = {"threads": args.threads, "steps": steps, "guidance": sampling.guidance_scale,
              "seconds_per_image_batch1": round(one, 4), "seconds_per_image_batch16": round(batched, 4),
              "goal_seconds_per_image": 0.5, "meets_goal": bool(one <= 0.5),
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "numpy": np.__version__}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
