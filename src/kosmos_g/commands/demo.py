"""``kosmos-g demo``: the web demo (Gradio, the ``demo`` extra) on a model loaded once.

By default it serves the embedded micro model on 127.0.0.1:7860, with its example subjects
as one-click examples. ``--controlnet`` and ``--lora`` (each repeatable) become the choices
of the page's ControlNet and LoRA panels; the page picks them by index, never by path.
Exposing the page beyond this machine takes an explicit ``--host``; ``--auth user:pass``
asks for a login.

Example:
    kosmos-g demo --model ckpt/kosmos-g --sd ckpt/sd-v1-5 --controlnet ckpt/canny --lora style.safetensors
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from .. import micro

DEFAULT_MODEL = micro.CHECKPOINTS / "kosmos-g"
DEFAULT_SD = micro.CHECKPOINTS / "sd"
MICRO_EXAMPLES = micro.CHECKPOINTS / "examples"
MICRO_PROMPTS = (  # prompts of the kind micro DreamBench asks, on the shipped example subjects
    ("a large <i> on the left, on a green background", ["purple-dotted-star.png"]),
    ("a small <i> on the top and a large <i> on the right, on a pink background",
     ["pink-checkered-heart.png", "yellow-checkered-circle.png"]),
    ("a large <i> on the bottom, on a blue background", ["yellow-checkered-circle.png"]),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..demo.limits import Limits as lim  # its defaults (an instance would import torch to check them)

    p = subparsers.add_parser(
        "demo", help="serve the web demo (needs the 'demo' extra: pip install 'kosmos-g[demo]')",
        description="Serve a web page to compose interleaved prompts and generate images. The models "
                    "load once; one generation runs at a time, others wait in a bounded queue.")
    src = p.add_argument_group("models")
    src.add_argument("--model", help="Kosmos-G folder (default: the embedded micro model)")
    src.add_argument("--sd", help="Stable Diffusion 1.5 diffusers folder (default: the embedded micro-SD)")
    src.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                     help="a ControlNet folder offered on the page (repeat for several)")
    src.add_argument("--lora", action="append", default=[], metavar="FILE",
                     help="an SD1.5 LoRA .safetensors file offered on the page (repeat for several)")
    srv = p.add_argument_group("serving")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    srv.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    srv.add_argument("--auth", metavar="USER:PASS", help="ask for this login (default: none)")
    srv.add_argument("--queue-size", type=int, default=lim.queue_size,
                     help=f"requests that may wait for the device (default {lim.queue_size})")
    srv.add_argument("--max-upload-mb", type=float, default=lim.max_upload_mb,
                     help=f"largest upload in MB (default {lim.max_upload_mb:g})")
    srv.add_argument("--max-image-pixels", type=int, default=lim.max_image_pixels,
                     help=f"largest uploaded image in pixels (default {lim.max_image_pixels:,})")
    srv.add_argument("--output-dir", metavar="DIR",
                     help="where generated PNGs and sidecars are kept (default: a new temporary folder)")
    run = p.add_argument_group("run")
    run.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA, else fp32")
    p.set_defaults(func=main)


def parse_auth(spec: str | None) -> tuple[str, str] | None:
    """``"user:pass"`` -> ``("user", "pass")``; the password may hold ``:``."""
    if spec is None:
        return None
    user, sep, password = spec.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must be USER:PASS with both parts non-empty.")
    return user, password


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    if importlib.util.find_spec("gradio") is None:
        raise ValueError("the web demo needs gradio: pip install 'kosmos-g[demo]' (or -e '.[demo]').")
    from ..demo.app import launch
    from ..demo.engine import Engine
    from ..demo.limits import Limits

    auth = parse_auth(args.auth)
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be 0-65535, got {args.port}.")
    limits = Limits(queue_size=args.queue_size, max_upload_mb=args.max_upload_mb,
                    max_image_pixels=args.max_image_pixels)
    model = Path(args.model) if args.model else DEFAULT_MODEL
    sd = Path(args.sd) if args.sd else DEFAULT_SD
    examples = []
    if not args.model and not args.sd:  # the micro model's own subjects
        examples = [(text, [MICRO_EXAMPLES / f for f in files]) for text, files in MICRO_PROMPTS]
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    engine = Engine.load(model, sd, controlnet_dirs=args.controlnet, lora_files=args.lora, device=args.device,
                         dtype=args.dtype, output_dir=args.output_dir, limits=limits)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"kosmos-g demo: serving on {args.host}, reachable from other machines"
              f"{'' if auth else ' by anyone (no --auth)'}.", file=sys.stderr)
    print(f"kosmos-g demo: model {model}, outputs in {engine.output_dir}", file=sys.stderr)
    launch(engine, host=args.host, port=args.port, auth=auth, examples=examples)
    return 0
