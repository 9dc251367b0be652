"""A stand-in for the Hugging Face Hub's upload endpoints on 127.0.0.1, for offline push tests.

It answers what huggingface_hub 2.4's `create_repo`, `create_branch` and `upload_folder` call
(read off its source: hf_api.py, _commit_api.py, _upload_pipeline.py, lfs.py):

    POST /api/repos/create                          {"name", "organization", "visibility"?}
    GET  /api/models/{repo}[/revision/{rev}]        repo info (only asked after a 401/403)
    POST /api/models/{repo}/branch/{branch}         create a branch from main
    POST /api/validate-yaml                         README.md metadata check
    POST /api/models/{repo}/preupload/{rev}         -> uploadMode "regular" or "lfs" per file
    POST /{repo}.git/info/lfs/objects/batch         -> basic-transfer upload URLs
    PUT  /lfs-upload/{oid}                          the LFS object (sha256 checked)
    POST /api/models/{repo}/commit/{rev}            NDJSON: header, then file / lfsFile lines

    GET  /api/agent-harnesses                       public list huggingface_hub's user agent reads

Which files are LFS is the server's choice (the preupload answer): `lfs_suffixes` picks them.
Xet storage (a separate content-addressed service) is not emulated: with hf_xet installed,
huggingface_hub only uses it for files the server calls "lfs", so the xet tests use "regular".
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class HubState:
    token: str
    """The only token accepted (as `Authorization: Bearer ...`)."""
    lfs_suffixes: tuple[str, ...] = ()
    """Files whose name ends with one of these are sent through LFS."""
    forbid_create: bool = False
    """Answer 403 to repo creation (no rights on the namespace)."""
    repos: dict = field(default_factory=dict)
    """repo id -> {"private": bool, "branches": {name: {path: bytes}}}"""
    lfs_objects: dict = field(default_factory=dict)
    """sha256 hex -> bytes"""
    requests: list = field(default_factory=list)
    """(method, path, Authorization header) of every request, in order."""
    unexpected: list = field(default_factory=list)
    """Requests no route answered: a test should see none."""
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(state: HubState, base_url: callable):
    repo = r"(?P<repo>[^/]+/[^/]+)"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30  # a stuck client cannot hold a handler thread forever

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload=None, headers: dict | None = None):
            data = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None):
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers)

        def _handle(self, method: str):
            path = unquote(urlparse(self.path).path)
            auth = self.headers.get("Authorization")
            body = self._body()
            with state.lock:
                state.requests.append((method, path, auth))
            if path.startswith("/lfs-upload/"):  # pre-signed storage URL: no Hub token needed
                return self._lfs_put(path.rsplit("/", 1)[1], body)
            if method == "GET" and path == "/api/agent-harnesses":  # public, for the user agent
                return self._send(200, {"standardEnvVars": [], "harnesses": {}})
            if auth != f"Bearer {state.token}":
                return self._error(401, "Invalid credentials in Authorization header")
            routes = [
                ("POST", r"/api/repos/create", self._create),
                ("GET", rf"/api/models/{repo}(/revision/(?P<rev>.+))?", self._info),
                ("POST", rf"/api/models/{repo}/branch/(?P<rev>.+)", self._branch),
                ("POST", r"/api/validate-yaml", lambda b: self._send(200, {"errors": []})),
                ("POST", rf"/api/models/{repo}/preupload/(?P<rev>.+)", self._preupload),
                ("POST", rf"/{repo}\.git/info/lfs/objects/batch", self._lfs_batch),
                ("POST", rf"/api/models/{repo}/commit/(?P<rev>.+)", self._commit),
            ]
            for verb, pattern, answer in routes:
                match = re.fullmatch(pattern, path)
                if verb == method and match:
                    self.match = match.groupdict()
                    return answer(body)
            with state.lock:
                state.unexpected.append((method, path))
            self._error(404, f"no route {method} {path}")

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def do_PUT(self):
            self._handle("PUT")

        def _repo(self):
            return state.repos.get(self.match["repo"])

        def _create(self, body):
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get(
                "organization") else f"user/{payload['name']}"
            if state.forbid_create:
                return self._error(403, f"You don't have the rights to create a model under the "
                                        f"namespace \"{repo_id.split('/')[0]}\"")
            with state.lock:
                if repo_id in state.repos:  # the Hub's 409 carries the url: create_repo reads it
                    return self._send(409, {"error": "You already created this model repo",
                                            "url": f"{base_url()}/{repo_id}"})
                state.repos[repo_id] = {"private": payload.get("visibility") == "private",
                                        "branches": {"main": {}}}
            self._send(200, {"url": f"{base_url()}/{repo_id}", "name": repo_id})

        def _info(self, body):
            repo = self._repo()
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            self._send(200, {"id": self.match["repo"], "sha": "0" * 40,
                             "private": repo["private"], "siblings": []})

        def _branch(self, body):
            repo = self._repo()
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            with state.lock:
                if self.match["rev"] in repo["branches"]:
                    return self._error(409, "Reference already exists")
                repo["branches"][self.match["rev"]] = dict(repo["branches"]["main"])
            self._send(200, {})

        def _preupload(self, body):
            if self._repo() is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            files = json.loads(body)["files"]
            self._send(200, {"files": [
                {"path": f["path"], "shouldIgnore": False, "oid": None,
                 "uploadMode": "lfs" if f["path"].endswith(state.lfs_suffixes) else "regular"}
                for f in files]})

        def _lfs_batch(self, body):
            objects = json.loads(body)["objects"]
            self._send(200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "authenticated": True,
                 "actions": {"upload": {"href": f"{base_url()}/lfs-upload/{o['oid']}"}}}
                for o in objects]})

        def _lfs_put(self, oid: str, body: bytes):
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, "content does not match its sha256")
            with state.lock:
                state.lfs_objects[oid] = body
            self._send(200, {})

        def _commit(self, body):
            repo = self._repo()
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            if self.match["rev"] not in repo["branches"]:
                return self._error(404, f"Invalid rev id: {self.match['rev']}", "RevisionNotFound")
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            if not lines or lines[0]["key"] != "header":
                return self._error(400, "the commit must start with a header line")
            files = {}
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in state.lfs_objects:
                        return self._error(400, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = state.lfs_objects[value["oid"]]
                else:
                    return self._error(400, f"unsupported commit operation {line['key']}")
            with state.lock:
                repo["branches"][self.match["rev"]].update(files)
            oid = hashlib.sha1(body).hexdigest()
            self._send(200, {"commitUrl": f"{base_url()}/{self.match['repo']}/commit/{oid}",
                             "commitOid": oid, "success": True})

    return Handler


class FakeHub:
    """Serve `HubState` on a free loopback port in a daemon thread; stops itself after
    `lifetime_s` seconds at most (so a failing test cannot leave it running)."""

    def __init__(self, state: HubState, lifetime_s: float = 120):
        self.state = state
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state, lambda: self.url))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._deadline = threading.Timer(lifetime_s, self.server.shutdown)
        self._deadline.daemon = True

    def __enter__(self) -> FakeHub:
        self._thread.start()
        self._deadline.start()
        return self

    def __exit__(self, *exc) -> None:
        self._deadline.cancel()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
