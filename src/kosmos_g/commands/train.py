"""``kosmos-g train stage1|stage2|stage3 --config recipe.yaml [key=value ...]``.

The same command runs on one CPU and under ``accelerate launch`` (DDP, FSDP, DeepSpeed):

    kosmos-g train stage2 --config tiny-stage2 -o runs/s2
    accelerate launch --num_processes 8 -m kosmos_g.cli train stage3 --config my-stage3.yaml
"""

from __future__ import annotations

import argparse
import json


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe YAML path, or a packaged recipe name (stage1, tiny-stage2, ...)")
    parser.add_argument("-o", "--output-dir", metavar="DIR",
                        help="folder for checkpoints, logs and the export; sets train.output_dir "
                             "(default: the recipe's)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train one Kosmos-G stage from a YAML recipe",
        description="Train stage 1 (multimodal LM), 2 (alignment) or 3 (instruction tuning) from a YAML "
                    "recipe; key.sub=value arguments override recipe entries (values are read as YAML). "
                    "Run under `accelerate launch` for multi-GPU / multi-node training.",
    )
    parser.add_argument("stage", choices=("stage1", "stage2", "stage3"))
    _options(parser)
    # Options and overrides may be mixed in any order after the stage; argparse alone cannot
    # mix a positional list with options, so the rest is parsed in `run`.
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="key=value",
                        help="recipe overrides, e.g. train.max_steps=10 data.batch_size=4")
    parser.set_defaults(func=run)


def _with_output_dir(output_dir: str | None, overrides: list[str]) -> list[str]:
    """The overrides with ``-o DIR`` as ``train.output_dir`` (JSON-quoted: a YAML string whatever DIR looks like)."""
    from ..train.recipe import parse_override

    if output_dir is None:
        return overrides
    for text in overrides:
        key, value = parse_override(text)
        if key == "train.output_dir" and str(value) != output_dir:
            raise ValueError(f"-o/--output-dir {output_dir} and {text} disagree; give the output folder once.")
    return [f"train.output_dir={json.dumps(output_dir)}", *overrides]


def run(args: argparse.Namespace) -> int:
    from ..train.recipe import load_recipe

    inner = argparse.ArgumentParser(prog=f"kosmos-g train {args.stage}")
    _options(inner)
    inner.add_argument("overrides", nargs="*")
    extra = inner.parse_intermixed_args(args.rest)
    config = extra.config or args.config
    if not config:
        raise ValueError("--config is required: a recipe YAML path or a packaged recipe name (e.g. tiny-stage1).")
    recipe = load_recipe(config, _with_output_dir(extra.output_dir or args.output_dir, extra.overrides))
    recipe.validate(args.stage)
    if args.print_config or extra.print_config:
        print(recipe.dump(), end="")
        return 0
    from ..train.trainer import Trainer

    trainer = Trainer(recipe, args.stage)
    summary = trainer.run()
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary))
    return 0
