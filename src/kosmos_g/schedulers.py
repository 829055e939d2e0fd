"""The sampler names the pipeline and the CLI accept (no diffusers import, so the CLI's
parser stays cheap); :func:`kosmos_g.pipeline.make_scheduler` turns one into a diffusers
scheduler built from an SD folder's scheduler config. Which one a model samples with by
default is its folder's :class:`kosmos_g.generation_config.GenerationConfig`."""

from __future__ import annotations

# name -> diffusers class name. DPM-Solver++ (2M) is the official sampler.
SCHEDULERS = {
    "dpm++": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
_SCHEDULER_ALIASES = {"pnpm": "pndm", "dpm": "dpm++", "dpmsolver++": "dpm++", "dpm-solver++": "dpm++",
                      "euler_a": "euler-a", "euler-ancestral": "euler-a"}


def scheduler_name(name: str) -> str:
    """Canonical scheduler name (``"pnpm"`` -> ``"pndm"``); ``ValueError`` for unknown names."""
    key = _SCHEDULER_ALIASES.get(name.lower(), name.lower())
    if key not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}.")
    return key


__all__ = ["SCHEDULERS", "scheduler_name"]
