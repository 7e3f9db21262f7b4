"""The options several benchmark commands share are one declaration (transexplain/commands/common.py):
the same flags, type, default and help in every command that has them."""
import pytest
import typer

from transexplain.cli import app

#: flag -> the commands that declare it alike (a flag whose help differs on purpose is grouped per wording)
SHARED = {
    "--method": ("perturb", "segment", "evaluate", "eraser"),
    "--device": ("perturb", "segment", "evaluate", "eraser"),
    "--overwrite": ("perturb", "segment", "evaluate", "eraser"),
    "--random-weights": ("perturb", "segment", "evaluate"),
    "--classes": ("perturb", "segment", "evaluate"),
    "--prompt": ("perturb", "segment", "evaluate"),
    "--num-workers": ("perturb", "segment", "evaluate"),
    "--option": ("perturb", "segment", "evaluate", "eraser"),
    "--quiet": ("perturb", "segment", "evaluate"),
    "--labels": ("perturb", "evaluate"),
    "--save-maps": ("perturb", "segment"),
    "--model": ("perturb", "segment"),
    "--limit": ("segment", "evaluate"),
    "--precision": ("perturb", "segment"),
}
#: the same flag with the plain (not the benchmark) precision help
SHARED_TOO = {"--precision": ("evaluate", "eraser")}


def _option(command, flag):
    cmd = typer.main.get_command(app).commands[command]
    [param] = [p for p in cmd.params if flag in p.opts]
    return (tuple(param.opts), tuple(param.secondary_opts), param.type_descriptor.annotation, param.default,
            param.required, param.help, param.is_flag, param.multiple, param.min, param.max)


@pytest.mark.parametrize("flag, commands", [*SHARED.items(), *SHARED_TOO.items()])
def test_a_shared_option_is_declared_alike_in_every_command(flag, commands):
    first = _option(commands[0], flag)
    for command in commands[1:]:
        assert _option(command, flag) == first, (flag, command)


@pytest.mark.parametrize("command", ["perturb", "segment", "evaluate", "eraser"])
def test_out_names_the_command_file(command):
    opts, _, _, default, required, help_text, *_ = _option(command, "--out")
    assert opts == ("--out", "-o") and default is None and not required
    assert f"results/{command}_<method>.h5" in help_text


def test_the_method_is_required_and_the_defaults_are_the_documented_ones():
    assert _option("perturb", "--method")[4] is True
    assert _option("perturb", "--prompt")[3] == "a photo of a {}"
    assert _option("eraser", "--device")[3] == "cpu" and _option("eraser", "--precision")[3] == "float64"
    assert _option("evaluate", "--model")[3] == "embedded" and _option("eraser", "--model")[3] == "embedded"
