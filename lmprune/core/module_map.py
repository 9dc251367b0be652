"""The module map format (`lmprune.modules`, docs/formats.md): its one reader and one writer.

`lmprune locate` writes maps of emergent modules, `lmprune induce` one of the module it grew;
`lmprune prune`, `induce --module` and the comparison read them.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from lmprune import __version__
from lmprune.core.arch import NeuronMap
from lmprune.core.errors import LmpruneError
from lmprune.core.io import read_json, write_json_atomic
from lmprune.core.masks import NeuronSet, normalize_neurons
from lmprune.core.models import check_identity

FORMAT = "lmprune.modules"
FORMAT_VERSION = 1


def write_module_map(path: str | Path, payload: dict) -> Path:
    """Write a map atomically, stamped with the format: `payload` holds the model block it is
    made for, the modules (id, members, size, layers, scores) and the writer's own fields."""
    assert isinstance(payload.get("model"), dict) and isinstance(payload.get("modules"), list)
    return write_json_atomic(path, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                    "lmprune_version": __version__, **payload})


def read_module_map(path: str | Path) -> dict:
    """A module map, checked: its format, every module's id and [layer, neuron] members, and
    the model block it was made for."""
    path = Path(path)
    if not path.is_file():
        raise LmpruneError(f"module map not found: {path} (write one with `lmprune locate`)")
    mmap = read_json(path, "write it again with `lmprune locate`")
    if mmap.get("format") != FORMAT or not isinstance(mmap.get("modules"), list):
        raise LmpruneError(f"{path} is not an lmprune module map (format 'lmprune.modules' with "
                           f"a 'modules' list)")
    for module in mmap["modules"]:
        if not isinstance(module, dict) or "id" not in module or not module.get("members"):
            raise LmpruneError(f"{path}: every module needs an 'id' and non-empty 'members'")
        bad = [m for m in module["members"] if not _is_member(m)]
        if bad:
            raise LmpruneError(f"{path}: module {module['id']} has member {bad[0]!r}; members "
                               f"are [layer, neuron] pairs of integers")
    if not isinstance(mmap.get("model"), dict) or not mmap["model"].get("model_type"):
        raise LmpruneError(f"{path} does not say which model it was made for (no 'model' block "
                           f"with model_type): write it again with `lmprune locate`")
    return mmap


def _is_member(member) -> bool:
    return (isinstance(member, list) and len(member) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in member))


def check_module_map(mmap: dict, identity: dict, nmap: NeuronMap, where: str) -> None:
    """Refuse a map made for another model, or with neurons outside the loaded one."""
    recorded = dict(mmap.get("model") or {})
    for key in ("num_layers", "neurons_per_layer"):
        recorded.setdefault(key, mmap.get(key))
    check_identity(recorded, identity, nmap, where)
    widths = nmap.widths
    for module in mmap["modules"]:
        for layer, neuron in module["members"]:
            if not (0 <= layer < nmap.num_layers and 0 <= neuron < widths[layer]):
                raise LmpruneError(f"{where}: module {module['id']} has neuron ({layer}, "
                                   f"{neuron}), outside the loaded model: use this model's map")


def module_neurons(modules: list[dict]) -> NeuronSet:
    """The union of the modules' members as a neuron set."""
    neurons: dict[int, set[int]] = defaultdict(set)
    for module in modules:
        for layer, neuron in module["members"]:
            neurons[int(layer)].add(int(neuron))
    return normalize_neurons(neurons)
