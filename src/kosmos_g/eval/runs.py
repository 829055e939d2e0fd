"""The three evaluations ``kosmos-g eval`` runs: DreamBench, COCO FID and any folder of images.

Each builds its :class:`~.runner.Item` list from the protocol (:mod:`.protocols`), makes the missing
images (:func:`~.runner.generate_items`: resumable, batched, split over ``accelerate`` processes),
scores them (:func:`~.runner.score_items`) and, on the main process, writes ``results.json`` and
``results.md`` (beside the paper's numbers) into the output folder.

Example:
    >>> make = lambda: KosmosGGenerator("ckpt/kosmos-g", "ckpt/sd", scheduler="dpm++", steps=100,
    ...                                 guidance=7.5, size=512, dtype="fp16", device="cuda")  # doctest: +SKIP
    >>> run_dreambench("dreambooth/dataset", "eval/dreambench", make, settings={...},
    ...                dino="ckpt/dino-vits16", clip="ckpt/clip-vit-base-patch32")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from ..fileio import atomic_file, atomic_write_text
from .inception import FIDInceptionV3
from .metrics import ClipScorer, DinoScorer, FeatureStats, fid, load_rgb, markdown_table, protocol_mean
from .protocols import COCO_SAMPLING, DREAMBENCH_SAMPLING, PAPER, dreambench_cases, sample_coco_captions
from .runner import (IMAGE_SUFFIXES, Item, generate_items, grid_image, image_stats, process_state, score_items,
                     write_report)

__all__ = ["run_dreambench", "run_coco_fid", "run_score", "summarize", "dreambench_items", "coco_items",
           "read_prompts"]

METRICS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"))


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "image"


def summarize(records: Sequence[dict[str, Any]], by: str | None = None) -> dict[str, Any]:
    """The protocol's scores (global mean of ``100 * max(cos, 0)``) of ``records``; with ``by``, per value of
    that field (subject, kind). Each value: ``{"n": images, "dino": ..., "clip_i": ..., "clip_t": ...}``."""
    if by is not None:
        keys = list(dict.fromkeys(r[by] for r in records))
        return {k: summarize([r for r in records if r[by] == k]) for k in keys}
    out: dict[str, Any] = {"n": len(records)}
    for key, _ in METRICS:
        values = [r[key] for r in records if key in r]
        if values:
            out[key] = protocol_mean(values)
    return out


def _cells(row: dict[str, Any], keys: Sequence[str], scale: float) -> list[str]:
    return [f"{row[k] / scale:.3f}" if k in row else "-" for k in keys]


def _main_table(label: str, scores: dict[str, Any], extra: Sequence[tuple[str, str]] = ()) -> str:
    """This run's row (scores / 100, as papers print them) above the paper's rows."""
    header = ["system"] + [t for _, t in METRICS] + [t for _, t in extra]
    rows = [[f"**{label}**"] + _cells(scores, [k for k, _ in METRICS], 100.0)
            + [f"{scores[k]:.2f}" if k in scores else "-" for k, _ in extra]]
    for name, paper in PAPER.items():
        cells = [f"{paper[k]:.3f}" if k in paper else "-" for k, _ in METRICS]
        cells += [f"{paper[k]:.2f}" if k in paper else "-" for k, _ in extra]
        if any(c != "-" for c in cells):
            rows.append([name] + cells)
    return markdown_table(header, rows)


def _breakdown(title: str, groups: dict[str, dict[str, Any]]) -> str:
    rows = [[name, g["n"]] + _cells(g, [k for k, _ in METRICS], 100.0) for name, g in groups.items()]
    return markdown_table([title, "images"] + [t for _, t in METRICS], rows)


# ----------------------------------------------------------------------------- DreamBench


def dreambench_items(data: str | os.PathLike, *, subjects: Sequence[str] | None = None, limit: int | None = None,
                     images_per_prompt: int = DREAMBENCH_SAMPLING["images_per_prompt"],
                     seed: int = DREAMBENCH_SAMPLING["seed"]) -> list[Item]:
    """One item per image: each subject's first ``limit`` prompts (all 25 by default) x ``images_per_prompt``;
    image k of a prompt has seed ``seed + k``."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}.")
    if images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt must be >= 1, got {images_per_prompt}.")
    items = []
    for case in dreambench_cases(data, list(subjects) if subjects else None):
        if limit is not None and case.index >= limit:
            continue
        group = f"{case.subject}/{case.index:02d}-{_slug(case.prompt.replace('<i>', ' '))}"
        for k in range(images_per_prompt):
            items.append(Item(key=f"{group}-{k}", prompt=case.prompt, images=[case.reference], seed=seed + k,
                              text=case.clip_prompt, reference=case.reference, group=group,
                              info={"subject": case.subject, "kind": case.kind, "prompt_index": case.index}))
    return items


