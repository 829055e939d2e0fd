"""Micro DreamBench: does the micro Kosmos-G draw the subjects it is SHOWN, in the context it is TOLD?

Three prompt sets, all built from the world with a fixed seed:

* **single**: each of the 16 held-out subjects (attribute combinations never used as a
  stage-3 subject) as an image in a prompt with NO word naming it, e.g.
  ``"a large <i> on the left, on a green background"`` (the caption grammar with the
  entity words replaced by the subject's background-whitened crop, as in the paper's
  compositional data); ``samples`` seeds each.
* **two**: pairs of held-out subjects, ``"a small <i> on the top and a large <i> on the
  right, on a pink background"``.
* **edit**: a rendered scene and an instruction, ``"<i>make the circle blue"``.

Scoring reads each generated image back with the learned attribute reader
(:mod:`.reader`: a small CNN trained only on the renderer's ground truth, exact on
renders and robust to the pixel shifts and soft edges of generated images; the shipped
one by default, ``reader=`` for another) and compares the scene it sees with the scene the
prompt asks for. Columns:

* ``subject``: shape, colour and pattern all right (per subject); ``shape``/``color``/
  ``pattern`` separately; ``context``: background and position both right;
* ``two``: ``subject`` per subject on the two-subject set;
* ``edit``: the instruction is carried out (background as asked, the objects the edit
  adds are there and the ones it removes are gone, on shape, colour, pattern, position);
* ``clip_i`` / ``clip_t`` / ``dino``: the micro analogues of the paper's CLIP-I, CLIP-T and
  DINO: micro-CLIP image-image cosine to the real render, image-text cosine to the full
  caption, and cosine of micro-CLIP's mean patch features (spatial appearance, which is
  what DINO scores) to the real render.

Rows: Kosmos-G (shipped), Kosmos-G after stage 2 only (before instruction tuning),
micro-SD given only the context words (the paper's SD baseline, which cannot know the
subject: chance level), micro-SD given the full caption (what the U-Net can draw when the
subject is NAMED: an upper reference), and the real renders (the oracle).
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..eval.metrics import cosine, markdown_table
from ..fileio import atomic_file, atomic_write_text
from . import CHECKPOINTS, world
from .clip import images_to_clip_pixels
from .sd import SD_SIZE
from .world import EVAL_SEED, ObjectSpec, Scene

if TYPE_CHECKING:
    from .reader import AttributeReader

EDIT_SEED = EVAL_SEED + 1
QUICK_THRESHOLDS = {"clip_i": 0.90, "clip_t": 0.85, "color": 0.80, "pattern": 0.75, "context": 0.85,
                    "subject": 0.70}
"""What the tests require of the shipped model on the quick set (``tests/test_micro_shipped.py``):
the micro CLIP-I/CLIP-T analogues, where the shipped model measures 0.92 / 0.87 and the
text-only baseline (which never sees the subject) 0.59 / 0.59; the subject's colour and
pattern, read only from the prompt image (shipped: 100% and 94%; text-only baseline 0% and 0%,
chance 12.5% and 25%); the context words (background and position: 100%; chance 1.4%); and
whole subjects (all three attributes: 87.5% = 14 of 16; text-only baseline and stage 2 alone
0%, chance 0.4%)."""
CHANCE = {  # of a uniformly random answer: 8 shapes, 8 colours, 4 patterns; 8 backgrounds x 9 cells
    "subject": 1 / 256, "two": 1 / 256, "shape": 1 / 8, "color": 1 / 8, "pattern": 1 / 4, "context": 1 / 72}


def embedded_models() -> Path:
    """The folder of the shipped micro models (``kosmos-g/``, ``kosmos-g-stage2/``, ``sd/``, ``clip/``)."""
    return CHECKPOINTS


# ============================================================================ prompt sets


@dataclass
class Case:
    """One prompt: interleaved text (``<i>`` placeholders) + images, and the scene it asks for."""

    prompt: str
    images: list[np.ndarray]
    target: Scene
    text_only: str = ""
    """The prompt with the subject words removed (what the text-only baseline gets)."""
    full_caption: str = ""
    source: Scene | None = None
    """Edits: the scene before the instruction."""


def _clean(text: str) -> str:
    return " ".join(text.replace(" ,", ",").split())


def _scene_case(scene: Scene, rng: np.random.Generator) -> Case:
    """Replace every object's entity words by its subject image (background-whitened crop)."""
    caption, spans = scene.caption_with_spans(rng)
    prompt, text_only, cursor = "", "", 0
    images = []
    for obj, (start, end) in sorted(zip(scene.objects, spans), key=lambda p: p[1][0]):
        prompt += caption[cursor:start] + "<i>"
        text_only += caption[cursor:start]
        images.append(world.subject_image(obj))
        cursor = end
    prompt += caption[cursor:]
    text_only += caption[cursor:]
    return Case(prompt=prompt, images=images, target=scene, text_only=_clean(text_only), full_caption=caption)


