"""The error policy every entry point follows: bad input (a setting, a dataset, a checkpoint) is
reported one line per problem with its fix and exits 2 having written nothing; a failure whose
message says all (a RunFailure, a full disk) is one line and exits 1; anything else keeps its
traceback. Each report also reaches the status page.
"""

from __future__ import annotations

import re
import sys

import status_page

EXIT_BAD_INPUT = 2


class BadInput(ValueError):
    """Bad input (a variable, a dataset, a checkpoint): one line per problem, each naming the input,
    what is wrong and how to fix it. Entry points exit with EXIT_BAD_INPUT, having written nothing."""

    def __init__(self, problems: list[str] | str):
        # One string is one problem (not a list of its characters, one per line).
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(problems))


def report(e: BadInput) -> int:
    """Print a BadInput for the user (stderr; the status page shows it too) and return the exit code
    entry points use for it."""
    text = "Bad input:\n  " + "\n  ".join(e.problems)
    print(text, file=sys.stderr)
    status_page.emit("failure", message=text)
    return EXIT_BAD_INPUT


class RunFailure(RuntimeError):
    """A runtime failure whose message says all (what happened and the fix): printed without a
    traceback, exit 1. `label` starts the line."""

    label = "Failed"


def report_failure(e: Exception) -> int | None:
    """Print a RunFailure, or a full disk (ENOSPC, EDQUOT) with its fix, and return exit code 1;
    None for anything else (which the caller re-raises)."""
    full = disk_full(e)
    if isinstance(e, RunFailure):
        text = f"{e.label}: {e}"
    elif full is not None:
        text = (f"Disk full: {full}. Nothing of this run was published and the state is unchanged. Fix: free space "
                "there, or point WORK_DIR / OUTPUT_REPO / HF_HOME at a larger disk, then run again.")
    else:
        return None
    print(text, file=sys.stderr)
    status_page.emit("failure", message=text)
    return 1


DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "StorageFull", "[Errno 28]", "[Errno 122]")


def disk_full(e: BaseException) -> str | None:
    """What a full disk (ENOSPC, EDQUOT) stopped, wherever in the exception it shows: an OSError, one
    it caused, a shutil.Error listing the files a copy could not write, or a library's own error
    that carries the system's message (safetensors, torch's archive writer); None when it is not that."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{e.strerror} writing {e.filename or 'a file'}"
        text = str(e)
        if any(w in text for w in DISK_FULL_WORDS):
            m = re.search(r"'([^']+)', \"\[Errno (?:28|122)\]", text)  # shutil.Error: (src, dst, why) triples
            return f"no space left on device writing {m.group(1) if m else 'a file'} ({type(e).__name__})"
        e = e.__cause__ or e.__context__
    return None


def quiet_disk_full_in_threads() -> None:
    """A full disk met by a background thread (TensorBoard's event writer, a loader) is told in one
    line, not a traceback; the thread that owns the work reports the failure and its exit code.
    Every other exception in a thread keeps Python's own report."""
    import threading

    default = threading.excepthook

    def hook(args) -> None:
        full = disk_full(args.exc_value) if args.exc_value is not None else None
        if full is None:
            return default(args)
        print(f"Disk full in the background ({args.thread.name if args.thread else 'a thread'}): {full}", file=sys.stderr)

    threading.excepthook = hook


def failure_exit(e: Exception) -> int:
    """The exit code of a failure an entry point reports in one message, no traceback: bad input 2,
    a RunFailure or a full disk 1. Anything else is re-raised, traceback and all."""
    if isinstance(e, BadInput):
        return report(e)
    code = report_failure(e)
    if code is None:
        raise e
    return code
