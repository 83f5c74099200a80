"""The input side of every command: paths, folders, globs and URLs to images, and the stderr Report
of what failed, how far a run is (a tqdm bar), and how it ended."""

from __future__ import annotations

import fnmatch
import io
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image
from tqdm import tqdm

from ...processing.image import IMAGE_EXTS, ImageLoadError, _open, load_image

PROGRESS_MIN = 6  # show progress from this many images on


def is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def canonical(src: str) -> str:
    """The key that says two sources are the same: a URL as given, a file's resolved absolute path."""
    return src if is_url(src) else os.path.realpath(src)


def expand_inputs(args: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files, folders (recursive, image extensions only), globs and URLs -> (sources, errors).
    Each real file comes once, under the first name that reached it (a file given twice, as `x.png`
    and `/abs/x.png`, a hard link, a symlinked folder: once)."""
    out, errors = [], []
    for a in args:
        if is_url(a):
            out.append(a)
        elif os.path.isdir(a):
            found = sorted(p for p in _glob(os.path.join(a, "**", "*"))
                           if Path(p).suffix.lower() in IMAGE_EXTS)
            if not found:
                errors.append((a, "folder holds no image files"))
            out.extend(found)
        elif os.path.exists(a):
            out.append(a)
        elif any(c in a for c in "*?["):
            found = sorted(_glob(a))
            if not found:
                errors.append((a, "pattern matches no files"))
            out.extend(found)
        else:
            errors.append((a, "no such file or directory"))
    seen: set = set()
    unique = []
    for s in out:
        k = _identity(s)
        if k not in seen:
            seen.add(k)
            unique.append(s)
    return unique, errors


def _identity(src: str) -> Any:
    if is_url(src):
        return src
    try:
        st = os.stat(src)
        return st.st_dev, st.st_ino
    except OSError:
        return canonical(src)


def _glob(pattern: str) -> list[str]:
    """The files `pattern` matches, as glob.glob(pattern, recursive=True) finds them, except that a
    `**` enters each real folder once: glob follows a symlink loop (loop/self -> .) 40 levels deep,
    and two such links make that 2**40 paths."""
    parts = pattern.split(os.sep)
    base = os.sep if pattern.startswith(os.sep) else ""
    return list(dict.fromkeys(_match(base, [p for p in parts if p], set())))


def _match(base: str, parts: list[str], seen: set) -> Iterator[str]:
    if not parts:
        if os.path.isfile(base):
            yield base
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        try:
            st = os.stat(base or ".")
        except OSError:
            return
        if (len(parts), st.st_dev, st.st_ino) in seen:  # this folder, reached again through a link
            return
        seen.add((len(parts), st.st_dev, st.st_ino))
        yield from _match(base, rest, seen)  # `**` as no folder at all
        for name in _names(base, "*"):
            p = os.path.join(base, name)
            if os.path.isdir(p):
                yield from _match(p, parts, seen)
            elif not rest:  # a last `**` matches the files too
                yield p
    elif any(c in head for c in "*?["):
        for name in _names(base, head):
            yield from _match(os.path.join(base, name), rest, seen)
    else:
        yield from _match(os.path.join(base, head), rest, seen)


def _names(folder: str, pattern: str) -> list[str]:
    """The entries of `folder` that match `pattern`; hidden ones only when the pattern starts with '.'."""
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return []
    return sorted(n for n in fnmatch.filter(names, pattern) if pattern.startswith(".") or not n.startswith("."))


def open_image(src: str, timeout: float = 20.0) -> Image.Image:
    """A PIL RGB image from a path or URL; raises ImageLoadError naming `src`."""
    if not is_url(src):
        return load_image(src)
    # Downloaded here rather than by load_image: some hosts refuse urllib's default User-Agent.
    try:
        req = urllib.request.Request(src, headers={"User-Agent": "blip2-cli"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
    except Exception as e:
        raise ImageLoadError(f"cannot download image {src}: {e}") from e
    return _open(io.BytesIO(data), src)


class Report:
    """Failed inputs, progress and the closing summary, all on stderr.

    The bar shows from PROGRESS_MIN images on, also when stderr is a log file rather than a
    terminal. Use it as a context manager: an error then finds the bar closed, and its message
    starts on a line of its own.
    """

    def __init__(self, total: int = 0, failed: Iterable[tuple[str, str]] = ()):
        """`total` images to come; `failed`: (input, why) pairs already known, reported first."""
        self.failed: list[tuple[str, str]] = []
        for src, why in failed:
            self.fail(src, why)
        self.bar = tqdm(total=total, unit="images", file=sys.stderr, disable=total < PROGRESS_MIN,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]")

    def __enter__(self) -> Report:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def fail(self, src: str, why: str) -> None:
        self.failed.append((src, why))
        why = why if src in why else f"{src}: {why}"
        tqdm.write(f"blip2: skipped {why}", file=sys.stderr)  # above the bar, which is redrawn below

    def step(self, k: int = 1) -> None:
        self.bar.update(k)
        if self.bar.n >= self.bar.total:
            self.bar.close()  # done: what stderr says next starts on its own line

    def finish(self, n_inputs: int) -> int:
        """The exit status: 1 when any input failed, after a one-line summary of which."""
        self.bar.close()
        if not self.failed:
            return 0
        print(f"blip2: {len(self.failed)} of {n_inputs} input(s) failed: "
              + ", ".join(s for s, _ in self.failed[:5]) + (" ..." if len(self.failed) > 5 else ""),
              file=sys.stderr, flush=True)
        return 1


def load_images(srcs: list[str], report: Report) -> list[tuple[str, Any]]:
    """(source, image) for each source that opens; the others are reported and skipped."""
    ok = []
    for s in srcs:
        try:
            ok.append((s, open_image(s)))
        except (ImageLoadError, OSError) as e:
            report.fail(s, str(e))
    return ok


def batches(xs: list, n: int) -> Iterable[list]:
    for i in range(0, len(xs), max(n, 1)):
        yield xs[i:i + max(n, 1)]