def single_cases(prompts_per_subject: int = 2, seed: int = EVAL_SEED) -> list[Case]:
    """Every held-out subject, alone, in ``prompts_per_subject`` random contexts."""
    rng = np.random.default_rng(seed)
    cases = []
    for subject in sorted(world.held_out_subjects()):
        for _ in range(prompts_per_subject):
            position = world.POSITIONS[int(rng.integers(len(world.POSITIONS)))]
            size = list(world.SIZES)[int(rng.integers(len(world.SIZES)))]
            background = world.BACKGROUNDS[int(rng.integers(len(world.BACKGROUNDS)))]
            scene = Scene(background, (ObjectSpec(*subject, size=size, position=position),))
            cases.append(_scene_case(scene, rng))
    return cases


def two_cases(n: int = 16, seed: int = EVAL_SEED + 2) -> list[Case]:
    """``n`` pairs of held-out subjects with different shapes, in random cells and contexts."""
    rng = np.random.default_rng(seed)
    held = sorted(world.held_out_subjects())
    cases = []
    while len(cases) < n:
        a, b = (held[int(i)] for i in rng.choice(len(held), 2, replace=False))
        if a[0] == b[0]:
            continue
        cells = rng.choice(len(world.POSITIONS), 2, replace=False)
        sizes = list(world.SIZES)
        objs = tuple(ObjectSpec(*s, size=sizes[int(rng.integers(len(sizes)))], position=world.POSITIONS[int(c)])
                     for s, c in zip((a, b), cells))
        background = world.BACKGROUNDS[int(rng.integers(len(world.BACKGROUNDS)))]
        cases.append(_scene_case(Scene(background, objs), rng))
    return cases


