"""Recipes: packaged YAML files, typed overrides, clear errors."""

from __future__ import annotations

import pytest
import yaml

from kosmos_g.cli import main
from kosmos_g.train.recipe import RECIPES_DIR, load_recipe, parse_override


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_packaged_recipes_parse_and_validate(name):
    recipe = load_recipe(name)
    stage = recipe.stage
    assert stage in ("stage1", "stage2", "stage3")
    recipe.validate(stage)
    assert recipe.optim.betas == (0.9, 0.98) and recipe.optim.weight_decay == 0.01


def test_paper_recipes_carry_the_released_settings():
    s2, s3 = load_recipe("stage2"), load_recipe("stage3")
    assert (s2.optim.lr, s2.train.max_steps, s2.stage2.max_clip_tokens, s2.stage2.max_mllm_tokens) == \
        (1e-3, 300_000, 75, 85)
    assert [src.weight for src in s3.data.sources] == [1, 2, 2]
    assert (s3.stage3.resolution, s3.stage3.cond_dropout, s3.stage3.caption_drop) == (512, 0.1, 0.5)
    assert load_recipe("stage1").model.preset == "kosmos-g"


def test_overrides_are_typed_yaml():
    r = load_recipe("tiny-stage3", ["train.max_steps=12", "train.precision=bf16", "optim.lr=3e-4",
                                    "data.sources.1.weight=5", "stage3.latent_cache=null",
                                    "model.config={mllm.dropout: 0.0}", "optim.betas=[0.8, 0.9]"])
    assert r.train.max_steps == 12 and r.train.precision == "bf16" and r.optim.lr == 3e-4
    assert r.data.sources[1].weight == 5.0 and r.stage3.latent_cache is None
    assert r.model.config == {"mllm.dropout": 0.0} and r.optim.betas == (0.8, 0.9)
    assert parse_override("a.b=") == ("a.b", None)


@pytest.mark.parametrize("overrides, match", [
    (["train.max_step=3"], "Unknown recipe key"),
    (["train.max_steps=three"], "integer"),
    (["train.precision=fp8"], "precision"),
    (["optim.betas=[0.9]"], "2 values"),
    (["stage3.cond_dropout=1.5"], "cond_dropout"),
    (["stage3.resolution=30"], "multiple of 8"),
    (["data.sources=[]"], "data.sources is empty"),
    (["model.preset=tiny"], "exactly one"),
])
def test_bad_recipes_name_the_problem(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_recipe("tiny-stage3", overrides).validate("stage3")


@pytest.mark.parametrize("key, value", [("cell_label_weight", "2.0"), ("cell_classes", "{shape: 3}"), ("cells", "4")])
def test_stage3_refuses_the_per_cell_loss_keys_by_name(tmp_path, key, value):
    """The per-cell attribute loss is stage 1's only; a stage-3 recipe that sets one of its
    keys fails with the loader's unknown-key error, which names the key."""
    data = load_recipe("tiny-stage3").to_dict()
    data["stage3"][key] = yaml.safe_load(value)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"Unknown recipe key\(s\) \['stage3\.{key}'\]"):
        load_recipe(path)
    with pytest.raises(ValueError, match=rf"\['stage3\.{key}'\]"):
        load_recipe("tiny-stage3", [f"stage3.{key}={value}"])
    assert load_recipe("tiny-stage1", [f"stage1.{key}={value}"])  # stage 1 keeps them


def test_stage_mismatch_and_missing_recipe():
    with pytest.raises(ValueError, match="for stage2"):
        load_recipe("tiny-stage2").validate("stage1")
    with pytest.raises(FileNotFoundError, match="tiny-stage1"):
        load_recipe("no-such-recipe")


def test_cli_prints_the_resolved_recipe(capsys):
    assert main(["train", "stage2", "--config", "tiny-stage2", "train.max_steps=7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "clip_path: runs/tiny/sd" in out


def test_cli_errors_are_one_line(capsys):
    assert main(["train", "stage2", "--config", "tiny-stage2", "train.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "Unknown recipe key" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "stage1"]) == 2
    assert "--config is required" in capsys.readouterr().err


def test_model_config_overrides_set_single_fields(tiny_kosmos_dir):
    from kosmos_g.train.modeling import load_kosmos_g

    # The command line's dotted form nests: model.config.resampler.num_queries=7 ->
    # {"resampler": {"num_queries": 7}}; it must change that field only.
    def spec(*overrides):
        return load_recipe("tiny-stage1", ["model.init=null", "model.preset=tiny",
                                           f"model.tokenizer={tiny_kosmos_dir / 'tokenizer'}", *overrides]).model

    model, processor = load_kosmos_g(spec("model.config.resampler.num_queries=7", "model.config.mllm.dropout=0.25"))
    tiny = load_kosmos_g(spec())[0]
    got, ref = model.config.to_dict(), tiny.config.to_dict()
    assert got["resampler"] == {**ref["resampler"], "num_queries": 7}
    assert got["mllm"] == {**ref["mllm"], "dropout": 0.25}
    assert processor.num_image_tokens == 7
    with pytest.raises(ValueError, match="resampler.num_querys"):
        load_kosmos_g(spec("model.config.resampler.num_querys=7"))
    with pytest.raises(ValueError, match="whole section"):
        load_kosmos_g(spec("model.config={resampler: null}"))
