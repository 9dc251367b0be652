"""The stage runner shared by `lmprune run` and `lmprune compare`: a stage is a config, an action
and its inputs and outputs; its key hashes the settings and the inputs' contents.

Every stage leaves a marker `OUT/.stages/NAME.json`: written "started" (with the stage's key)
before it runs and "done" after, atomically. A stage whose marker is done with the same key, and
whose outputs exist, is skipped. A stage that was killed reruns; collect, fine-tune and the
relearning attack resume from their own checkpoints when the key is unchanged, and start over
when it changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmprune.core.config import StageSpec, unhashed
from lmprune.core.errors import ConfigError, LmpruneError
from lmprune.core.io import write_text_atomic

MARKERS = ".stages"


# --------------------------------------------------------------------------------------------
# Hashes of inputs


def digest(payload) -> str:
    """The sha256 of a JSON-able value (keys sorted): stage keys and content-named files."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def path_hash(path: str | Path) -> str:
    """A file's content hash; for a stats folder its manifest; for a checkpoint its weights and
    lmprune.json."""
    from lmprune.core.models import file_sha256, folder_weights_sha256

    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if (path / "manifest.json").is_file():
        return file_sha256(path / "manifest.json")
    if (path / "config.json").is_file():
        lineage = path / "lmprune.json"
        files = sorted(p for p in path.iterdir() if p.is_file())
        # Weights are hashed once per process and version of the files (several stages read
        # the same checkpoint).
        stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        if stamp not in _WEIGHT_HASHES:
            _WEIGHT_HASHES[stamp] = digest([folder_weights_sha256(path),
                                             file_sha256(lineage) if lineage.is_file() else None])
        return _WEIGHT_HASHES[stamp]
    return "missing"


_WEIGHT_HASHES: dict[tuple, str] = {}


def source_hash(spec: str) -> str:
    """A model name or corpus spec: its local file's hash where it has one, else the text."""
    from lmprune.core.data import resolve_spec

    source = Path(resolve_spec(spec).partition("?")[0]).expanduser()
    return digest([spec, path_hash(source)]) if source.exists() else spec


# --------------------------------------------------------------------------------------------
# Stages


@dataclass
class Stage:
    name: str
    config: object
    action: Callable[[bool], object]
    """Runs the stage; its argument says whether a killed run with the same key may resume."""
    outputs: list[Path]
    inputs: list[Path] = field(default_factory=list)
    """Upstream outputs (hashed into the key when the stage is reached)."""
    sources: list[str] = field(default_factory=list)
    """Model names and corpus specs (hashed by content where local)."""
    spec: StageSpec | None = None
    """The registered stage it runs (its settings checked before the first stage)."""

    def key(self, root: Path) -> str:
        """Hash of the settings and inputs. Paths inside the run folder count relative to it,
        so a moved or copied run folder is still up to date."""
        config = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) \
            else self.config
        # fields declared option(stage_key=False) change how a stage treats its output path,
        # not what it computes
        config = {k: v for k, v in config.items() if k not in unhashed(self.config)}
        text = json.dumps({"stage": self.name, "config": config}, sort_keys=True, default=str)
        return digest({"settings": text.replace(str(root), "<run>"),
                        "inputs": [path_hash(p) for p in self.inputs],
                        "sources": [source_hash(s) for s in self.sources]})


def planned(spec: StageSpec, config, root: Path, name: str | None = None) -> Stage:
    """The stage of a registered spec, wired from its config: its outputs are the spec's output
    fields; the model and the spec's inputs and sources count as inputs where they lie inside the
    run folder (a stage made them: hashed by content when reached) and as sources elsewhere (a
    model name, hashed by content where local); its corpus specs are sources."""
    def values(names) -> list[str]:
        found = []
        for key in names:
            value = getattr(config, key, None)
            found += [str(v) for v in (value if isinstance(value, list) else [value]) if v]
        return found

    root = Path(root).resolve()
    inputs, sources = [], []
    for value in values(["model", *spec.inputs, *spec.sources]):
        inside = Path(value).resolve().is_relative_to(root)
        (inputs if inside else sources).append(Path(value) if inside else value)
    sources += values(spec.corpus_keys)  # corpus specs: never a stage's output
    step = spec.step or (lambda cfg, resume: spec.run(cfg))
    return Stage(name or spec.name, config, lambda resume: step(config, resume),
                 [Path(v) for v in values(spec.outputs)], inputs, sources, spec)