def run_dreambench(data: str | os.PathLike, out_dir: str | os.PathLike, make_generator: Callable[[], Any], *,
                   settings: dict[str, Any], dino: str | os.PathLike, clip: str | os.PathLike,
                   subjects: Sequence[str] | None = None, limit: int | None = None,
                   images_per_prompt: int = DREAMBENCH_SAMPLING["images_per_prompt"],
                   seed: int = DREAMBENCH_SAMPLING["seed"], batch_size: int = 4, overwrite: bool = False,
                   label: str = "this run", progress: bool = True) -> dict[str, Any] | None:
    """DreamBench end to end into ``out_dir``: ``images/`` (PNG + sidecar each), ``grids/SUBJECT.png``,
    ``prompts.jsonl`` (for ``kosmos-g eval score``), ``results.json`` and ``results.md``. Returns the
    result on the main process (None on the others)."""
    out_dir = Path(out_dir)
    items = dreambench_items(data, subjects=subjects, limit=limit, images_per_prompt=images_per_prompt, seed=seed)
    for path in (dino, clip):
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"model folder not found or without config.json: {path}.")
    state = process_state()
    device = state.device
    generate_items(items, out_dir / "images", make_generator, settings=settings, batch_size=batch_size,
                   overwrite=overwrite, progress=progress, desc="DreamBench images")
    records, _ = score_items(items, out_dir / "images", dino=DinoScorer(dino, device=device),
                             clip=ClipScorer(clip, device=device), progress=progress)
    if not state.is_main_process:
        return None
    result = {"protocol": "dreambench", "label": label, "settings": {**settings, "seed": seed,
                                                                     "images_per_prompt": images_per_prompt,
                                                                     "processes": state.num_processes},
              "scale": "100 x cosine, clamped at 0, mean over all images (papers print it / 100)",
              "scores": summarize(records), "per_subject": summarize(records, "subject"),
              "per_kind": summarize(records, "kind"), "paper": PAPER, "images": records}
    n_subjects = len(result["per_subject"])
    md = [f"# DreamBench: {label}", "", _main_table(label, result["scores"]), "",
          f"{len(records)} images: {n_subjects} subjects, {len(records) // max(1, n_subjects * images_per_prompt)} "
          f"prompts each x {images_per_prompt}; " + ", ".join(f"{k} {v}" for k, v in settings.items()
                                                               if k in ("scheduler", "steps", "guidance")) + ".",
          "", "## Per subject", "", _breakdown("subject", result["per_subject"]),
          "", "## Per prompt kind", "", _breakdown("kind", result["per_kind"])]
    write_report(out_dir, "results", result, "\n".join(md))
    _write_prompts(out_dir / "prompts.jsonl", items)
    _write_grids(out_dir, items)
    return result


def _write_prompts(path: Path, items: Sequence[Item]) -> None:
    lines = [json.dumps({"file": f"{it.key}.png", "prompt": it.text, "reference": str(it.reference),
                         "model_prompt": it.prompt, "seed": it.seed, "group": it.group, **it.info})
             for it in items]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _write_grids(out_dir: Path, items: Sequence[Item]) -> None:
    """Per subject: one row per prompt, the reference image then that prompt's images."""
    by_subject: dict[str, dict[str, list[Item]]] = {}
    for it in items:
        by_subject.setdefault(it.info["subject"], {}).setdefault(it.group, []).append(it)
    for subject, groups in by_subject.items():
        rows = [[load_rgb(g[0].reference)] + [load_rgb(out_dir / "images" / f"{it.key}.png") for it in g]
                for g in groups.values()]
        with atomic_file(out_dir / "grids" / f"{subject}.png") as tmp:
            grid_image(rows).save(tmp, format="PNG")


# ----------------------------------------------------------------------------- COCO FID


