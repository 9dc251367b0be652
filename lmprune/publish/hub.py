"""`lmprune push`: upload a checkpoint folder to the Hugging Face Hub, with its model card.

The token comes from huggingface_hub's own lookup (`HF_TOKEN`, then the login cache) and is
passed to it only: lmprune never prints or logs it. The upload reads the folder through a staging
folder of symlinks, so a card written for a folder without one goes up in the same commit, and the
local folder changes only once the upload succeeded (the card is then written into it too).
Only the model files go up (`UPLOADED`; `--include` adds more): never hidden files or the
resumable training state under checkpoints/.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmprune.core.config import StageSpec, option
from lmprune.core.errors import LmpruneError, first_line
from lmprune.core.io import write_text_atomic
from lmprune.core.lineage import LINEAGE_FILE, read_lineage
from lmprune.publish.modelcard import CARD_FILE, build_model_card

_OFFLINE = ("offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): unset it to "
            "push to the Hub")


@dataclass
class PushConfig:
    """Upload a checkpoint folder to the Hugging Face Hub."""

    checkpoint: str = option("", "Checkpoint folder written by `lmprune prune` or `finetune`.",
                             positional=True)
    repo_id: str = option("", "Hub repository, `namespace/name` (created if missing).")
    private: bool = option(False, "Create the repository as private (an existing one keeps its "
                                  "visibility).")
    revision: str | None = option(None, "Branch to push to (created if missing); default main.")
    commit_message: str = option("Upload checkpoint with lmprune", "Commit message.")
    include: list[str] = option([], "Also upload the files matching this glob pattern, relative "
                                "to the folder (repeatable), e.g. 'eval/*.json'.")


def check_checkpoint(folder: str | Path) -> Path:
    """The folder, if it is an lmprune checkpoint: config.json, safetensors, lmprune.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LmpruneError(f"checkpoint folder not found: {folder}")
    missing = [name for name in ("config.json", LINEAGE_FILE) if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise LmpruneError(f"{folder} is not an lmprune checkpoint (missing {', '.join(missing)}): "
                           f"push a folder written by `lmprune prune` or `lmprune finetune`")
    read_lineage(folder, required=True)  # valid JSON object, or a clear error
    return folder


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not repo_id:
        raise LmpruneError("--repo-id is required: the Hub repository to push to, e.g. "
                           "your-name/smollm2-135m-pruned")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise LmpruneError(f"invalid --repo-id '{repo_id}': use `namespace/name` with letters, "
                           f"digits, '-', '_' and '.' (at most 96 characters)") from None


# What a push uploads (top level of the folder only): the model and what describes it. Nothing
# hidden, nothing under checkpoints/ (optimizer state), no stray files such as .env.
UPLOADED = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
            "chat_template.jinja", "chat_template.json", LINEAGE_FILE, CARD_FILE, "*.png")


def upload_files(folder: Path, include: list[str] = ()) -> list[Path]:
    """The files a push uploads: the model files, plus those matching `include`."""
    chosen = {p for pattern in UPLOADED for p in folder.glob(pattern)
              if not p.name.startswith(".")}
    for pattern in include:
        matched = [p for p in folder.glob(pattern) if p.is_file()]
        if not matched:
            raise LmpruneError(f"--include '{pattern}' matches no file in {folder}")
        chosen.update(matched)
    return sorted(p for p in chosen if p.is_file())


def _stage(folder: Path, card: str | None, include: list[str] = ()) -> Path:
    """A temporary folder of symlinks to the files to upload (+ the card, when given)."""
    staging = Path(tempfile.mkdtemp(prefix="lmprune-push-"))
    for path in upload_files(folder, include):
        link = staging / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
    if card is not None:
        (staging / CARD_FILE).write_text(card, encoding="utf-8")
    return staging


