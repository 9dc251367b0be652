"""Bad inputs and faults, as a new user meets them: each case asserts the exit code (2: one line
on stderr naming the problem; 1 is only a failed gate) and that every file that existed before
is unchanged. Listed in README.md, section Reliability. Then what must work: --overwrite, a
re-prune into its own folder, the umask's permissions, temp folders cleaned, what `push`
uploads, redacted tracebacks, resume by weights, and two concurrent runs on one folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from checkpoints import snapshot, tiny_checkpoint
from planted import write_run_inputs
from safetensors.torch import save_file

from lmprune.cli import main
from lmprune.core.lock import folder_lock

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
WIKI = "The river runs through the old town and the bridge is made of stone .\n" * 40


def _module_map(path: Path, members=None, model: dict | None = None, **extra) -> Path:
    payload = {"format": "lmprune.modules", "format_version": 1,
               "model": {"model_type": "llama"} if model is None else model,
               "modules": [{"id": 0, "members": members or [[0, 1], [1, 2]],
                            "scores": {"causal": 1.0}}], **extra}
    if model == {}:
        payload.pop("model")
    path.write_text(json.dumps(payload))
    return path


def _stats(folder: Path, manifest: dict | str | None = None) -> Path:
    folder.mkdir()
    import torch

    save_file({"auroc": torch.full((2, 48), 0.5)}, folder / "stats.safetensors")
    save_file({"gram": torch.zeros(2, 4, 4)}, folder / "coact.safetensors")
    if manifest is None:
        manifest = {"format": "lmprune.stats", "complete": True, "num_layers": 2,
                    "neurons_per_layer": 48,
                    "model": {"name": "m", "kind": "folder", "model_type": "llama"},
                    "corpora": {"offensive": {}, "clean": {}}}
    (folder / "manifest.json").write_text(manifest if isinstance(manifest, str)
                                          else json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A tiny checkpoint, a module map for it, corpora and a stats folder: copied per case."""
    root = tmp_path_factory.mktemp("template")
    tiny_checkpoint(root / "model")
    _module_map(root / "modules.json")
    (root / "wiki.txt").write_text(WIKI)
    (root / "prompts.txt").write_text("the bridge is\nthe river\n")
    (root / "afile").write_text("a user's file\n")
    (root / "empty.txt").write_text("")
    (root / "bin.txt").write_bytes(bytes(range(256)) * 4)
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("a user's own notes\n")
    _stats(root / "stats")
    return root


