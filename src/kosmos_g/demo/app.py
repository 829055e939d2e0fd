"""The Gradio page of the web demo, built on an :class:`~kosmos_g.demo.engine.Engine`.

``gradio`` is imported inside :func:`build_app` and :func:`launch`, so this module imports
without the ``demo`` extra. Every event that takes uploads runs with ``preprocess=False``:
its function gets the upload server's raw file records and the engine checks them itself
(type from the content, bytes, pixels from the header), so an unreadable or oversized file
is refused in one sentence instead of failing inside a component. Generation is one queued
event per device (``concurrency_id="device"``, one at a time) whose function is a generator:
it polls the engine's job, reports steps to the progress bar, and cancels the job when the
page's Cancel button (or a client's cancel) closes it.

Example:
    >>> from kosmos_g.demo import Engine
    >>> from kosmos_g.demo.app import launch
    >>> launch(Engine.load("ckpt/kosmos-g", "ckpt/sd-v1-5"), host="127.0.0.1", port=7860)  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import inspect
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ..processing import PLACEHOLDER
from ..schedulers import SCHEDULERS
from .engine import NONE_CHOICE, DemoError, Engine, canny_edges

Example = tuple[str, Sequence[str]]
"""A prompt and the image files for its ``<i>`` (files on the server, chosen by the command)."""

CSS = """
#preview .chip { display: inline-block; margin: 2px; padding: 2px 6px; border-radius: 6px; vertical-align: middle; }
#preview .text { background: var(--neutral-100); color: var(--neutral-800); white-space: pre-wrap; }
#preview .image img { height: 48px; width: 48px; object-fit: contain; image-rendering: pixelated; }
#preview .image { border: 1px solid var(--color-accent); }
#preview .empty, #preview .bad { border: 1px dashed var(--error-border-color, #d00); color: #b00; }
#gallery img { image-rendering: pixelated; }
"""

PAGE_INTRO = (
    "Type a prompt and put `{ph}` where each image goes: `a {ph} wearing a {ph}` takes two images, "
    "one per slot, in order. The preview shows how the prompt will be read."
)


def _generate_api_names(n_slots: int, n_negative: int) -> list[str]:
    """The generate endpoint's inputs, in order (also its gradio_client parameters)."""
    return (["prompt"] + [f"image_{k + 1}" for k in range(n_slots)] + ["negative_prompt"]
            + [f"negative_image_{k + 1}" for k in range(n_negative)]
            + ["steps", "guidance", "seed", "randomize_seed", "num_images", "width", "height", "scheduler",
               "controlnet", "control_image", "control_scale", "lora", "lora_scale"])


def _thumbnail(engine: Engine, value: Any, what: str, cache: dict) -> str:
    """An HTML chip with a small inline thumbnail of an upload, or its one-sentence problem."""
    try:
        path = value.get("path") if isinstance(value, dict) else value
        key = (path, os.stat(path).st_mtime_ns) if isinstance(path, str) and os.path.isfile(path) else None
        if key is None or key not in cache:
            image = engine.check_upload(value, what)
            image.thumbnail((96, 96))
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data = base64.b64encode(buf.getvalue()).decode("ascii")
            if key is not None:
                if len(cache) > 256:
                    cache.clear()
                cache[key] = data
        else:
            data = cache[key]
    except DemoError as e:
        return f'<span class="chip bad">{html.escape(str(e))}</span>'
    return f'<span class="chip image" title="{html.escape(what)}"><img alt="{html.escape(what)}" ' \
           f'src="data:image/png;base64,{data}"></span>'


def render_preview(engine: Engine, prompt: Any, slots: Sequence[Any], cache: dict | None = None) -> str:
    """How the prompt will be read: its text pieces and image thumbnails, in order (HTML)."""
    cache = {} if cache is None else cache
    if not isinstance(prompt, str) or not prompt.strip():
        return '<span class="chip text">Type a prompt; each <b>&lt;i&gt;</b> takes the image in its slot.</span>'
    pieces = prompt.split(PLACEHOLDER)
    out = []
    for k, text in enumerate(pieces):
        if text.strip():
            out.append(f'<span class="chip text">{html.escape(text.strip())}</span>')
        if k < len(pieces) - 1:
            if k >= len(slots):
                out.append(f'<span class="chip bad">{PLACEHOLDER.replace("<", "&lt;").replace(">", "&gt;")} '
                           f'{k + 1}: at most {len(slots)} images</span>')
            elif slots[k] is None:
                out.append(f'<span class="chip empty">image {k + 1}: empty slot</span>')
            else:
                out.append(_thumbnail(engine, slots[k], f"Image {k + 1}", cache))
    return "".join(out)


