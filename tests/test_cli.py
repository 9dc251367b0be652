"""`lmprune` on the command line: info, exit codes and one-line errors."""

import json
import subprocess
import sys

import pytest
from tiny_models import tiny_config, tiny_model

from lmprune.cli import build_parser, main
from lmprune.core.models import save_model


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_json_on_a_saved_folder(tmp_path, capsys):
    save_model(tiny_model("gpt2"), None, tmp_path / "g")
    code, out, err = _run(capsys, "info", str(tmp_path / "g"), "--json")
    info = json.loads(out)
    assert code == 0
    assert info["model_type"] == "gpt2"
    assert info["num_layers"] == 2
    assert info["neurons_per_layer"] == [40, 40]
    assert info["total_neurons"] == 80
    assert info["parameters"] == sum(p.numel() for p in tiny_model("gpt2").parameters())
    assert info["hook_points"] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]


def _bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    bert = tmp_path / "bert"
    bert.mkdir()
    from transformers import BertConfig

    BertConfig(architectures=["BertForSequenceClassification"]).save_pretrained(bert)
    bloom = tmp_path / "bloom"
    from transformers import BloomConfig

    BloomConfig(n_layer=1, hidden_size=8, n_head=2).save_pretrained(bloom)
    return {
        "missing": (str(tmp_path / "nope"), "model not found"),
        "no config": (str(tmp_path / "empty"), "without config.json"),
        "not causal": (str(bert), "not a causal language model"),
        "unsupported": (str(bloom), "unsupported model_type 'bloom'"),
        "missing gguf": (str(tmp_path / "m.gguf"), "GGUF file not found"),
    }


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    for case, (model, message) in _bad_inputs(tmp_path).items():
        code, out, err = _run(capsys, "info", model)
        assert code == 2, case
        assert message in err, case
        assert err.count("\n") == 1 and "Traceback" not in err, case


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = _run(capsys, "--debug", "info", str(tmp_path / "nope"))
    assert code == 2 and "Traceback" in err


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["info"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_console_script_entry_point(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path / "cfg")
    proc = subprocess.run([sys.executable, "-m", "lmprune.cli", "info", str(tmp_path / "cfg")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "total neurons     96" in proc.stdout


@pytest.mark.integration
def test_info_on_the_bundled_model(smollm2, capsys):
    code, out, _ = _run(capsys, "info", "smollm2-135m", "--json")
    info = json.loads(out)
    assert code == 0
    assert (info["model_type"], info["num_layers"], info["total_neurons"]) == ("llama", 30, 46080)
    assert info["parameters"] == 134_515_008
    assert info["hook_points"][0] == "model.layers.0.mlp.down_proj"


def _subcommands() -> list[str]:
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(commands.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_help_page_renders(command, capsys):
    # argparse %-formats help text: one stray "%" in a field's help breaks the whole page
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: lmprune {command}" in capsys.readouterr().out
