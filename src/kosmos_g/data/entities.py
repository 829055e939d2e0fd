"""Entities from a language model's answer: the paper's instruction, and parsing what real LMs write.

The paper asks an instruct LM (MPT-7B-Instruct in the release) for the objects a caption
mentions, comma-separated, and keeps the ones that occur in the caption. Real answers are
messier than a comma list: numbered or bulleted lines, an "Objects:" prefix, a sentence of
prose after the list, the next "### Instruction:" turn when the token budget allows, plurals
of caption words, duplicates, other case. :func:`parse_entities` turns any of these into the
caption's own words with their character spans, which stage 3 needs to place each entity's
image after (or instead of) its words.

Example:
    >>> [(e.text, e.start, e.end) for e in parse_entities("1. Dogs\\n2. hat", "a dog wearing a red hat")]
    [('dog', 2, 5), ('hat', 20, 23)]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The release's prompt (Dolly/Alpaca format) and instruction, word for word in substance.
INSTRUCTION = ("List all the objects mentioned in the caption, separated by commas. Only list foreground "
               "objects, not the site, location or environment. Only give nouns, without adjectives.")
PROMPT_TEMPLATE = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Input:\n{caption}\n\n### Response:\n")

# A line's list marker: "1.", "2)", "-", "*", "•", "(a)".
_MARKER = re.compile(r"^\s*(?:\(?\d{1,3}[.)]|\(?[a-z][.)](?=\s)|[-*•·–])\s*", re.IGNORECASE)
# A leading label such as "Objects:", "Entities -", "Answer:", "Response:".
_LABEL = re.compile(r"^\s*(?:the\s+)?(?:foreground\s+)?(?:objects?|entities|entity|nouns?|answer|response|output)"
                    r"(?:\s+mentioned(?:\s+in\s+the\s+caption)?)?\s*(?:are|is|:|-)\s*", re.IGNORECASE)
_ARTICLE = re.compile(r"^(?:a|an|the|some|two|three|several|many)\s+", re.IGNORECASE)
# Words that are never an entity on their own (a bare "a" would match any caption).
_FUNCTION_WORDS = frozenset("a an the some of and or to in on at with next by for from near".split())
_SEPARATORS = re.compile(r",|;|\n|\band\b|&|/", re.IGNORECASE)


@dataclass(frozen=True)
class Entity:
    """One entity: the caption's own text for it and its character span (end exclusive)."""

    text: str
    start: int
    end: int

    def to_json(self) -> dict:
        return {"text": self.text, "start": self.start, "end": self.end}


def build_prompt(caption: str, instruction: str = INSTRUCTION, template: str = PROMPT_TEMPLATE) -> str:
    """The LM prompt for one caption (the release's Dolly/Alpaca format by default).

    Example:
        >>> build_prompt("a dog").endswith("### Input:\\na dog\\n\\n### Response:\\n")
        True
    """
    return template.format(instruction=instruction, caption=caption)


def candidate_phrases(answer: str) -> list[str]:
    """The raw list items of an LM answer, in order (not yet matched to the caption).

    Anything from the first ``#`` on is cut: it is the LM writing the next turn of the
    template (the release drops such answers whole; the items before it are complete).
    A period followed by a space ends the list: what follows is prose.

    Example:
        >>> candidate_phrases("Objects: dog, a red hat. These are the objects.")
        ['dog', 'red hat']
    """
    text = answer.split("#", 1)[0]
    lines = [line for line in text.splitlines() if line.strip()]
    items: list[str] = []
    for i, line in enumerate(lines):
        line = _MARKER.sub("", line)
        if i == 0 or not items:
            line = _LABEL.sub("", line)
        # Prose after the list: "dog, hat. The caption also ..." -> "dog, hat".
        line = re.split(r"[.!?](?:\s|$)", line, maxsplit=1)[0]
        for part in _SEPARATORS.split(line):
            part = part.strip().strip("\"'`*.:()[]{}").strip()
            part = _ARTICLE.sub("", part).strip()
            if part and not all(w.lower() in _FUNCTION_WORDS for w in part.split()):
                items.append(part)
    return items


def _variants(phrase: str) -> list[str]:
    """The phrase and its singular/plural forms, to match ``dogs`` to a caption's ``dog`` and back."""
    out = [phrase]
    lower = phrase.lower()
    if lower.endswith("ies") and len(lower) > 4:
        out.append(phrase[:-3] + "y")
    if lower.endswith(("ches", "shes", "sses", "xes", "zes")):
        out.append(phrase[:-2])
    if lower.endswith("s") and not lower.endswith("ss"):
        out.append(phrase[:-1])
    else:
        out += [phrase + "s", phrase + "es"]
        if lower.endswith("y"):
            out.append(phrase[:-1] + "ies")
    return out


def _find(caption: str, phrase: str, taken: list[tuple[int, int]]) -> tuple[int, int] | None:
    """Leftmost whole-word, case-insensitive occurrence of ``phrase`` (or a plural/singular form)
    in ``caption`` that overlaps no span in ``taken``."""
    best = None
    for form in _variants(phrase):
        words = [re.escape(w) for w in form.split()]
        pattern = re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)
        for m in pattern.finditer(caption):
            if any(m.start() < e and s < m.end() for s, e in taken):
                continue
            if best is None or m.start() < best[0] or (m.start() == best[0] and m.end() > best[1]):
                best = (m.start(), m.end())
            break
    return best


def parse_entities(answer: str, caption: str, *, max_entities: int | None = None) -> list[Entity]:
    """The entities of an LM answer that occur in ``caption``, as the caption writes them.

    Items are matched as whole words, ignoring case, with plural/singular forms allowed;
    each keeps the caption's spelling and span. Duplicates (the same span, or a span
    overlapping an earlier entity's) are dropped. Entities come back in caption order,
    at most ``max_entities`` of them (the earliest in the answer win).

    Example:
        >>> [e.text for e in parse_entities("Cat, cats, sofa, the room", "A cat sleeping on a sofa")]
        ['cat', 'sofa']
    """
    if max_entities is not None and max_entities < 1:
        raise ValueError(f"max_entities must be >= 1 or None, got {max_entities}.")
    taken: list[tuple[int, int]] = []
    for phrase in candidate_phrases(answer):
        if max_entities is not None and len(taken) >= max_entities:
            break
        span = _find(caption, phrase, taken)
        if span is not None:
            taken.append(span)
    return [Entity(caption[s:e], s, e) for s, e in sorted(taken)]


def clean_caption(text: str) -> str:
    """A caption as the release stores it: tabs and newlines out, runs of spaces collapsed.

    Example:
        >>> clean_caption("  a dog\\n on\\tthe beach ")
        'a dog on the beach'
    """
    return " ".join(text.split())