def _explain(err: Exception, repo_id: str, endpoint: str, token: str) -> str:
    """One line saying what went wrong and what to do; never the token."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        message = _OFFLINE
    elif isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        server = (err.server_message or "").strip().splitlines()
        detail = f" ({server[0]})" if server else ""
        if status == 401:
            message = (f"the Hub refused the token (401 Unauthorized){detail}: set a valid "
                       f"HF_TOKEN or run `hf auth login`")
        elif status == 403:
            message = (f"no write access to {repo_id} (403 Forbidden){detail}: use a token with "
                       f"write permission and a namespace you may write to")
        elif status == 404:
            message = f"{repo_id} was not found on the Hub (404){detail}: check --repo-id"
        elif status in (400, 409, 422):
            message = f"the Hub rejected the push to {repo_id} ({status}){detail}"
        else:
            message = f"the Hub answered {status}{detail} while pushing to {repo_id}: try again"
    elif _is_transport_error(err):
        message = (f"cannot reach the Hub at {endpoint} ({type(err).__name__}: "
                   f"{first_line(err)}): check the network connection or HF_ENDPOINT")
    elif isinstance(err, ValueError):
        message = f"the Hub rejected the push to {repo_id}: {first_line(err)}"
    else:
        message = f"pushing to {repo_id} failed ({type(err).__name__}: {first_line(err)})"
    return message.replace(token, "***") if token else message


def _is_transport_error(err: Exception) -> bool:
    """Connection refused, DNS, timeouts: OSError, or the HTTP client's transport errors
    (huggingface_hub 2.x uses httpx2, older versions requests; both are matched by module)."""
    module = type(err).__module__.split(".")[0]
    return isinstance(err, OSError) or module in {"httpx", "httpx2", "requests", "urllib3"}


def push_checkpoint(checkpoint: str | Path, repo_id: str, private: bool = False,
                    revision: str | None = None,
                    commit_message: str = "Upload checkpoint with lmprune",
                    include: list[str] = ()) -> str:
    """Upload a checkpoint folder to `repo_id` (created if missing); returns the commit URL.

    A folder without README.md gets a model card (lmprune.publish.modelcard), uploaded with the
    files and written into the folder once the upload succeeded. On any failure the folder is
    unchanged and an LmpruneError says why in one line.
    """
    from huggingface_hub import HfApi, constants, get_token, is_offline_mode

    folder = check_checkpoint(checkpoint)
    _check_repo_id(repo_id)
    if is_offline_mode():
        raise LmpruneError(_OFFLINE)
    token = get_token()
    if not token:
        raise LmpruneError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token "
                           "with write permission)")
    card = None
    if not (folder / CARD_FILE).is_file():
        card = str(build_model_card(folder, model_name=repo_id))
    api = HfApi(token=token)
    staging = _stage(folder, card, include)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=staging, revision=revision,
                                   commit_message=commit_message, repo_type="model")
    except Exception as err:  # HTTP errors, connection errors, refused metadata: one line
        raise LmpruneError(_explain(err, repo_id, api.endpoint, token)) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if card is not None:
        write_text_atomic(folder / CARD_FILE, card)
    return commit.commit_url


def run(config: PushConfig) -> int:
    if not config.checkpoint:
        raise LmpruneError("name the checkpoint folder to push: lmprune push DIR --repo-id ID")
    had_card = (Path(config.checkpoint) / CARD_FILE).is_file()
    url = push_checkpoint(config.checkpoint, config.repo_id, config.private, config.revision,
                          config.commit_message, config.include)
    if not had_card:
        print(f"wrote the model card {Path(config.checkpoint) / CARD_FILE}")
    print(f"pushed {config.checkpoint} to {config.repo_id}: {url}")
    return 0


STAGE = StageSpec(
    "push", PushConfig, run,
    help="Upload a checkpoint folder (with its model card) to the Hugging Face Hub.",
    outputs=(), inputs=("checkpoint",), wired=())
register = STAGE.register
