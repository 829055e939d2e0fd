"""One optimizer step of each training stage for a Kosmos-G whose MLLM is a ~0.5B pretrained LM.

A causal LM of Qwen2-0.5B's shape (896 wide, 24 layers, 14 heads, 2 KV heads, MLP 4864, 151,936
tokens, tied embeddings) is built with random weights and saved to a temporary folder with a
small byte-level BPE tokenizer trained on the test corpus (one token per word; the embedding
matrix keeps its 151,936 rows: the tokenizer's
``<image>``/``</image>`` take spare rows, as with Qwen2's own padded matrix, and the logits span
the whole matrix). Every step loads it through ``kosmos_g.models.init_from_causal_lm`` with the
`kosmos-g` preset's vision tower (ViT-L/14), resampler and AlignerNet, as
``model.mllm_init`` does. The steps, each in its own subprocess so that peak memory is its own:

- **stage1_lm_trained**: next-token loss (``LMModule``) on ``<s> <image> 64 slots </image>
  caption </s>``; the LM, resampler and last vision block train.
- **stage1_lm_frozen**: the same with the LM frozen (``stage1.freeze_lm_steps``): resampler and
  last vision block train, the gradient still runs back through the LM.
- **stage2_aligner**: the frozen MLLM reads ``<s> caption``, the frozen CLIP ViT-L/14 text encoder
  gives the target, AlignerNet M and N train (``AlignModule``).
- **stage3_lm_trained**: the image + caption prompt through MLLM and AlignerNet M, the condition
  into the frozen U-Net (``DiffusionModule``), targets encoded by the frozen VAE each step;
  LM, resampler, last vision block and M train.

Fused AdamW as in the recipes; random weights (no downloads), which do not change speed or
memory. The U-Net and VAE are SD1.5's sizes on CUDA and the `reduced` ones of
benchmarks/common.py on the CPU (``--unet-size``); frozen U-Net, VAE and CLIP text are held
in the autocast dtype. Peak memory is measured as in benchmarks/train_step.py (CUDA:
``torch.cuda.max_memory_allocated``; CPU: parameter bytes + the largest resident-set growth
while stepping).

    python benchmarks/pretrained_lm.py                      # CPU: 1 warm-up + 3 steps each, ~9 min on 2 cores
    python benchmarks/pretrained_lm.py --device cuda        # bf16 autocast, SD1.5 U-Net, 2 + 5 steps
    python benchmarks/pretrained_lm.py --size-preset tiny   # smoke run: tiny LM, tiny preset and U-Net

Writes ``benchmarks/results/train_step-qwen2-0.5b-<device>.json`` (``--out`` to override).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import CLIP_L_TEXT, SD15_SCHEDULER, param_bytes, sizes, time_training_step

STAGES = ("stage1_lm_trained", "stage1_lm_frozen", "stage2_aligner", "stage3_lm_trained")
QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY_LM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, vocab_size=1032, max_position_embeddings=256, tie_word_embeddings=True)


def make_lm(path: Path, size_preset: str) -> Path:
    """A random Qwen2-shaped causal LM and a byte-level BPE tokenizer, saved as one folder.

    The tokenizer is byte-level like Qwen2's own, since ``AutoTokenizer`` loads a Qwen2 folder's
    tokenizer as ``Qwen2Tokenizer``, whose byte-level pre-tokenizer replaces any other."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from kosmos_g.testing import TINY_CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TINY_CORPUS, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(eos_token_id=0, **(QWEN2_05B if size_preset == "full" else TINY_LM)))
    lm.save_pretrained(str(path))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(str(path))
    return path


# ----------------------------------------------------------------------------- one stage's step

