"""`lmprune push` against a stand-in Hub on 127.0.0.1 (tests/fake_hub.py): no real network.

Each push runs `python -m lmprune.cli` in a subprocess, because huggingface_hub reads HF_ENDPOINT,
HF_TOKEN, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET when it is imported.
"""

import os
import re
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import snapshot, tiny_checkpoint
from fake_hub import FakeHub, HubState

from lmprune.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def token():
    return "hf_" + secrets.token_hex(12)


@pytest.fixture
def checkpoint(tmp_path):
    return tiny_checkpoint(tmp_path / "ckpt")


def _push(folder, endpoint, tmp_path, *flags, token=None, env=None):
    """Run `lmprune push` with a clean Hugging Face environment (no login cache, no offline)."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    clean.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"),
                 PYTHONPATH=os.pathsep.join([str(ROOT), clean.get("PYTHONPATH", "")]))
    if token:
        clean["HF_TOKEN"] = token
    clean.update(env or {})
    return subprocess.run([sys.executable, "-m", "lmprune.cli", "push", str(folder), *flags],
                          env=clean, capture_output=True, text=True, timeout=180)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_token_kept(result, state: HubState, token: str):
    assert token not in result.stdout and token not in result.stderr
    hub_calls = [r for r in state.requests
                 if not r[1].startswith("/lfs-upload/") and r[1] != "/api/agent-harnesses"]
    assert hub_calls and all(auth == f"Bearer {token}" for _, _, auth in hub_calls)
    # pre-signed storage URLs must not get the Hub token
    assert all(auth is None for _, path, auth in state.requests if path.startswith("/lfs-upload/"))


@pytest.mark.slow
def test_push_uploads_every_file_and_writes_the_card(checkpoint, tmp_path, token):
    """The default path (hf_xet installed: pipelined upload) into a repository that exists
    already (create answers 409); the server takes every file as a regular git blob, so the bytes
    travel base64-encoded inside the NDJSON commit."""
    before = _files(checkpoint)
    state = HubState(token=token)
    state.repos["me/tiny-pruned"] = {"private": False, "branches": {"main": {"old.txt": b"v0"}}}
    with FakeHub(state) as hub:
        result = _push(checkpoint, hub.url, tmp_path, "--repo-id", "me/tiny-pruned", token=token)
    assert result.returncode == 0, result.stderr
    assert not state.unexpected
    assert "me/tiny-pruned" in result.stdout

    uploaded = state.repos["me/tiny-pruned"]["branches"]["main"]
    after = _files(checkpoint)
    assert set(after) == set(before) | {"README.md"}  # the card, written once the push worked
    assert {k: after[k] for k in before} == before  # nothing else touched
    assert uploaded == {"old.txt": b"v0", **after}  # every file arrived, byte for byte
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in uploaded["README.md"].decode()
    assert state.repos["me/tiny-pruned"]["private"] is False
    _assert_token_kept(result, state, token)


@pytest.mark.slow
def test_push_lfs_private_branch_and_existing_card(checkpoint, tmp_path, token):
    """Without xet the weights go through the LFS batch API and a PUT; an existing README.md is
    uploaded as it is; --private and --revision reach the server."""
    (checkpoint / "README.md").write_text("---\nlicense: apache-2.0\n---\n# my own card\n")
    before = snapshot(checkpoint)
    state = HubState(token=token, lfs_suffixes=(".safetensors",))
    with FakeHub(state) as hub:
        result = _push(checkpoint, hub.url, tmp_path, "--repo-id", "me/tiny", "--private",
                       "--revision", "dev", "--commit-message", "pruned v1", token=token,
                       env={"HF_HUB_DISABLE_XET": "1"})
    assert result.returncode == 0, result.stderr
    assert not state.unexpected
    assert snapshot(checkpoint) == before
    repo = state.repos["me/tiny"]
    assert repo["private"] is True
    assert repo["branches"]["main"] == {}
    assert repo["branches"]["dev"] == _files(checkpoint)
    weights = (checkpoint / "model.safetensors").read_bytes()
    assert list(state.lfs_objects.values()) == [weights]  # the weights went through LFS
    assert any(path.startswith("/lfs-upload/") for _, path, _ in state.requests)
    _assert_token_kept(result, state, token)


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("no token", "no Hugging Face token: set HF_TOKEN"),
    ("refused token", "the Hub refused the token (401"),
    ("forbidden", "no write access to me/tiny (403 Forbidden)"),
    ("unreachable", "cannot reach the Hub at http://127.0.0.1"),
    ("offline", "offline mode is on (HF_HUB_OFFLINE"),
])
def test_failed_push_is_one_line_and_leaves_the_folder_untouched(checkpoint, tmp_path, token,
                                                                case, message):
    before = snapshot(checkpoint)
    state = HubState(token=token, forbid_create=case == "forbidden")
    sent = {"no token": None, "refused token": "hf_" + secrets.token_hex(12)}.get(case, token)
    env = {"HF_HUB_OFFLINE": "1"} if case == "offline" else {}
    with FakeHub(state) as hub:
        endpoint = _closed_port_url() if case == "unreachable" else hub.url
        result = _push(checkpoint, endpoint, tmp_path, "--repo-id", "me/tiny", token=sent,
                       env=env)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("lmprune: error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(checkpoint) == before  # same files, same bytes, no README.md left behind
    assert all(not repo["branches"]["main"] for repo in state.repos.values())
    for secret in filter(None, [token, sent]):
        assert secret not in result.stdout + result.stderr
    if case in ("no token", "offline", "unreachable"):
        assert not [r for r in state.requests if r[1] != "/api/agent-harnesses"]


@pytest.mark.parametrize("remove, message", [
    ("lmprune.json", "missing lmprune.json"),
    ("model.safetensors", r"missing \*.safetensors"),
    ("config.json", "missing config.json"),
])
def test_push_refuses_a_folder_that_is_not_a_checkpoint(checkpoint, remove, message, capsys):
    (checkpoint / remove).unlink()
    before = snapshot(checkpoint)
    assert main(["push", str(checkpoint), "--repo-id", "me/tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmprune: error: ") and err.count("\n") == 1
    assert re.search(message, err)
    assert snapshot(checkpoint) == before


@pytest.mark.parametrize("repo_id, message", [
    ("", "--repo-id is required"),
    ("me/has space", "invalid --repo-id 'me/has space'"),
    ("a/b/c", "invalid --repo-id 'a/b/c'"),
])
def test_push_refuses_a_bad_repo_id_before_any_network(checkpoint, repo_id, message, capsys):
    assert main(["push", str(checkpoint), "--repo-id", repo_id]) == 2
    assert message in capsys.readouterr().err
    assert not (checkpoint / "README.md").exists()
