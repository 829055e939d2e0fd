"""Options every `kosmos-g` command spells the same way: the output folder is `-o/--output-dir`."""

from __future__ import annotations

import pytest
import yaml

from kosmos_g.cli import build_parser, main


@pytest.mark.parametrize("argv", [["generate", "a dog"],
                                  ["convert-official", "ckpt.pt", "--dict", "dict.txt", "--spm", "spm.model"]])
@pytest.mark.parametrize("flag", ["-o", "--output-dir"])
def test_output_folder_option(argv, flag):
    assert build_parser().parse_args([*argv, flag, "out"]).output_dir == "out"


def test_generate_writes_to_outputs_by_default():
    assert build_parser().parse_args(["generate", "a dog"]).output_dir == "outputs"


def _printed_output_dir(argv: list[str], capsys) -> str:
    assert main(["train", "stage1", *argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)["train"]["output_dir"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_train_output_dir_sets_the_recipe_entry(tmp_path, capsys, where):
    config = ["--config", "tiny-stage1"]
    for flag in ("-o", "--output-dir"):
        option = [flag, str(tmp_path / "run")]
        argv = [*option, *config] if where == "before" else [*config, *option]
        assert _printed_output_dir(argv, capsys) == str(tmp_path / "run")
    assert _printed_output_dir([*config, "-o", "123"], capsys) == "123"  # a folder name, not a number
    # The recipe override keeps working, alone or naming the same folder as -o.
    same = f"train.output_dir={tmp_path / 'o'}"
    assert _printed_output_dir([*config, same], capsys) == str(tmp_path / "o")
    assert _printed_output_dir([*config, "-o", str(tmp_path / "o"), same], capsys) == str(tmp_path / "o")


def test_train_output_dir_given_twice_differently_is_refused(tmp_path, capsys):
    rc = main(["train", "stage1", "--config", "tiny-stage1", "-o", str(tmp_path / "a"),
               f"train.output_dir={tmp_path / 'b'}", "--print-config"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "-o/--output-dir" in err and "train.output_dir" in err
