"""Where a command's records go: stdout as text, a JSON array (--json) or JSON lines (--jsonl), and
--output FILE, which a re-run resumes.

Nothing already written may be lost or duplicated, whatever happens to the run:
- the output is opened, locked and read before the model loads: a file that cannot be written, or
  that another run is writing, stops the command before any work (exit 2);
- JSONL is appended a record at a time (one write each, fsynced at the end); a run cut off inside a
  record leaves a torn last line, which the next run drops with a warning, keeping every whole one;
- a .json array is rewritten whole at the end (also when the run is interrupted) into a temporary
  file beside it and renamed over it, so the old file stays intact until the new one is complete;
- resume keys are canonical (a file's resolved path; a URL as given), so `x.png` and `/abs/x.png`
  are the same image.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from .common import UsageError
from .inputs import canonical


def dumps(obj: Any, **kw: Any) -> str:
    """JSON text that encodes to UTF-8. A file name that is not valid UTF-8 reaches us with surrogate
    escapes (os.fsdecode); such a record is written with ASCII escapes, which read back to the same
    name, so the output stays valid and resume still recognises the file."""
    s = json.dumps(obj, ensure_ascii=False, **kw)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, **kw)


def write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Call write(binary file) on a temporary file in path's folder, fsync it, and rename it over
    `path`: a reader (or a crash) sees the old file or the new one, never a part of either."""
    path = Path(os.path.realpath(path))  # replace the file a symlink points to, not the link
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def writable(path: Path, replace: bool = True) -> None:
    """Fail now (UsageError) if `path` cannot become an output file: a folder, a device or pipe, a
    parent that cannot be created, or (`replace`: the file is written beside and renamed) a folder
    we cannot write. Missing parents are created."""
    if path.is_dir():
        raise UsageError(f"--output {path} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise UsageError(f"--output {path} is not a regular file; give a file name, or print the records "
                         "with --json / --jsonl")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"cannot write --output {path}: {path.parent} is a file, not a folder") from None
    except OSError as e:
        raise UsageError(f"cannot write --output {path}: cannot create its folder ({e.strerror or e})") from None
    if replace:  # try it: permissions alone do not tell (root, read-only mounts)
        try:
            with tempfile.TemporaryFile(dir=path.parent):
                pass
        except OSError as e:
            raise UsageError(f"cannot write --output {path}: cannot create files in {path.parent} "
                             f"({e.strerror or e})") from None


