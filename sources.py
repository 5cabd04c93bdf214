"""The datasets a stage reads: one source or several with weights, in one deterministic order of rows.

INPUT_DATASET and INSTRUCT_DATASET each name one source (a Hub dataset id, a local directory or a
file) or several with weights, `data/web.jsonl:0.7,data/code.jsonl:0.3`; in CONFIG_FILE also a list
of {path, weight, text_column, split}. Several sources are interleaved by
`datasets.interleave_datasets` (the weights as probabilities, SEED as its seed), which stops when a
source runs out, so the mix holds from the first row to the last. The interleaving is drawn over the
sources' row numbers, not their rows: sources with different columns mix, and shard k reads only its
own rows from each source. Same sources, weights and SEED: the same rows in every shard, on every
machine. One source is read in its own order, as it always was.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from config import BadInput

FIELDS = ("path", "weight", "text_column", "split")


@dataclass(frozen=True)
class Source:
    path: str
    weight: float = 1.0
    text_column: str | None = None  # None: TEXT_COLUMN
    split: str | None = None        # None: DATASET_SPLIT

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _weight(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_sources(value: str, var: str) -> list[Source]:
    """The sources in `value`: `spec`, `spec:w,spec:w,...`, or a JSON list of {path, weight,
    text_column, split} (how CONFIG_FILE passes a list). Bad input names the variable and the fix."""
    text = value.strip()
    fix = (f"Fix: {var}=path or {var}=path_a:0.7,path_b:0.3 (weights > 0), or in CONFIG_FILE a list of "
           "{path, weight, text_column, split}.")
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput([f"{var}: the list of datasets does not parse ({e.msg}). {fix}"]) from None
        sources = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                item = {"path": item}
            if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"].strip():
                raise BadInput([f"{var}: entry {i} has no 'path'. {fix}"])
            unknown = sorted(set(item) - set(FIELDS))
            if unknown:
                raise BadInput([f"{var}: entry {i} has unknown key(s) {', '.join(unknown)} (accepted: {', '.join(FIELDS)}). {fix}"])
            w = item.get("weight", 1.0)
            w = _weight(str(w)) if not isinstance(w, bool) else None
            if w is None:
                raise BadInput([f"{var}: entry {i} ({item['path']}) has weight {item.get('weight')!r}, not a number. {fix}"])
            sources.append(Source(item["path"].strip(), w, item.get("text_column"), item.get("split")))
    else:
        sources = []
        for piece in (p.strip() for p in text.split(",")):
            if not piece:
                raise BadInput([f"{var}={value!r}: an empty entry in the list. {fix}"])
            path, sep, w = piece.rpartition(":")
            weight = _weight(w) if sep else None
            sources.append(Source(path.strip(), weight) if weight is not None and path.strip() else Source(piece))
    if not sources:
        raise BadInput([f"{var}: no dataset given. {fix}"])
    for src in sources:
        if not math.isfinite(src.weight) or src.weight <= 0:
            raise BadInput([f"{var}: {src.path} has weight {src.weight:g}; weights are the mix's proportions and must be > 0. {fix}"])
    return sources


class Corpus:
    """The rows of one stage: its sources loaded (prep.load_rows: Hub, directory or file) and, with
    several, the interleaved order of (source, row) pairs."""

    def __init__(self, sources: list[Source], var: str, text_column: str, split: str, token: str | None, seed: int):
        self.sources, self.var, self.text_column = sources, var, text_column
        self.datasets = [load_rows(src.path, var if len(sources) == 1 else f"{var} ({src.path})",
                                   src.split or split, token) for src in sources]
        self.order = None if len(sources) == 1 else self._interleave(seed)

    def _interleave(self, seed: int):
        import numpy as np
        from datasets import Dataset, interleave_datasets

        total = sum(src.weight for src in self.sources)
        parts = [Dataset.from_dict({"source": np.full(len(ds), i, dtype=np.int32), "row": np.arange(len(ds), dtype=np.int64)})
                 for i, ds in enumerate(self.datasets)]
        mixed = interleave_datasets(parts, probabilities=[src.weight / total for src in self.sources], seed=seed,
                                    stopping_strategy="first_exhausted")
        table = mixed.with_format("numpy")[:]
        return np.asarray(table["source"], dtype=np.int32), np.asarray(table["row"], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.datasets[0]) if self.order is None else len(self.order[0])

    def describe(self) -> str:
        if self.order is None:
            return f"{self.sources[0].path}: {len(self)} rows"
        share = ", ".join(f"{src.path} {ds_rows:,} of {len(ds):,} rows (weight {src.weight:g})"
                          for src, ds, ds_rows in zip(self.sources, self.datasets, self.rows_per_source(0, len(self))))
        return f"{len(self.sources)} datasets interleaved into {len(self):,} rows: {share}"

    def rows_per_source(self, start: int, end: int) -> list[int]:
        import numpy as np

        if self.order is None:
            return [end - start]
        return np.bincount(self.order[0][start:end], minlength=len(self.sources)).tolist()

    def _pieces(self, start: int, end: int):
        """(source index, its row numbers, the positions in [start, end) they fill), per source."""
        import numpy as np

        if self.order is None:
            yield 0, np.arange(start, end), np.arange(end - start)
            return
        src, row = self.order[0][start:end], self.order[1][start:end]
        for i in range(len(self.sources)):
            at = np.nonzero(src == i)[0]
            if len(at):
                yield i, row[at], at

    def column(self, start: int, end: int) -> tuple[list, list[int]]:
        """The text column of rows [start, end) (each source's own column), and each row's source."""
        values: list = [None] * (end - start)
        which = [0] * (end - start)
        for i, rows, at in self._pieces(start, end):
            ds, column = self.datasets[i], self.sources[i].text_column or self.text_column
            where = self.var if self.order is None else f"{self.var} ({self.sources[i].path})"
            if column not in ds.column_names:
                raise BadInput([f"{where}: no column {column!r} (columns: {', '.join(ds.column_names)}). "
                                "Fix: set TEXT_COLUMN (or the source's text_column) to the column holding the text."])
            got = ds[int(rows[0]):int(rows[-1]) + 1][column] if _contiguous(rows) else ds.select(rows)[column]
            for pos, v in zip(at.tolist(), got):
                values[pos] = v
                which[pos] = i
        return values, which

    def texts(self, start: int, end: int) -> tuple[list[str], list[int]]:
        """The non-empty texts of rows [start, end), and each one's source; a value that is not text
        is bad input naming its row."""
        values, which = self.column(start, end)
        for pos, v in enumerate(values):
            if v is not None and not isinstance(v, str):
                column = self.sources[which[pos]].text_column or self.text_column
                raise BadInput([f"{self.where(start + pos, which[pos])}: column {column!r} holds non-text values "
                                f"({type(v).__name__}). Fix: a column of strings."])
        keep = [pos for pos, v in enumerate(values) if v and v.strip()]
        return [values[pos] for pos in keep], [which[pos] for pos in keep]

    def records(self, start: int, end: int) -> tuple[list[dict[str, Any]], list[int]]:
        """Rows [start, end) as dicts (chats), and each row's source."""
        out: list = [None] * (end - start)
        which = [0] * (end - start)
        for i, rows, at in self._pieces(start, end):
            ds = self.datasets[i]
            part = ds.select(range(int(rows[0]), int(rows[-1]) + 1)) if _contiguous(rows) else ds.select(rows)
            for pos, row in zip(at.tolist(), part):
                out[pos] = row
                which[pos] = i
        return out, which

    def sample_texts(self, cap_bytes: int) -> list[str]:
        """The first texts of the corpus, in its order, up to `cap_bytes` (the tokenizer's sample)."""
        out, total = [], 0
        for start in range(0, len(self), 10_000):
            texts, _ = self.texts(start, min(len(self), start + 10_000))
            for t in texts:
                if t:
                    out.append(t)
                    total += len(t.encode())
                    if total >= cap_bytes:
                        return out
        return out

    def where(self, position: int, which: int) -> str:
        """A row's name in a message: its position in the corpus, and its source and row there."""
        if self.order is None:
            return f"{self.var} row {position}"
        return f"{self.var} row {position} ({self.sources[which].path} row {int(self.order[1][position])})"


def load_rows(spec: str, var: str, split: str, token: str | None = None):
    """Load a dataset the same way whether `spec` is a Hub id, a local directory or a file."""
    import datasets

    p = Path(spec).expanduser()
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
    try:
        if p.is_file():
            builder = builders.get(p.suffix.lower())
            if builder is None:
                raise BadInput([f"{var}={spec!r}: unsupported file type {p.suffix!r}. Fix: use .jsonl, .json, .parquet, .csv or .txt."])
            if p.stat().st_size == 0:
                raise BadInput([f"{var}={spec!r}: the file is empty. Fix: point {var} at a file with rows."])
            kw = {"sample_by": "paragraph"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=str(p), split="train", **kw)
        elif p.is_dir():
            ds = datasets.load_dataset(str(p), split=split)
        elif spec.startswith(("/", "./", "../", "~")) or spec.endswith(tuple(builders)):
            raise BadInput([f"{var}={spec!r}: no such file or directory. Fix: check the path (relative paths start in the project directory)."])
        else:
            ds = datasets.load_dataset(spec, split=split, token=token)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable input; all are bad input here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput([f"{var}={spec!r}: cannot be read as a dataset ({type(e).__name__}: {first[:300]}). "
                        f"Fix: a Hub dataset id, a directory of data files, or a valid .jsonl/.parquet/.txt file."]) from None
    if len(ds) == 0:
        raise BadInput([f"{var}={spec!r}: the dataset has no rows. Fix: point {var} at data with rows."])
    return ds


def _contiguous(rows) -> bool:
    return len(rows) > 0 and int(rows[-1]) - int(rows[0]) + 1 == len(rows)