def build_app(engine: Engine, *, examples: Sequence[Example] = (), title: str = "Kosmos-G"):
    """The demo page on ``engine``: prompt and image slots, sampling settings, ControlNet and
    LoRA panels, gallery with downloads, examples. Returns a ``gradio.Blocks``; queue and
    launch it with :func:`launch`.

    Example:
        >>> demo = build_app(engine, examples=[("a large <i> on the left", ["star.png"])])  # doctest: +SKIP
    """
    import gradio as gr
    from gradio.utils import get_upload_folder

    if engine.upload_root is None:
        engine.upload_root = Path(get_upload_folder()).resolve()
    lim, d = engine.limits, engine.defaults
    n_slots, n_neg = lim.max_slots, lim.max_negative_slots
    size_lo, size_hi = engine.size_range
    thumbs: dict = {}
    skip = gr.skip

    tmp, cwd = Path(tempfile.gettempdir()).resolve(), Path.cwd().resolve()
    out = engine.output_dir.resolve()
    hand_out_dir: list[Path] = []

    def handed_out(paths: Sequence[Path]) -> list[str]:
        """Paths gradio may copy into its cache for the page: it copies from the temp and working
        folders, or from launch's allowed_paths, which would also serve every output to anyone
        who guesses a name. So outputs kept elsewhere are copied to a private temp folder first."""
        if out.is_relative_to(tmp) or out.is_relative_to(cwd):
            return [str(p) for p in paths]
        if not hand_out_dir:
            hand_out_dir.append(Path(tempfile.mkdtemp(prefix="kosmos-g-demo-page-")))
        copies = []
        for p in paths:
            copy = hand_out_dir[0] / Path(p).relative_to(out)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, copy)
            copies.append(str(copy))
        return copies

    def page_error(message: str):
        # The page renders an error's message as HTML: escaped, a prompt's <i> shows as typed.
        return gr.Error(html.escape(message), print_exception=False)

    # Uploads and the copies the page shows are dropped from gradio's cache after a day, checked
    # hourly, so a server left running does not fill its disk (the output folder is kept).
    with gr.Blocks(title=title, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"# {title}\n" + PAGE_INTRO.format(ph=PLACEHOLDER) + f"  \nModel: `{engine.model_name}`.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", elem_id="prompt", lines=2, max_length=lim.max_prompt_chars,
                                    placeholder=f"a {PLACEHOLDER} wearing a {PLACEHOLDER}")
                with gr.Row():
                    add_image = gr.Button(f"+ image ({PLACEHOLDER})", elem_id="add-image", size="sm", scale=0)
                    preview = gr.HTML(render_preview(engine, "", [None] * n_slots), elem_id="preview")
                columns, slots, lefts, removes = [], [], [], []
                with gr.Row():
                    for k in range(n_slots):
                        with gr.Column(visible=False, min_width=140, elem_id=f"slot-col-{k + 1}") as col:
                            slots.append(gr.Image(label=f"image {k + 1}", type="filepath", format="png",
                                                  sources=["upload", "clipboard"], elem_id=f"slot-{k + 1}",
                                                  height=150))
                            with gr.Row():
                                lefts.append(gr.Button("◀ earlier", size="sm", elem_id=f"slot-{k + 1}-earlier",
                                                       interactive=k > 0))
                                removes.append(gr.Button("✕ remove", size="sm", elem_id=f"slot-{k + 1}-remove"))
                        columns.append(col)
                with gr.Accordion("Negative prompt", open=False):
                    negative = gr.Textbox(label="Negative prompt (text, with <i> for images)", elem_id="negative",
                                          max_length=lim.max_prompt_chars)
                    with gr.Row():
                        neg_slots = [gr.Image(label=f"negative image {k + 1}", type="filepath", format="png",
                                              sources=["upload", "clipboard"], elem_id=f"negative-slot-{k + 1}",
                                              height=120) for k in range(n_neg)]
                with gr.Accordion("Sampling", open=True):
                    with gr.Row():
                        steps = gr.Slider(1, lim.max_steps, value=d["steps"], step=1, label="Steps",
                                          elem_id="steps")
                        guidance = gr.Slider(0, 30, value=d["guidance"], step=0.5, label="Guidance",
                                             elem_id="guidance")
                        scheduler = gr.Dropdown(list(SCHEDULERS), value=d["scheduler"], label="Scheduler",
                                                elem_id="scheduler")
                    with gr.Row():
                        seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=2**31 - 1,
                                         elem_id="seed")
                        randomize = gr.Checkbox(True, label="Randomize seed", elem_id="randomize")
                        num_images = gr.Slider(1, lim.max_images, value=min(2, lim.max_images), step=1,
                                               label="Images", elem_id="num-images")
                    with gr.Row():
                        width = gr.Slider(size_lo, size_hi, value=d["width"], step=8, label="Width",
                                          elem_id="width")
                        height = gr.Slider(size_lo, size_hi, value=d["height"], step=8, label="Height",
                                           elem_id="height")
                with gr.Accordion("ControlNet", open=False, visible=bool(engine.controlnet_names)):
                    controlnet = gr.Dropdown([("none", NONE_CHOICE)] + [(n, k) for k, n in
                                                                       enumerate(engine.controlnet_names)],
                                             value=NONE_CHOICE, label="ControlNet", elem_id="controlnet")
                    with gr.Row():
                        control_image = gr.Image(label="Control image", type="filepath", format="png",
                                                 sources=["upload", "clipboard"], elem_id="control-image",
                                                 height=150)
                        photo = gr.Image(label="Photo for canny edges", type="filepath", format="png",
                                         sources=["upload", "clipboard"], elem_id="canny-photo", height=150)
                    with gr.Row():
                        canny_low = gr.Slider(0, 1, value=0.1, step=0.01, label="Canny low", elem_id="canny-low")
                        canny_high = gr.Slider(0, 1, value=0.2, step=0.01, label="Canny high",
                                               elem_id="canny-high")
                        make_canny = gr.Button("Make canny edges", elem_id="make-canny", size="sm")
                    control_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="ControlNet scale",
                                              elem_id="control-scale")
                with gr.Accordion("LoRA", open=False, visible=bool(engine.lora_names)):
                    lora = gr.Dropdown([("none", NONE_CHOICE)] + [(n, k) for k, n in enumerate(engine.lora_names)],
                                       value=NONE_CHOICE, label="LoRA", elem_id="lora")
                    lora_scale = gr.Slider(-2, 2, value=1.0, step=0.05, label="LoRA scale", elem_id="lora-scale")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                status = gr.Markdown("", elem_id="status", label="status")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Output", elem_id="gallery", format="png", columns=2, height=420,
                                     object_fit="contain", interactive=False, buttons=["download", "fullscreen"])
                use_as_input = gr.Button("Use as input (selected image)", elem_id="use-as-input", size="sm")
                downloads = gr.File(label="PNG and JSON sidecar of each image", file_count="multiple",
                                    elem_id="downloads", interactive=False)
        outputs_state = gr.State([])  # server side: the last run's PNG paths
        selected = gr.State(None)  # the gallery image last clicked

        # ---------------------------------------------------------------- slots and preview
        def on_prompt(text: Any, *values: Any):
            n = text.count(PLACEHOLDER) if isinstance(text, str) else 0
            visible = [gr.update(visible=k < n) for k in range(n_slots)]
            cleared = [skip() if k < n or values[k] is None else None for k in range(n_slots)]
            return (*visible, *cleared, render_preview(engine, text, values, thumbs))

        prompt.change(on_prompt, [prompt, *slots], [*columns, *slots, preview], preprocess=False, queue=False,
                      api_visibility="private", show_progress="hidden")
        for slot in slots:
            slot.change(lambda text, *values: render_preview(engine, text, values, thumbs), [prompt, *slots],
                        preview, preprocess=False, queue=False, api_visibility="private", show_progress="hidden")

        def on_add(text: Any):
            text = text if isinstance(text, str) else ""
            if text.count(PLACEHOLDER) >= n_slots:
                raise page_error(f"At most {n_slots} images fit in a prompt.")
            return (text.rstrip() + " " + PLACEHOLDER).lstrip()

        add_image.click(on_add, prompt, prompt, queue=False, api_visibility="private", show_progress="hidden")

        def path_of(value: Any) -> str | None:
            try:
                path = engine.upload_file(value, "The image")
            except DemoError as e:
                raise page_error(str(e)) from None
            return None if path is None else str(path)

        for k in range(1, n_slots):
            lefts[k].click(lambda a, b: (path_of(b), path_of(a)), [slots[k - 1], slots[k]], [slots[k - 1], slots[k]],
                           preprocess=False, queue=False, api_visibility="private", show_progress="hidden")

        def make_remove(k: int):
            def remove(text: Any, *values: Any):
                text = text if isinstance(text, str) else ""
                pieces = text.split(PLACEHOLDER)
                if k < len(pieces) - 1:  # join the pieces around the k-th placeholder
                    pieces[k:k + 2] = [pieces[k].rstrip() + (" " if pieces[k + 1][:1] not in ("", " ") else "")
                                       + pieces[k + 1]]
                paths = [path_of(v) for v in values]
                paths = paths[:k] + paths[k + 1:] + [None]
                return (PLACEHOLDER.join(pieces), *paths)
            return remove

        for k in range(n_slots):
            removes[k].click(make_remove(k), [prompt, *slots], [prompt, *slots], preprocess=False, queue=False,
                             api_visibility="private", show_progress="hidden")

        # ---------------------------------------------------------------- generation
        names = _generate_api_names(n_slots, n_neg)

        def generate(progress=gr.Progress(), *values: Any):
            """One request: check it, run it on the device, report steps; closing this generator
            (the Cancel button, a client's cancel) cancels the job within one step."""
            v = dict(zip(names, values))
            try:
                request = engine.parse(
                    prompt=v["prompt"], images=[v[f"image_{k + 1}"] for k in range(n_slots)],
                    negative=v["negative_prompt"], negative_images=[v[f"negative_image_{k + 1}"] for k in range(n_neg)],
                    steps=v["steps"], guidance=v["guidance"], seed=v["seed"], randomize_seed=v["randomize_seed"],
                    num_images=v["num_images"], width=v["width"], height=v["height"], scheduler=v["scheduler"],
                    controlnet=v["controlnet"], control_image=v["control_image"], control_scale=v["control_scale"],
                    lora=v["lora"], lora_scale=v["lora_scale"])
            except DemoError as e:
                raise page_error(str(e)) from None
            job = engine.start(request)
            try:
                while not job.wait(0.1):
                    if job.state == "running":
                        progress((job.step, job.total), desc="Sampling", unit="steps")
                        text = f"Sampling: step {job.step} of {job.total}."
                    else:
                        text = "Waiting for the device."
                    yield skip(), skip(), text, skip(), skip()
            finally:
                job.cancel()  # a no-op when the job is done; stops the sampling loop when this is closed
            if job.error is not None:
                raise page_error(str(job.error))
            files = handed_out(job.files)
            pngs = files[0::2]
            captions = [(p, f"seed {request.seed + k}") for k, p in enumerate(pngs)]
            text = (f"{len(pngs)} image{'s' if len(pngs) > 1 else ''} in {job.seconds:.1f} s, seed {request.seed}"
                    f"{'' if len(pngs) == 1 else f' to {request.seed + len(pngs) - 1}'}.")
            yield captions, files, text, request.seed, pngs

        # Named parameters for API clients (gradio reads them from the signature), each optional.
        generate.__signature__ = inspect.Signature(
            [inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress())]
            + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names])
        gen_inputs = [prompt, *slots, negative, *neg_slots, steps, guidance, seed, randomize, num_images, width,
                      height, scheduler, controlnet, control_image, control_scale, lora, lora_scale]
        gen_outputs = [gallery, downloads, status, seed, outputs_state]
        gen_options = dict(preprocess=False, concurrency_limit=1, concurrency_id="device",
                           show_progress="full", show_progress_on=[gallery])
        gen_event = run.click(generate, gen_inputs, gen_outputs, api_name="generate", **gen_options)
        events = [gen_event]

        if examples:
            width_needed = max(1, *(len(files) for _, files in examples))
            if width_needed > n_slots:
                raise ValueError(f"An example has {width_needed} images; the page has {n_slots} slots.")
            rows = [[text, *map(str, files), *[None] * (width_needed - len(files))] for text, files in examples]
            ex = gr.Examples(rows, [prompt, *slots[:width_needed]], label="Examples (click one to run it)",
                             examples_per_page=8, elem_id="examples")
            events.append(ex.load_input_event.then(generate, gen_inputs, gen_outputs, api_visibility="private",
                                                   **gen_options))

        # The status is set only once the cancellation is done: set in the same event, a progress
        # update already on its way from the cancelled run could land after it and overwrite it.
        cancel.click(None, None, None, cancels=events, queue=False, api_visibility="private").then(
            lambda: "Cancelled.", None, status, queue=False, api_visibility="private")

        def on_select(evt):
            return evt.index

        on_select.__annotations__ = {"evt": gr.SelectData}  # gradio passes the event by this type

        gallery.select(on_select, None, selected, queue=False, api_visibility="private")

        def on_use(text: Any, index: Any, pngs: list, *values: Any):
            if not pngs:
                raise page_error("Generate an image first, then use it as an input.")
            index = index if isinstance(index, int) and 0 <= index < len(pngs) else 0
            text = text if isinstance(text, str) else ""
            n = text.count(PLACEHOLDER)
            empty = next((k for k in range(n) if values[k] is None), None)
            if empty is None:
                if n >= n_slots:
                    raise page_error(f"All {n_slots} image slots are full; remove one first.")
                empty, text = n, (text.rstrip() + " " + PLACEHOLDER).lstrip()
            out = [skip()] * n_slots
            out[empty] = pngs[index]
            return (text, *out)

        use_as_input.click(on_use, [prompt, selected, outputs_state, *slots], [prompt, *slots], preprocess=False,
                           queue=False, api_visibility="private", show_progress="hidden")

        def on_canny(value: Any, low: Any, high: Any):
            try:
                image = engine.check_upload(value, "The photo")
                if image is None:
                    raise DemoError("Upload a photo first; its canny edges become the control image.")
                if not all(isinstance(x, (int, float)) for x in (low, high)) or not 0 <= low <= high <= 1:
                    raise DemoError("Canny low must be between 0 and canny high, and high at most 1.")
            except DemoError as e:
                raise page_error(str(e)) from None
            path = engine.output_dir / "control" / f"canny-{os.urandom(6).hex()}.png"
            path.parent.mkdir(exist_ok=True)
            canny_edges(image, float(low), float(high)).save(path)
            return handed_out([path])[0]

        make_canny.click(on_canny, [photo, canny_low, canny_high], control_image, preprocess=False,
                         api_name="canny", concurrency_limit=2)
    return demo


