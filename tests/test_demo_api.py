"""The web demo served on loopback with tiny random models, driven through gradio_client and
plain HTTP: generation with sidecars, one-sentence errors, upload limits, crafted requests,
the bounded queue, live progress and a cancel that stops the sampling loop."""

from __future__ import annotations

import html
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the web demo needs the 'demo' extra (gradio)")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import httpx  # noqa: E402  (gradio's dependency)
from gradio_client import Client, handle_file  # noqa: E402
from helpers import DOG, HAT, forged_png  # noqa: E402

from kosmos_g.demo import Engine, Limits  # noqa: E402
from kosmos_g.demo.app import launch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIMITS = Limits(queue_size=2, max_upload_mb=0.5, max_image_pixels=1_000_000)
FAST = dict(steps=2, num_images=1, randomize_seed=False, seed=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine(tiny_kosmos_dir, tiny_sd_dir, tmp_path_factory):
    from kosmos_g.testing import make_tiny_controlnet, make_tiny_lora

    extra = tmp_path_factory.mktemp("demo-extras")
    cn = make_tiny_controlnet(extra / "canny", tiny_sd_dir)
    lora = make_tiny_lora(extra / "style.safetensors", tiny_sd_dir)
    return Engine.load(tiny_kosmos_dir, tiny_sd_dir, controlnet_dirs=[cn], lora_files=[lora], device="cpu",
                       output_dir=tmp_path_factory.mktemp("demo-out"), limits=LIMITS)


@pytest.fixture(scope="module")
def server(engine):
    demo = launch(engine, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture()
def client(server):
    return Client(server, verbose=False, download_files=False)


def error_of(fn, *args, **kwargs) -> str:
    """The message of the error ``fn`` raises (the page gets it HTML-escaped, shown as written)."""
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    return html.unescape(str(info.value))


def test_generates_two_images_with_png_and_json_sidecar(client, engine):
    gallery, files, status, seed, = client.predict("<i> wearing <i>", handle_file(DOG), handle_file(HAT),
                                                   steps=2, num_images=2, seed=11, randomize_seed=False,
                                                   api_name="/generate")
    assert len(gallery) == 2 and [g["caption"] for g in gallery] == ["seed 11", "seed 12"]
    names = [f["orig_name"] for f in files]
    assert [n[-4:] for n in names] == [".png", "json", ".png", "json"]
    assert seed == 11 and status.startswith("2 images")
    sidecar = json.loads((engine.output_dir / names[1]).read_text())
    assert sidecar["format"] == "kosmos-g-demo/1" and sidecar["image_seed"] == 11
    s = sidecar["settings"]
    assert s["prompt"] == "<i> wearing <i>" and s["steps"] == 2 and len(s["image_sha256"]) == 2
    assert s["scheduler"] == engine.defaults["scheduler"] and s["controlnet"] is None and s["lora"] is None
    assert str(engine.output_dir) not in json.dumps(sidecar)  # no server path in what is downloaded
    with httpx.Client() as http:  # the page gets copies in gradio's cache; the outputs are not served by path
        assert http.get(f"{client.src}gradio_api/file={engine.output_dir / names[0]}").status_code == 403
        assert http.get(f"{client.src}gradio_api/file={files[0]['path']}").status_code == 200


@pytest.mark.parametrize("prompt, images, message", [
    ("<i> wearing <i>", [DOG], "The prompt has 2 <i> but 1 image was given; upload an image into slot 2."),
    ("a dog <i>", [DOG, HAT], "The prompt has 1 <i> but 2 images were given; remove the image in slot 2 "
                              "or add a <i> for it."),
    ("  ", [], "Type a prompt first, with a <i> where each image goes."),
])
def test_placeholder_image_mismatch_is_one_sentence(client, prompt, images, message):
    text = error_of(client.predict, prompt, *map(handle_file, images), **FAST, api_name="/generate")
    assert text == message


def test_unreadable_and_oversized_uploads_are_refused_in_one_sentence(client, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(Path(DOG).read_bytes()[:400])
    forged_png(tmp_path / "big.png", 1200, 1000)  # over this server's 1,000,000 pixels
    forged_png(tmp_path / "bomb.png", 40000, 40000)  # 1.6 gigapixels in a few bytes
    (tmp_path / "heavy.png").write_bytes(os.urandom(600_000))  # over the 0.5 MB upload limit
    (tmp_path / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')

    def refusal(name: str) -> str:
        return error_of(client.predict, "<i>", handle_file(str(tmp_path / name)), **FAST, api_name="/generate")

    kinds = "PNG, JPEG, WebP, BMP, GIF"
    assert refusal("notes.png") == f"Image 1 could not be read as an image; upload a {kinds} file."
    assert refusal("drawing.svg") == f"Image 1 could not be read as an image; upload a {kinds} file."
    assert refusal("cut.png") == f"Image 1 is damaged or truncated; upload a complete {kinds} file."
    assert refusal("big.png") == ("Image 1 is 1200x1000 (1,200,000 pixels); the limit is 1,000,000 pixels, "
                                  "so downscale it first.")
    assert refusal("bomb.png") == "Image 1 is larger than 1,000,000 pixels; downscale it first."
    assert "exceeds the maximum file size of 500000 bytes" in refusal("heavy.png")  # gradio_client checks first


def test_the_upload_server_refuses_files_over_the_limit(server):
    with httpx.Client(timeout=30) as http:
        big = http.post(f"{server}gradio_api/upload", files={"files": ("a.png", os.urandom(600_000), "image/png")})
        small = http.post(f"{server}gradio_api/upload", files={"files": ("a.png", b"x" * 1000, "image/png")})
    assert big.status_code == 413 and small.status_code == 200


def post_raw(url: str, data: list) -> str:
    """Call /generate with hand-made JSON (what a crafted request sends), return the SSE reply."""
    with httpx.Client(timeout=60) as http:
        r = http.post(f"{url}gradio_api/call/generate", json={"data": data})
        if r.status_code != 200:
            return r.text
        reply = http.get(f"{url}gradio_api/call/generate/{r.json()['event_id']}")
        return reply.text


def raw_args(client, **values) -> list:
    names = [p["parameter_name"] for p in client.view_api(print_info=False, return_format="dict")
             ["named_endpoints"]["/generate"]["parameters"]]
    base = {"steps": 2, "guidance": 3.0, "seed": 0, "randomize_seed": False, "num_images": 1, "width": 32,
            "height": 32, "scheduler": "ddim", "controlnet": -1, "control_scale": 1.0, "lora": -1,
            "lora_scale": 1.0, "negative_prompt": ""}
    return [values.get(n, base.get(n)) for n in names]


def test_a_crafted_request_naming_a_server_file_is_refused(server, client, engine):
    secret = engine.output_dir.parent / "secret.png"
    secret.write_bytes(Path(DOG).read_bytes())
    for path in (str(secret), "/etc/passwd", DOG):
        reply = post_raw(server, raw_args(client, prompt="<i>", image_1={"path": path, "meta": {
            "_type": "gradio.FileData"}}))
        assert "event: error" in reply or "error" in reply.lower(), reply
        assert "event: complete" not in reply
    # ControlNet and LoRA choices are indices into what the command line loaded, nothing else.
    for field, value in (("controlnet", str(secret)), ("controlnet", 5), ("lora", "style.safetensors"),
                         ("lora", 1)):
        reply = post_raw(server, raw_args(client, prompt="a cat", **{field: value}))
        assert "event: error" in reply and "event: complete" not in reply, reply
    n_runs = len(engine.history)
    assert post_raw(server, raw_args(client, prompt="a cat")).count("event: complete") == 1  # the same, well formed
    assert len(engine.history) == n_runs + 1


def test_controlnet_lora_and_canny(client, engine, tmp_path):
    import numpy as np
    from PIL import Image

    edges = client.predict(handle_file(DOG), 0.1, 0.2, api_name="/canny")
    made = np.asarray(Image.open(engine.output_dir / "control" / edges["orig_name"]))  # made here, by numpy
    assert set(np.unique(made)) == {0, 255} and 0 < (made > 0).mean() < 0.5
    assert "ControlNet is picked but there is no control image" in error_of(
        client.predict, "a <i>", handle_file(DOG), controlnet=0, **FAST, api_name="/generate")
    gallery, files, *_ = client.predict("a <i>", handle_file(DOG), controlnet=0, control_image=handle_file(DOG),
                                        control_scale=0.5, lora=0, lora_scale=0.8, **FAST, api_name="/generate")
    settings = json.loads((engine.output_dir / files[1]["orig_name"]).read_text())["settings"]
    assert (settings["controlnet"], settings["control_scale"]) == ("canny", 0.5)
    assert (settings["lora"], settings["lora_scale"]) == ("style", 0.8)
    assert engine.pipe.loras == {"style": 0.8}  # switched on for that request only ...
    client.predict("a <i>", handle_file(DOG), **FAST, api_name="/generate")
    assert engine.pipe.loras == {"style": 0.0}  # ... and off for the next


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_queue_is_bounded_and_every_waiting_request_is_answered(server, engine):
    clients = [Client(server, verbose=False, download_files=False) for _ in range(4)]
    with engine.lock:  # the device is busy: the first request holds the slot, two wait in the queue
        jobs = [clients[0].submit("a cat", **FAST, api_name="/generate")]
        wait_for(lambda: jobs[0].status().code.name in ("PROCESSING", "ITERATING"), what="first job running")
        jobs += [c.submit(f"a cat number {k}", **FAST, api_name="/generate") for k, c in enumerate(clients[1:3])]
        wait_for(lambda: all(j.status().code.name in ("IN_QUEUE", "QUEUE_FULL") for j in jobs[1:]),
                 what="jobs queued")
        assert sorted(j.status().rank for j in jobs[1:]) == [0, 1]  # their places in the queue
        full = clients[3].submit("one too many", **FAST, api_name="/generate")
        assert "Queue is full" in error_of(full.result, timeout=30)
    results = [j.result(timeout=60) for j in jobs]
    assert all(len(r[0]) == 1 for r in results)
    assert len({r[1][0]["orig_name"] for r in results}) == 3  # three different images


def test_progress_is_live_and_cancel_stops_the_loop_within_one_step(server, engine, monkeypatch):
    forward = engine.pipe.unet.forward

    def slow_forward(*args, **kwargs):  # at least 20 ms a step, so 100 steps outlast the cancel anywhere
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.pipe.unet, "forward", slow_forward)
    client = Client(server, verbose=False, download_files=False)
    job = client.submit("a slow cat", steps=100, num_images=1, randomize_seed=False, seed=1, api_name="/generate")
    wait_for(lambda: any(u.index and u.index >= 3 for u in (job.status().progress_data or [])),
             what="step progress")
    unit = job.status().progress_data[0]
    assert unit.length == 100 and unit.unit == "steps"
    n_files = len(list(engine.output_dir.iterdir()))
    job.cancel()
    wait_for(lambda: engine.history and engine.history[-1].request.prompt == "a slow cat", what="job end")
    run = engine.history[-1]
    assert run.state == "cancelled" and run.cancelled_at is not None
    assert run.step - run.cancelled_at <= 1 and run.step < 100
    assert len(list(engine.output_dir.iterdir())) == n_files  # nothing written for a cancelled run


def test_auth_is_asked_for_when_given(engine):
    demo = launch(engine, host="127.0.0.1", port=free_port(), auth=("ann", "s3cret"), prevent_thread_lock=True,
                  quiet=True)
    try:
        with httpx.Client() as http:
            assert http.get(f"{demo.local_url}config").status_code == 401
        with pytest.raises(Exception):
            Client(demo.local_url, verbose=False)
        ok = Client(demo.local_url, auth=("ann", "s3cret"), verbose=False, download_files=False)
        assert len(ok.predict("a cat", **FAST, api_name="/generate")[0]) == 1
    finally:
        demo.close()


def test_only_loopback_by_default():
    from kosmos_g.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.auth) == ("127.0.0.1", 7860, None)


def test_concurrent_requests_run_one_at_a_time(server, engine):
    active, peak = [0], [0]
    guard = threading.Lock()
    original = engine._sample

    def counting(job):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return original(job)
        finally:
            with guard:
                active[0] -= 1

    engine._sample = counting
    try:
        clients = [Client(server, verbose=False, download_files=False) for _ in range(3)]
        jobs = [c.submit(f"a dog {k}", **FAST, api_name="/generate") for k, c in enumerate(clients)]
        assert all(len(j.result(timeout=60)[0]) == 1 for j in jobs)
    finally:
        engine._sample = original
    assert peak[0] == 1


def test_outputs_kept_outside_the_temp_folder_reach_the_page_as_copies(engine):
    import shutil
    import tempfile

    root = Path("/var/tmp")
    if not root.is_dir() or root.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve()):
        pytest.skip("needs a folder outside the temp folder and the working folder")
    kept = Path(tempfile.mkdtemp(prefix="kosmos-g-demo-test-", dir=root))
    other = Engine(engine.pipe, output_dir=kept, loras=engine.lora_names, limits=LIMITS)
    demo = launch(other, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False, download_files=False)
        gallery, files, *_ = client.predict("a cat", **FAST, api_name="/generate")
        assert sorted(f["orig_name"] for f in files) == [p.name for p in sorted(kept.iterdir())]
        with httpx.Client() as http:
            assert http.get(f"{demo.local_url}gradio_api/file={kept / files[0]['orig_name']}").status_code == 403
            assert http.get(f"{demo.local_url}gradio_api/file={files[0]['path']}").status_code == 200
    finally:
        demo.close()
        shutil.rmtree(kept)