def build_step(args, device: torch.device, dtype: torch.dtype):
    """(step function, info) for ``args.worker``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel

    from kosmos_g import KosmosGProcessor, get_preset
    from kosmos_g.models import init_from_causal_lm
    from kosmos_g.processing import ProcessedPrompt
    from kosmos_g.testing import TINY_CORPUS
    from kosmos_g.train.modeling import enable_gradient_checkpointing, set_trainable
    from kosmos_g.train.stage1 import LMModule, encode_document
    from kosmos_g.train.stage2 import AlignModule
    from kosmos_g.train.stage3 import DiffusionModule, Stage3Options, draw_latents, encode_targets, vae_geometry

    stage = args.worker
    config = get_preset("tiny" if args.size_preset == "tiny" else "kosmos-g")
    if stage == "stage2_aligner":
        config.aligner.reconstruction = True
    torch.manual_seed(0)
    model, tokenizer = init_from_causal_lm(args.lm_dir, config)
    model = model.to(device).train()
    processor = KosmosGProcessor.from_config(tokenizer, model.config)
    g = torch.Generator().manual_seed(0)
    words = sorted({w for line in TINY_CORPUS for w in line.split()})
    caption = ""
    while len(tokenizer.encode(caption)) < args.text_tokens:  # a word is one token, or a few
        caption += f" {words[int(torch.randint(0, len(words), (1,), generator=g))]}"
    caption = caption.strip()
    size = model.config.vision.image_size
    image = Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
    doc = encode_document(processor, [lambda: image, caption], max_length=10 ** 6)  # <s> image caption </s>
    batch = {k: v.to(device) for k, v in processor.collate([doc] * args.batch_size).items()}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    frozen: list[torch.nn.Module] = []

    if stage.startswith("stage1"):
        set_trainable(model, mllm=stage == "stage1_lm_trained", resampler=True, vision_last_block=True)
        module = LMModule(model, exclude_ids=(tokenizer.bos_id, tokenizer.boi_id, tokenizer.eoi_id))

        def loss_fn() -> torch.Tensor:
            with autocast:
                loss_sum, tokens = module(batch)["loss"]
            return loss_sum / tokens

    elif stage == "stage2_aligner":
        set_trainable(model, aligner=True)
        model.eval()
        model.aligner.train()
        ids = [tokenizer.bos_id] + tokenizer.encode(caption)
        text = processor.collate([ProcessedPrompt(ids, [False] * len(ids), [])] * args.batch_size)
        text = {k: v.to(device) for k, v in text.items()}
        clip_kw = CLIP_L_TEXT if args.size_preset == "full" else sizes("tiny")[3]
        clip = CLIPTextModel(CLIPTextConfig(**clip_kw)).to(device, dtype).requires_grad_(False).eval()
        frozen.append(clip)
        clip_ids = torch.randint(0, clip_kw["vocab_size"] - 2, (args.batch_size, 77), generator=g).to(device)
        module = AlignModule(model.aligner, reconstruction_weight=1.0)

        def loss_fn() -> torch.Tensor:
            with autocast:
                with torch.no_grad():  # Stage2.prepare_batch: the frozen MLLM and CLIP
                    hidden = model.hidden_states(text["input_ids"], text["attention_mask"])  # (B, T, C)
                    target = clip(input_ids=clip_ids).last_hidden_state  # (B, 77, 768)
                loss_sum, n = module({"hidden": hidden, "attention_mask": text["attention_mask"],
                                      "clip_target": target})["loss"]
            return loss_sum / n

    else:
        set_trainable(model, mllm=True, resampler=True, vision_last_block=True, aligner=True)
        _, unet_kw, vae_kw, _, res = sizes({"tiny": "tiny", "full": args.unet_size}[args.size_preset])
        unet = UNet2DConditionModel(**unet_kw).to(device, dtype).requires_grad_(False).eval()
        vae = AutoencoderKL(**vae_kw).to(device, dtype).requires_grad_(False).eval()
        frozen += [unet, vae]
        sched = DDPMScheduler.from_config(SD15_SCHEDULER)
        options = Stage3Options(
            resolution=res, cond_dropout=0.1, caption_drop=0.5, entity_replace_prob=0.5, white_crop_prob=0.5,
            max_caption_tokens=256, min_caption_image_size=0, foreground_weight=1.0, text_align_weight=0.0,
            num_train_timesteps=1000, prediction_type="epsilon", latent_factor=vae_geometry(vae)[0],
            clip_length=model.config.aligner.num_queries, unet_bf16=False)
        module = DiffusionModule(model, unet, sched, ["caption"], options)
        B = args.batch_size
        targets = torch.rand(B, 3, res, res, generator=g).mul(2).sub(1).to(device)
        extra = {"timesteps": torch.randint(0, 1000, (B,), generator=g).to(device),
                 "drop": torch.zeros(B, dtype=torch.bool, device=device),
                 "source_ids": torch.zeros(B, dtype=torch.long, device=device)}

        def loss_fn() -> torch.Tensor:
            latents, noise = draw_latents(encode_targets(vae, targets), list(range(B)), vae.config.scaling_factor)
            with autocast:
                loss_sum, n = module({**batch, **extra, "latents": latents, "noise": noise})["loss"]
            return loss_sum / n

    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, fused=True)

    def step() -> None:
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    info = {"params": sum(p.numel() for p in model.parameters()),
            "lm_params": sum(p.numel() for p in model.mllm.parameters()),
            "trainable_params": sum(p.numel() for p in params),
            "frozen_other_params": sum(p.numel() for m in frozen for p in m.parameters()),
            "caption_tokens": len(tokenizer.encode(caption)),
            "positions": int(text["input_ids"].shape[1] if stage == "stage2_aligner" else batch["input_ids"].shape[1]),
            "param_bytes": param_bytes(model, *frozen)}
    return step, info



def worker(args) -> dict:
    """Build one stage's step, run warm-up + timed repeats, measure peak memory."""
    device = torch.device(args.device)
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    step, info = build_step(args, device, dtype)
    info["build_s"] = time.perf_counter() - t0
    return time_training_step(step, info, device, warmup=args.warmup, repeats=args.repeats)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-preset", default="full", choices=["tiny", "full"],
                    help="full: the Qwen2-0.5B-shaped LM + `kosmos-g` preset; tiny: a smoke run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--unet-size", default=None, choices=["reduced", "full"],
                    help="stage 3's frozen U-Net/VAE (default: full on CUDA, reduced on the CPU)")
    ap.add_argument("--precision", default=None, choices=["no", "bf16", "fp16"],
                    help="autocast (default: bf16 on CUDA, no on the CPU)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--text-tokens", type=int, default=32, help="caption tokens (at least)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--warmup", type=int, default=None, help="default: 2 on CUDA, 1 on the CPU")
    ap.add_argument("--repeats", type=int, default=None, help="default: 5 on CUDA, 3 on the CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--out", default=None)
    ap.add_argument("--lm-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.precision = args.precision or ("bf16" if cuda else "no")
    args.unet_size = args.unet_size or ("full" if cuda else "reduced")
    args.warmup = 2 if args.warmup is None and cuda else 1 if args.warmup is None else args.warmup
    args.repeats = 5 if args.repeats is None and cuda else 3 if args.repeats is None else args.repeats
    if args.worker:
        print(json.dumps(worker(args)))
        return {}

    argv = list(argv if argv is not None else sys.argv[1:])
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="kosmos-g-lm-"))
    try:
        t0 = time.perf_counter()
        lm_dir = make_lm(tmp / "lm", args.size_preset)
        print(f"random LM saved in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for name in args.stages:
            cmd = [sys.executable, __file__, *argv, "--lm-dir", str(lm_dir), "--worker", name]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            r = results[name]
            print(f"{name}: {r['step_s']:.2f} s/step, peak {r['peak_mem_gib']:.2f} GiB, "
                  f"{r['trainable_params']:,} trained (built in {r['build_s']:.0f} s)", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lm = QWEN2_05B if args.size_preset == "full" else TINY_LM
    report = {
        "benchmark": "train_step-pretrained-lm", "lm": "qwen2-0.5b-shape" if args.size_preset == "full" else "tiny",
        "lm_config": lm, "vision_preset": "kosmos-g" if args.size_preset == "full" else "tiny",
        "unet_size": args.unet_size if args.size_preset == "full" else "tiny",
        "device": args.device, "device_name": torch.cuda.get_device_name(0) if cuda else cpu_name(),
        "precision": args.precision, "batch_size": args.batch_size, "text_tokens": args.text_tokens,
        "gradient_checkpointing": args.gradient_checkpointing, "warmup": args.warmup, "repeats": args.repeats,
        "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
        **results,
    }
    name = "qwen2-0.5b" if args.size_preset == "full" else "qwen2-tiny"
    out = Path(args.out or Path(__file__).parent / "results" / f"train_step-{name}-{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("->", out, file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
