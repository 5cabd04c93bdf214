"""Secrets never reach a log: one mask over everything a train-llama process prints.

Each entry point calls `install()` first thing, before the libraries it uses create their loggers.
From then on every write to sys.stdout and sys.stderr (our lines, library logs, warnings, the
traceback of an uncaught exception, an error message that quotes an HTTP header or a config file
line) passes through `mask`, which replaces

- every secret registered with `add` (config.load_settings registers HF_TOKEN, as given and
  stripped, from the environment and from CONFIG_FILE), and
- anything shaped like a Hugging Face token (``hf_`` and 20 or more letters and digits), whatever
  its source: a token pasted into another variable or quoted by a parser is masked too,

with ``***``. The child processes of a run (the training ranks) are Python entry points of ours and
install the same mask.
"""

from __future__ import annotations

import io
import re
import sys
from typing import TextIO

MASK = "***"
TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_SECRETS: set[str] = set()


def add(secret: str | None) -> None:
    """Mask `secret` (and its whitespace-stripped form) from now on; short values are ignored (a
    2-character "secret" would mask half the log and protects nothing)."""
    for value in (secret, (secret or "").strip()):
        if value and len(value.strip()) >= 8:
            _SECRETS.add(value)


def mask(text: str) -> str:
    for secret in sorted(_SECRETS, key=len, reverse=True):  # the longest first: "tok\n" before "tok"
        if secret in text:
            text = text.replace(secret, MASK)
    return TOKEN_SHAPE.sub(MASK, text)


class MaskedStream(io.TextIOBase):
    """A text stream that masks secrets before writing to the stream it wraps."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner

    def write(self, s: str) -> int:
        self.inner.write(mask(s))
        return len(s)

    def flush(self) -> None:
        self.inner.flush()

    def fileno(self) -> int:
        return self.inner.fileno()

    def isatty(self) -> bool:
        return self.inner.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.inner.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.inner.errors

    def writable(self) -> bool:
        return True


def install() -> None:
    """Wrap sys.stdout and sys.stderr (once per process)."""
    if not isinstance(sys.stdout, MaskedStream):
        sys.stdout = MaskedStream(sys.stdout)
    if not isinstance(sys.stderr, MaskedStream):
        sys.stderr = MaskedStream(sys.stderr)
