"""The web demo's engine without a web server: value checks, canny edges, the command's defaults."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kosmos_g.demo import DemoError, Engine, Limits, canny_edges

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_kosmos_dir, tiny_sd_dir, tmp_path_factory):
    return Engine.load(tiny_kosmos_dir, tiny_sd_dir, device="cpu", output_dir=tmp_path_factory.mktemp("out"),
                       upload_root=tmp_path_factory.mktemp("uploads"))


def test_canny_edges_outline_a_square_in_one_pixel_wide_lines():
    im = Image.new("RGB", (48, 48))
    im.paste((200, 40, 40), (12, 12, 36, 36))
    edges = np.asarray(canny_edges(im))[..., 0] > 0  # (H, W)
    assert np.nonzero(edges[24])[0].tolist() == [12, 36] == np.nonzero(edges[:, 24])[0].tolist()
    assert edges[16:32, 12].all() and edges[16:32, 36].all()  # the left and right sides, corners aside
    assert np.asarray(canny_edges(Image.new("RGB", (8, 8), "white"))).max() == 0
    with pytest.raises(ValueError, match="low <= high"):
        canny_edges(im, 0.5, 0.2)


def test_defaults_come_from_the_model_folder(engine):
    config = engine.pipe.generation_config
    assert engine.defaults == {"steps": config.num_inference_steps, "guidance": config.guidance_scale,
                               "scheduler": config.scheduler, "width": 32, "height": 32}
    r = engine.parse(prompt="a cat")
    assert (r.steps, r.guidance, r.scheduler, r.width, r.height) == (50, 7.5, "dpm++", 32, 32)


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "Steps must be a whole number from 1 to 100."),
    ("steps", 2.5, "Steps must be a whole number from 1 to 100."),
    ("steps", "9; rm -rf", "Steps must be a whole number from 1 to 100."),
    ("guidance", float("nan"), "Guidance must be a number from 0 to 30."),
    ("num_images", 5, "The number of images must be a whole number from 1 to 4."),
    ("width", 1024, "Width must be a whole number from 16 to 64."),
    ("width", 20, "Width and height must be multiples of 8."),
    ("seed", -1, "The seed must be a whole number from 0 to 2.14748e+09."),
    ("scheduler", "../../scheduler", "The scheduler must be one of dpm++, ddim, pndm, euler, euler-a, unipc."),
    ("controlnet", 0, "The ControlNet must be one of the 0 listed on the page (or none)."),
    ("lora", "../loras/style.safetensors", "The LoRA must be one of the 0 listed on the page (or none)."),
    ("randomize_seed", "yes", "Randomize seed must be true or false."),
    ("prompt", "x" * 1001, "The prompt is 1001 characters long; the limit is 1000."),
    ("prompt", ["<i>"], "The prompt must be text."),
    ("images", [{"path": "/etc/hostname"}], "The prompt has 0 <i> but 1 image was given; remove the image "
                                            "in slot 1 or add a <i> for it."),
])
def test_each_bad_value_is_refused_in_one_sentence(engine, field, value, message):
    values = {"prompt": "a cat", field: value}
    with pytest.raises(DemoError) as info:
        engine.parse(**values)
    assert str(info.value) == message


def test_an_upload_outside_the_upload_folder_is_refused(engine, tmp_path):
    from helpers import DOG

    with pytest.raises(DemoError, match="^Image 1 is not an uploaded file; upload the image from your computer.$"):
        engine.parse(prompt="<i>", images=[{"path": DOG}])
    with pytest.raises(DemoError, match="^Image 1 is not an uploaded file"):
        engine.parse(prompt="<i>", images=[str(engine.upload_root / ".." / "x.png")])


def test_a_job_runs_writes_and_records_its_steps(engine, tmp_path):
    import shutil

    from helpers import DOG

    upload = engine.upload_root / "dog.png"
    shutil.copy(DOG, upload)
    job = engine.run(engine.parse(prompt="<i> on grass", images=[{"path": str(upload)}], steps=3, seed=5))
    assert job.state == "done" and (job.step, job.total) == (3, 3)
    assert [p.suffix for p in job.files] == [".png", ".json"] and job.images[0].name.endswith("-s5.png")
    cancelled = engine.start(engine.parse(prompt="a cat", steps=3))
    cancelled.cancel()
    assert cancelled.wait(30) and cancelled.state == "cancelled" and not cancelled.files
    assert str(cancelled.error) in ("Cancelled before it started.", f"Cancelled after {cancelled.step} of 3 steps.")


def test_limits_are_validated():
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        Limits(max_image_pixels=10**9)
    with pytest.raises(ValueError, match="queue_size"):
        Limits(queue_size=0)


def test_the_demo_package_imports_without_gradio_and_never_the_micro_world():
    code = ("import sys; sys.modules['gradio'] = None\n"
            "import kosmos_g.demo, kosmos_g.demo.app, kosmos_g.demo.engine\n"
            "assert not any(m.startswith(('kosmos_g.micro', 'kosmos_g.commands')) for m in sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_command_line_parses_and_reports_bad_auth():
    from kosmos_g.cli import build_parser
    from kosmos_g.commands.demo import parse_auth

    args = build_parser().parse_args(["demo", "--controlnet", "a", "--controlnet", "b", "--lora", "x.safetensors",
                                      "--host", "0.0.0.0", "--auth", "ann:pa:ss"])
    assert args.controlnet == ["a", "b"] and args.lora == ["x.safetensors"] and args.host == "0.0.0.0"
    assert parse_auth(args.auth) == ("ann", "pa:ss")
    with pytest.raises(ValueError, match="USER:PASS"):
        parse_auth("ann")


def test_controlnet_with_a_pixel_space_sd_folder_is_refused_at_start(tmp_path):
    from kosmos_g.micro import CHECKPOINTS

    (tmp_path / "canny").mkdir()
    (tmp_path / "canny" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="works in pixel space .* drop --controlnet"):
        Engine.load(CHECKPOINTS / "kosmos-g", CHECKPOINTS / "sd", controlnet_dirs=[tmp_path / "canny"], device="cpu",
                    output_dir=tmp_path / "out")
