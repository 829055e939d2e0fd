"""``--engine ray`` on a local Ray (2 CPUs) gives the same samples as the local engine."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="the Ray engine is an optional extra: pip install 'kosmos-g[data]'")
pytest.importorskip("ray.data", reason="the Ray engine needs Ray Data: pip install 'ray[data]'")

from kosmos_g.data.compose import ComposeConfig, compose  # noqa: E402
from kosmos_g.data.runner import read_failures  # noqa: E402
from kosmos_g.data.shards import expand_shards, iter_shards  # noqa: E402
from kosmos_g.data.testing import make_tiny_compose_models, write_image_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def samples(out):
    return [{k: v for k, v in raw.items() if k != "__url__"} for raw in iter_shards(expand_shards(out))]


def test_ray_engine_gives_the_local_engines_samples(local_ray, tmp_path):
    models = make_tiny_compose_models(tmp_path / "models", grounded_sam=False)
    images = write_image_folder(tmp_path / "photos", 12)
    (images / "broken.png").write_bytes(b"not an image")
    cfg = ComposeConfig(lm=str(models["lm"]), segmenter_path=str(models["clipseg"]), caption_from_source=True,
                        size=48, workers=0, caption_batch_size=4, lm_batch_size=4, mask_batch_size=8)
    local = compose(images, tmp_path / "local", cfg, chunk_size=5, progress=False)
    with_ray = compose(images, tmp_path / "ray", cfg, chunk_size=5, progress=False, engine="ray")
    assert with_ray["samples"] == local["samples"] >= 2 and with_ray["failures"] == local["failures"]
    assert samples(tmp_path / "ray") == samples(tmp_path / "local")
    assert read_failures(tmp_path / "ray") == read_failures(tmp_path / "local")
    # the engines share the run folder format: a local run resumes a ray run's folder (nothing left to do)
    assert compose(images, tmp_path / "ray", cfg, chunk_size=5, progress=False) == with_ray
