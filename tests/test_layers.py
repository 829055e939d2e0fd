"""The package's layers point one way: the library never imports the micro world or the CLI.

The library (config, models, processing, tokenizer, pipeline, convert, data, train, ...) is
what users build on; the micro world (``kosmos_g.micro``) and the command line
(``kosmos_g.cli``, ``kosmos_g.commands``) are workflows on top of it.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import kosmos_g

WORKFLOWS = ("kosmos_g.micro", "kosmos_g.commands", "kosmos_g.cli")


def _is_workflow(name: str) -> bool:
    return any(name == w or name.startswith(w + ".") for w in WORKFLOWS)


def library_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(kosmos_g.__path__, "kosmos_g.")]
    return ["kosmos_g", *sorted(n for n in names if not _is_workflow(n))]


def test_the_library_list_covers_the_core_and_the_workflows_are_found():
    names = set(library_modules())
    assert {"kosmos_g.pipeline", "kosmos_g.models.kosmos_g", "kosmos_g.train.trainer", "kosmos_g.data.shards",
            "kosmos_g.convert.official", "kosmos_g.fileio", "kosmos_g.testing"} <= names
    every = {m.name for m in pkgutil.walk_packages(kosmos_g.__path__, "kosmos_g.")}
    assert {"kosmos_g.micro.train_all", "kosmos_g.commands.micro"} <= every - names


def test_no_library_module_imports_the_micro_world_or_the_commands():
    """Each library module is imported in a fresh interpreter (and its lazy top-level names
    resolved); none may pull in a workflow module."""
    script = f"""
import importlib, json, sys
forbidden = {WORKFLOWS!r}
bad = {{}}
for name in {library_modules()!r}:
    before = set(sys.modules)
    module = importlib.import_module(name)
    for attr in getattr(module, "__all__", []):
        getattr(module, attr)
    new = [m for m in set(sys.modules) - before if any(m == w or m.startswith(w + ".") for w in forbidden)]
    if new:
        bad[name] = sorted(new)
print(json.dumps(bad))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}
