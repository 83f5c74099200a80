"""Training data: image + caption or image + question/answer examples, read from a JSONL file or
a folder of images with .txt captions. Bad lines raise DataError naming the line, or are skipped
and counted (skip_bad=True)."""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..processing.image import IMAGE_EXTS, ImageLoadError, load_image


class DataError(ValueError):
    """A data file is malformed or points at an image that cannot be read; the message names the line."""


@dataclass
class Example:
    image: Path
    text: str | None = None  # a caption
    question: str | None = None
    answer: str | None = None
    where: str = ""  # "file:line" for error messages

    @property
    def is_qa(self) -> bool:
        return self.question is not None


class Dataset(list):
    """A list of Examples plus what was skipped while reading (skip_bad=True)."""

    def __init__(self, items=(), skipped: list[str] | None = None):
        super().__init__(items)
        self.skipped_lines: list[str] = list(skipped or [])  # "file:line: reason"

    @property
    def skipped(self) -> int:
        return len(self.skipped_lines)


def _check_image(path: Path) -> None:
    load_image(path)  # a full decode: truncated files fail here, not mid-run


def read_jsonl(path: str | os.PathLike, skip_bad: bool = False, check_images: bool = True) -> Dataset:
    """Read `{"image": path, "text": caption}` or `{"image", "question", "answer"}` lines.

    Image paths are relative to the JSONL's folder (absolute ones are kept). A malformed line
    raises DataError naming it; so does a missing or unreadable image unless skip_bad, which
    skips the line and counts it (`Dataset.skipped`, `Dataset.skipped_lines`).
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        return _read_lines(path, list(enumerate(f, 1)), skip_bad, check_images)


def _read_lines(path: Path, lines: list[tuple[int, str]], skip_bad: bool, check_images: bool) -> Dataset:
    """(line number, JSON text) pairs of `path` as Examples; image paths relative to path's folder."""
    root = path.parent
    out, skipped = [], []
    for n, line in lines:
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
            raise DataError(f"{where}: each line needs an \"image\" path (a string)")
        has_text = isinstance(rec.get("text"), str)
        has_qa = isinstance(rec.get("question"), str) and isinstance(rec.get("answer"), str)
        if not (has_text or has_qa):
            raise DataError(f"{where}: each line needs \"text\", or \"question\" and \"answer\" (strings)")
        img = root / rec["image"]
        if check_images:
            try:
                _check_image(img)
            except (ImageLoadError, OSError) as e:
                msg = f"{where}: cannot read image {img}: {e}"
                if not skip_bad:
                    raise DataError(msg + " (pass skip_bad=True to skip such lines)") from e
                skipped.append(msg)
                continue
        out.append(Example(img, rec.get("text") if has_text else None,
                           rec["question"] if has_qa else None, rec["answer"] if has_qa else None, where))
    if skipped:
        print(f"{path.name}: skipped {len(skipped)} line(s) with unreadable images", file=sys.stderr)
    return Dataset(out, skipped)


def read_folder(path: str | os.PathLike, skip_bad: bool = False, check_images: bool = True) -> Dataset:
    """Images in a folder, each captioned by the .txt file of the same stem (a.png + a.txt).

    An image without a caption file, or one that cannot be read, raises DataError naming it
    unless skip_bad (then it is skipped and counted).
    """
    d = Path(path)
    out, skipped = [], []
    for img in sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        txt = img.with_suffix(".txt")
        try:
            if not txt.is_file():
                raise DataError(f"{img}: no caption file {txt.name}")
            if check_images:
                try:
                    _check_image(img)
                except (ImageLoadError, OSError) as e:
                    raise DataError(f"{img}: cannot read image: {e}") from e
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        out.append(Example(img, txt.read_text(encoding="utf-8").strip(), where=str(img)))
    if skipped:
        print(f"read_folder: skipped {len(skipped)} image(s) of {d}", file=sys.stderr)
    return Dataset(out, skipped)


def read_csv(path: str | os.PathLike, skip_bad: bool = False, check_images: bool = True) -> Dataset:
    """A CSV file with a header row naming its columns: image and text, or image, question and
    answer (other columns are ignored); rows as read_jsonl reads lines."""
    path = Path(path)
    lines = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        if "image" not in cols or not ({"text"} <= cols or {"question", "answer"} <= cols):
            raise DataError(f"{path}:1: the header needs the columns image and text, or image, question and answer "
                            f"(it has {', '.join(sorted(cols)) or 'none'})")
        for row in reader:
            rec = {k: row[k] for k in ("image", "text", "question", "answer") if row.get(k)}
            lines.append(json.dumps(rec))  # the row as a JSONL line: one reader checks both formats
    return _read_lines(path, list(enumerate(lines, 2)), skip_bad, check_images)


def load_data(path: str | os.PathLike, skip_bad: bool = False) -> Dataset:
    """A folder of images + captions, a CSV file (by its .csv suffix), or a JSONL file."""
    p = Path(path)
    if p.is_dir():
        return read_folder(p, skip_bad)
    return read_csv(p, skip_bad) if p.suffix.lower() == ".csv" else read_jsonl(p, skip_bad)