def launch(engine: Engine, *, host: str = "127.0.0.1", port: int | None = 7860,
           auth: tuple[str, str] | None = None, examples: Sequence[Example] = (),
           allowed_paths: Sequence[str | os.PathLike] = (), prevent_thread_lock: bool = False, quiet: bool = False):
    """Build, queue and serve the demo: loopback by default, the engine's upload limit enforced
    by the upload server, only the engine's output folder and the example files servable, one
    generation at a time with ``engine.limits.queue_size`` waiting. Returns the ``gradio.Blocks``
    (serving in the background with ``prevent_thread_lock``; ``.close()`` stops it).

    Example:
        >>> demo = launch(engine, port=0, prevent_thread_lock=True)  # doctest: +SKIP
    """
    demo = build_app(engine, examples=examples)
    demo.queue(max_size=engine.limits.queue_size, default_concurrency_limit=1, api_open=True)
    # Only the example files are served from where they lie; outputs reach the page through
    # gradio's cache (see handed_out in build_app), never by their path.
    served = [str(Path(f).resolve()) for _, files in examples for f in files]
    demo.launch(server_name=host, server_port=port, auth=auth, max_file_size=engine.limits.max_upload_bytes,
                allowed_paths=sorted(set(served) | {str(p) for p in allowed_paths}), show_error=False,
                share=False, ssr_mode=False, prevent_thread_lock=prevent_thread_lock, quiet=quiet, css=CSS,
                footer_links=["api"], enable_monitoring=False, pwa=False, mcp_server=False)
    return demo
