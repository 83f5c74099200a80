"""What a dataset job reads: image files (folders, globs), tables (Parquet, JSONL) with a path or URL
column, and WebDataset tar shards as img2dataset writes them. Each becomes a list of plain row dicts
with a stable id; `load_source` opens one row's image wherever it lives.

Row fields: id (str, unique), source (path, URL or `SHARD.tar::MEMBER`), offset / size (the
member's bytes inside a tar, -1 elsewhere), caption (the input's own text, or None), questions
(for `ask`: the row's own question(s)), error (a row that is already bad, e.g. a JSONL line that is
not JSON: it is carried through and written with this error)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from ...processing.image import IMAGE_EXTS, _open
from ..cli.inputs import expand_inputs, open_image

TABLE_EXTS = (".parquet", ".jsonl", ".ndjson")
PATH_COLUMNS = ("path", "image_path", "filepath", "file", "url", "image_url", "URL", "image")
ID_COLUMNS = ("id", "key")
CAPTION_COLUMNS = ("caption", "text", "TEXT")
QUESTION_COLUMNS = ("question", "questions")
TAR_SEP = "::"


class InputError(ValueError):
    """An input that cannot be read as a whole (an unreadable table, no path column, ids that repeat)."""


def row(id: str, source: str, *, offset: int = -1, size: int = -1, caption: str | None = None,
        questions: list[str] | None = None, error: str = "") -> dict[str, Any]:
    return {"id": id, "source": source, "offset": offset, "size": size, "caption": caption,
            "questions": list(questions or []), "error": error}


def read_inputs(args: list[str], path_column: str | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """(rows, (input, why) for inputs that gave nothing). Folders that hold .tar files and no images
    are WebDataset shard folders; .parquet / .jsonl files are tables; everything else goes through
    the CLI's expansion of files, folders, globs and URLs. Raises InputError on repeated ids."""
    rows: list[dict] = []
    bad: list[tuple[str, str]] = []
    for a in args:
        if os.path.isdir(a) and not _has_images(a):
            shards = sorted(str(p) for p in Path(a).rglob("*.tar"))
            if shards:
                for s in shards:
                    rows += read_shard(s)
                continue
        srcs, errs = expand_inputs([a])
        bad += errs
        for s in srcs:
            low = s.lower()
            if low.endswith(".tar"):
                rows += read_shard(s)
            elif low.endswith(TABLE_EXTS):
                rows += read_table(s, path_column)
            else:
                rows.append(row(s, s))
    seen: set[str] = set()
    for r in rows:
        if r["id"] in seen:
            raise InputError(f"row id {r['id']!r} appears twice in the inputs; ids must be unique "
                             "(give each input once, or give the table unique ids)")
        seen.add(r["id"])
    return rows, bad


def _has_images(folder: str) -> bool:
    return any(Path(f).suffix.lower() in IMAGE_EXTS for _, _, fs in os.walk(folder) for f in fs)


def _pick(columns: list[str], wanted: tuple[str, ...], given: str | None = None) -> str | None:
    if given is not None:
        return given if given in columns else None
    return next((c for c in wanted if c in columns), None)


def read_table(path: str, path_column: str | None = None) -> list[dict]:
    """Rows of a Parquet or JSONL table. The image is in the path column (`path_column`, else the first
    of PATH_COLUMNS); relative paths are taken from the table's folder. An `id` / `key` column gives
    the ids (else `TABLE:ROW`), `caption` / `text` the caption, `question(s)` the questions. A JSONL
    line that is not a JSON object becomes an error row."""
    base = os.path.dirname(os.path.abspath(path))
    if path.lower().endswith(".parquet"):
        try:
            import pyarrow.parquet as pq

            records: list[Any] = pq.read_table(path).to_pylist()
        except Exception as e:
            raise InputError(f"cannot read the Parquet table {path}: {' '.join(str(e).split())}") from e
    else:
        records = []
        try:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except ValueError as e:
                            records.append(f"line {len(records) + 1} is not JSON ({e})")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the JSONL table {path}: {e}") from e
    columns = sorted({k for r in records if isinstance(r, dict) for k in r})
    col = _pick(columns, PATH_COLUMNS, path_column)
    if records and col is None:
        want = repr(path_column) if path_column else "one of " + ", ".join(PATH_COLUMNS)
        raise InputError(f"{path}: no image column ({want}); its columns are {', '.join(columns) or 'none'}"
                         " (choose one with --path-column)")
    id_col, cap_col = _pick(columns, ID_COLUMNS), _pick(columns, CAPTION_COLUMNS)
    q_col = _pick(columns, QUESTION_COLUMNS)
    stem = Path(path).name
    out = []
    for n, r in enumerate(records):
        if not isinstance(r, dict):
            why = r if isinstance(r, str) else f"row {n + 1} is not an object"
            out.append(row(f"{stem}:{n}", f"{path}:{n + 1}", error=why))
            continue
        rid = str(r[id_col]) if id_col and r.get(id_col) is not None else f"{stem}:{n}"
        src = r.get(col)
        if not isinstance(src, str) or not src:
            out.append(row(rid, f"{path}:{n + 1}", error=f"row {n + 1} has no {col!r}"))
            continue
        if not src.startswith(("http://", "https://")) and not os.path.isabs(src):
            src = os.path.join(base, src)
        qs = r.get(q_col) if q_col else None
        qs = [qs] if isinstance(qs, str) else [str(q) for q in (qs or [])]
        cap = r.get(cap_col) if cap_col else None
        out.append(row(rid, src, caption=None if cap is None else str(cap), questions=qs))
    return out


def read_shard(path: str) -> list[dict]:
    """Rows of a WebDataset tar shard: members are grouped by key (the name up to its first dot); a key
    with an image member is a row, its .txt is the caption, its .json may hold a "key" (the id, as
    img2dataset writes it; else the member key). The image is read later from its byte offset."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if m.isfile():
                    d, name = os.path.split(m.name)
                    key, _, ext = name.partition(".")
                    groups.setdefault(f"{d}/{key}" if d else key, {})["." + ext.lower()] = m
            out = []
            for key, members in groups.items():
                img = next((m for ext, m in members.items() if ext in IMAGE_EXTS), None)
                if img is None:
                    continue
                cap = _member_text(tf, members.get(".txt"))
                meta = _member_text(tf, members.get(".json"))
                rid = key
                if meta:
                    try:
                        rid = str(json.loads(meta).get("key") or key)
                    except (ValueError, AttributeError):
                        pass
                out.append(row(rid, f"{path}{TAR_SEP}{img.name}", offset=img.offset_data, size=img.size, caption=cap))
    except (OSError, tarfile.TarError) as e:
        raise InputError(f"cannot read the WebDataset shard {path}: {e}") from e
    return out


def _member_text(tf: tarfile.TarFile, m: tarfile.TarInfo | None) -> str | None:
    if m is None:
        return None
    fh = tf.extractfile(m)
    return fh.read().decode("utf-8", "replace").strip() if fh else None


def load_source(source: str, offset: int = -1, size: int = -1):
    """The RGB PIL image of one row: a tar member read from its offset, else a path or URL (the
    CLI's loader: pixel budget, EXIF, 16-bit gray). Raises ImageLoadError or OSError."""
    if offset < 0:
        return open_image(source)
    shard = source.split(TAR_SEP, 1)[0]
    with open(shard, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"{source}: the shard ends inside this member (truncated tar)")
    return _open(io.BytesIO(data), source)
