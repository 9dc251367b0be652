"""The stage registry (lmprune/stages.py): one spec per stage, read by the CLI, `lmprune run` and
`lmprune compare`; and the tree's import direction (stages below the recipes, core below all)."""

import ast
import dataclasses
from pathlib import Path

import pytest

from lmprune.cli import build_parser
from lmprune.compare.recipe import MODULE_WIRED
from lmprune.core.config import corpus_fields
from lmprune.core.errors import LmpruneError
from lmprune.run.recipe import SECTIONS, WIRED, parse_recipe
from lmprune.run.runner import planned
from lmprune.stages import STAGES

PACKAGE = Path(__file__).resolve().parents[1] / "lmprune"


def subcommands() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


@pytest.mark.parametrize("name", list(STAGES))
def test_every_spec_names_fields_of_its_config_and_is_a_subcommand(name):
    spec = STAGES[name]
    fields = {f.name for f in dataclasses.fields(spec.config)}
    named = {*spec.outputs, *spec.inputs, *spec.wired, *spec.sources}
    assert named <= fields, f"{name}: {sorted(named - fields)} are not fields of its config"
    flags = {a.dest for a in subcommands()[name]._actions}
    assert fields <= flags  # one flag (or positional) per field, nothing kept apart


def test_recipe_sections_and_wired_keys_come_from_the_registry():
    for section, keys in WIRED.items():
        assert SECTIONS[section] is STAGES[section].config
        assert keys == {*STAGES[section].wired, *STAGES[section].inputs,
                        *STAGES[section].outputs}
    assert STAGES["prune"].wired_keys <= MODULE_WIRED


@pytest.mark.parametrize("section,key", [("locate", "stats"), ("prune", "like"),
                                         ("eval", "json"), ("finetune", "base_model")])
def test_a_recipe_that_sets_a_wired_key_is_refused_by_name(section, key):
    with pytest.raises(LmpruneError, match=rf"^{section}\.{key}: set by `lmprune run`"):
        parse_recipe({section: {key: "x"}}, "r")


def test_planned_stage_reads_run_folder_paths_as_inputs_and_the_rest_as_sources(tmp_path):
    root = tmp_path / "run"
    config = STAGES["prune"].config(model=str(root / "base-finetuned"), mode="random",
                                    like=str(root / "pruned"), stats=str(tmp_path / "stats"),
                                    out=str(root / "control-0"))
    stage = planned(STAGES["prune"], config, root, "control-0")
    assert stage.name == "control-0"
    assert stage.outputs == [root / "control-0"]
    assert stage.inputs == [root / "base-finetuned", root / "pruned"]
    assert str(tmp_path / "stats") in stage.sources  # outside the run: a source
    evaluation = STAGES["eval"].config(model="smollm2-135m", json=str(root / "eval/base.json"))
    stage = planned(STAGES["eval"], evaluation, root)
    assert stage.inputs == [] and stage.outputs == [root / "eval/base.json"]
    assert stage.sources[0] == "smollm2-135m"
    for key in corpus_fields(STAGES["eval"].config):  # the corpora it reads are in its key
        value = getattr(evaluation, key)
        assert all(v in stage.sources for v in (value if isinstance(value, list) else [value]))


def test_a_recipe_naming_a_scorer_that_cannot_load_is_refused_by_its_key(tmp_path):
    """check_stages asks each spec what it will load: the relearning curve's scorer too."""
    from lmprune.run.runner import check_stages

    finetune = STAGES["finetune"].config(model=str(tmp_path / "pruned"), out=str(tmp_path / "ft"),
                                         data="wikitext2:valid", eval_every=5,
                                         scorer="no-such-scorer-kind:x")
    stage = planned(STAGES["finetune"], finetune, tmp_path, "finetune:base")
    with pytest.raises(LmpruneError, match=r"^finetune\.scorer: scorer 'no-such-scorer-kind:x' "
                                           r"cannot be loaded"):
        check_stages([stage])
    bad = STAGES["eval"].config(model="m", json=str(tmp_path / "e.json"), limit=0)
    with pytest.raises(LmpruneError, match=r"^eval\.limit"):
        check_stages([planned(STAGES["eval"], bad, tmp_path, "eval:base")])


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("lmprune.")}


# what a folder may import beside itself and core: evaluate's measurement modules are the
# library every stage that measures uses; the recipes (run, compare) stand on all stages
MEASUREMENT = {"lmprune.evaluate.fluency", "lmprune.evaluate.perplexity",
               "lmprune.evaluate.registry", "lmprune.evaluate.toxicity"}
RECIPES = {"run", "compare"}


@pytest.mark.parametrize("folder", sorted(p.name for p in PACKAGE.iterdir()
                                          if (p / "__init__.py").is_file()))
def test_imports_only_point_down(folder):
    for path in (PACKAGE / folder).rglob("*.py"):
        for name in imports_of(path):
            other = name.split(".")[1]
            if other in (folder, "core") or folder in RECIPES:
                if folder == "core":
                    assert other == "core", f"{path}: core imports {name}"
                elif folder == "run":
                    assert other != "compare", f"{path}: run imports {name}"
                continue
            assert name in MEASUREMENT, f"{path}: the {folder} stage imports {name}"
