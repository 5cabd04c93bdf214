"""A loopback stand-in for the Hugging Face Hub: the endpoints the real `huggingface_hub` client calls
when this project publishes, reads back and drives a Space, with files stored so that a download
returns what was uploaded, and faults injected on demand.

    hub = HubDouble(tokens={"hf_write": {"name": "alice", "role": "write"}})
    hub.start()                       # hub.endpoint -> HF_ENDPOINT of the code under test
    hub.fail("POST", r"/commit/", status=503, times=2)
    ...
    hub.stop()

Speaks: whoami-v2; repo create / info / auth-check; the model card's metadata check; preupload; the LFS batch API with basic
transfers (the client is run with HF_HUB_DISABLE_XET=1: this double has no Xet storage); commits
(ndjson: regular files, LFS files, deletions, parentCommit); resolve (HEAD and GET) at a branch or
a commit; the tree listing; Space auth-check, variables, runtime, pause and restart. Faults: an HTTP status
(5xx, 429 with Retry-After, 401, 403), a dropped connection before the request is handled, a delay
(the client's timeout), or a dropped connection after the request was applied (a commit that landed
but whose answer was lost).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Fault:
    method: str
    pattern: str
    kind: str  # "status" | "drop" | "delay" | "drop_after"
    times: int
    status: int = 503
    retry_after: float | None = None
    seconds: float = 0.0
    fired: int = 0


@dataclass
class Repo:
    kind: str  # "model" | "space"
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[tuple[str, dict[str, bytes], str]] = field(default_factory=list)  # (sha, files, title)

    @property
    def head(self) -> str:
        return self.commits[-1][0] if self.commits else "0" * 40


@dataclass
class Space:
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    stage: str = "RUNNING"
    restarts: int = 0
    events: list[str] = field(default_factory=list)


LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".tfevents")


class HubDouble:
    def __init__(self, tokens: dict[str, dict[str, Any]], spaces: list[str] | None = None) -> None:
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.spaces: dict[str, Space] = {s: Space() for s in spaces or []}
        self.lfs: dict[str, bytes] = {}
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, int]] = []
        self.bytes_served: dict[str, int] = {}  # file path -> bytes of its content sent (ranges included)
        self.lock = threading.RLock()
        self.server: ThreadingHTTPServer | None = None

    # --- control -------------------------------------------------------------------------------
    def start(self) -> "HubDouble":
        hub = self

        class Handler(_Handler):
            double = hub

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:  # a client that gave up (timeout): expected
                import sys

                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, method: str, pattern: str, *, times: int = 1, status: int = 503, kind: str = "status",
             retry_after: float | None = None, seconds: float = 0.0) -> Fault:
        fault = Fault(method.upper(), pattern, kind, times, status, retry_after, seconds)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def seed(self, repo_id: str, files: dict[str, bytes], title: str = "seed", private: bool = True,
             kind: str = "model") -> str:
        """A repo holding `files` in one commit (what an earlier run published, or a dataset with
        kind="dataset"); returns its sha."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(kind, private))
            sha = hashlib.sha1(f"{repo_id}{len(repo.commits)}{sorted(files)}".encode()).hexdigest()
            repo.files = dict(files)
            repo.commits.append((sha, dict(files), title))
        return sha

    def commits(self, repo_id: str) -> list[str]:
        repo = self.repos.get(repo_id)
        return [title for _, _, title in repo.commits] if repo else []

    def requests(self, method: str, pattern: str) -> int:
        return sum(1 for m, p, _ in self.log if m == method and re.search(pattern, p))

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.fired < f.times and f.method == method and re.search(f.pattern, path):
                    f.fired += 1
                    return f
        return None


