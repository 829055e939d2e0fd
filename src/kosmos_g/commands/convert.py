"""``kosmos-g convert-official``: the released fairseq checkpoint -> a kosmos-g folder."""

from __future__ import annotations

import argparse
import logging


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert-official",
        help="convert the released Kosmos-G checkpoint (fairseq) to a kosmos-g folder",
        description="Convert the official Kosmos-G checkpoint (e.g. checkpoint_final.pt) and its "
                    "tokenizer files into a folder that KosmosG.from_pretrained and "
                    "KosmosGProcessor.from_pretrained load. The checkpoint is read with "
                    "torch.load(weights_only=True) and an allow-list; see docs/convert.md.",
    )
    p.add_argument("checkpoint", metavar="CKPT",
                   help="official checkpoint, e.g. checkpoint_final.pt, or a file of its model tensors alone "
                        "(then give --config)")
    p.add_argument("--dict", dest="dict_path", required=True, metavar="DICT",
                   help="the fairseq dictionary (dict.txt) released with the checkpoint")
    p.add_argument("--spm", dest="spm_path", required=True, metavar="SPM",
                   help="the SentencePiece model (sentencepiece.bpe.model)")
    p.add_argument("-o", "--output-dir", required=True, metavar="DIR",
                   help="folder to write (required; must be new or empty unless --overwrite)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="full, unsafe pickle load (can run code from the file); only for a file you trust")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="weight dtype to save (default: fp16, which holds the release's weights exactly: they "
                        "are fp16 training weights saved as fp32; a weight it would change is reported)")
    p.add_argument("--config", default=None, metavar="PRESET_OR_JSON",
                   help="preset name (kosmos-g for the release) or config.json; needed when CKPT records no "
                        "head count (model tensors alone) or its sizes match no preset, and checked against it")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..convert.official import convert_official

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = {"dtype": args.dtype} if args.dtype else {}  # else convert_official's default (fp16)
    out = convert_official(args.checkpoint, args.dict_path, args.spm_path, args.output_dir,
                           trust_pickle=args.trust_pickle, config=args.config, overwrite=args.overwrite, **dtype)
    print(f"Wrote {out}; load it with KosmosG.from_pretrained({str(out)!r}).")
    return 0
