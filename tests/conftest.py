"""Shared fixtures: tiny random models saved to temp folders (no network, CPU)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_kosmos_dir(tmp_path_factory):
    """A saved tiny random Kosmos-G folder (weights, config, tokenizer)."""
    from kosmos_g.testing import make_tiny_kosmos_g

    path = tmp_path_factory.mktemp("tiny-kosmos-g")
    make_tiny_kosmos_g(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A saved tiny random SD1.5-layout diffusers folder."""
    from kosmos_g.testing import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture()
def tiny(tiny_kosmos_dir):
    """(model, processor) loaded through the public loaders."""
    from kosmos_g import KosmosG, KosmosGProcessor

    return KosmosG.from_pretrained(tiny_kosmos_dir), KosmosGProcessor.from_pretrained(tiny_kosmos_dir)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and two spinning OpenMP threads on a
    busy 2-core machine run several times slower; restored for the other test files.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
