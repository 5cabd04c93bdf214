"""The Hub client: huggingface_hub with this project's rules (timeouts, retries on transient errors
only, "not there" decided by one rule, atomic publishes on top of a known commit). The token goes to
the client only, never into a message.

One client per settings object, built by `hub(s)` and shared by every caller of the process.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from config import Settings
from errors import BadInput, RunFailure
from run_state import STATE_FILE

def hub(s: Settings) -> "Hub":
    """The Hub client of these settings, built on first use and kept by the settings object itself
    (another settings object gets a client of its own)."""
    h = s._hub_client
    if h is None or h.s is not s:
        h = s._hub_client = Hub(s)
    return h


def retries_made(s: Settings) -> dict[str, int]:
    """The retries the client of these settings made so far, by call (empty when none was built)."""
    h = s._hub_client
    return dict(h.retries) if h is not None and h.s is s else {}


class HubError(RunFailure):
    """A Hub call that kept failing on transient errors, or a publish that met a concurrent change."""

    label = "Hub"


class PublishConflict(HubError):
    """The output changed under this run (another run published there): nothing is published."""

    label = "publish refused"


class HubRefused(BadInput):
    """A Hub call that cannot succeed (401, 403, 404, a rejected request): bad input, exit 2."""


HUB_ERRORS = (HubError, HubRefused)


class Hub:
    """huggingface_hub's HfApi with this project's rules: a timeout on every request, retries with
    exponential backoff and jitter on transient errors only (5xx, 429 honouring Retry-After,
    timeouts, dropped connections), immediate failure with the reason on anything else. The token
    is passed to the client only; it is never formatted into a message."""

    def __init__(self, s: Settings) -> None:
        import httpx2
        import huggingface_hub
        from huggingface_hub.utils._http import hf_request_event_hook

        huggingface_hub.utils.disable_progress_bars()  # one line per publish, not one bar per file

        timeout = s.hub_timeout
        # A download with no cached copy whose metadata request timed out is retried by the client
        # itself with a fixed 60 s timeout: HUB_TIMEOUT would not hold there, and a stalled Hub would
        # hold each read for a minute per attempt. Our retries (HUB_RETRIES) cover that case.
        from huggingface_hub import file_download

        if hasattr(file_download, "_ETAG_RETRY_TIMEOUT"):
            file_download._ETAG_RETRY_TIMEOUT = timeout
        huggingface_hub.set_client_factory(lambda: httpx2.Client(
            event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True,
            timeout=httpx2.Timeout(timeout, connect=min(timeout, 30.0))))
        self.s = s
        self.token = s.hf_token.get_secret_value() if s.hf_token else None
        self.api = huggingface_hub.HfApi(token=self.token or False)
        self.retries: dict[str, int] = {}

    # --- retries -----------------------------------------------------------------------------
    @staticmethod
    def transient(e: BaseException) -> tuple[bool, float | None]:
        """(retry?, the server's Retry-After in seconds if it gave one)."""
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

        if isinstance(e, LocalEntryNotFoundError):  # the client got no answer and has no cached copy: why?
            cause = e.__cause__
            return Hub.transient(cause) if cause is not None else (True, None)
        if isinstance(e, httpx2.LocalProtocolError):  # the request itself is malformed: no retry can help
            return False, None
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            code = e.response.status_code
            if code == 429 or code >= 500:
                after = e.response.headers.get("Retry-After")
                try:
                    return True, float(after) if after is not None else None
                except ValueError:
                    return True, None
            return False, None
        if isinstance(e, OfflineModeIsEnabled):  # HF_HUB_OFFLINE: no retry will reach the Hub
            return False, None
        return isinstance(e, (httpx2.TransportError, TimeoutError, ConnectionError)), None

    def call(self, what: str, fn, *args, **kwargs):
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - classified below; what cannot succeed is raised at once
                retry, after = self.transient(e)
                if not retry or attempt >= self.s.hub_retries:
                    raise self.explain(what, e, attempt) from e
                wait = after if after is not None else min(60.0, self.s.hub_retry_wait * 2 ** attempt) * random.uniform(0.5, 1.5)
                attempt += 1
                self.retries[what] = self.retries.get(what, 0) + 1
                print(f"[hub] {what}: {self.describe(e)}; retry {attempt} of {self.s.hub_retries} in {wait:.1f} s",
                      flush=True)
                time.sleep(wait)

    @staticmethod
    def describe(e: BaseException) -> str:
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return f"HTTP {e.response.status_code}"
        return type(e).__name__

    def explain(self, what: str, e: BaseException, attempts: int) -> HubError | HubRefused:
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        code = e.response.status_code if isinstance(e, HfHubHTTPError) and e.response is not None else None
        fix = {401: "HF_TOKEN is not valid: create a new token with write access and set the secret HF_TOKEN.",
               403: "HF_TOKEN cannot write there: use a token with write access to that namespace (a fine-grained token "
                    "needs write on the repo), or choose an OUTPUT_REPO under your own name.",
               404: "the repo does not exist or the token cannot see it: check OUTPUT_REPO / INPUT_REPO and HF_TOKEN."}.get(code)
        detail = (str(e).splitlines()[0][:300] if str(e) else type(e).__name__).rstrip(".")
        if isinstance(e, OfflineModeIsEnabled):
            fix = "HF_HUB_OFFLINE is set, so the Hub cannot be reached: unset it to read from or publish to the Hub."
        if self.transient(e)[0]:
            return HubError(f"{what}: {detail}. The Hub kept failing after {attempts} retries: run again later "
                            "(nothing was lost).")
        return HubRefused([f"{what}: {detail}" + (f". Fix: {fix}" if fix else "")])

    # --- reading ----------------------------------------------------------------------------------
    def read_text(self, repo: str, path: str, revision: str | None = None) -> str | None:
        """A file of the repo at `revision` (a commit: what is read is exactly that commit's file,
        from the cache or the Hub; default the main branch), or None when the Hub answers that the
        repo, the revision or the file does not exist."""
        from huggingface_hub import hf_hub_download

        local = self.unless_missing(f"read {repo}/{path}", hf_hub_download, repo, path, revision=revision,
                                    token=self.token or False, cache_dir=self.cache(), etag_timeout=self.s.hub_timeout)
        return None if local is None else Path(local).read_text()

    def list_files(self, repo: str, revision: str | None = None) -> list[str] | None:
        return self.unless_missing(f"list {repo}", self.api.list_repo_files, repo, revision=revision)

    def head(self, repo: str) -> str | None:
        info = self.unless_missing(f"info {repo}", self.api.repo_info, repo)
        return None if info is None else info.sha

    @staticmethod
    def absent(e: BaseException | None) -> bool:
        """The one rule for "not there": the Hub itself answered 404 for this repo, revision or file.
        A Hub that could not be reached (huggingface_hub's LocalEntryNotFoundError: no answer and no
        cached copy), a 5xx, a timeout or a gated repo is not an answer about the file."""
        from huggingface_hub.errors import (GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)

        return (isinstance(e, (RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError))
                and not isinstance(e, GatedRepoError) and e.response is not None and e.response.status_code == 404)

    def unless_missing(self, what: str, fn, *args, **kwargs):
        """`call`, with None where the Hub answers that the repo, revision or file is not there."""
        try:
            return self.call(what, fn, *args, **kwargs)
        except HUB_ERRORS as e:
            if self.absent(e.__cause__):
                return None
            raise

    def download(self, repo: str, into: Path, ignore: list[str] | None = None, allow: list[str] | None = None) -> Path:
        """A snapshot of the repo at its current commit, in `into`/<owner>--<name>/<commit>."""
        from huggingface_hub import snapshot_download

        sha = self.head(repo)
        if sha is None:
            raise HubError(f"{repo}: no such repo on the Hub (or HF_TOKEN cannot see it)")
        dst = into / repo.replace("/", "--") / sha
        done = dst / f".complete-{'allow' if allow else 'ignore'}-{'-'.join(allow or ignore or []).replace('/', '_')}"
        if not done.exists():  # each selection of files (the model, the checkpoint) is fetched once
            self.call(f"download {repo}", snapshot_download, repo, revision=sha, local_dir=dst, token=self.token or False,
                      ignore_patterns=ignore, allow_patterns=allow, cache_dir=self.cache())
            done.write_text(sha)
        for old in dst.parent.iterdir():  # earlier snapshots of this repo are no longer needed
            if old != dst and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        return dst

    def cache(self) -> str:
        return str(Path(self.s.work_dir).resolve() / "hub" / ".cache")

    # --- access -------------------------------------------------------------------------------
    def check_access(self, repos: list[str]) -> list[str]:
        """Problems that would stop publishing to `repos` (each with its fix); [] when the token can
        write to every one of them (existing or creatable) and, in a Space, to the Space."""
        from huggingface_hub.errors import HfHubHTTPError

        try:
            me = self.call("whoami", self.api.whoami)
        except HubRefused as e:  # a Hub that does not answer is an outage (raised), not a token problem
            return [f"HF_TOKEN: {e}"]
        role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            return ["HF_TOKEN is a read-only token: publishing needs write access. Fix: create a token with the "
                    "'write' role (or a fine-grained token with write access to the repo) and set the secret HF_TOKEN."]
        spaces = [self.s.space_id] if self.s.space_id else []
        namespaces = {me.get("name"), *(o.get("name") for o in me.get("orgs") or [])}
        problems = []
        for repo in repos + spaces:
            kind = "space" if repo in spaces else "model"
            try:
                self.call(f"check {repo}", self.api.auth_check, repo, repo_type=kind, write=True)
            except HubRefused as e:
                cause = e.__cause__
                status = cause.response.status_code if isinstance(cause, HfHubHTTPError) and cause.response is not None else None
                if status == 404 and kind == "model":
                    if repo.split("/")[0] not in namespaces:
                        problems.append(f"{repo}: the token ({me.get('name')}) cannot create repos under "
                                        f"{repo.split('/')[0]!r}. Fix: an OUTPUT_REPO under {me.get('name')!r} or one of "
                                        "its organisations, or a token of that namespace.")
                    continue  # created on the first publish
                problems.append(str(e))
        return problems

    # --- writing ------------------------------------------------------------------------------
    def publish(self, repo: str, folder: Path, message: str, publish_id: str, parent: str | None,
                replace: list[str] | None = None) -> str:
        """One commit making `repo` hold exactly `folder` (or, with `replace`, making those paths hold
        what `folder` has and leaving the rest): every file added, every file of an earlier publish
        that is not in `folder` deleted, on top of the head read before (parentCommit), so
        that a concurrent change fails the commit instead of being overwritten. A commit whose answer
        was lost and that is retried finds the head moved: it counts as landed when the head's record
        carries this `publish_id`. Returns the commit id."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.errors import HfHubHTTPError

        if parent is None:  # a new repo: created now, and still without a record
            self.call(f"create {repo}", self.api.create_repo, repo, private=self.s.private, exist_ok=True)
            parent = self.head(repo)
            if parent is None or self.read_text(repo, STATE_FILE, revision=parent) is not None:
                raise PublishConflict(f"publish {repo}: another run created and published this repo while this run "
                                      "trained. Nothing was published. Fix: run again; the next run reads what is there now.")
        existing = set(self.list_files(repo, revision=parent) or [])
        if replace is not None:  # only these paths (a file, or a folder ending in /) are this publish's
            existing = {f for f in existing if any(f == r or (r.endswith("/") and f.startswith(r)) for r in replace)}
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        # runs/<run>/ are the TensorBoard traces of earlier runs: every publish adds its own, none removes them
        stale = sorted(f for f in existing - set(files) - {".gitattributes"} if not (f.startswith("runs/") and f.count("/") >= 2))

        def commit():
            ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
            ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
            return self.api.create_commit(repo, ops, commit_message=message, parent_commit=parent)

        try:
            return self.call(f"publish {repo}", commit).oid
        except HUB_ERRORS as e:
            cause = e.__cause__
            if isinstance(cause, HfHubHTTPError) and cause.response is not None and cause.response.status_code == 412:
                head = self.head(repo)
                landed = self.read_text(repo, STATE_FILE, revision=head) if head else None
                try:
                    if landed and json.loads(landed).get("publish_id") == publish_id:
                        return head or ""
                except json.JSONDecodeError:
                    pass
                raise PublishConflict(f"publish {repo}: another run published to this repo while this run was training or "
                                      "publishing, so nothing was published and the state is not advanced. Fix: run again; "
                                      "the next run reads what is there now.") from cause
            raise