def edit_cases(n: int = 48, seed: int = EDIT_SEED) -> list[Case]:
    """``n`` instruction edits of random scenes: ``"<i>instruction"`` (no caption, as half of training)."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        scene = world.sample_scene(rng)
        src, tgt, instruction = world.make_edit(rng, scene)
        cases.append(Case(prompt="<i>" + instruction, images=[world.render(src).image], target=tgt,
                          source=src, text_only=instruction, full_caption=tgt.caption()))
    return cases


# ============================================================================ scoring


def _key(o: ObjectSpec) -> tuple[str, str, str, str]:
    return (o.shape, o.color, o.pattern, o.position)


def edit_checks(source: Scene, target: Scene, seen: Scene) -> dict[str, bool]:
    """The parts of an edit, each compared on shape, colour, pattern and position:
    ``background`` as asked; ``new``: every object the edit adds (or changes into) is there;
    ``gone``: every object it removes (or changes from) is not; ``kept``: every object it
    leaves alone is still there. An edit is followed when the first three hold (``kept`` is
    reported, not required: a model that redraws an untouched object slightly wrong still edited)."""
    src, tgt, got = ({_key(o) for o in s.objects} for s in (source, target, seen))
    return {"background": seen.background == target.background, "new": (tgt - src) <= got,
            "gone": not ((src - tgt) & got), "kept": (src & tgt) <= got}


def score_scene(case: Case, seen: Scene) -> dict[str, float]:
    """Scores of one generated image, given the scene read back from it (see the module docstring)."""
    if case.source is not None:
        checks = edit_checks(case.source, case.target, seen)
        return {"edit": float(checks["background"] and checks["new"] and checks["gone"]),
                **{f"edit_{k}": float(v) for k, v in checks.items()}}
    free = list(seen.objects)
    rows = []
    for obj in case.target.objects:
        best = max(free, key=lambda o: (o.subject == obj.subject, o.position == obj.position,
                                        sum(getattr(o, a) == getattr(obj, a) for a in ("shape", "color", "pattern"))),
                   default=None)
        if best is not None:
            free.remove(best)
        rows.append({
            "subject": float(best is not None and best.subject == obj.subject),
            "shape": float(best is not None and best.shape == obj.shape),
            "color": float(best is not None and best.color == obj.color),
            "pattern": float(best is not None and best.pattern == obj.pattern),
            "position": float(best is not None and best.position == obj.position),
        })
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out["background"] = float(seen.background == case.target.background)
    out["context"] = float(out["background"] == 1.0 and out["position"] == 1.0)
    return out


class ClipScorer:
    """The micro analogues of CLIP-I, CLIP-T and DINO, on micro-CLIP (cosines by :func:`kosmos_g.eval.metrics.cosine`,
    as the real protocols' scores; reported as plain cosines, not the protocols' clamped 100 x cosine)."""

    def __init__(self, clip_dir: str | os.PathLike) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(clip_dir, torch_dtype=torch.float32).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(clip_dir)

    @torch.no_grad()
    def _image(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.model.config.vision_config.image_size
        if images.shape[1] != size:  # nearest upsampling keeps the generated pixels as they are
            k = size // images.shape[1]
            images = images.repeat(k, axis=1).repeat(k, axis=2)
        out = self.model.vision_model(pixel_values=images_to_clip_pixels(images))
        emb = self.model.visual_projection(out.pooler_output)
        patches = out.last_hidden_state[:, 1:].mean(1)
        return emb, patches

    @torch.no_grad()
    def _text(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt").input_ids
        return self.model.text_projection(self.model.text_model(input_ids=ids).pooler_output)

    def scores(self, images: np.ndarray, references: np.ndarray, captions: Sequence[str]) -> dict[str, np.ndarray]:
        gi, gp = self._image(images)
        ri, rp = self._image(references)
        t = self._text(captions)
        return {"clip_i": cosine(gi, ri).numpy(), "clip_t": cosine(gi, t).numpy(), "dino": cosine(gp, rp).numpy()}


# ============================================================================ generators


class KosmosGGenerator:
    """Images for cases through :class:`kosmos_g.pipeline.KosmosGPipeline` (the real path)."""

    def __init__(self, kosmos_dir: str | os.PathLike, sd_dir: str | os.PathLike, *, steps: int, guidance: float):
        from ..pipeline import KosmosGPipeline

        self.pipe = KosmosGPipeline.from_pretrained(kosmos_dir, sd_dir, dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance = steps, guidance

    def __call__(self, cases: Sequence[Case], seeds: Sequence[int]) -> np.ndarray:
        from PIL import Image

        out = self.pipe([c.prompt for c in cases],
                        prompt_images=[[Image.fromarray(im) for im in c.images] for c in cases],
                        num_inference_steps=self.steps, guidance_scale=self.guidance, output_type="np",
                        generator=[torch.Generator().manual_seed(int(s)) for s in seeds])
        return (np.asarray(out.images) * 255).round().astype(np.uint8)


class TextSDGenerator:
    """micro-SD on text alone: ``field="text_only"`` (context words) or ``"full_caption"``."""

    def __init__(self, sd_dir: str | os.PathLike, *, field: str, steps: int, guidance: float) -> None:
        from .sd import micro_sd_pipeline

        self.pipe = micro_sd_pipeline(sd_dir)
        self.field, self.steps, self.guidance = field, steps, guidance

    def __call__(self, cases: Sequence[Case], seeds: Sequence[int]) -> np.ndarray:
        from .sd import generate_micro_sd

        # One call per image: a batch of one draws the same floats whatever else is in the batch.
        return np.concatenate([generate_micro_sd(self.pipe, [getattr(c, self.field)], num_inference_steps=self.steps,
                                                 guidance_scale=self.guidance, seeds=[int(s)])
                               for c, s in zip(cases, seeds)])


def oracle(cases: Sequence[Case], seeds: Sequence[int], size: int = SD_SIZE) -> np.ndarray:
    """The real renders of the asked-for scenes, at ``size`` (micro-SD's resolution)."""
    return np.stack([world.render(c.target, size).image for c in cases])


def sd_resolution(sd_dir: str | os.PathLike) -> int:
    """The resolution a micro-SD folder draws at (its U-Net's ``sample_size``)."""
    return int(json.loads((Path(sd_dir) / "unet" / "config.json").read_text())["sample_size"])


# ============================================================================ the evaluation


def _run(generate, cases: list[Case], samples: int, batch_size: int = 16) -> tuple[list[Case], np.ndarray]:
    flat = [(c, EVAL_SEED + 1000 * i + k) for i, c in enumerate(cases) for k in range(samples)]
    images = [generate([c for c, _ in flat[j:j + batch_size]], [s for _, s in flat[j:j + batch_size]])
              for j in range(0, len(flat), batch_size)]
    return [c for c, _ in flat], np.concatenate(images)


def _generators(models: Path, steps: int, guidance: float, rows: Sequence[str] | None) -> dict[str, Any]:
    """Each row's name and a function that loads its image generator."""
    generators: dict[str, Any] = {
        "Kosmos-G": lambda: KosmosGGenerator(models / "kosmos-g", models / "sd", steps=steps, guidance=guidance),
        "Kosmos-G, stage 2 only": lambda: KosmosGGenerator(models / "kosmos-g-stage2", models / "sd",
                                                           steps=steps, guidance=guidance),
        "micro-SD, context words only": lambda: TextSDGenerator(models / "sd", field="text_only", steps=steps,
                                                               guidance=guidance),
        "micro-SD, subject named (reference)": lambda: TextSDGenerator(models / "sd", field="full_caption",
                                                                      steps=steps, guidance=guidance),
        "real renders (oracle)": lambda: functools.partial(oracle, size=sd_resolution(models / "sd")),
    }
    if not (models / "kosmos-g-stage2").is_dir():
        generators.pop("Kosmos-G, stage 2 only")
    if rows is not None:
        unknown = set(rows) - set(generators)
        if unknown:
            raise ValueError(f"Unknown rows {sorted(unknown)}; choose from {list(generators)}.")
        generators = {k: v for k, v in generators.items() if k in rows}
    return generators


def _score_row(generate: Any, sets: dict[str, list[Case]], samples: int, reader: "AttributeReader",
               scorer: ClipScorer, text_only: bool) -> tuple[dict[str, Any], dict[str, np.ndarray], int]:
    """One row of the table: its scores on every prompt set, the first images of each set (for
    the grid) and how many images it drew. ``text_only`` rows skip the edits (a text-to-image
    model cannot see the picture to edit)."""
    from .reader import read_scenes

    row: dict[str, Any] = {}
    firsts: dict[str, np.ndarray] = {}
    n_images = 0
    for set_name, cases in sets.items():
        if set_name == "edit" and text_only:
            continue
        per_case = samples if set_name != "edit" else 1
        flat, images = _run(generate, cases, per_case)
        n_images += len(images)
        firsts[set_name] = images[::per_case][:8]
        per = [score_scene(c, seen) for c, seen in zip(flat, read_scenes(reader, images))]
        if set_name == "single":
            for k in ("subject", "shape", "color", "pattern", "context"):
                row[k] = float(np.mean([p[k] for p in per]))
            refs = np.stack([world.render(c.target).image for c in flat])
            for k, v in scorer.scores(images, refs, [c.full_caption for c in flat]).items():
                row[k] = float(v.mean())
        elif set_name == "two":
            row["two"] = float(np.mean([p["subject"] for p in per]))
            row["two_context"] = float(np.mean([p["context"] for p in per]))
        else:
            row["edit"] = float(np.mean([p["edit"] for p in per]))
            row["edit_by_kind"] = edits_by_kind(flat, per)
    return row, firsts, n_images


def evaluate(models: str | os.PathLike | None = None, *, out_dir: str | os.PathLike | None = None,
             quick: bool = False, samples: int | None = None, num_inference_steps: int | None = None,
             guidance_scale: float | None = None, rows: Sequence[str] | None = None,
             reader: "str | os.PathLike | AttributeReader | None" = None) -> dict[str, Any]:
    """Run micro DreamBench on a release folder (default: the embedded models).

    ``quick``: 16 single-subject prompts, 8 pairs and 16 edits, one sample each (the tests);
    otherwise 32 prompts x ``samples`` (4), 16 pairs x 4, 48 edits x 1. Returns
    ``{"rows": {name: metrics}, "settings": ...}``; with ``out_dir`` also writes
    ``table.json``, ``table.md`` and ``grid.png``. ``reader``: the attribute reader that scores
    the images (a folder or a loaded :class:`.reader.AttributeReader`; default: the shipped one).
    ``num_inference_steps``/``guidance_scale``: every row's sampling (default: the Kosmos-G
    folder's ``generation_config.json``).
    """
    from ..generation_config import GenerationConfig
    from .reader import AttributeReader, as_reader

    reader_name = "given" if isinstance(reader, AttributeReader) else str(reader or "shipped")
    reader = as_reader(reader)
    models = Path(models) if models is not None else embedded_models()
    for sub in ("kosmos-g", "sd", "clip"):
        if not (models / sub).is_dir():
            raise FileNotFoundError(f"{models / sub} not found: pass --models a release folder written by "
                                    "`kosmos-g micro train-all` (its release/ subfolder).")
    sampling = GenerationConfig.from_pretrained(models / "kosmos-g")
    num_inference_steps = num_inference_steps or sampling.num_inference_steps
    guidance_scale = sampling.guidance_scale if guidance_scale is None else guidance_scale
    samples = samples or (1 if quick else 4)
    sets = {"single": single_cases(1 if quick else 2), "two": two_cases(8 if quick else 16),
            "edit": edit_cases(16 if quick else 48)}
    scorer = ClipScorer(models / "clip")
    table: dict[str, dict[str, Any]] = {}
    grid: dict[str, dict[str, np.ndarray]] = {}
    timer = None
    for name, make in _generators(models, num_inference_steps, guidance_scale, rows).items():
        generate = make()
        timer = generate if name == "Kosmos-G" else timer
        t0 = time.time()
        table[name], grid[name], n_images = _score_row(generate, sets, samples, reader, scorer,
                                                       text_only=name.startswith("micro-SD"))
        table[name]["s_per_image"] = (time.time() - t0) / max(1, n_images) if "oracle" not in name else 0.0
    result = {"rows": table, "settings": {
        "quick": quick, "samples": samples, "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale, "threads": torch.get_num_threads(),
        "cases": {k: len(v) for k, v in sets.items()}, "models": str(models), "reader": reader_name}}
    if timer is not None:
        result["single_image_s"] = time_one_image(timer)
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_text(out / "table.json", json.dumps(result, indent=1))
        atomic_write_text(out / "table.md", format_table(result) + "\n")
        write_grid(out / "grid.png", sets, grid)
    return result


def time_one_image(generate: "KosmosGGenerator", repeats: int = 3) -> float:
    """Median wall seconds for ONE image (prompt encoding included) at the current thread count."""
    case = single_cases(1)[0]
    generate([case], [0])  # warm-up
    times = []
    for k in range(repeats):
        t0 = time.perf_counter()
        generate([case], [k])
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


COLUMNS = (("subject", "subject (3 attrs)"), ("shape", "shape"), ("color", "colour"), ("pattern", "pattern"),
           ("context", "context"), ("two", "2 subjects"), ("edit", "edit"), ("clip_i", "CLIP-I~"),
           ("clip_t", "CLIP-T~"), ("dino", "DINO~"), ("s_per_image", "s/image"))


EDIT_PARTS = ("edit", "edit_background", "edit_new", "edit_gone", "edit_kept")


def edits_by_kind(cases: Sequence[Case], scores: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per edit kind (``world.EDIT_KINDS`` order): ``n`` and the mean of each part of
    :func:`edit_checks` (``edit`` = followed)."""
    out: dict[str, dict[str, float]] = {}
    kinds = [world.edit_kind(c.source, c.target) for c in cases]
    for kind in world.EDIT_KINDS:
        rows = [p for k, p in zip(kinds, scores) if k == kind]
        if rows:
            out[kind] = {"n": len(rows), **{part: float(np.mean([r[part] for r in rows])) for part in EDIT_PARTS}}
    return out


def format_edits(result: dict[str, Any]) -> str:
    """Per model with edits, followed / n by kind, and why the others failed."""
    rows = []
    for name, row in result["rows"].items():
        kinds = row.get("edit_by_kind")
        if not kinds:
            continue
        cells = [f"{round(k['edit'] * k['n'])}/{k['n']}" if (k := kinds.get(kind)) else "-"
                 for kind in world.EDIT_KINDS]
        rows.append([name, *cells])
        for part, title in (("edit_background", "background right"), ("edit_new", "new object there"),
                            ("edit_gone", "old object gone"), ("edit_kept", "others kept")):
            cells = [f"{round(k[part] * k['n'])}/{k['n']}" if (k := kinds.get(kind)) else "-"
                     for kind in world.EDIT_KINDS]
            rows.append([f"&nbsp; {title}", *cells])
    return markdown_table(["edits followed", *world.EDIT_KINDS], rows) if rows else ""


def format_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table (accuracies in %, similarities as cosines)."""
    rows = []
    for name, row in result["rows"].items():
        cells = []
        for key, _ in COLUMNS:
            if key not in row:
                cells.append("-")
            elif key in ("clip_i", "clip_t", "dino"):
                cells.append(f"{row[key]:.3f}")
            elif key == "s_per_image":
                cells.append(f"{row[key]:.2f}")
            else:
                cells.append(f"{100 * row[key]:.1f}")
        rows.append([name, *cells])
    rows.append(["chance", *(f"{100 * CHANCE[key]:.1f}" if key in CHANCE else "-" for key, _ in COLUMNS)])
    lines = markdown_table(["model", *(title for _, title in COLUMNS)], rows).split("\n")
    s = result["settings"]
    lines.append("")
    lines.append(f"{s['cases']['single']} single-subject prompts x {s['samples']}, {s['cases']['two']} two-subject "
                 f"prompts x {s['samples']}, {s['cases']['edit']} edits x 1; {s['num_inference_steps']} steps, "
                 f"guidance {s['guidance_scale']}, {s['threads']} threads.")
    if "single_image_s" in result:
        lines.append(f"One image (batch 1, encoding included): {result['single_image_s']:.2f} s.")
    edits = format_edits(result)
    if edits:
        lines += ["", edits]
    return "\n".join(lines)


def write_grid(path: Path, sets: dict[str, list[Case]], grid: dict[str, dict[str, np.ndarray]],
               per_set: int = 4, cell: int = 96) -> None:
    """A PNG: per example, the prompt's image(s), then each model's first sample, each enlarged
    (nearest neighbour, so pixels stay as generated) to ``cell`` px."""
    from PIL import Image, ImageDraw

    names = list(grid)
    label_w = 6 * max(len(n) for n in names + ["prompt images"]) + 8  # PIL's default font: ~6 px a letter
    rows = [(set_name, i, case) for set_name, cases in sets.items() for i, case in enumerate(cases[:per_set])]
    canvas = Image.new("RGB", (label_w + cell * len(rows), 16 + cell * (1 + len(names))), "white")
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(["prompt images"] + names):
        draw.text((4, 16 + cell * r + cell // 2 - 6), name, fill="black")
    for col, (set_name, i, case) in enumerate(rows):
        x = label_w + cell * col
        draw.text((x + 2, 2), f"{set_name} {i}", fill="black")
        prompt_imgs = [Image.fromarray(im).resize((cell // len(case.images), cell // len(case.images)),
                                                  Image.NEAREST) for im in case.images]
        for k, im in enumerate(prompt_imgs):
            canvas.paste(im, (x + k * (cell // len(case.images)), 16))
        for r, name in enumerate(names):
            imgs = grid[name].get(set_name)
            if imgs is None or i >= len(imgs):
                continue
            canvas.paste(Image.fromarray(imgs[i]).resize((cell, cell), Image.NEAREST), (x, 16 + cell * (r + 1)))
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")
