"""``kosmos-g eval``: the paper's DreamBench and COCO-FID protocols, and their metrics on any folder.

Every model is a local folder or file (nothing is downloaded). Runs are resumable: images already in
the output folder with the same settings are not made again. ``accelerate launch -m kosmos_g.cli eval ...``
splits the prompts over the processes and gathers the scores once.

Example:
    kosmos-g eval dreambench --data dreambooth/dataset --model ckpt/kosmos-g --sd ckpt/sd-v1-5 \\
        --dino ckpt/dino-vits16 --clip ckpt/clip-vit-base-patch32 -o eval/dreambench
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..eval.protocols import COCO_SAMPLING, DREAMBENCH_SAMPLING, REFERENCE_IMAGES

EPILOG = """\
examples:
  kosmos-g eval dreambench --data dreambooth/dataset --model ckpt/kosmos-g --sd ckpt/sd-v1-5 \\
      --dino ckpt/dino-vits16 --clip ckpt/clip-vit-base-patch32 -o eval/dreambench
  kosmos-g eval coco-fid --captions coco/annotations/captions_val2014.json --coco-images coco/val2014 \\
      --inception ckpt/pt_inception-2015-12-05-6726825d.pth --clip ckpt/clip-vit-base-patch32 \\
      --model ckpt/kosmos-g --sd ckpt/sd-v1-5 -o eval/coco
  kosmos-g eval score --generated other/images --prompts eval/dreambench/prompts.jsonl \\
      --dino ckpt/dino-vits16 --clip ckpt/clip-vit-base-patch32 -o eval/other
  accelerate launch -m kosmos_g.cli eval dreambench ...        # prompts split over the GPUs
