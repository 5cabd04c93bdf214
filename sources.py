"""The datasets a stage reads: one source or several with weights, in one deterministic order of rows.

INPUT_DATASET and INSTRUCT_DATASET each name one source (a Hub dataset id, a local directory or a
file) or several with weights, `data/web.jsonl:0.7,data/code.jsonl:0.3`; in CONFIG_FILE also a list
of {path, weight, text_column, split}. Several sources are interleaved by
`datasets.interleave_datasets` (the weights as probabilities, SEED as its seed), which stops when a
source runs out, so the mix holds from the first row to the last. The interleaving is drawn over the
sources' row numbers, not their rows: sources with different columns mix, and shard k reads only its
own rows from each source. Same sources, weights and SEED: the same rows in every shard, on every
machine. One source is read in its own order, as it always was.

A source made of Parquet files (a Hub dataset, a local directory) is read where its rows are: the
row count from the files' footers, shard k from the row groups that hold it (ParquetRows); any other
is loaded whole by `datasets` (DatasetRows).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from errors import BadInput

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


def _is_path(text: str) -> bool:
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):  # a name too long to be a path (a JSON list), or one with a NUL
        return False


def parse_sources(value: str, var: str) -> list[Source]:
    """The sources in `value`: `spec`, `spec:w,spec:w,...`, or a JSON list of {path, weight,
    text_column, split} (how CONFIG_FILE passes a list). Bad input names the variable and the fix."""
    text = value.strip()
    if _is_path(text):  # a path that holds a ',' or ends in ':<number>' is still one path
        return [Source(text)]
    if text.startswith("{"):  # one mapping where a list was meant (CONFIG_FILE)
        text = f"[{text}]"
    fix = (f"Fix: {var}=path or {var}=path_a:0.7,path_b:0.3 (weights > 0), or in CONFIG_FILE a list of "
           "{path, weight, text_column, split}.")
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput([f"{var}: the list of datasets does not parse ({e.msg}). {fix}"]) from None
        sources = []
        for i, item in enumerate(items):
            if isinstance(item, str):  # a plain entry takes a weight as on the command line: path:0.7
                path, sep, w = item.strip().rpartition(":")
                item = {"path": path, "weight": w} if sep and path and _weight(w) is not None else {"path": item}
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
    """The rows of one stage: its sources opened (open_rows: Parquet files read where their rows are,
    anything else loaded whole) and, with several, the interleaved order of (source, row) pairs
    (12 bytes per row of the mix)."""

    def __init__(self, sources: list[Source], var: str, text_column: str, split: str, token: str | None, seed: int):
        self.sources, self.var, self.text_column = sources, var, text_column
        self.datasets = [open_rows(src.path, self._name(i), src.split or split, token) for i, src in enumerate(sources)]
        self.order = None if len(sources) == 1 else self._interleave(seed)

    def _name(self, i: int) -> str:
        """Source i in a message: the variable, and with several sources which one."""
        return self.var if len(self.sources) == 1 else f"{self.var} ({self.sources[i].path})"

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

    def _gather(self, start: int, end: int, read) -> tuple[list, list[int]]:
        """`read(i, rows)` (source i's values of its `rows`) placed at their positions in [start, end),
        and each position's source."""
        out: list = [None] * (end - start)
        which = [0] * (end - start)
        for i, rows, at in self._pieces(start, end):
            for pos, v in zip(at.tolist(), read(i, rows)):
                out[pos] = v
                which[pos] = i
        return out, which

    def column(self, start: int, end: int) -> tuple[list, list[int]]:
        """The text column of rows [start, end) (each source's own column), and each row's source."""
        def read(i: int, rows) -> list:
            ds, column = self.datasets[i], self.sources[i].text_column or self.text_column
            if column not in ds.column_names:
                raise BadInput([f"{self._name(i)}: no column {column!r} (columns: {', '.join(ds.column_names)}). "
                                "Fix: set TEXT_COLUMN (or the source's text_column) to the column holding the text."])
            return ds.read(rows, [column])[column]

        return self._gather(start, end, read)

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
        def read(i: int, rows) -> list[dict[str, Any]]:
            cols = self.datasets[i].read(rows, None)
            return [dict(zip(cols, values)) for values in zip(*cols.values())]

        return self._gather(start, end, read)

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


class DatasetRows:
    """A source loaded whole by `datasets` (files, a directory of non-Parquet files, a Hub dataset
    without Parquet files)."""

    def __init__(self, ds) -> None:
        self.ds = ds
        self.column_names = ds.column_names

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, rows, columns: list[str] | None) -> dict[str, list]:
        """Columns of `rows` (increasing row numbers), as lists."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        assert rows.size and bool((rows[1:] > rows[:-1]).all()), "rows are read in increasing order"
        ds = self.ds if columns is None else self.ds.select_columns(columns)
        return ds[int(rows[0]):int(rows[-1]) + 1] if _contiguous(rows) else ds.select(rows)[:]


class ParquetRows:
    """A source made of Parquet files (a Hub dataset, or a local directory), read where its rows are:
    the files' footers give every row group's row count, so the number of rows is known before any
    data is read, and a shard reads only the row groups that hold its rows (on the Hub: byte ranges
    of the files, through HfFileSystem). The files are the ones `datasets` resolves for the split, in
    its order, so the rows are those `load_dataset` would give, in the same order."""

    TAIL = 2**12  # bytes of a Hub file's end read first: its footer, whole for a few columns and row groups

    def __init__(self, files: list[str], token: str | None) -> None:
        import numpy as np

        self.files, self.token, self._open, self._meta, self._tail = files, token, {}, {}, self.TAIL
        self._last = None  # ((row group, columns), its table): the row group read last
        self.fs = None
        if any(f.startswith("hf://") for f in files):
            from huggingface_hub import HfFileSystem

            self.fs = HfFileSystem(token=token)
        if self.fs is not None:
            # every file's size from one listing per folder, then the footers fetched 8 at a time:
            # opening a dataset of many files costs a few round trips, not two per file in a row
            from concurrent.futures import ThreadPoolExecutor

            self._sizes = {}
            for parent in sorted({f.rsplit("/", 1)[0] for f in files}):
                for entry in self.fs.ls(parent, detail=True):
                    self._sizes[entry["name"]] = entry["size"]
            self._metadata(0)  # the first alone: it sizes the read of the others
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(self._metadata, range(1, len(files))))
        counts, self.groups = [], []
        for f, path in enumerate(files):
            meta = self._metadata(f)
            for g in range(meta.num_row_groups):
                counts.append(meta.row_group(g).num_rows)
                self.groups.append((f, g))
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.column_names = self._metadata(0).schema.to_arrow_schema().names if files else []

    def _metadata(self, f: int):
        """The file's footer. On the Hub: its last bytes in one ranged read (pyarrow would read 64 KiB
        of every file's end, more than a small shard's own rows)."""
        import io

        import pyarrow.parquet as pq

        if f not in self._meta:
            path = self.files[f]
            if not path.startswith("hf://"):
                self._meta[f] = pq.read_metadata(path)
            else:
                size = self._sizes.get(path.replace("hf://", "", 1)) or self.fs.size(path)
                tail = self.fs.cat_file(path, start=max(0, size - self._tail))
                n = int.from_bytes(tail[-8:-4], "little") + 8
                if n > len(tail):
                    tail = self.fs.cat_file(path, start=size - n)
                self._tail = max(self._tail, n + n // 4)  # a dataset's files are alike: the next footer in one read
                self._meta[f] = pq.read_metadata(io.BytesIO(b"PAR1" + tail[-n:]))
        return self._meta[f]

    def _file(self, f: int):
        import pyarrow.parquet as pq

        if f not in self._open:
            path = self.files[f]
            if path.startswith("hf://"):
                # no read-ahead: each column chunk of a row group is one ranged read of exactly its bytes
                handle = self.fs.open(path, "rb", cache_type="none")
                self._open[f] = pq.ParquetFile(handle, metadata=self._metadata(f))
            else:
                self._open[f] = pq.ParquetFile(path, metadata=self._metadata(f))
        return self._open[f]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, rows, columns: list[str] | None) -> dict[str, list]:
        import numpy as np
        import pyarrow as pa

        rows = np.asarray(rows, dtype=np.int64)
        group_of = np.searchsorted(self.starts, rows, side="right") - 1
        assert rows.size and bool((rows[1:] > rows[:-1]).all()), "rows are read in increasing order"
        parts = []
        for g in np.unique(group_of):
            key = (int(g), tuple(columns) if columns else None)
            if self._last is None or self._last[0] != key:  # consecutive reads (the tokenizer's sample) share a group
                f, rg = self.groups[int(g)]
                self._last = (key, self._file(f).read_row_group(rg, columns=columns))
            parts.append(self._last[1].take(pa.array(rows[group_of == g] - self.starts[g])))
        # files written apart may differ in small ways (string vs large_string, a column all null in one)
        table = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
        return table.to_pydict()


def parquet_files(spec: str, split: str, token: str | None) -> list[str] | None:
    """The data files of `spec`'s split as `datasets` resolves them (a Hub dataset or a local
    directory), when every one is Parquet; None otherwise (and for a single file)."""
    import datasets

    p = Path(spec).expanduser()
    if p.is_file() or (not p.is_dir() and spec.startswith(("/", "./", "../", "~"))):
        return None
    try:
        builder = datasets.load_dataset_builder(str(p) if p.is_dir() else spec, token=token)
        files = (builder.config.data_files or {}).get(split)
    except Exception:  # noqa: BLE001 - anything unresolvable: load_rows reads it (or explains why not)
        return None
    files = [str(f) for f in files or []]
    return files if files and all(f.endswith(".parquet") for f in files) else None


def open_rows(spec: str, var: str, split: str, token: str | None = None):
    """A source's rows: read where they are when it is Parquet files (ParquetRows), else loaded whole."""
    files = parquet_files(spec, split, token)
    if files:
        try:
            rows = ParquetRows(files, token)
        except Exception as e:  # noqa: BLE001 - a damaged or unreadable file is bad input naming it
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInput([f"{var}={spec!r}: its Parquet files cannot be read ({type(e).__name__}: {first[:300]}). "
                            "Fix: check the dataset's files (each must be a complete Parquet file)."]) from None
        if len(rows) == 0:
            raise BadInput([f"{var}={spec!r}: the dataset has no rows. Fix: point {var} at data with rows."])
        return rows
    return DatasetRows(load_rows(spec, var, split, token))


def _contiguous(rows) -> bool:
    return len(rows) > 0 and int(rows[-1]) - int(rows[0]) + 1 == len(rows)


def shard_bounds(n_rows: int, shard: int, shard_size: int, var: str) -> tuple[int, int, int]:
    """(start, end, shards_total) of `shard`; an index past the end is bad input."""
    total = math.ceil(n_rows / shard_size)
    if shard >= total:
        raise BadInput([f"INIT={shard}: {var} has {n_rows} rows, so only {total} shard(s) of SHARD_SIZE={shard_size} "
                        f"(INIT 0..{total - 1}). Fix: a smaller INIT, or unset INIT to follow the record."])
    return shard * shard_size, min(n_rows, (shard + 1) * shard_size), total
