"""The paper's evaluation protocols as data: DreamBench's subjects, prompts and rewrites, COCO's captions.

Every number here is fixed by the protocol (``docs/evaluation.md``), so results are comparable
with the paper's Table 1 and with every other system scored the same way:

* DreamBench: 30 subjects, ONE fixed reference image each (the official evaluation's list),
  25 prompts each (DreamBooth's object or live-subject list), 4 images per prompt. The model's
  prompt puts ``<i>`` where "a <class>" was and drops the leading "a"; the five attribute prompts
  are rewritten (``a red {}`` -> ``{}, red``). CLIP-T is scored against the ORIGINAL prompt with
  the class noun (``a dog in the jungle``).
* COCO: 30,000 captions drawn with seed 0 from ``captions_val2014.json``.

Example:
    >>> [model_prompt(t) for t in ("a {} in the jungle", "a red {}", "a cube shaped {}")]
    ['<i> in the jungle', '<i>, red', '<i>, cube shaped']
    >>> clip_prompt("a red {}", "dog")
    'a red dog'
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["REFERENCE_IMAGES", "LIVE_SUBJECTS", "CLASS_NOUNS", "OBJECT_PROMPTS", "LIVE_PROMPTS", "REWRITES",
           "PAPER", "DreamBenchCase", "model_prompt", "clip_prompt", "prompt_kind", "dreambench_cases",
           "sample_coco_captions", "DREAMBENCH_SAMPLING", "COCO_SAMPLING"]

# ----------------------------------------------------------------------------- DreamBench

REFERENCE_IMAGES = {
    "backpack": "02.jpg", "backpack_dog": "02.jpg", "bear_plushie": "03.jpg", "berry_bowl": "02.jpg",
    "can": "01.jpg", "candle": "02.jpg", "cat": "04.jpg", "cat2": "02.jpg", "clock": "03.jpg",
    "colorful_sneaker": "01.jpg", "dog": "02.jpg", "dog2": "02.jpg", "dog3": "05.jpg", "dog5": "00.jpg",
    "dog6": "02.jpg", "dog7": "01.jpg", "dog8": "04.jpg", "duck_toy": "01.jpg", "fancy_boot": "02.jpg",
    "grey_sloth_plushie": "04.jpg", "monster_toy": "04.jpg", "pink_sunglasses": "04.jpg", "poop_emoji": "00.jpg",
    "rc_car": "03.jpg", "red_cartoon": "00.jpg", "robot_toy": "00.jpg", "shiny_sneaker": "01.jpg",
    "teapot": "04.jpg", "vase": "02.jpg", "wolf_plushie": "04.jpg",
}
"""The one reference image per subject that the official evaluation compares every generated image with."""

LIVE_SUBJECTS = frozenset({"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"})
"""Subjects that take the live-subject prompt list; the others take the object list."""

CLASS_NOUNS = {
    **dict.fromkeys(("bear_plushie", "grey_sloth_plushie", "wolf_plushie"), "stuffed animal"),
    **dict.fromkeys(("duck_toy", "monster_toy", "poop_emoji", "rc_car", "robot_toy"), "toy"),
    "pink_sunglasses": "glasses", "berry_bowl": "bowl", "colorful_sneaker": "sneaker", "shiny_sneaker": "sneaker",
    "fancy_boot": "boot", "red_cartoon": "cartoon", "backpack": "backpack", "backpack_dog": "backpack",
    "cat": "cat", "cat2": "cat", **{d: "dog" for d in ("dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8")},
    **{s: s for s in ("can", "candle", "clock", "teapot", "vase")},
}
"""DreamBooth's ``prompts_and_classes.txt`` class nouns: what CLIP-T's prompt names."""

_CONTEXTS = [
    "a {} in the jungle", "a {} in the snow", "a {} on the beach", "a {} on a cobblestone street",
    "a {} on top of pink fabric", "a {} on top of a wooden floor", "a {} with a city in the background",
    "a {} with a mountain in the background", "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
]
_PROPERTIES = ["a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}"]
OBJECT_PROMPTS = tuple(_CONTEXTS + [
    "a {} with a wheat field in the background", "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background", "a {} floating on top of water",
    "a {} floating in an ocean of milk", "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror", "a {} on top of the sidewalk in a crowded street", "a {} on top of a dirt road",
    "a {} on top of a white rug",
] + _PROPERTIES)
"""DreamBooth's 25 object prompts (``{}``: the subject)."""
LIVE_PROMPTS = tuple(_CONTEXTS + [
    "a {} wearing a red hat", "a {} wearing a santa hat", "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle", "a {} in a chef outfit", "a {} in a firefighter outfit",
    "a {} in a police outfit", "a {} wearing pink glasses", "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
] + _PROPERTIES)
"""DreamBooth's 25 live-subject prompts."""

REWRITES = {"a red {}": "{}, red", "a purple {}": "{}, purple", "a shiny {}": "{}, shiny", "a wet {}": "{}, wet",
            "a cube shaped {}": "{}, cube shaped"}
"""The paper's rewrites of the attribute prompts for the model: the image first, the attribute after."""

