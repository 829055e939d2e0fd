"""Throughput of ``kosmos-g data compose``: images/s of each step and end to end (random weights).

    python benchmarks/compose.py --preset tiny --device cpu --images 64          # tiny models, any CPU
    python benchmarks/compose.py --preset full --device cuda --dtype fp16        # BLIP-2 OPT-2.7b, a 7B LM, CLIPSeg

``full`` builds the release's model sizes with random weights (BLIP-2 OPT-2.7b, a Llama-layout
7B LM in MPT-7B's place, CLIPSeg rd64 on ViT-B/16) and saves them to a temporary folder, so that
they load through the same ``from_pretrained`` path as real weights; random weights change
what the models say, not how fast they say it. Each step is timed on its own over the same
pre-decoded images (the mask step with two entities per image, whatever the LM answered, so that
it is timed on a full load), then the whole local engine end to end (decode in DataLoader
workers, all steps, encoding, shard writing). Results go to ``benchmarks/results/compose-<preset>-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from kosmos_g.data.compose import (Captioner, ClipSegSegmenter, ComposeConfig, EntityExtractor, decode_record,
                                   local_chunk_fn, to_sample)
from kosmos_g.data.entities import parse_entities
from kosmos_g.data.runner import list_images, run_chunks
from kosmos_g.data.shards import encode_member
from kosmos_g.data.testing import make_tiny_compose_models, render_scene, word_tokenizer

IMAGES_9M = 9_000_000


def make_full_models(root: Path, dtype: torch.dtype) -> dict[str, Path]:
    """Random-weight models of the release's sizes, saved like real checkpoints."""
    from transformers import (BlipImageProcessor, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, LlamaConfig,
                              LlamaForCausalLM, OPTConfig, ViTImageProcessor)

    from kosmos_g.testing import make_tiny_clip_tokenizer

    out = {}
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the benchmark dtype: a 7B fp32 init would need 28 GB
    try:
        tok = word_tokenizer(image_token="<image>", bos=True)
        opt = OPTConfig(vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                        num_attention_heads=32, word_embed_proj_dim=2560, max_position_embeddings=2048,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
        cfg = Blip2Config(vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                             num_attention_heads=16, image_size=224, patch_size=14),
                          qformer_config=dict(vocab_size=30522), text_config=opt.to_dict(), num_query_tokens=32,
                          image_token_index=tok.convert_tokens_to_ids("<image>"))
        out["captioner"] = root / "blip2"
        Blip2ForConditionalGeneration(cfg).save_pretrained(out["captioner"])
        Blip2Processor(image_processor=BlipImageProcessor(size={"height": 224, "width": 224}), tokenizer=tok,
                       num_query_tokens=32).save_pretrained(out["captioner"])
        out["lm"] = root / "lm"
        LlamaForCausalLM(LlamaConfig(vocab_size=50432, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(out["lm"])
        word_tokenizer().save_pretrained(out["lm"])
        out["clipseg"] = root / "clipseg"
        ctok = make_tiny_clip_tokenizer(out["clipseg"])
        seg = CLIPSegConfig(text_config=dict(vocab_size=49408), vision_config=dict(patch_size=16),
                            projection_dim=512, extract_layers=[3, 6, 9], reduce_dim=64)
        CLIPSegForImageSegmentation(seg).save_pretrained(out["clipseg"])
        CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 352, "width": 352}),
                         tokenizer=ctok).save_pretrained(out["clipseg"])
    finally:
        torch.set_default_dtype(default)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default: fp16 on CUDA, else fp32")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=512, help="target/crop side (the release: 512)")
    p.add_argument("--batch", type=int, default=16, help="caption and LM batch; the mask batch is twice this")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    root = Path(tempfile.mkdtemp(prefix="compose-bench-"))
    try:
        t0 = time.perf_counter()
        models = (make_tiny_compose_models(root / "models", grounded_sam=False) if args.preset == "tiny"
                  else make_full_models(root / "models", dtype))
        build_s = time.perf_counter() - t0
        photos = root / "photos"
        photos.mkdir()
        captions = {}
        for i in range(args.images):  # photo-sized JPEGs, so decoding costs what it costs on real data
            img, caption = render_scene(i, 96)
            Image.fromarray(img).resize((1024, 768), Image.BICUBIC).save(photos / f"{i:05d}.jpg", quality=90)
            captions[f"{i:05d}"] = caption
        cfg = ComposeConfig(lm=str(models["lm"]), segmenter_path=str(models["clipseg"]),
                            captioner=str(models["captioner"]), size=args.size, caption_batch_size=args.batch,
                            lm_batch_size=args.batch, mask_batch_size=2 * args.batch, dtype=dtype_name,
                            device=args.device, workers=args.workers, image_format="jpg")
        t0 = time.perf_counter()
        steps = [Captioner(cfg), EntityExtractor(cfg), ClipSegSegmenter(cfg)]
        load_s = time.perf_counter() - t0
        items = list_images(photos)
        n = len(items)
        result: dict = {"preset": args.preset, "device": args.device, "dtype": dtype_name, "images": n,
                        "size": args.size, "batch": args.batch, "torch_threads": torch.get_num_threads(),
                        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                        "build_models_s": round(build_s, 2), "load_models_s": round(load_s, 2)}
        if args.device.startswith("cuda"):
            result["gpu"] = torch.cuda.get_device_name(0)

        # warm-up on one batch (kernels, allocator)
        warm = [decode_record(it, size=args.size, seed=0) for it in items[:args.batch]]
        for step in steps:
            warm = step(warm)

        step_s: dict[str, float] = {}
        records: list[dict] = []
        step_s["decode"] = timed(lambda: records.extend(decode_record(it, size=args.size, seed=0) for it in items),
                                 args.device)
        step_s["caption"] = timed(lambda: steps[0](records), args.device)
        for r in records:  # time the LM on the real prompt length: the render's caption
            r["caption"], r["error"] = captions[r["key"]], None
        step_s["entities"] = timed(lambda: steps[1](records), args.device)
        for r in records:  # two entities per image, whatever the random LM said
            r["error"] = None
            r["entities"] = parse_entities("square, circle, red, blue", r["caption"])[:2] or \
                parse_entities(r["caption"].split()[-1], r["caption"])
        step_s["masks"] = timed(lambda: steps[2](records), args.device)
        kept = [r for r in records if r["error"] is None]

        def encode():
            for r in kept:
                for k, v in to_sample(r, "jpg").items():
                    if k != "__key__":
                        encode_member(k, v)
        step_s["crops_and_encode"] = timed(encode, args.device)
        result["per_step"] = {k: {"seconds": round(v, 3), "images_per_s": round(n / v, 2)} for k, v in step_s.items()}
        result["entities_per_image_in_mask_step"] = round(sum(len(r["entities"]) for r in records) / n, 2)
        sum_s = sum(step_s.values())
        result["sum_of_steps_images_per_s"] = round(n / sum_s, 2)

        out = root / "shards"
        fn = local_chunk_fn(cfg, steps)
        e2e = timed(lambda: run_chunks(items, out, fn, chunk_size=max(1, n // 4), prefix="compositional",
                                       progress=False), args.device)
        manifest = json.loads((out / "manifest.json").read_text())
        result["end_to_end"] = {"seconds": round(e2e, 3), "images_per_s": round(n / e2e, 2),
                                "kept": manifest["samples"], "failures": manifest["failures"]}
        # The end-to-end run drops most images before the mask step (random models rarely name a caption
        # word); the sum of the steps, each on a full load, is the conservative rate for real models.
        rate = result["sum_of_steps_images_per_s"]
        result["device_days_for_9M_images_at_sum_of_steps_rate"] = round(IMAGES_9M / rate / 86400, 2)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    name = f"compose-{args.preset}-{args.device.split(':')[0]}.json"
    path = Path(args.out or Path(__file__).parent / "results" / name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