def planner(root: Path) -> Callable[..., Stage]:
    """`plan(kind, config, name=None)`: the registered stage `kind` (lmprune/stages.py) with
    `config`, planned in the folder `root` (see `planned`)."""
    from lmprune.stages import STAGES

    return lambda kind, config, name=None: planned(STAGES[kind], config, root, name)


class StageFolder:
    """A folder whose stages leave markers: OUT/.stages/NAME.json."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def marker(self, stage: str) -> Path:
        return self.root / MARKERS / f"{stage.replace(':', '-')}.json"

    def read_marker(self, stage: str) -> dict | None:
        path = self.marker(stage)
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except json.JSONDecodeError:
            return None

    def write_marker(self, stage: str, payload: dict) -> None:
        write_text_atomic(self.marker(stage), json.dumps(payload, indent=1, default=str) + "\n")


def _exists(path: Path) -> bool:
    if path.suffix:  # a file
        return path.is_file()
    return (path / "manifest.json").is_file() or (path / "config.json").is_file()


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def execute_stages(stages: list[Stage], folder: StageFolder, command: str = "run") -> float:
    """Run each stage whose marker is not done with the same key; returns the wall seconds."""
    started_all = time.time()
    for number, stage in enumerate(stages, 1):
        tag = f"[{number}/{len(stages)}] {stage.name}"
        key = stage.key(folder.root)
        marker = folder.read_marker(stage.name) or {}
        if (marker.get("state") == "done" and marker.get("key") == key
                and all(_exists(p) for p in stage.outputs)):
            print(f"lmprune {command}: {tag}: skipped (up to date)", flush=True)
            continue
        resume = marker.get("state") == "started" and marker.get("key") == key
        folder.write_marker(stage.name, {"stage": stage.name, "state": "started", "key": key,
                                         "time": _now()})
        print(f"lmprune {command}: {tag}: {'resumed' if resume else 'started'}", flush=True)
        t0 = time.time()
        stage.action(resume)
        seconds = time.time() - t0
        folder.write_marker(stage.name, {
            "stage": stage.name, "state": "done", "key": key, "time": _now(),
            "seconds": round(seconds, 1), "outputs": [str(p) for p in stage.outputs],
            "config": dataclasses.asdict(stage.config) if dataclasses.is_dataclass(stage.config)
            else stage.config})
        print(f"lmprune {command}: {tag}: done in {duration(seconds)}", flush=True)
    return time.time() - started_all


def check_stages(stages: list[Stage]) -> None:
    """What the stages would refuse only once they are reached, checked before the first: each
    stage's own check (`StageSpec.check`; errors named by recipe key, `finetune.batch_size`),
    and every scorer and fluency judge they name, loaded once."""
    from lmprune.core.models import load_config, resolve_device
    from lmprune.evaluate.registry import load_scorer

    needs: dict[tuple[str, str, str], str] = {}  # (kind, name, device) -> recipe key
    for stage in stages:
        if stage.spec is None or stage.spec.check is None:
            continue
        section = stage.name.partition(":")[0]
        try:
            for need in stage.spec.check(stage.config):
                needs.setdefault((need.kind, need.name, need.device), f"{section}.{need.key}")
        except ConfigError as err:
            raise LmpruneError(err.recipe_message(section)) from None
        except LmpruneError as err:
            raise LmpruneError(f"{section}: {err}") from None
    for (kind, name, device), key in needs.items():
        try:
            if kind == "scorer":
                load_scorer(name, device=resolve_device(device))
            else:
                load_config(name)
        except LmpruneError as err:
            raise LmpruneError(f"{key}: scorer '{name}' cannot be loaded: {err}" if kind ==
                               "scorer" else f"{key}: {err}") from None


def record_recipe(folder: StageFolder, values: dict) -> None:
    """The recipe as run (after overrides), beside the results."""
    folder.root.mkdir(parents=True, exist_ok=True)
    record = folder.root / "recipe.yaml"
    text = yaml.safe_dump(values, sort_keys=False)
    if not record.is_file() or record.read_text(encoding="utf-8") != text:
        write_text_atomic(record, text)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
