"""`kosmos-g eval dreambench | coco-fid | score` end to end on tiny random models: reports, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from eval_fixtures import make_coco, make_dreambench, make_random_inception, make_tiny_clip, make_tiny_dino
from kosmos_g.cli import main
from kosmos_g.eval import runner
from kosmos_g.eval.inception import FIDInceptionV3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_kosmos_dir, tiny_sd_dir):
    root = tmp_path_factory.mktemp("eval-world")
    coco_captions, coco_images = make_coco(root / "coco")
    make_random_inception(root / "inception.pth")
    return {"kosmos": tiny_kosmos_dir, "sd": tiny_sd_dir, "dino": make_tiny_dino(root / "dino"),
            "clip": make_tiny_clip(root / "clip"),
            "data": make_dreambench(root / "db", {"dog": "02.jpg", "can": "01.jpg"}),
            "captions": coco_captions, "coco_images": coco_images, "inception": root / "inception.pth"}


@pytest.fixture()
def calls(monkeypatch):
    """Counts the generator calls (each a batch) and models loaded."""
    counts = {"load": 0, "batches": 0}
    for cls in (runner.KosmosGGenerator, runner.SDGenerator):
        init, call = cls.__init__, cls.__call__

        def counted_init(self, *a, _init=init, **k):
            counts["load"] += 1
            _init(self, *a, **k)

        def counted_call(self, items, _call=call):
            counts["batches"] += 1
            return _call(self, items)

        monkeypatch.setattr(cls, "__init__", counted_init)
        monkeypatch.setattr(cls, "__call__", counted_call)
    monkeypatch.setattr(FIDInceptionV3, "input_size", 75)  # the random Inception, fast
    return counts


def dreambench_args(world, out, *extra):
    return ["eval", "dreambench", "--data", str(world["data"]), "--model", str(world["kosmos"]), "--sd",
            str(world["sd"]), "--dino", str(world["dino"]), "--clip", str(world["clip"]), "--subjects", "dog,can",
            "--limit", "2", "--images-per-prompt", "2", "--steps", "2", "--batch-size", "2", "-q", "-o", str(out),
            *extra]


def test_dreambench_runs_end_to_end_and_resumes_without_generating_again(world, tmp_path, calls, capsys):
    out = tmp_path / "db"
    assert main(dreambench_args(world, out)) == 0
    assert calls == {"load": 1, "batches": 4}  # 2 subjects x 2 prompts, 2 images per batch
    result = json.loads((out / "results.json").read_text())
    assert result["scores"]["n"] == 8 and set(result["per_subject"]) == {"can", "dog"}
    assert set(result["per_kind"]) == {"recontextualization"}
    assert all(0.0 <= result["scores"][k] <= 100.0 for k in ("dino", "clip_i", "clip_t"))
    md = (out / "results.md").read_text()
    assert "| Kosmos-G (paper) | 0.694 | 0.847 | 0.287 |" in md and "## Per subject" in md
    assert (out / "grids" / "dog.png").is_file() and (out / "grids" / "can.png").is_file()
    sidecar = json.loads((out / "images" / "dog" / "00-in-the-jungle-1.json").read_text())
    assert sidecar["settings"]["steps"] == 2 and sidecar["settings"]["scheduler"] == "dpm++"
    assert sidecar["item"]["prompt"] == "<i> in the jungle" and sidecar["item"]["seed"] == 1
    assert sidecar["item"]["images"][0].endswith("dog/02.jpg")
    first = {r["key"]: r for r in result["images"]}
    assert first["dog/01-in-the-snow-0"]["subject"] == "dog"
    assert "dino 0." in capsys.readouterr().out

    # again: nothing is generated, no model is loaded, the scores are the same
    calls.update(load=0, batches=0)
    assert main(dreambench_args(world, out)) == 0
    assert calls == {"load": 0, "batches": 0}
    assert json.loads((out / "results.json").read_text())["scores"] == result["scores"]

    # one image lost (a killed run): only that one is made again
    (out / "images" / "can" / "01-in-the-snow-1.json").unlink()
    assert main(dreambench_args(world, out)) == 0
    assert calls == {"load": 1, "batches": 1}
    assert json.loads((out / "results.json").read_text())["scores"] == pytest.approx(result["scores"])

    # other settings: refused in one line (exit 2), nothing made; --overwrite remakes them
    calls.update(load=0, batches=0)
    capsys.readouterr()
    assert main(dreambench_args(world, out, "--guidance", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings" in err and "--overwrite" in err
    assert calls["batches"] == 0
    assert main(dreambench_args(world, out, "--guidance", "3", "--overwrite")) == 0
    assert calls["batches"] == 4
    assert json.loads((out / "images" / "dog" / "00-in-the-jungle-0.json").read_text())["settings"]["guidance"] == 3


def test_coco_fid_runs_end_to_end_caches_the_reference_and_resumes(world, tmp_path, calls, monkeypatch):
    out = tmp_path / "coco"
    args = ["eval", "coco-fid", "--captions", str(world["captions"]), "--coco-images", str(world["coco_images"]),
            "--inception", str(world["inception"]), "--clip", str(world["clip"]), "--model", str(world["kosmos"]),
            "--sd", str(world["sd"]), "--steps", "2", "--limit", "4", "-q", "-o", str(out)]
    assert main(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["scores"]["n"] == 4 and result["scores"]["fid"] > 0 and "clip_t" in result["scores"]
    assert result["settings"]["scheduler"] == "ddim" and result["settings"]["guidance"] == 3.0
    assert result["settings"]["reference_images"] == 4
    assert (out / "reference-stats-256.safetensors").is_file()
    assert "| SD v1.5 (paper) | 9.34 | - |" in (out / "results.md").read_text()
    sidecars = sorted((out / "images").glob("*.json"))
    assert [json.loads(p.read_text())["item"]["seed"] for p in sidecars] == [0, 1, 2, 3]

    computed = []
    monkeypatch.setattr("kosmos_g.eval.runs.image_stats", lambda *a, **k: computed.append(1))
    calls.update(load=0, batches=0)
    assert main(args) == 0
    assert calls["batches"] == 0 and not computed  # images and reference statistics are reused
    assert json.loads((out / "results.json").read_text())["scores"]["fid"] == pytest.approx(result["scores"]["fid"])


def test_score_any_folder_and_the_sd_baseline(world, tmp_path, calls):
    db = tmp_path / "db"
    assert main(dreambench_args(world, db)) == 0
    ours = json.loads((db / "results.json").read_text())["scores"]
    # another system's images under the same names, scored the same way: here, the same images
    out = tmp_path / "scored"
    assert main(["eval", "score", "--generated", str(db / "images"), "--prompts", str(db / "prompts.jsonl"),
                 "--dino", str(world["dino"]), "--clip", str(world["clip"]), "-q", "-o", str(out)]) == 0
    scored = json.loads((out / "results.json").read_text())
    assert {k: scored["scores"][k] for k in ours} == pytest.approx(ours)
    assert set(scored["per_subject"]) == {"dog", "can"}

    # the SD baseline on the same prompts (with the class noun), then FID against a folder
    calls.update(load=0, batches=0)
    sd_args = ["eval", "score", "--baseline", "sd", "--sd", str(world["sd"]), "--steps", "2",
               "--generated", str(tmp_path / "sd-images"), "--prompts", str(db / "prompts.jsonl"),
               "--reference", str(world["coco_images"]), "--inception", str(world["inception"]),
               "--dino", str(world["dino"]), "--clip", str(world["clip"]), "-q", "-o", str(tmp_path / "sd")]
    assert main(sd_args) == 0
    assert calls["load"] == 1
    sd = json.loads((tmp_path / "sd" / "results.json").read_text())
    assert sd["scores"]["n"] == 8 and sd["scores"]["fid"] > 0 and sd["settings"]["generator"] == "sd"
    sidecar = json.loads((tmp_path / "sd-images" / "dog" / "00-in-the-jungle-1.json").read_text())
    assert sidecar["item"]["seed"] == 1 and sidecar["settings"]["model"] is None
    calls.update(load=0, batches=0)
    assert main(sd_args) == 0
    assert calls == {"load": 0, "batches": 0}


@pytest.mark.parametrize("extra, message", [
    (["--subjects", "dog,unicorn"], "unknown DreamBench subject"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--size", "30"], "multiple of 8"),
    (["--baseline", "sd"], "drop --model"),
])
def test_bad_input_is_one_line_and_exit_2(world, tmp_path, calls, capsys, extra, message):
    capsys.readouterr()
    assert main(dreambench_args(world, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert calls["load"] == 0


def test_missing_folders_and_a_user_s_report_are_refused(world, tmp_path, capsys):
    args = dreambench_args(world, tmp_path / "out")
    args[args.index("--data") + 1] = str(tmp_path / "nowhere")
    assert main(args) == 2
    assert "DreamBench folder not found" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "results.json").write_text("{\"my\": \"numbers\"}")
    assert main(["eval", "score", "--generated", str(world["coco_images"]), "--reference", str(world["coco_images"]),
                 "--inception", str(world["inception"]), "-q", "-o", str(tmp_path / "mine")]) == 2
    assert "not written by kosmos-g eval" in capsys.readouterr().err
    assert json.loads((tmp_path / "mine" / "results.json").read_text()) == {"my": "numbers"}


def test_two_processes_give_the_scores_of_one(world, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(dreambench_args(world, one)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "KOSMOS_G_DEBUG": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "kosmos_g.cli", *dreambench_args(world, two)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode and any(m in done.stderr for m in ("address already in use", "EADDRINUSE", "rendezvous")):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # a port race: retry once
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert b["settings"]["processes"] == 2 and a["settings"]["processes"] == 1
    assert b["scores"] == pytest.approx(a["scores"], abs=1e-4)
    assert [r["key"] for r in b["images"]] == [r["key"] for r in a["images"]]
    for subject, scores in a["per_subject"].items():
        assert b["per_subject"][subject] == pytest.approx(scores, abs=1e-4)


def test_two_processes_give_the_fid_of_one(world, tmp_path):
    """The Inception statistics (reference and generated) are split over the processes and summed."""
    def args(out):
        return ["eval", "coco-fid", "--captions", str(world["captions"]), "--coco-images", str(world["coco_images"]),
                "--inception", str(world["inception"]), "--clip", str(world["clip"]), "--model", str(world["kosmos"]),
                "--sd", str(world["sd"]), "--steps", "2", "--limit", "4", "--batch-size", "1", "-q", "-o", str(out)]

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(one)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "KOSMOS_G_DEBUG": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "kosmos_g.cli", *args(two)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode and any(m in done.stderr for m in ("address already in use", "EADDRINUSE", "rendezvous")):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert b["settings"]["processes"] == 2 and b["settings"]["reference_images"] == 4
    assert b["scores"]["fid"] == pytest.approx(a["scores"]["fid"], rel=1e-4)
    assert b["scores"]["clip_t"] == pytest.approx(a["scores"]["clip_t"], abs=1e-4)


def test_the_docs_python_example_runs(world, tmp_path, monkeypatch, calls):
    """docs/evaluation.md's Python block, on the tiny folders, on the CPU and with 2 steps."""
    import re
    import shutil
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    for name, key in (("ckpt/kosmos-g", "kosmos"), ("ckpt/sd-v1-5", "sd"), ("ckpt/dino-vits16", "dino"),
                      ("ckpt/clip-vit-base-patch32", "clip"), ("dreambooth/dataset", "data")):
        shutil.copytree(world[key], tmp_path / name)
    monkeypatch.chdir(tmp_path)
    code = block.replace('"cuda"', '"cpu"').replace('"fp16"', '"fp32"').replace("steps=100", "steps=2")
    code = code.replace('"steps": 100', '"steps": 2')
    exec(compile(code, "docs/evaluation.md python block", "exec"), {})
    assert json.loads((tmp_path / "eval/dreambench-quick/results.json").read_text())["scores"]["n"] == 16