"""


def _add_generation(p: argparse.ArgumentParser, sampling: dict[str, Any], *, models_required: bool) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--model", required=False, help="Kosmos-G folder (not with --baseline sd)")
    g.add_argument("--sd", required=models_required, help="Stable Diffusion 1.5 diffusers folder")
    g.add_argument("--baseline", choices=["sd"], help="sd: the text-only SD pipeline on the same prompts "
                                                      "(its own CLIP text encoder), the paper's SD baseline")
    g.add_argument("--scheduler", default=sampling.get("scheduler"), help=f"default {sampling.get('scheduler')}")
    g.add_argument("--steps", type=int, default=sampling.get("steps"), help=f"default {sampling.get('steps')}")
    g.add_argument("--guidance", type=float, default=sampling.get("guidance"),
                   help=f"default {sampling.get('guidance')}")
    g.add_argument("--seed", type=int, default=sampling.get("seed", 0), help="default 0")
    g.add_argument("--size", type=int, help="image side in pixels (default: the U-Net's)")
    g.add_argument("--batch-size", type=int, default=4, help="images per batch (default 4)")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA, else fp32")
    g.add_argument("--overwrite", action="store_true",
                   help="remake images in the output folder that were made with other settings")


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output-dir", required=True, metavar="DIR", help="output folder (resumed if it exists)")
    p.add_argument("--label", default=None, help="this run's name in the tables (default: the model folder's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate: DreamBench, COCO FID, or the same metrics on any folder",
                              description="The paper's evaluation protocols (docs/evaluation.md).",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)

    d = sub.add_parser("dreambench", help="DreamBench: DINO, CLIP-I, CLIP-T on 30 subjects x 25 prompts x 4",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--data", required=True, metavar="DIR", help="DreamBooth's dataset/ folder (a folder per subject)")
    d.add_argument("--dino", required=True, metavar="DIR", help="DINO ViT-S/16 transformers folder")
    d.add_argument("--clip", required=True, metavar="DIR", help="CLIP ViT-B/32 transformers folder")
    d.add_argument("--subjects", help=f"comma-separated subset of the {len(REFERENCE_IMAGES)} subjects")
    d.add_argument("--limit", type=int, help="only the first N prompts of each subject (quick runs)")
    d.add_argument("--images-per-prompt", type=int, default=DREAMBENCH_SAMPLING["images_per_prompt"],
                   help=f"default {DREAMBENCH_SAMPLING['images_per_prompt']}")
    _add_generation(d, DREAMBENCH_SAMPLING, models_required=True)
    _add_run(d)
    d.set_defaults(func=main)

    c = sub.add_parser("coco-fid", help="MS-COCO zero-shot FID at 256 px on 30,000 captions, and CLIP score",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--captions", required=True, metavar="FILE", help="COCO's captions_val2014.json")
    c.add_argument("--coco-images", required=True, metavar="DIR", help="COCO's val2014/ images (the reference)")
    c.add_argument("--inception", required=True, metavar="FILE", help="pt_inception-2015-12-05-6726825d.pth")
    c.add_argument("--clip", metavar="DIR", help="CLIP ViT-B/32 folder for the CLIP-score column")
    c.add_argument("--reference-stats", metavar="FILE",
                   help="cache of the reference statistics (default: OUTPUT_DIR/reference-stats-256.safetensors)")
    c.add_argument("--limit", type=int, help="only the first N captions of the draw (quick runs)")
    _add_generation(c, COCO_SAMPLING, models_required=True)
    _add_run(c)
    c.set_defaults(func=main)

    s = sub.add_parser("score", help="the same metrics on any folder of images",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--generated", required=True, metavar="DIR", help="the images to score")
    s.add_argument("--prompts", metavar="FILE", help="JSON lines {file, prompt, reference?}, e.g. a dreambench "
                                                     "run's prompts.jsonl: CLIP-T, DINO, CLIP-I")
    s.add_argument("--reference", metavar="DIR", help="real images: FID of --generated against them")
    s.add_argument("--dino", metavar="DIR", help="DINO ViT-S/16 folder")
    s.add_argument("--clip", metavar="DIR", help="CLIP ViT-B/32 folder")
    s.add_argument("--inception", metavar="FILE", help="FID Inception weights (with --reference)")
    _add_generation(s, DREAMBENCH_SAMPLING, models_required=False)
    _add_run(s)
    s.set_defaults(func=main)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the generation options (before any model loads) into the settings each sidecar records."""
    from ..commands.generate import _check_device, _default_device
    from ..pipeline import check_pretrained_folders
    from ..schedulers import scheduler_name

    for name in ("steps", "batch_size", "size", "limit", "images_per_prompt"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    if args.size is not None and args.size % 8:
        raise ValueError(f"--size must be a multiple of 8, got {args.size}.")
    if args.guidance is not None and args.guidance < 0:
        raise ValueError(f"--guidance must be >= 0, got {args.guidance}.")
    if args.baseline == "sd":
        if args.model:
            raise ValueError("--baseline sd runs the SD pipeline alone; drop --model.")
        if not args.sd:
            raise ValueError("--baseline sd needs --sd DIR (with its text_encoder/ and tokenizer/).")
        for sub in ("unet", "scheduler", "text_encoder", "tokenizer"):
            if not (Path(args.sd) / sub).is_dir():
                raise FileNotFoundError(f"--baseline sd runs the SD folder's own text encoder: {Path(args.sd) / sub} "
                                        "not found.")
    elif not args.model:
        raise ValueError("give --model DIR (a Kosmos-G folder), or --baseline sd.")
    device = _default_device()
    _check_device(device)
    if args.model:
        check_pretrained_folders(args.model, args.sd)
    return {"generator": "sd" if args.baseline else "kosmos-g",
            "model": str(Path(args.model).resolve()) if args.model else None, "sd": str(Path(args.sd).resolve()),
            "scheduler": scheduler_name(args.scheduler), "steps": args.steps, "guidance": args.guidance,
            "size": args.size, "dtype": args.dtype or ("fp16" if device.startswith("cuda") else "fp32")}


def _make_generator(settings: dict[str, Any]):
    def make():
        from ..eval.runner import KosmosGGenerator, SDGenerator, process_state

        device = process_state().device
        common = dict(scheduler=settings["scheduler"], steps=settings["steps"], guidance=settings["guidance"],
                      size=settings["size"], dtype=settings["dtype"], device=device)
        if settings["generator"] == "sd":
            return SDGenerator(settings["sd"], **common)
        return KosmosGGenerator(settings["model"], settings["sd"], **common)
    return make


def _label(args: argparse.Namespace) -> str:
    if args.label:
        return args.label
    if getattr(args, "baseline", None) == "sd":
        return f"SD baseline ({Path(args.sd).name})"
    return Path(args.model).name if getattr(args, "model", None) else Path(args.generated).name


def _print(result: dict[str, Any] | None, out_dir: str) -> None:
    if result is None:
        return
    scores = result["scores"]
    shown = ", ".join(f"{k} {v / 100:.3f}" if k in ("dino", "clip_i", "clip_t") else f"{k} {v:.2f}"
                      for k, v in scores.items() if k != "n")
    print(f"{result['label']}: {shown} ({scores['n']} images); reports in {Path(out_dir) / 'results.md'}")


def main(args: argparse.Namespace) -> int:
    from ..eval import runs

    progress = not args.quiet
    if args.protocol == "dreambench":
        settings = _settings(args)
        subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
        result = runs.run_dreambench(args.data, args.output_dir, _make_generator(settings), settings=settings,
                                     dino=args.dino, clip=args.clip, subjects=subjects, limit=args.limit,
                                     images_per_prompt=args.images_per_prompt, seed=args.seed,
                                     batch_size=args.batch_size, overwrite=args.overwrite, label=_label(args),
                                     progress=progress)
    elif args.protocol == "coco-fid":
        settings = _settings(args)
        result = runs.run_coco_fid(args.captions, args.coco_images, args.output_dir, _make_generator(settings),
                                   settings=settings, inception=args.inception, clip=args.clip,
                                   reference_cache=args.reference_stats, limit=args.limit, seed=args.seed,
                                   batch_size=args.batch_size, overwrite=args.overwrite, label=_label(args),
                                   progress=progress)
    else:
        settings = _settings(args) if args.baseline else None
        result = runs.run_score(args.generated, args.output_dir, prompts=args.prompts, reference=args.reference,
                                dino=args.dino, clip=args.clip, inception=args.inception,
                                make_generator=_make_generator(settings) if settings else None, settings=settings,
                                batch_size=args.batch_size, overwrite=args.overwrite, label=_label(args),
                                progress=progress)
    _print(result, args.output_dir)
    return 0