def _sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    double: HubDouble
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # --- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes | dict | list | None = None, headers: dict[str, str] | None = None,
              head: bool = False) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        body = body or b""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.double.log.append((self.command, self.path, status))

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message} if code else
                   {"X-Error-Message": message}, head=head)

    def _drop(self) -> None:
        self.double.log.append((self.command, self.path, 0))
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close_connection = True

    def _user(self) -> dict[str, Any] | None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        return self.double.tokens.get(token) if token else None

    def _can_write(self, user: dict[str, Any] | None, repo_id: str) -> bool:
        if not user or user.get("role") != "write":
            return False
        return repo_id.split("/")[0] in {user["name"], *user.get("orgs", [])}

    def _can_read(self, user: dict[str, Any] | None, repo: Repo, repo_id: str) -> bool:
        return not repo.private or (user is not None and repo_id.split("/")[0] in {user["name"], *user.get("orgs", [])})

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self, head: bool = False) -> None:
        url = urlparse(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        fault = self.double._fault_for(self.command, path)
        if fault and fault.kind == "drop":
            return self._drop()
        if fault and fault.kind == "delay":
            time.sleep(fault.seconds)
        if fault and fault.kind == "status":
            extra = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
            return self._send(fault.status, {"error": f"injected {fault.status}"}, extra, head=head)
        with self.double.lock:
            try:
                self._route(path, query, body, head, drop_after=bool(fault and fault.kind == "drop_after"))
            except _Dropped:
                return self._drop()

    # --- routes ----------------------------------------------------------------------------------
    def _route(self, path: str, query: dict, body: bytes, head: bool, drop_after: bool) -> None:
        d, user = self.double, self._user()
        m = self.command
        if path == "/api/whoami-v2" and m == "GET":
            if user is None:
                return self._error(401, "Invalid credentials in Authorization header")
            return self._send(200, {"type": "user", "name": user["name"], "orgs": [{"name": o} for o in user.get("orgs", [])],
                                    "auth": {"type": "access_token",
                                             "accessToken": {"displayName": "test", "role": user.get("role", "read")}}})
        if path == "/api/repos/create" and m == "POST":
            req = json.loads(body)
            repo_id = f"{req.get('organization') or user['name'] if user else ''}/{req['name']}"
            if user is None:
                return self._error(401, "Invalid credentials in Authorization header")
            if not self._can_write(user, repo_id):
                return self._error(403, f"You don't have the rights to create a repo under {repo_id.split('/')[0]}")
            if repo_id in d.repos:  # the Hub answers a conflict with the existing repo's url
                return self._send(409, {"error": "You already created this model repo", "url": f"{d.endpoint}/{repo_id}"})
            private = req.get("visibility", "private" if req.get("private") else "public") != "public"
            d.repos[repo_id] = Repo(req.get("type") or "model", private)
            return self._send(200, {"url": f"{d.endpoint}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml" and m == "POST":  # the model card's metadata
            content = json.loads(body)["content"]
            if content.startswith("---") and content.count("---") < 2:
                return self._send(400, {"errors": [{"message": "unterminated metadata block"}]})
            return self._send(200, {"errors": [], "warnings": []})
        mm = re.fullmatch(r"/api/(models|spaces|datasets)/([^/]+/[^/]+)(/.*)?", path)
        if mm:
            return self._api(mm.group(1), mm.group(2), mm.group(3) or "", query, body, user, head, drop_after)
        mm = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if mm and m == "POST":
            repo = d.repos.get(mm.group(1))
            if repo is None or not self._can_write(user, mm.group(1)):
                return self._error(404 if repo is None else 403, "Repository not found", "RepoNotFound")
            req = json.loads(body)
            objects = []
            for o in req["objects"]:
                entry = {"oid": o["oid"], "size": o["size"]}
                if o["oid"] not in d.lfs:
                    entry["actions"] = {"upload": {"href": f"{d.endpoint}/lfs-upload/{o['oid']}", "header": {}}}
                objects.append(entry)
            return self._send(200, {"transfer": "basic", "objects": objects})
        mm = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if mm and m == "PUT":
            if hashlib.sha256(body).hexdigest() != mm.group(1):
                return self._error(400, "sha256 mismatch")
            d.lfs[mm.group(1)] = body
            return self._send(200, b"")
        mm = re.fullmatch(r"/(?:spaces/|datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if mm and m in ("GET", "HEAD"):
            return self._resolve(mm.group(1), mm.group(2), mm.group(3), user, head)
        return self._error(404, f"no route for {m} {path}")

    def _api(self, kind: str, repo_id: str, rest: str, query: dict, body: bytes, user, head: bool, drop_after: bool) -> None:
        d, m = self.double, self.command
        if kind == "spaces" and repo_id in d.spaces:
            return self._space(repo_id, rest, body, user)
        repo = d.repos.get(repo_id)
        if repo is None or not self._can_read(user, repo, repo_id):
            return self._error(404, "Repository not found", "RepoNotFound", head=head)
        mm = re.fullmatch(r"(?:/revision/([^/]+))?", rest)
        if mm is not None and m == "GET":
            files = self._files_at(repo, mm.group(1) or "main")
            if files is None:
                return self._error(404, "Revision not found", "RevisionNotFound")
            return self._send(200, {"id": repo_id, "modelId": repo_id, "sha": self._sha_at(repo, mm.group(1) or "main"),
                                    "private": repo.private, "siblings": [{"rfilename": p} for p in sorted(files)],
                                    "tags": [], "downloads": 0, "likes": 0})
        if rest in ("/auth-check", "/auth-check/write") and m == "GET":
            if rest.endswith("write") and not self._can_write(user, repo_id):
                return self._error(403, "You do not have write access to this repository")
            return self._send(200, {})
        mm = re.fullmatch(r"/preupload/([^/]+)", rest)
        if mm and m == "POST":
            if not self._can_write(user, repo_id):
                return self._error(403, "You do not have write access to this repository")
            files = json.loads(body)["files"]
            return self._send(200, {"files": [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10 * 2**20 else "regular",
                 "shouldIgnore": False} for f in files], "commitOid": repo.head})
        mm = re.fullmatch(r"/commit/([^/]+)", rest)
        if mm and m == "POST":
            if not self._can_write(user, repo_id):
                return self._error(403, "You do not have write access to this repository")
            return self._commit(repo_id, repo, body, drop_after)
        mm = re.fullmatch(r"/paths-info/([^/]+)", rest)
        if mm and m == "POST":  # HfFileSystem's info(): each path a file or a directory
            files = self._files_at(repo, mm.group(1))
            if files is None:
                return self._error(404, "Revision not found", "RevisionNotFound")
            ctype = self.headers.get("Content-Type", "")
            paths = json.loads(body)["paths"] if "json" in ctype else parse_qs(body.decode()).get("paths", [])
            out = []
            for want in paths:
                want = want.strip("/")
                if want in files:
                    out.append({"type": "file", "oid": _sha1(files[want]), "size": len(files[want]), "path": want})
                elif any(f.startswith(want + "/") for f in files):
                    out.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": want})
            return self._send(200, out)
        mm = re.fullmatch(r"/tree/([^/]+)(?:/(.*))?", rest)
        if mm and m == "GET":
            files = self._files_at(repo, mm.group(1))
            if files is None:
                return self._error(404, "Revision not found", "RevisionNotFound")
            prefix = (mm.group(2) or "").strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            entries, dirs = [], set()
            for p in sorted(files):
                if prefix and not p.startswith(prefix + "/"):
                    continue
                rel = p[len(prefix) + 1:] if prefix else p
                if "/" in rel and not recursive:
                    dirs.add(f"{prefix + '/' if prefix else ''}{rel.split('/')[0]}")
                    continue
                if recursive:
                    parts = rel.split("/")[:-1]
                    for i in range(len(parts)):
                        dirs.add("/".join(([prefix] if prefix else []) + parts[:i + 1]))
                data = files[p]
                entry = {"type": "file", "oid": _sha1(data), "size": len(data), "path": p}
                if p.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            return self._send(200, [{"type": "directory", "oid": "0" * 40, "size": 0, "path": p} for p in sorted(dirs)] + entries)
        return self._error(404, f"no route for {m} /api/{kind}s/{repo_id}{rest}")

    def _space(self, repo_id: str, rest: str, body: bytes, user) -> None:
        m, sp = self.command, self.double.spaces[repo_id]
        if not self._can_write(user, repo_id):
            return self._error(401 if user is None else 403, "You do not have write access to this Space")
        runtime = {"stage": sp.stage, "hardware": {"current": "cpu-basic", "requested": "cpu-basic"},
                   "storage": None, "gcTimeout": None, "replicas": {"current": 1, "requested": 1}}
        if rest in ("/auth-check", "/auth-check/write") and m == "GET":
            return self._send(200, {})
        if rest == "/variables" and m == "GET":
            return self._send(200, sp.variables)
        if rest == "/variables" and m == "POST":
            req = json.loads(body)
            sp.variables[req["key"]] = {"value": str(req["value"]), "description": req.get("description"),
                                        "updatedAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
            sp.events.append(f"set {req['key']}={req['value']}")
            return self._send(200, sp.variables)
        if rest == "/variables" and m == "DELETE":
            key = json.loads(body)["key"]
            sp.variables.pop(key, None)
            sp.events.append(f"delete {key}")
            return self._send(200, sp.variables)
        if rest == "/runtime" and m == "GET":
            return self._send(200, runtime)
        if rest == "/pause" and m == "POST":
            sp.stage = "PAUSED"
            sp.events.append("pause")
            return self._send(200, {**runtime, "stage": "PAUSED"})
        if rest == "/restart" and m == "POST":
            sp.restarts += 1
            sp.events.append("restart")
            return self._send(200, {**runtime, "stage": "RUNNING_BUILDING"})
        return self._error(404, f"no route for {m} /api/spaces/{repo_id}{rest}")

    def _sha_at(self, repo: Repo, rev: str) -> str:
        return repo.head if rev == "main" else rev

    def _files_at(self, repo: Repo, rev: str) -> dict[str, bytes] | None:
        if rev == "main":
            return repo.files
        for sha, files, _ in repo.commits:
            if sha == rev:
                return files
        return None

    def _commit(self, repo_id: str, repo: Repo, body: bytes, drop_after: bool) -> None:
        d = self.double
        lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        parent = header.get("parentCommit")
        if parent and parent != repo.head:
            return self._error(412, f"A commit has happened since. Please refresh and try again. (parent {parent} "
                                    f"is not the head {repo.head})")
        files = dict(repo.files)
        for x in lines:
            v = x["value"]
            if x["key"] == "file":
                files[v["path"]] = base64.b64decode(v["content"])
            elif x["key"] == "lfsFile":
                if v["oid"] not in d.lfs:
                    return self._error(422, f"LFS object {v['oid']} was not uploaded")
                files[v["path"]] = d.lfs[v["oid"]]
            elif x["key"] == "deletedFile":
                if v["path"] not in files:
                    return self._error(404, f"{v['path']} does not exist", "EntryNotFound")
                del files[v["path"]]
            elif x["key"] == "deletedFolder":
                for p in [p for p in files if p.startswith(v["path"].rstrip("/") + "/")]:
                    del files[p]
        sha = hashlib.sha1((repo.head + json.dumps(sorted((p, _sha1(b)) for p, b in files.items()))).encode()
                           + str(len(repo.commits)).encode()).hexdigest()
        repo.files = files
        repo.commits.append((sha, files, header.get("summary", "")))
        if drop_after:
            raise _Dropped()
        return self._send(200, {"commitUrl": f"{d.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                                "pullRequestUrl": None})

    def _resolve(self, repo_id: str, rev: str, path: str, user, head: bool) -> None:
        repo = self.double.repos.get(repo_id)
        if repo is None or not self._can_read(user, repo, repo_id):
            return self._error(404, "Repository not found", "RepoNotFound", head=head)
        files = self._files_at(repo, rev)
        if files is None:
            return self._error(404, "Revision not found", "RevisionNotFound", head=head)
        if path not in files:
            return self._error(404, "Entry not found", "EntryNotFound", head=head)
        data = files[path]
        headers = {"X-Repo-Commit": self._sha_at(repo, rev), "ETag": f'"{_sha1(data)}"'}
        if path.endswith(LFS_SUFFIXES):
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        headers["Accept-Ranges"] = "bytes"
        if head:
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.double.log.append((self.command, self.path, 200))
            return None
        rng = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "") or "")
        if rng and data:  # a byte range, as the Hub's CDN serves one: 206 with Content-Range
            a, b = rng.groups()
            start, end = (len(data) - int(b), len(data) - 1) if not a else (int(a), min(len(data) - 1, int(b) if b else len(data) - 1))
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            part = data[start:end + 1]
            self.double.bytes_served[path] = self.double.bytes_served.get(path, 0) + len(part)
            return self._send(206, part, {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})
        self.double.bytes_served[path] = self.double.bytes_served.get(path, 0) + len(data)
        return self._send(200, data, headers)


class _Dropped(Exception):
    pass


if __name__ == "__main__":  # a standalone double for trying the pipeline by hand
    import sys

    hub = HubDouble({"hf_test_write": {"name": "alice", "role": "write"}}, spaces=sys.argv[1:]).start()
    print(hub.endpoint, flush=True)
    threading.Event().wait()