def lock(path: Path, name: Path, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    """An fd of `path` (created if needed) holding an exclusive lock, or a UsageError at once when
    another run holds it. `name` is the output the message names."""
    while True:
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise UsageError(f"cannot write --output {name}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"--output {name} is being written by another blip2 run; wait for it to "
                             "finish, or pass another --output") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file between our open and lock: lock the new one


class Sink:
    """Records to stdout (text / --json / --jsonl) and to --output FILE (.json array, else JSONL).

    `fields` name what, besides the path, tells records apart (ask: the question); `has` is true
    for what FILE already holds, which a re-run skips. `text` is a record's line on stdout when
    neither --json nor --jsonl nor --output is given (None: the command prints its own). Use it as
    a context manager: on the way out, also through an error or Ctrl-C, the .json array is written
    and the lock released.
    """

    def __init__(self, args: argparse.Namespace, fields: tuple[str, ...], text: Callable[[dict], str] | None):
        self.fmt = "json" if args.json else "jsonl" if args.jsonl else "text"
        self.fields, self.text = fields, text
        self.records: list[dict] = []
        self.path = Path(args.output) if getattr(args, "output", None) else None
        self.done: set = set()
        self.old: list[dict] = []
        self.fd: int | None = None  # the JSONL file (locked), or the lock file beside a .json
        if self.path is None:
            return
        self.file_json = self.path.suffix.lower() == ".json"
        writable(self.path, replace=self.file_json)
        if self.file_json:
            self.lock_path = Path(os.path.realpath(self.path) + ".lock")  # beside the file a link names
            self.fd = lock(self.lock_path, self.path)
        else:
            self.created = not os.path.lexists(self.path)
            self.fd = lock(self.path, self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        try:
            self.old = self._parse_json(self._read(self.path)) if self.file_json else self._parse_jsonl()
        except BaseException:
            self._save()  # nothing new to save: this releases the lock
            raise
        self.done = {self.key(r) for r in self.old}

    def key(self, rec: dict) -> tuple:
        return (canonical(rec["path"]), *(rec.get(f) for f in self.fields))

    def has(self, path: str, *values: Any) -> bool:
        return (canonical(path), *values) in self.done

    def _read(self, p: Path) -> bytes:
        try:
            return p.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as e:
            raise UsageError(f"cannot read --output {p} to resume: {e.strerror or e}") from None

    def _refuse(self, why: str) -> UsageError:
        return UsageError(f"cannot resume from {self.path}: {why}, so it is not a "
                          f"{'JSON' if self.file_json else 'JSONL'} file of blip2 records; pass another --output")

    def _check(self, recs: list) -> list[dict]:
        for r in recs:
            if not (isinstance(r, dict) and isinstance(r.get("path"), str)):
                raise self._refuse(f"{dumps(r)[:60]} is not a record with a path")
        return recs

    def _parse_json(self, raw: bytes) -> list[dict]:
        if not raw.strip():
            return []
        try:
            recs = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._refuse(str(e)) from None
        if not isinstance(recs, list):
            raise self._refuse(f"it holds {dumps(recs)[:60]}, not an array of records")
        return self._check(recs)

    def _parse_jsonl(self) -> list[dict]:
        """The records of the (locked) JSONL file, after repairing its end: a torn last line is cut
        off with a warning, and a whole last record that lacks its newline gets one."""
        raw = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        lines = raw.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        recs = []
        for i, line in enumerate(lines, 1):
            if line.strip():
                try:
                    recs.append(json.loads(line.decode("utf-8")))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise self._refuse(f"line {i}: {e}") from None
        self._check(recs)
        if tail.strip():
            try:
                last = json.loads(tail.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                if not tail.lstrip().startswith(b"{"):  # not the start of a record: someone else's file
                    raise self._refuse(f"line {len(lines) + 1}: {e}") from None
                os.ftruncate(self.fd, len(raw) - len(tail))
                print(f"blip2: warning: {self.path}: dropped its last line, {len(tail)} bytes of a record cut "
                      f"off by an earlier run; kept the {len(recs)} whole record(s) before it", file=sys.stderr)
            else:
                recs += self._check([last])
                os.write(self.fd, b"\n")  # a whole record without its newline: the next one starts a line
        return recs

    def add(self, rec: dict) -> None:
        self.records.append(rec)
        self.done.add(self.key(rec))
        if self.fd is not None and not self.file_json:
            data = (dumps(rec) + "\n").encode("utf-8")
            while data:  # one write per record: a cut leaves at most a torn last line
                data = data[os.write(self.fd, data):]
        if self.fmt == "jsonl":
            print(dumps(rec), flush=True)
        elif self.fmt == "text" and self.path is None and self.text is not None:
            print(self.text(rec), flush=True)

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._save()
        if self.fmt == "json" and (exc_type is None or exc_type is KeyboardInterrupt):
            print(dumps(self.records, indent=2), flush=True)  # after Ctrl-C: the records done so far

    def _save(self) -> None:
        """Make FILE hold every record (fsynced, atomically for .json) and release the lock."""
        if self.fd is None:
            return
        try:
            if not self.file_json and self.created and os.fstat(self.fd).st_size == 0:
                os.unlink(self.path)  # made by this run, which failed before its first record: leave no file
            elif not self.file_json:
                os.fsync(self.fd)
            elif self.records:
                text = dumps(self.old + self.records, indent=2) + "\n"
                try:
                    write_atomic(self.path, lambda fh: fh.write(text.encode("utf-8")))
                except OSError as e:  # e.g. the disk filled up during the run: the records go to stdout
                    print(dumps(self.records, indent=2), flush=True)
                    raise UsageError(f"cannot write --output {self.path} ({e.strerror or e}); it is unchanged, "
                                     f"and this run's {len(self.records)} record(s) went to stdout") from None
        finally:
            if self.file_json:  # removed while still locked: a run that opened it retries on a new one
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.lock_path)
            os.close(self.fd)
            self.fd = None
