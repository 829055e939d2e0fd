"""``kosmos-g data compose | instructpix2pix | captions | inspect``: build and look at training shards.

    kosmos-g data compose photos/ -o shards/comp --captioner models/blip2 --lm models/mpt-7b-instruct \\
        --clipseg models/clipseg-rd64-refined --shard 0/8
    kosmos-g data instructpix2pix clip-filtered-dataset/ -o shards/edit
    kosmos-g data captions laion-wds/ -o shards/caption
    kosmos-g data inspect shards/comp --sheet comp.png

See docs/data.md.
"""

from __future__ import annotations

import argparse
import json


def _run_options(p: argparse.ArgumentParser, chunk: int = 1000) -> None:
    run = p.add_argument_group("run")
    run.add_argument("-o", "--output-dir", required=True, metavar="DIR",
                     help="folder for the shards, manifest.json and failures.jsonl; a re-run resumes there")
    run.add_argument("--chunk-size", type=int, default=chunk, metavar="N",
                     help=f"inputs per output shard (default {chunk}); keep it when resuming")
    run.add_argument("--shard", default=None, metavar="I/N",
                     help="this machine's part of the input: chunks j with j %% N == I (default: all)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data", help="build training shards: compositional data, InstructPix2Pix, captions; inspect shards",
        description="Build the WebDataset shards training reads (docs/data-format.md) and look at them. "
                    "Runs are resumable: re-running a command with the same output folder skips finished shards.")
    sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = sub.add_parser(
        "compose", help="images -> compositional shards (caption, entities, masks, crops)",
        description="The paper's compositional data: caption each image (BLIP-2) or keep its caption, ask an "
                    "instruct LM for the entities, segment each entity (CLIPSeg or Grounding-DINO + SAM), and "
                    "write the target with two crops per entity.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a folder tree of images (NAME.txt beside an image is its caption), a list file "
                        "(.txt/.tsv: PATH[<TAB>CAPTION]; .jsonl: {\"image\", \"caption\"}) or WebDataset tars")
    models = p.add_argument_group("models (local transformers folders)")
    models.add_argument("--captioner", metavar="DIR", help="BLIP-2 or another image-to-text model")
    models.add_argument("--caption-from-source", action="store_true",
                        help="keep each input's own caption instead of captioning it")
    models.add_argument("--lm", required=True, metavar="DIR", help="causal instruct LM for the entities")
    models.add_argument("--segmenter", choices=("clipseg", "grounded-sam"), default="clipseg",
                        help="clipseg (the paper) or grounded-sam (Grounding-DINO box + SAM mask)")
    models.add_argument("--clipseg", metavar="DIR", help="CLIPSeg folder (--segmenter clipseg)")
    models.add_argument("--grounding-dino", metavar="DIR", help="Grounding-DINO folder (--segmenter grounded-sam)")
    models.add_argument("--sam", metavar="DIR", help="SAM folder (--segmenter grounded-sam)")
    steps = p.add_argument_group("steps")
    steps.add_argument("--size", type=int, default=512, help="side of targets and crops (default 512)")
    steps.add_argument("--threshold", type=float, default=0.3, help="CLIPSeg mask threshold (default 0.3)")
    steps.add_argument("--box-threshold", type=float, default=0.3, help="Grounding-DINO box threshold")
    steps.add_argument("--max-entities", type=int, default=None, help="at most this many entities per image")
    steps.add_argument("--max-new-tokens", type=int, default=10, help="LM answer budget (default 10)")
    steps.add_argument("--temperature", type=float, default=1.0)
    steps.add_argument("--top-k", type=int, default=50)
    steps.add_argument("--top-p", type=float, default=0.95)
    steps.add_argument("--greedy", action="store_true", help="greedy LM answers instead of sampling")
    steps.add_argument("--seed", type=int, default=0, help="run seed; each sample's seed derives from its key")
    steps.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    compute = p.add_argument_group("compute")
    compute.add_argument("--caption-batch-size", type=int, default=16)
    compute.add_argument("--lm-batch-size", type=int, default=16)
    compute.add_argument("--mask-batch-size", type=int, default=32, help="(image, entity) pairs per call")
    compute.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                         help="auto: fp16 on CUDA, fp32 on CPU")
    compute.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when present)")
    compute.add_argument("--workers", type=int, default=2, help="image-decoding DataLoader workers")
    compute.add_argument("--engine", choices=("local", "ray"), default="local",
                         help="local (one process) or ray (Ray Data actor pools; pip install 'kosmos-g[data]')")
    compute.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local one)")
    compute.add_argument("--ray-actors", type=int, default=1, metavar="N",
                         help="actors per model stage with --engine ray (each holds one model, one GPU if any)")
    _run_options(p)
    p.set_defaults(func=run_compose)

    p = sub.add_parser(
        "instructpix2pix", help="InstructPix2Pix (folder or parquet release) -> edit shards",
        description="Convert InstructPix2Pix's CLIP-filtered release (seeds.json + prompt folders) or its parquet "
                    "release into edit shards: one sample per (prompt, seed), shorter sides resized to --size.")
    p.add_argument("input", metavar="INPUT", help="the release's folder, or a .parquet file / folder of them")
    p.add_argument("--size", type=int, default=512, help="shorter side of both images (default 512)")
    p.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    _run_options(p)
    p.set_defaults(func=run_instructpix2pix)

    p = sub.add_parser(
        "captions", help="image-caption pairs (img2dataset tars/parquet, TSV/JSONL lists) -> caption shards",
        description="Convert image-caption pairs into caption shards with the stage-2 filters: empty captions, "
                    "captions over --max-clip-tokens CLIP tokens or --max-words words, images under --min-side.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="WebDataset tars (img2dataset), .parquet with image bytes, or a .tsv/.jsonl list")
    p.add_argument("--clip-tokenizer", metavar="DIR", help="CLIP tokenizer folder for --max-clip-tokens")
    p.add_argument("--max-clip-tokens", type=int, default=None, metavar="N",
                   help="drop captions over N CLIP tokens (the release: 75; needs --clip-tokenizer)")
    p.add_argument("--max-words", type=int, default=None, metavar="N", help="drop captions over N words")
    p.add_argument("--min-side", type=int, default=0, metavar="PX", help="drop images whose shorter side is smaller")
    _run_options(p)
    p.set_defaults(func=run_captions)

    p = sub.add_parser(
        "inspect", help="count the samples of shards and draw a contact sheet",
        description="Count samples per kind, entities per compositional sample and bad samples; with --sheet, "
                    "draw the first --rows samples (target, each entity's two crops, the caption) into a PNG.")
    p.add_argument("shards", nargs="+", metavar="SHARDS", help="a folder of shards, a .tar, a glob or {a..b} pattern")
    p.add_argument("--sheet", metavar="PNG", help="write a contact sheet to this .png")
    p.add_argument("--rows", type=int, default=16, help="samples on the sheet (default 16)")
    p.set_defaults(func=run_inspect)


def _print_manifest(manifest: dict, out: str) -> None:
    print(json.dumps({"output_dir": out, "samples": manifest["samples"], "failures": manifest["failures"],
                      "chunks_done": manifest["chunks_done"], "chunks_total": manifest["chunks_total"]}))


def _quiet_transformers(quiet: bool) -> None:
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def run_compose(args: argparse.Namespace) -> int:
    from ..data.compose import ComposeConfig, compose

    _quiet_transformers(args.quiet)

    config = ComposeConfig(
        lm=args.lm, segmenter_path=args.clipseg, captioner=args.captioner, caption_from_source=args.caption_from_source,
        segmenter=args.segmenter, grounding_dino=args.grounding_dino, sam=args.sam, size=args.size,
        threshold=args.threshold, box_threshold=args.box_threshold, max_entities=args.max_entities,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        do_sample=not args.greedy, caption_batch_size=args.caption_batch_size, lm_batch_size=args.lm_batch_size,
        mask_batch_size=args.mask_batch_size, dtype=args.dtype, device=args.device, seed=args.seed,
        image_format=args.image_format, workers=args.workers)
    manifest = compose(args.inputs, args.output_dir, config, chunk_size=args.chunk_size, shard=args.shard,
                       engine=args.engine, progress=not args.quiet, ray_address=args.ray_address,
                       ray_actors=args.ray_actors)
    _print_manifest(manifest, args.output_dir)
    return 0


def run_instructpix2pix(args: argparse.Namespace) -> int:
    from ..data.converters import convert_instructpix2pix

    manifest = convert_instructpix2pix(args.input, args.output_dir, size=args.size, chunk_size=args.chunk_size,
                                       shard=args.shard, image_format=args.image_format, progress=not args.quiet)
    _print_manifest(manifest, args.output_dir)
    return 0


def run_captions(args: argparse.Namespace) -> int:
    from ..data.converters import convert_captions

    manifest = convert_captions(args.inputs, args.output_dir, max_clip_tokens=args.max_clip_tokens,
                                clip_tokenizer=args.clip_tokenizer, max_words=args.max_words, min_side=args.min_side,
                                chunk_size=args.chunk_size, shard=args.shard, progress=not args.quiet)
    _print_manifest(manifest, args.output_dir)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from ..data.inspect import inspect_shards

    print(json.dumps(inspect_shards(args.shards, sheet=args.sheet, rows=args.rows)))
    return 0