@pytest.fixture
def work(template, tmp_path, monkeypatch) -> Path:
    shutil.copytree(template, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    return tmp_path / "w"


def _truncate(path: Path, size: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


def _recipe(w: Path, **sections) -> str:
    values = {
        "model": str(w / "model"), "out": str(w / "run"), "device": "cpu",
        "collect": {"offensive": str(w / "wiki.txt"), "clean": str(w / "wiki.txt")},
        "prune": {"select": "top:1"}, "control": {"seeds": []},
        "eval": {"prompts": str(w / "prompts.txt"), "ppl_data": str(w / "wiki.txt")},
        "finetune": {"data": str(w / "wiki.txt"), "max_steps": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    (w / "recipe.yaml").write_text(yaml.safe_dump(values))
    return str(w / "recipe.yaml")


def _compare_recipe(w: Path, modules: dict) -> str:
    values = {"model": str(w / "model"), "out": str(w / "cmp"), "device": "cpu",
              "collect": {"offensive": str(w / "wiki.txt"), "clean": str(w / "wiki.txt")},
              "eval": {"prompts": str(w / "prompts.txt"), "ppl_data": str(w / "wiki.txt")},
              "finetune": {"data": str(w / "wiki.txt"), "max_steps": 1},
              "modules": modules}
    (w / "compare.yaml").write_text(yaml.safe_dump(values))
    return str(w / "compare.yaml")


PRUNE = ["prune", "--model", "model", "--modules", "modules.json", "--select", "top:1",
         "--out", "pruned"]
EVAL = ["eval", "--model", "model", "--prompts", "none", "--ppl-data", "wiki.txt",
        "--ppl-max-length", "32", "--ppl-stride", "16", "--json", "ev.json", "--no-progress"]
FINETUNE = ["finetune", "--model", "model", "--data", "wiki.txt", "--out", "tuned",
            "--max-steps", "1", "--batch-size", "2", "--seq-len", "16", "--device", "cpu"]
COLLECT = ["collect", "--model", "model", "--offensive", "wiki.txt", "--clean", "wiki.txt",
           "--out", "st", "--max-docs", "4"]
LOCATE = ["locate", "--stats", "stats", "--out", "mods.json"]


def _swap(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def _locked_run(w: Path) -> list[str]:
    return ["run", _recipe(w)]


# (case id, setup(work folder) -> argv, exit code, text stderr must contain)
CASES = [
    # weights and lineage files
    ("truncated-weights", lambda w: (_truncate(w / "model" / "model.safetensors"), PRUNE)[1], 2,
     "model.safetensors is corrupt or truncated"),
    ("empty-weights", lambda w: (_truncate(w / "model" / "model.safetensors", 0), PRUNE)[1], 2,
     "model.safetensors is corrupt or truncated"),
    ("truncated-weights-eval", lambda w: (_truncate(w / "model" / "model.safetensors"), EVAL)[1],
     2, "model.safetensors is corrupt or truncated"),
    ("corrupt-lineage-eval", lambda w: ((w / "model" / "lmprune.json").write_text("{\"mo"),
                                        EVAL)[1], 2, "lmprune.json is corrupt or truncated"),
    ("corrupt-lineage-finetune", lambda w: ((w / "model" / "lmprune.json").write_text("{"),
                                            FINETUNE)[1], 2, "lmprune.json is corrupt"),
    ("empty-lineage-prune", lambda w: ((w / "model" / "lmprune.json").write_text(""), PRUNE)[1],
     2, "lmprune.json is corrupt or truncated (not valid JSON: empty)"),
    ("lineage-is-a-list", lambda w: ((w / "model" / "lmprune.json").write_text("[1, 2]"),
                                     PRUNE)[1], 2, "lmprune.json: expected a JSON object"),
    ("corrupt-config", lambda w: ((w / "model" / "config.json").write_text("{"),
                                  ["info", "model"])[1], 2, "cannot read the config"),
    # module maps
    ("corrupt-module-map", lambda w: ((w / "modules.json").write_text("{\"format"), PRUNE)[1], 2,
     "modules.json is corrupt or truncated"),
    ("module-map-not-a-map", lambda w: ((w / "modules.json").write_text("{}"), PRUNE)[1], 2,
     "is not an lmprune module map"),
    ("member-not-integers", lambda w: (_module_map(w / "modules.json", [["a", 1]]), PRUNE)[1], 2,
     "has member ['a', 1]"),
    ("member-three-numbers", lambda w: (_module_map(w / "modules.json", [[0, 1, 2]]), PRUNE)[1],
     2, "has member [0, 1, 2]"),
    ("member-out-of-range", lambda w: (_module_map(w / "modules.json", [[0, 999]]), PRUNE)[1], 2,
     "outside the loaded model"),
    ("map-without-model-block", lambda w: (_module_map(w / "modules.json", model={}), PRUNE)[1],
     2, "does not say which model it was made for"),
    ("map-for-another-model", lambda w: (_module_map(w / "modules.json",
                                                     model={"model_type": "gpt2"}), PRUNE)[1],
     2, "was made for a gpt2 model"),
    ("missing-module-map", lambda w: _swap(PRUNE, "--modules", "nope.json"), 2,
     "module map not found: nope.json"),
    # numbers
    ("select-budget-nan", lambda w: _swap(PRUNE, "--select", "budget:nan%"), 2,
     "--select must be"),
    ("select-target-nan", lambda w: _swap(PRUNE, "--select", "target:nan"), 2,
     "--select must be"),
    ("select-target-inf", lambda w: _swap(PRUNE, "--select", "target:inf"), 2,
     "--select must be"),
    ("select-top-zero", lambda w: _swap(PRUNE, "--select", "top:0"), 2, "--select must be"),
    ("strength-nan", lambda w: ["prune", "--model", "model", "--mode", "dampen", "--stats",
                                "stats", "--strength", "nan", "--out", "p"], 2,
     "--strength must be a finite number"),
    ("min-selectivity-inf", lambda w: PRUNE + ["--min-selectivity", "inf"], 2,
     "--min-selectivity must be a finite number"),
    ("gate-nan", lambda w: EVAL + ["--fail-above", "perplexity=nan"], 2,
     "'nan' is not a finite number"),
    ("top-p-nan", lambda w: EVAL + ["--top-p", "nan"], 2, "--top-p must be a finite number"),
    ("lr-nan", lambda w: FINETUNE + ["--lr", "nan"], 2, "--lr must be a finite number"),
    ("fraction-nan", lambda w: COLLECT + ["--coact-token-fraction", "nan"], 2,
     "--coact-token-fraction must be a finite number"),
    ("eval-limit-zero", lambda w: EVAL + ["--limit", "0"], 2, "--limit must be at least 1"),
    ("finetune-batch-zero", lambda w: _swap(FINETUNE, "--batch-size", "0"), 2,
     "--batch-size must be at least 1"),
    ("teacher-missing", lambda w: FINETUNE + ["--distill-from", "nope"], 2,
     "--distill-from: teacher 'nope' cannot be loaded"),
    ("gate-on-skipped-part", lambda w: EVAL + ["--fail-above", "toxicity.mean_toxicity=0.5"], 2,
     "toxicity.mean_toxicity is not in the result (toxicity is skipped)"),
    # output paths
    ("prune-out-under-a-file", lambda w: _swap(PRUNE, "--out", "afile/sub"), 2,
     "cannot write into"),
    ("prune-out-dot", lambda w: _swap(PRUNE, "--out", "."), 2,
     "exists and is not an lmprune checkpoint"),
    ("prune-out-user-folder", lambda w: _swap(PRUNE, "--out", "mine"), 2,
     "--out mine exists and is not an lmprune checkpoint"),
    ("prune-out-is-a-file", lambda w: _swap(PRUNE, "--out", "afile"), 2,
     "--out afile is a file"),
    ("prune-out-file-overwrite", lambda w: _swap(PRUNE, "--out", "afile") + ["--overwrite"], 2,
     "--out afile is a file"),
    ("eval-json-under-a-file", lambda w: _swap(EVAL, "--json", "afile/ev.json"), 2,
     "cannot write into"),
    ("eval-json-a-folder", lambda w: _swap(EVAL, "--json", "mine"), 2, "--json mine is a folder"),
    ("eval-json-user-file", lambda w: _swap(EVAL, "--json", "afile"), 2,
     "--json afile exists and is not an lmprune result"),
    ("finetune-out-user-folder", lambda w: _swap(FINETUNE, "--out", "mine"), 2,
     "exists and is not an lmprune checkpoint"),
    ("finetune-out-under-a-file", lambda w: _swap(FINETUNE, "--out", "afile/t"), 2,
     "cannot write into"),
    ("collect-out-user-folder", lambda w: _swap(COLLECT, "--out", "mine"), 2,
     "exists and is not an lmprune collect folder"),
    ("locate-out-under-a-file", lambda w: _swap(LOCATE, "--out", "afile/m.json"), 2,
     "cannot write into"),
    ("locate-out-user-file", lambda w: _swap(LOCATE, "--out", "afile"), 2,
     "--out afile exists and is not an lmprune result"),
    # statistics
    ("truncated-stats", lambda w: (_truncate(w / "stats" / "stats.safetensors"), LOCATE)[1], 2,
     "stats.safetensors is corrupt or truncated"),
    ("corrupt-manifest", lambda w: ((w / "stats" / "manifest.json").write_text("{\"a\""),
                                    LOCATE)[1], 2, "manifest.json is corrupt or truncated"),
    ("manifest-without-model", lambda w: ((w / "stats" / "manifest.json").write_text(
        json.dumps({"complete": True})), LOCATE)[1], 2, "is not a collect manifest"),
    ("stats-without-manifest", lambda w: ((w / "stats" / "manifest.json").unlink(), LOCATE)[1],
     2, "has no manifest.json"),
    ("truncated-stats-prune", lambda w: (_truncate(w / "stats" / "stats.safetensors"),
                                         ["prune", "--model", "model", "--mode", "dampen",
                                          "--stats", "stats", "--out", "p"])[1], 2,
     "stats.safetensors is corrupt or truncated"),
    # corpora
    ("binary-corpus", lambda w: _swap(EVAL, "--ppl-data", "bin.txt"), 2,
     "corpus bin.txt is not UTF-8 text"),
    ("empty-corpus", lambda w: _swap(FINETUNE, "--data", "empty.txt"), 2, "has no documents"),
    ("missing-corpus", lambda w: _swap(COLLECT, "--offensive", "nope.txt"), 2,
     "corpus file not found: nope.txt"),
    ("like-not-a-map", lambda w: ["prune", "--model", "model", "--mode", "random", "--like",
                                  "wiki.txt", "--select", "top:1", "--out", "p"], 2,
     "wiki.txt is corrupt or truncated (not valid JSON"),
    # recipes
    ("recipe-batch-size-zero", lambda w: ["run", _recipe(w, finetune={"batch_size": 0})], 2,
     "finetune.batch_size: must be at least 1"),
    ("recipe-scorer-offline", lambda w: ["run", _recipe(w, eval={"scorer": "hf:nobody/none"})],
     2, "eval.scorer: scorer 'hf:nobody/none' cannot be loaded"),
    ("recipe-judge-missing", lambda w: ["run", _recipe(w, eval={"fluency_judge": "./nojudge"})],
     2, "eval.fluency_judge: model not found"),
    ("recipe-eval-limit-zero", lambda w: ["run", _recipe(w, eval={"limit": 0})], 2,
     "eval.limit: must be at least 1"),
    ("recipe-nan", lambda w: ["run", _recipe(w, eval={"top_p": float("nan")})], 2,
     "eval.top_p: must be a finite number"),
    ("recipe-not-yaml", lambda w: ((w / "r.yaml").write_text("a: [1"), ["run", "r.yaml"])[1], 2,
     "r.yaml is not valid YAML"),
    ("recipe-a-list", lambda w: ((w / "r.yaml").write_text("- 1\n"), ["run", "r.yaml"])[1], 2,
     "expected a mapping of keys to values"),
    ("run-out-user-folder", lambda w: ["run", _recipe(w), "--out", "mine"], 2,
     "--out mine exists and is not an lmprune run folder"),
    ("run-out-a-file", lambda w: ["run", _recipe(w), "--out", "afile"], 2, "--out afile is a file"),
    ("compare-row-climbs-out", lambda w: ["compare", _compare_recipe(
        w, {"../../victim": {"select": "top:1"}})], 2, "modules.../../victim: a row name"),
    ("compare-row-hidden", lambda w: ["compare", _compare_recipe(
        w, {".hidden": {"select": "top:1"}})], 2, "modules..hidden: a row name"),
    ("compare-out-user-folder", lambda w: ["compare", _compare_recipe(
        w, {"m": {"select": "top:1"}}), "--out", "mine"], 2, "exists and is not an lmprune run"),
    # push
    ("push-corrupt-lineage", lambda w: ((w / "model" / "lmprune.json").write_text("{"),
                                        ["push", "model", "--repo-id", "a/b"])[1], 2,
     "lmprune.json is corrupt or truncated"),
]


def _lines(err: str) -> list[str]:
    """stderr's lines, less the progress bars of transformers' weight loading."""
    return [line for line in err.strip().splitlines() if not PROGRESS.search(line)]


PROGRESS = re.compile(r"\d+/\d+ \[[\d:<?]+")


@pytest.mark.parametrize("case, setup, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_changes_nothing(work, capsys, case, setup, code, message):
    argv = setup(work)
    before = snapshot(work)
    got = main(argv)
    err = capsys.readouterr().err
    lines = _lines(err)
    assert got == code, err
    assert len(lines) == 1 and lines[0].startswith("lmprune: error: "), err
    assert message in lines[0], lines[0]
    after = snapshot(work)
    assert {p: after.get(p) for p in before} == before, "a file that existed was changed"


def test_the_matrix_is_large_and_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert len(CASES) + len(LOCK_CASES) >= 40
    for case in [c[0] for c in CASES] + list(LOCK_CASES):
        assert f"`{case}`" in readme, f"README's reliability section misses {case}"


LOCK_CASES = {"collect-locked": (COLLECT, "st"), "finetune-locked": (FINETUNE, "tuned"),
              "run-locked": (None, "run")}


@pytest.mark.parametrize("case", LOCK_CASES)
def test_a_held_folder_is_refused_with_the_pid(work, capsys, case):
    argv, folder = LOCK_CASES[case]
    argv = argv or _locked_run(work)
    with folder_lock(work / folder):
        before = snapshot(work)
        assert main(argv) == 2
        assert snapshot(work) == before
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1
    assert f"is in use by another lmprune process (pid {os.getpid()})" in lines[0]


def test_a_missing_gate_path_still_writes_the_json(work, capsys):
    assert main(EVAL + ["--fail-above", "perplexity.nothing=1"]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "gate metric 'perplexity.nothing' is not in the result" in err[0]
    assert "perplexity" in json.loads((work / "ev.json").read_text())


def test_overwrite_replaces_a_user_folder_and_a_checkpoint_is_replaced_freely(work, capsys):
    assert main(_swap(PRUNE, "--out", "mine") + ["--overwrite"]) == 0
    assert not (work / "mine" / "notes.txt").exists()
    assert (work / "mine" / "lmprune.json").is_file()
    assert main(_swap(PRUNE, "--out", "mine")) == 0  # now an lmprune checkpoint: replaced
    (work / "empty").mkdir()
    assert main(_swap(PRUNE, "--out", "empty")) == 0


def test_outputs_get_the_umask_permissions_and_stale_temps_go(work, capsys):
    stale = work / ".pruned.tmp-999999999-x"  # a save killed mid-way (no such process)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = work / f".pruned.tmp-{os.getpid()}-y"  # a save in progress: kept
    live.mkdir()
    old = os.umask(0o022)
    try:
        assert main(PRUNE) == 0
        assert main(EVAL) == 0
    finally:
        os.umask(old)
    assert (work / "pruned").stat().st_mode & 0o777 == 0o755
    assert (work / "pruned" / "lmprune.json").stat().st_mode & 0o777 == 0o644
    assert (work / "ev.json").stat().st_mode & 0o777 == 0o644
    assert not stale.exists() and live.exists()


def test_push_uploads_the_model_files_only(work):
    from lmprune.publish.hub import upload_files

    folder = work / "model"
    (folder / ".env").write_text("HF_TOKEN=hf_secret\n")
    (folder / "checkpoints" / "step-00000002").mkdir(parents=True)
    (folder / "checkpoints" / "step-00000002" / "training.pt").write_bytes(b"state")
    (folder / "plot.png").write_bytes(b"png")
    (folder / "notes.txt").write_text("mine")
    names = {p.name for p in upload_files(folder)}
    assert {"config.json", "model.safetensors", "lmprune.json", "plot.png",
            "tokenizer.json"} <= names
    assert not names & {".env", "training.pt", "notes.txt"}
    assert "notes.txt" in {p.name for p in upload_files(folder, ["*.txt"])}


def test_debug_traceback_redacts_tokens(work, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "sekrit-token-value")
    assert main(["--debug", "info", "./hf_abcdefghijklmnop/sekrit-token-value/x"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert "hf_abcdefghijklmnop" not in err and "sekrit-token-value" not in err


def test_finetune_resumes_by_the_weights_not_the_path():
    from lmprune.finetune.command import FinetuneConfig, _fingerprint

    cfg = FinetuneConfig(model="same/path", data="d", out="o")
    one = _fingerprint(cfg, {"name": "same/path", "weights_sha256": "a" * 64}, "s", 4, 2, 1)
    two = _fingerprint(cfg, {"name": "same/path", "weights_sha256": "b" * 64}, "s", 4, 2, 1)
    moved = _fingerprint(FinetuneConfig(model="elsewhere", data="d", out="o"),
                         {"name": "elsewhere", "weights_sha256": "a" * 64}, "s", 4, 2, 1)
    assert one != two and one == moved


def test_finetune_refuses_checkpoints_of_a_re_pruned_input(work, capsys, monkeypatch):
    """Killed in its final save, a fine-tuning leaves OUT/checkpoints; the input folder is then
    pruned again at the same path: the rerun refuses those checkpoints instead of resuming."""
    import lmprune.core.models

    def killed(*args, **kwargs):
        raise RuntimeError("killed during the final save")

    argv = _swap(FINETUNE, "--max-steps", "2") + ["--checkpoint-every", "1"]
    with monkeypatch.context() as patch:
        patch.setattr(lmprune.core.models, "save_model", killed)
        assert main(argv) == 2
    assert (work / "tuned" / "checkpoints" / "step-00000001").is_dir()
    assert main(_swap(PRUNE, "--out", "model")) == 0  # same path, other weights
    capsys.readouterr()
    assert main(argv) == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and "holds checkpoints of a different run" in lines[0], lines


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_runs_on_one_folder(tmp_path):
    """Two `lmprune run` started together on one folder: the one that takes the folder's lock
    runs every stage; the other gets one line naming its pid (exit 2) and runs none."""
    inputs = write_run_inputs(tmp_path)
    evaluation = dict(prompts=str(inputs / "prompts.txt"), limit=2, samples=2, max_new_tokens=3,
                      bootstrap=20, ppl_data=str(inputs / "wiki.txt"), ppl_max_tokens=200,
                      ppl_max_length=32, ppl_stride=16, progress=False)
    values = {"model": str(inputs / "model"), "out": str(tmp_path / "run"), "device": "cpu",
              "collect": dict(offensive=str(inputs / "off.txt"), clean=str(inputs / "clean.txt"),
                              max_docs=30, top_k_global=8),
              "locate": dict(k=4, knn=5, heldout_docs=10, exact=2, controls=2,
                             exact_controls=1, shuffles=2, clusterability_layers=1, plots=False),
              "prune": dict(select="top:1"), "control": dict(seeds=[]), "eval": evaluation,
              "finetune": None}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(values))
    command = [sys.executable, "-m", "lmprune.cli", "run", str(recipe)]
    runs = [subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    codes = [run.returncode for run in runs]
    assert sorted(codes) == [0, 2], outputs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    lines = _lines(outputs[loser][1])
    assert len(lines) == 1, outputs[loser][1]
    assert f"is in use by another lmprune process (pid {runs[winner].pid})" in lines[0]
    assert "lmprune run: [" not in outputs[loser][0], "the refused run ran a stage"
    assert "lmprune run: [1/" in outputs[winner][0]
    assert (tmp_path / "run" / "report.md").is_file()
