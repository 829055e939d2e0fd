"""``kosmos-g micro train-all|eval|train-reader``: the micro world's models, from scratch, and their scores.

    kosmos-g micro train-all -o runs/micro             # ~105 min on 2 CPU cores; resumable
    kosmos-g micro train-all -o runs/s --standins shipped  # stages 1-3 only, on the shipped stand-ins
    kosmos-g micro train-all -o runs/smoke --smoke     # every step, a few iterations each
    kosmos-g micro eval                                # the shipped model: table + grid PNG
    kosmos-g micro eval --models runs/micro/release --quick
    kosmos-g micro train-reader -o runs/reader         # the attribute reader eval scores with (~8 min)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_EVAL_DIR = "outputs/micro-eval"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "micro", help="train and evaluate the micro-world Kosmos-G (the embedded default model)",
        description="The micro world: synthetic scenes in which every stage of Kosmos-G trains on a CPU.")
    sub = parser.add_subparsers(dest="micro_command", metavar="ACTION", required=True)

    train = sub.add_parser(
        "train-all", help="train tokenizer, micro-CLIP, micro-SD and Kosmos-G stages 1-3 from scratch",
        description="Reproduce the shipped micro models from scratch with fixed seeds: the stand-ins, then "
                    "stages 1-3 on the packaged micro-stage1/2/3 recipes. Each step is skipped when its "
                    "output folder exists, so an interrupted run resumes.")
    train.add_argument("-o", "--output-dir", required=True,
                       help="run folder (release/ in it holds the fp16 models the package ships)")
    train.add_argument("--smoke", action="store_true", help="a few iterations of every step (for tests)")
    train.add_argument("--threads", type=int, default=None,
                       help="CPU threads (default: 2 if available; with 2+, micro-SD trains beside stages 1-2)")
    train.add_argument("--clip-bind-weight", type=float, default=None, metavar="W",
                       help="micro-CLIP's binding loss weight (default 1.0, the shipped recipe, which keeps two "
                            "subjects' attributes apart in micro-SD; 0 turns it off)")
    train.add_argument("--unet-precision", choices=("auto", "fp32", "bf16"), default=None,
                       help="the micro U-Net's precision in micro-SD's training and stage 3 (default auto: "
                            "bf16 on CPUs with AVX512-BF16/AMX, where it is about twice as fast; fp32 elsewhere)")
    train.add_argument("--standins", default=None, metavar="DIR",
                       help="use this release folder's micro-CLIP and micro-SD (clip/, sd/; 'shipped': the "
                            "embedded ones) instead of training them; stages 1-3 are retrained on them")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=run_train_all)

    ev = sub.add_parser(
        "eval", help="micro DreamBench: attribute, context and edit accuracy, with baselines",
        description="Generate the micro DreamBench prompts with Kosmos-G, Kosmos-G after stage 2 only, "
                    "the text-only micro-SD and real renders; print the table and write a grid PNG.")
    ev.add_argument("--models", default=None,
                    help="a release folder (kosmos-g/, kosmos-g-stage2/, sd/, clip/); default: the embedded one")
    ev.add_argument("-o", "--output-dir", default=DEFAULT_EVAL_DIR,
                    help=f"folder for table.json, table.md and grid.png (default {DEFAULT_EVAL_DIR})")
    ev.add_argument("--quick", action="store_true", help="the small fixed set the tests use (1 sample per prompt)")
    ev.add_argument("--samples", type=int, default=None, help="samples per prompt (default 4; quick: 1)")
    ev.add_argument("--steps", type=int, default=None,
                    help="denoising steps (default: the model's generation_config.json)")
    ev.add_argument("--guidance", type=float, default=None,
                    help="guidance scale (default: the model's generation_config.json)")
    ev.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ev.add_argument("--reader", default=None,
                    help="attribute reader folder that scores the images (default: the shipped one)")
    ev.set_defaults(func=run_eval)

    rd = sub.add_parser(
        "train-reader", help="train the attribute reader micro DreamBench scores with",
        description="Train the CNN that reads shape, colour, pattern, size and position back from "
                    "generated images, on renders of random scenes only (the shipped one used the defaults).")
    rd.add_argument("-o", "--output-dir", required=True,
                    help="output folder, must not exist (config.json, model.safetensors, train.json)")
    rd.add_argument("--steps", type=int, default=4000, help="training steps (default 4000)")
    rd.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    rd.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as shipped)")
    rd.add_argument("--no-progress", action="store_true", help="no progress bar")
    rd.set_defaults(func=run_train_reader)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} {value} must be >= 1")


def run_train_all(args: argparse.Namespace) -> int:
    from ..fileio import prepare_output_dir
    from ..micro.train_all import SHIPPED, SMOKE, train_all, with_clip_bind_weight

    _positive("--threads", args.threads)
    recipe = SMOKE if args.smoke else SHIPPED
    if args.clip_bind_weight is not None:
        if args.clip_bind_weight < 0:
            raise ValueError(f"--clip-bind-weight {args.clip_bind_weight} must be >= 0 (0: off; the shipped "
                             f"recipe: {SHIPPED.clip.bind_weight})")
        recipe = with_clip_bind_weight(recipe, args.clip_bind_weight)
    prepare_output_dir(args.output_dir)
    record = train_all(args.output_dir, recipe, progress=not args.no_progress, threads=args.threads,
                       unet_precision=args.unet_precision, standins=args.standins)
    print(json.dumps({"output_dir": str(Path(args.output_dir)), "seconds": record["seconds"],
                      "wall_s": record["wall_s"]}))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..fileio import prepare_output_dir
    from ..micro.evaluate import evaluate, format_table

    _positive("--threads", args.threads)
    _positive("--samples", args.samples)
    _positive("--steps", args.steps)
    prepare_output_dir(args.output_dir)  # before the minutes of generation, not after
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate(args.models, out_dir=args.output_dir, quick=args.quick, reader=args.reader,
                      samples=args.samples, num_inference_steps=args.steps, guidance_scale=args.guidance)
    print(format_table(result))
    out = Path(args.output_dir)
    print(f"wrote {out / 'table.json'}, {out / 'table.md'} and {out / 'grid.png'}")
    return 0


def run_train_reader(args: argparse.Namespace) -> int:
    import torch

    from ..fileio import prepare_output_dir
    from ..micro.reader import train_reader

    _positive("--threads", args.threads)
    out = Path(args.output_dir)
    if out.exists():
        raise ValueError(f"--output-dir {out} already exists; choose a new folder (a reader is never "
                         "written over another).")
    prepare_output_dir(out.parent)
    torch.set_num_threads(args.threads)
    record = train_reader(args.output_dir, steps=args.steps, seed=args.seed, progress=not args.no_progress)
    print(json.dumps({"output_dir": str(Path(args.output_dir)), "seconds": round(record["seconds"], 1),
                      "accuracy_on_renders": record["accuracy"]}))
    return 0