def coco_items(captions: str | os.PathLike, *, limit: int | None = None,
               seed: int = COCO_SAMPLING["seed"]) -> list[Item]:
    """One item per caption of the protocol's draw (the first ``limit``); caption i is made with seed ``seed + i``."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}.")
    drawn = sample_coco_captions(captions, limit or COCO_SAMPLING["captions"], seed=COCO_SAMPLING["seed"])
    return [Item(key=f"{i:05d}-{a['id']}", prompt=a["caption"], seed=seed + i, text=a["caption"],
                 info={"image_id": a["image_id"], "caption_id": a["id"]}) for i, a in enumerate(drawn)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise ValueError(f"{folder} holds {len(files)} image(s); FID needs at least 2.")
    return files


def reference_stats(images: str | os.PathLike, inception: FIDInceptionV3, weights_sha256: str, cache: Path, *,
                    size: int = COCO_SAMPLING["size"], progress: bool = True) -> FeatureStats:
    """Inception statistics of every image in ``images`` at ``size``, computed once and saved to ``cache``; a
    cache made from another folder size, image count or Inception weights is refused."""
    files = _image_files(Path(images))
    meta = {"size": size, "images": len(files), "inception_sha256": weights_sha256}
    if cache.is_file():
        stats, saved = FeatureStats.load(cache)
        if {k: saved.get(k) for k in meta} != meta:
            raise ValueError(f"{cache} holds statistics of {saved.get('images')} images at {saved.get('size')} px "
                             f"with other Inception weights or another folder than this run's ({len(files)} images "
                             f"at {size} px); pass another --reference-stats, or delete it to recompute.")
        return stats
    stats = image_stats(files, inception, size=size, progress=progress)
    state = process_state()
    if state.is_main_process:
        stats.save(cache, {**meta, "folder": Path(images).name})
    state.wait_for_everyone()
    return stats


def run_coco_fid(captions: str | os.PathLike, coco_images: str | os.PathLike, out_dir: str | os.PathLike,
                 make_generator: Callable[[], Any], *, settings: dict[str, Any], inception: str | os.PathLike,
                 clip: str | os.PathLike | None = None, reference_cache: str | os.PathLike | None = None,
                 limit: int | None = None, seed: int = COCO_SAMPLING["seed"], batch_size: int = 4,
                 overwrite: bool = False, label: str = "this run", progress: bool = True,
                 inception_net: FIDInceptionV3 | None = None) -> dict[str, Any] | None:
    """Zero-shot COCO FID into ``out_dir``: ``images/``, the reference statistics (``reference_cache``, default
    ``out_dir/reference-stats-256.safetensors``), ``results.json`` and ``results.md``. ``inception_net``
    replaces the network loaded from ``inception`` (tests: a random one)."""
    out_dir = Path(out_dir)
    items = coco_items(captions, limit=limit, seed=seed)
    if inception_net is None:
        inception_net = FIDInceptionV3.from_file(inception)
    state = process_state()
    inception_net = inception_net.to(state.device)
    size = COCO_SAMPLING["size"]
    cache = Path(reference_cache) if reference_cache else out_dir / f"reference-stats-{size}.safetensors"
    real = reference_stats(coco_images, inception_net, _sha256(Path(inception)), cache, progress=progress)
    generate_items(items, out_dir / "images", make_generator, settings=settings, batch_size=batch_size,
                   overwrite=overwrite, progress=progress, desc="COCO images")
    records, fake = score_items(items, out_dir / "images", clip=ClipScorer(clip, device=state.device) if clip else None,
                                inception=inception_net, fid_size=COCO_SAMPLING["size"], progress=progress)
    if not state.is_main_process:
        return None
    scores: dict[str, Any] = {"n": len(records), "fid": fid(real, fake)}
    if clip:
        scores["clip_t"] = protocol_mean(r["clip_t"] for r in records)
    result = {"protocol": "coco-fid", "label": label, "settings": {**settings, "seed": seed, "captions": len(items),
                                                                   "fid_size": COCO_SAMPLING["size"],
                                                                   "reference_images": real.n,
                                                                   "processes": state.num_processes},
              "scores": scores, "paper": PAPER, "images": records}
    rows = [[f"**{label}**", f"{scores['fid']:.2f}", f"{scores['clip_t'] / 100:.3f}" if "clip_t" in scores else "-"]]
    rows += [[name, f"{p['fid']:.2f}", "-"] for name, p in PAPER.items() if "fid" in p]
    md = [f"# MS-COCO zero-shot FID: {label}", "", markdown_table(["system", "FID (256 px)", "CLIP score"], rows), "",
          f"{len(records)} captions (seed {COCO_SAMPLING['seed']} draw from captions_val2014.json), one image each; "
          f"reference: {real.n} images; " + ", ".join(f"{k} {v}" for k, v in settings.items()
                                                        if k in ("scheduler", "steps", "guidance")) + "."]
    write_report(out_dir, "results", result, "\n".join(md))
    return result


# ----------------------------------------------------------------------------- any folder


def read_prompts(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A prompts file: JSON lines ``{"file": "dog/00-0.png", "prompt": "a dog in the jungle", "reference":
    "dog/02.jpg"}`` (``reference`` optional; relative to the file's folder); ``subject``/``kind`` are kept
    for the breakdown. ``kosmos-g eval dreambench`` writes one (``prompts.jsonl``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}.")
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            if not isinstance(e.get("file"), str) or not isinstance(e.get("prompt", ""), str):
                raise TypeError("'file' must be a string")
        except (json.JSONDecodeError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}:{n}: not a prompts line ({err}); each line is a JSON object with "
                             "\"file\" and \"prompt\".") from None
        if e.get("reference"):
            ref = Path(e["reference"])
            e["reference"] = ref if ref.is_absolute() else path.parent / ref
        entries.append(e)
    if not entries:
        raise ValueError(f"{path} holds no prompts.")
    return entries


def run_score(generated: str | os.PathLike, out_dir: str | os.PathLike, *, prompts: str | os.PathLike | None = None,
              reference: str | os.PathLike | None = None, dino: str | os.PathLike | None = None,
              clip: str | os.PathLike | None = None, inception: str | os.PathLike | None = None,
              make_generator: Callable[[], Any] | None = None, settings: dict[str, Any] | None = None,
              batch_size: int = 4, overwrite: bool = False, label: str = "generated",
              progress: bool = True, inception_net: FIDInceptionV3 | None = None) -> dict[str, Any] | None:
    """The protocols' metrics on a folder of images made by anything. ``prompts``: CLIP-T of each listed
    image against its prompt, DINO and CLIP-I against its reference (per-subject/kind breakdowns when the
    file has them); ``reference``: FID of all images against that folder's. ``make_generator`` (the SD
    baseline) first makes the listed images that are missing, as the protocols do."""
    generated, out_dir = Path(generated), Path(out_dir)
    if prompts is None and reference is None:
        raise ValueError("give --prompts FILE (CLIP-T, DINO, CLIP-I) and/or --reference DIR (FID).")
    if make_generator is not None and prompts is None:
        raise ValueError("--baseline needs --prompts FILE: the prompts to generate from.")
    state = process_state()
    if prompts is not None:
        entries = read_prompts(prompts)
        if make_generator is not None:
            bad = [e["file"] for e in entries if not e["file"].endswith(".png")]
            if bad:
                raise ValueError(f"--baseline writes PNGs; {bad[0]} in {prompts} does not end with .png.")
        items = [Item(key=e["file"][:-4] if make_generator else e["file"], prompt=e.get("prompt", ""),
                      text=e.get("prompt") or None, reference=e.get("reference"), seed=int(e.get("seed", 0)),
                      group=e.get("group", e["file"]),
                      info={k: e[k] for k in ("subject", "kind") if k in e}) for e in entries]
    else:
        items = [Item(key=str(p.relative_to(generated)), prompt="") for p in _image_files(generated)]
    if make_generator is not None:
        generate_items(items, generated, make_generator, settings=settings or {}, batch_size=batch_size,
                       overwrite=overwrite, progress=progress, desc="baseline images")
    if any(it.reference for it in items) and not (dino and clip):
        raise ValueError("the prompts file names reference images: pass --dino DIR and --clip DIR to score them.")
    if any(it.text for it in items) and not clip:
        raise ValueError("the prompts file has prompts: pass --clip DIR to score CLIP-T.")
    net = None
    if reference is not None:
        if inception_net is None and inception is None:
            raise ValueError("--reference DIR scores FID: pass --inception FILE (the FID Inception weights).")
        net = (inception_net or FIDInceptionV3.from_file(inception)).to(state.device)
    records, fake = score_items(items, generated, dino=DinoScorer(dino, device=state.device) if dino else None,
                                clip=ClipScorer(clip, device=state.device) if clip else None, inception=net,
                                progress=progress)
    real = image_stats(_image_files(Path(reference)), net, progress=progress) if net is not None else None
    if not state.is_main_process:
        return None
    scores = summarize(records)
    if real is not None:
        scores["fid"] = fid(real, fake)
    result: dict[str, Any] = {"protocol": "score", "label": label, "generated": str(generated),
                              "settings": settings or {}, "scores": scores, "images": records}
    md = [f"# Scores: {label}", "", _main_table(label, scores, extra=(("fid", "FID"),)), ""]
    for key, title in (("subject", "Per subject"), ("kind", "Per prompt kind")):
        if records and all(key in r for r in records):
            result[f"per_{key}"] = summarize(records, key)
            md += [f"## {title}", "", _breakdown(key, result[f"per_{key}"]), ""]
    write_report(out_dir, "results", result, "\n".join(md).rstrip())
    return result