PAPER = {
    "real images (oracle)": {"dino": 0.774, "clip_i": 0.885},
    "Kosmos-G (paper)": {"dino": 0.694, "clip_i": 0.847, "clip_t": 0.287, "fid": 10.99},
    "SD v1.5 (paper)": {"fid": 9.34},
    "BLIP-Diffusion (paper)": {"dino": 0.594, "clip_i": 0.779, "clip_t": 0.300},
    "DreamBooth (paper)": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
}
"""The paper's Table 1 (scores / 100, as papers print them) for the reports' comparison rows."""

DREAMBENCH_SAMPLING = {"scheduler": "dpm++", "steps": 100, "guidance": 7.5, "seed": 0, "images_per_prompt": 4}
"""DreamBench sampling: DPM-Solver, 100 steps, guidance 7.5, seed 0, 4 images per prompt."""
COCO_SAMPLING = {"scheduler": "ddim", "steps": 250, "guidance": 3.0, "seed": 0, "captions": 30_000, "size": 256}
"""COCO FID: DDIM, 250 steps, guidance 3.0; 30,000 captions drawn with seed 0; FID at 256x256."""


def model_prompt(template: str) -> str:
    """The prompt the model gets: the rewrite if there is one, the leading "a" dropped, ``<i>`` for the subject."""
    template = REWRITES.get(template, template)
    if template.startswith("a "):
        template = template[2:]
    return template.format("<i>")


def clip_prompt(template: str, class_noun: str) -> str:
    """The original prompt with the class noun, which CLIP-T scores against: ``a dog in the jungle``."""
    return template.format(class_noun)


def prompt_kind(template: str) -> str:
    """``recontextualization``, ``accessorization`` (live subjects' outfits) or ``property`` (the attributes)."""
    if template in REWRITES:
        return "property"
    return "recontextualization" if template in _CONTEXTS or template in OBJECT_PROMPTS else "accessorization"


@dataclass(frozen=True)
class DreamBenchCase:
    """One subject and prompt: what the model gets, what CLIP-T scores against, the reference image."""

    subject: str
    index: int
    """The prompt's position (0-24) in its list."""
    template: str
    prompt: str
    clip_prompt: str
    kind: str
    reference: Path


def dreambench_cases(root: str | os.PathLike, subjects: list[str] | None = None) -> list[DreamBenchCase]:
    """The protocol's cases (30 subjects x 25 prompts), or only ``subjects``'s, over the dataset folder ``root``
    (DreamBooth's ``dataset/``: one folder per subject). Every reference image is checked to exist.

    Example:
        >>> cases = dreambench_cases("dreambooth/dataset", ["dog"])  # doctest: +SKIP
        >>> cases[0].prompt, cases[0].clip_prompt, cases[0].reference.name  # doctest: +SKIP
        ('<i> in the jungle', 'a dog in the jungle', '02.jpg')
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DreamBench folder not found: {root}; pass DreamBooth's dataset/ folder "
                                "(one folder per subject).")
    if subjects is not None:
        unknown = [s for s in subjects if s not in REFERENCE_IMAGES]
        if unknown:
            raise ValueError(f"unknown DreamBench subject(s) {unknown}; choose from {sorted(REFERENCE_IMAGES)}.")
    chosen = [s for s in REFERENCE_IMAGES if subjects is None or s in subjects]
    cases = []
    for subject in chosen:
        reference = root / subject / REFERENCE_IMAGES[subject]
        if not reference.is_file():
            raise FileNotFoundError(f"DreamBench reference image not found: {reference}; is {root} DreamBooth's "
                                    "dataset/ folder?")
        templates = LIVE_PROMPTS if subject in LIVE_SUBJECTS else OBJECT_PROMPTS
        for i, t in enumerate(templates):
            cases.append(DreamBenchCase(subject=subject, index=i, template=t, prompt=model_prompt(t),
                                        clip_prompt=clip_prompt(t, CLASS_NOUNS[subject]), kind=prompt_kind(t),
                                        reference=reference))
    return cases


# ----------------------------------------------------------------------------- COCO


def sample_coco_captions(path: str | os.PathLike, n: int = COCO_SAMPLING["captions"],
                         seed: int = COCO_SAMPLING["seed"]) -> list[dict]:
    """``n`` caption annotations drawn without replacement with ``random.Random(seed).sample`` from the
    ``annotations`` list of COCO's ``captions_val2014.json`` (in file order); each ``{"image_id", "id",
    "caption"}``. A smaller run takes the first entries of the same draw, so its captions are a subset.

    Example:
        >>> sample_coco_captions("annotations/captions_val2014.json")[0]["caption"]  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO captions file not found: {path}; pass captions_val2014.json.")
    try:
        annotations = json.loads(path.read_text(encoding="utf-8"))["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a COCO captions file ({e}); pass captions_val2014.json.") from None
    drawn = random.Random(seed).sample(annotations, min(COCO_SAMPLING["captions"], len(annotations)))
    return [{"image_id": a["image_id"], "id": a["id"], "caption": " ".join(a["caption"].split())}
            for a in drawn[:n]]
