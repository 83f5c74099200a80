"""The `blip2` command against hostile inputs and accidents, on the shipped demo model: nothing
already written is lost, no record is duplicated, and every refusal is one line with the README's
exit status (1: an input failed, 2: the model, the output or the command line is unusable).

Most cases run `main()` in this process (fast); what needs a real process (signals, a second
concurrent writer, a closed pipe, the streams' encodings) runs `blip2` in a subprocess and is
marked slow."""

import collections
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blip2 import Blip2ForConditionalGeneration, scenes
from blip2.apps.cli import sink as sink_mod
from blip2.apps.cli.main import main
from blip2.apps.demo.shipped import demo_checkpoint
from subprocs import default_sigint

EXE = str(Path(sys.executable).with_name("blip2"))
FAST = ["--model", "demo", "--max-new-tokens", "3"]
LONG = "what color is the square " * 300  # 1500 tokens: far past the demo LM's 128 positions


def _draw(d: Path, n: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"img{i:02d}.png"
        scenes.render(scenes.make_scene(rng), size=64).save(p)
        out.append(p)
    return out


def cli(capsys, *args) -> tuple[int, str, str]:
    """`blip2 ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([EXE, *map(str, args)], capture_output=True, env=env, cwd=cwd, timeout=120)


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines()]


def _one_line_error(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if "images/s" not in x]
    assert len(lines) == 1 and lines[0].startswith("blip2: error: ") and "Traceback" not in err, err
    return lines[0]


def _once(recs: list[dict], paths) -> None:
    """Every image in `paths` has exactly one record (the same file: the same inode)."""
    c = collections.Counter(os.stat(r["path"]).st_ino for r in recs)
    assert c == collections.Counter(os.stat(p).st_ino for p in paths), [r["path"] for r in recs]


# --- options and devices: refused at parse time, before anything is read ------------------------

@pytest.mark.parametrize("opt", [
    ["--max-new-tokens", "0"], ["--max-new-tokens", "-5"], ["--max-new-tokens", "x"], ["--temperature", "0"],
    ["--temperature", "-1"], ["--temperature", "nan"], ["--top-p", "2"], ["--top-p", "0"], ["--batch-size", "0"],
    ["--num-beams", "0"], ["--num-captions", "0"],
])
def test_bad_numbers_are_usage_errors(capsys, tmp_path, opt):
    rc, out, err = cli(capsys, "caption", tmp_path / "x.png", *FAST, *opt)
    assert rc == 2 and f"argument {opt[0]}" in err and "Traceback" not in err


def test_device_and_template_errors(capsys, tmp_path):
    img = _draw(tmp_path, 1)[0]
    for dev in ("nonsense", "meta") + (() if torch.cuda.is_available() else ("cuda", "cuda:1")):
        rc, _, err = cli(capsys, "caption", img, *FAST, "--device", dev)
        assert rc == 2 and dev in _one_line_error(err)
    for t in ("Q: {} {x} A:", "Q: A:", "Q: {} {} A:", "Q: {} } A:"):
        rc, _, err = cli(capsys, "ask", img, "what?", *FAST, "--template", t)
        assert rc == 2 and repr(t) in _one_line_error(err)
    rc, out, err = cli(capsys, "ask", img, "what color is the square?", *FAST, "--template", "{{Q}}: {} A:")
    assert rc == 0 and out.startswith("Q: what color"), err


# --- outputs that cannot be written: refused before the model loads ------------------------------

def test_unwritable_output_fails_before_the_model_loads(capsys, tmp_path, monkeypatch):
    img = _draw(tmp_path / "in", 1)[0]
    loaded = []
    monkeypatch.setattr(Blip2ForConditionalGeneration, "from_pretrained", lambda *a, **k: loaded.append(a))
    (tmp_path / "afile").write_text("x")
    if os.geteuid() == 0:  # root writes anywhere on a normal disk; /proc refuses new files even to root
        ro = [Path("/proc/blip2-out.json"), Path("/proc/blip2-out.jsonl")]
    else:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        ro = [tmp_path / "ro" / "out.json", tmp_path / "ro" / "out.jsonl"]
    for out in [tmp_path / "in", tmp_path / "afile" / "out.jsonl", tmp_path / "afile" / "out.json", *ro]:
        rc, _, err = cli(capsys, "caption", img, *FAST, "-o", out)
        assert rc == 2 and str(out) in _one_line_error(err)
    (tmp_path / "dir.npy").mkdir()
    rc, _, err = cli(capsys, "embed", img, "--model", "demo", "-o", tmp_path / "dir.npy")
    assert rc == 2 and "folder" in _one_line_error(err)
    assert not loaded


def test_output_that_is_not_records_is_refused_untouched(capsys, tmp_path):
    img = _draw(tmp_path, 1)[0]
    for content in ("42", "[1,2]", '{"a":1}', "not json", "[1,2]\n", "42\n"):
        for name in ("out.json", "out.jsonl"):
            out = tmp_path / name
            out.write_text(content)
            rc, _, err = cli(capsys, "caption", img, *FAST, "-o", out)
            assert rc == 2 and str(out) in _one_line_error(err), (content, name)
            assert out.read_text() == content
            assert not list(tmp_path.glob("*.lock"))


# --- resume: canonical keys, torn and unterminated last lines, links and loops -------------------

def test_resume_repairs_the_end_of_a_jsonl(capsys, tmp_path):
    paths = _draw(tmp_path / "imgs", 3)
    out = tmp_path / "out.jsonl"
    rc, _, err = cli(capsys, "caption", *paths[:2], *FAST, "-o", out)
    assert rc == 0, err
    whole = out.read_bytes()
    out.write_bytes(whole[:-1])  # the last record lacks its newline
    rc, _, err = cli(capsys, "caption", *paths, *FAST, "-o", out)
    assert rc == 0 and "2 image(s) already in" in err
    _once(_jsonl(out), paths)

    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][:len(lines[2]) // 2])  # a torn third record
    rc, _, err = cli(capsys, "caption", *paths, *FAST, "-o", out)
    assert rc == 0 and "dropped its last line" in err and "kept the 2 whole record(s)" in err
    _once(_jsonl(out), paths)
    assert out.read_bytes().startswith(b"".join(lines[:2]))


def test_resume_keys_are_canonical_and_links_are_followed_once(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = _draw(tmp_path / "many", 2)
    (tmp_path / "many" / "self").symlink_to(".")  # a loop: glob alone finds each file 41 times
    (tmp_path / "many" / "again").symlink_to(".")  # and with a second one, 2**40 paths
    rc, _, err = cli(capsys, "caption", "many/**/*.png", "many", "many/img00.png", *FAST, "-o", "out.jsonl")
    assert rc == 0, err
    recs = _jsonl(tmp_path / "out.jsonl")
    assert [r["path"] for r in recs] == ["many/img00.png", "many/img01.png"]
    for spelling in (tmp_path / "many", f"{tmp_path}/many/img00.png", "./many/self/img01.png"):
        rc, _, err = cli(capsys, "caption", spelling, *FAST, "-o", "out.jsonl")
        assert rc == 0 and "already in" in err, err
    assert _jsonl(tmp_path / "out.jsonl") == recs


def test_non_utf8_file_names(capsys, tmp_path, monkeypatch):
    """A file name that is not UTF-8 costs no record, in .json and JSONL, and resume recognises it."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "many"
    paths = _draw(d, 3)
    odd = os.fsencode(d) + b"/b\xff.png"
    os.rename(paths[0], odd)
    paths[0] = Path(os.fsdecode(odd))
    old = [{"path": f"/elsewhere/{i}.png", "text": "kept"} for i in range(30)]
    Path("out.json").write_text(json.dumps(old))
    for out in ("out.json", "out.jsonl"):
        rc, _, err = cli(capsys, "caption", "many", *FAST, "-o", out)
        assert rc == 0, err
        recs = json.loads(Path(out).read_text(encoding="utf-8")) if out.endswith("n") else _jsonl(Path(out))
        if out == "out.json":
            assert recs[:30] == old
            recs = recs[30:]
        assert [os.fsencode(r["path"]) for r in recs] == [b"many/b\xff.png", b"many/img01.png", b"many/img02.png"]
        rc, _, err = cli(capsys, "caption", d, *FAST, "-o", out)  # the same files, spelled absolute
        assert rc == 0 and "3 image(s) already in" in err, err


# --- .json: written whole, or not at all ---------------------------------------------------------

def test_json_output_is_replaced_atomically(capsys, tmp_path, monkeypatch):
    paths = _draw(tmp_path / "imgs", 3)
    out = tmp_path / "out.json"
    old = [{"path": f"/elsewhere/{i}.png", "text": "kept"} for i in range(30)]
    out.write_text(json.dumps(old))
    before = out.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sink_mod.os, "fsync", disk_full)
    rc, out_, err = cli(capsys, "caption", *paths, *FAST, "-o", out)
    assert rc == 2 and "No space left" in _one_line_error(err) and "went to stdout" in err
    assert out.read_bytes() == before  # the old file, whole
    assert [r["path"] for r in json.loads(out_)] == [str(p) for p in paths]  # this run's records: not lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out.json"]  # no temp file, no lock
    monkeypatch.undo()

    # Ctrl-C after two images: the .json then holds the old records and those two; a re-run adds the rest once
    calls = []
    add = sink_mod.Sink.add

    def add_then_interrupt(self, rec):
        add(self, rec)
        calls.append(rec)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(sink_mod.Sink, "add", add_then_interrupt)
    rc, _, err = cli(capsys, "caption", *paths, *FAST, "-o", out, "--batch-size", 1)
    assert rc == 130
    assert json.loads(out.read_text())[:30] == old and len(json.loads(out.read_text())) == 32
    monkeypatch.undo()
    rc, _, err = cli(capsys, "caption", *paths, *FAST, "-o", out)
    assert rc == 0 and "2 image(s) already in" in err
    recs = json.loads(out.read_text())
    assert recs[:30] == old
    _once(recs[30:], paths)


def test_json_output_lock_refuses_a_second_writer(capsys, tmp_path):
    img = _draw(tmp_path, 1)[0]
    out = tmp_path / "out.json"
    with open(tmp_path / "out.json.lock", "w") as held:  # another run holds the .json
        fcntl.flock(held, fcntl.LOCK_EX)
        rc, _, err = cli(capsys, "caption", img, *FAST, "-o", out)
        assert rc == 2 and str(out) in _one_line_error(err) and "another blip2 run" in err
    assert not out.exists()


# --- one bad item costs no other item's result ---------------------------------------------------

def test_too_long_question_or_text_fails_alone(capsys, tmp_path):
    img = _draw(tmp_path, 1)[0]
    out = tmp_path / "ask.jsonl"
    qs = ["what color is the square?", LONG, "how many squares are there?"]
    rc, _, err = cli(capsys, "ask", img, *qs, *FAST, "-o", out)
    assert rc == 1 and "128 positions" in err and "--truncate" in err and "Traceback" not in err
    assert [r["question"] for r in _jsonl(out)] == [qs[0], qs[2]]
    rc, _, err = cli(capsys, "ask", img, *qs, *FAST, "-o", out, "--truncate")  # resume: only the long one
    assert rc == 0, err
    recs = _jsonl(out)
    assert [r["question"] for r in recs] == [qs[0], qs[2], qs[1]] and recs[2]["truncated"] is True

    rc, _, err = cli(capsys, "caption", img, *FAST, "--prompt", LONG)  # one prompt for all: a usage error
    assert rc == 2 and "--truncate" in _one_line_error(err)
    rc, out_, err = cli(capsys, "caption", img, *FAST, "--prompt", LONG, "--truncate")
    assert rc == 0 and "cut to" in err and out_.startswith(str(img))
    rc, _, err = cli(capsys, "caption", img, "--model", "demo", "--max-new-tokens", 1000)
    assert rc == 2 and "at most" in _one_line_error(err)

    match = ["match", img, "--text", "a red square", LONG, "--model", "demo", "--jsonl"]
    rc, out_, err = cli(capsys, *match)
    assert rc == 1 and "64 positions" in err
    assert [r["text"] for r in map(json.loads, out_.splitlines())] == ["a red square"]
    rc, out_, err = cli(capsys, *match, "--truncate")
    assert rc == 0 and len(out_.splitlines()) == 2
    rc, _, err = cli(capsys, "embed", img, "--text", "a red square", LONG, "--model", "demo", "-o", tmp_path / "e.npy")
    assert rc == 1 and json.loads((tmp_path / "e.text.json").read_text())["ids"] == ["a red square"]


# --- damaged checkpoints: one line naming the file ------------------------------------------------

def test_damaged_checkpoints_are_one_line(capsys, tmp_path):
    img = _draw(tmp_path, 1)[0]
    src = demo_checkpoint("retrieval")
    cfg = json.loads((src / "config.json").read_text())
    cfg["vision_config"]["hidden_size"] = -96
    cases = {  # file -> its damaged content, and whether `info` (config and headers only) reads it
        "config.json": (b"[1, 2]", True),
        "config.json ": (json.dumps(cfg).encode(), True),
        "model.safetensors": ((2 ** 60).to_bytes(8, "little") + b"{}", True),
        "model.safetensors ": (b"\x10\x00", True),
        "tokenizer.json": (b'{"garbage": ', False),
    }
    for i, (name, (data, info_reads)) in enumerate(cases.items()):
        name = name.strip()
        d = tmp_path / f"ckpt{i}"
        d.mkdir()
        for f in src.iterdir():
            (d / f.name).symlink_to(f)
        (d / name).unlink()
        (d / name).write_bytes(data)
        for cmd in (["info", d], ["embed", img, "--model", d, "-o", tmp_path / "e.npy"],
                    ["match", img, "--text", "a", "--model", d], ["caption", img, "--model", d, "-o", d / "c.jsonl"]):
            rc, _, err = cli(capsys, *cmd)
            assert not (d / "c.jsonl").exists()  # a run that wrote nothing leaves no empty output
            if cmd[0] == "info" and not info_reads:
                assert rc == 0, err
                continue
            line = _one_line_error(err)
            assert rc == 2 and str(d) in line, (name, cmd, line)
            assert name == "tokenizer.json" or str(d / name) in line, (name, cmd, line)


# --- in a real process: streams, signals, concurrent writers -------------------------------------

@pytest.mark.slow
def test_non_utf8_file_names_on_stdout(tmp_path):
    d = tmp_path / "many"
    img = _draw(d, 1)[0]
    os.rename(img, os.fsencode(d) + b"/b\xff.png")
    r = run("caption", "many", *FAST, "--jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.fsencode(json.loads(r.stdout.decode("utf-8"))["path"]) == b"many/b\xff.png"  # escaped in JSON
    r = run("caption", "many", *FAST, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(b"many/b\xff.png: "), r  # text: the name's bytes, as ls


@pytest.mark.slow
def test_sigint_then_resume_and_a_concurrent_writer(tmp_path):
    """A run over N images (--batch-size 1) is interrupted half-way; meanwhile a second run on the
    same JSONL refuses at once. The interrupted file holds only whole records, and a re-run adds
    each remaining image exactly once."""
    N = 60  # enough work that the first run is still going when the second starts (both import torch)
    paths = _draw(tmp_path / "imgs", N)
    out = tmp_path / "out.jsonl"
    # beam search makes the first run slow enough to be still running when the second one starts
    cmd = [EXE, "caption", tmp_path / "imgs", "--model", "demo", "--num-beams", 3, "--batch-size", 1, "-o", out]
    a = subprocess.Popen(list(map(str, cmd)), stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         preexec_fn=default_sigint)
    deadline = time.time() + 60
    while (not out.exists() or out.read_text().count("\n") < 2) and time.time() < deadline:
        time.sleep(0.05)
    b = run(*cmd[1:])
    assert b.returncode == 2 and str(out).encode() in b.stderr and b"another blip2 run" in b.stderr, b.stderr
    assert a.poll() is None, "the first run ended before the second tried the file: give it more work"
    a.send_signal(signal.SIGINT)
    err = a.communicate(timeout=60)[1].decode()
    assert a.returncode == 130 and "Traceback" not in err, err
    done = _jsonl(out)  # every line whole
    assert 2 <= len(done) < N
    r = run(*cmd[1:3], *FAST, "--batch-size", 12, "-o", out)  # the rest, quickly: options are not part of the key
    assert r.returncode == 0 and f"{len(done)} image(s) already in".encode() in r.stderr, r.stderr
    recs = _jsonl(out)
    assert recs[:len(done)] == done
    _once(recs, paths)


@pytest.mark.slow
def test_closed_stdout_exits_quietly(tmp_path):
    """`blip2 caption ... --jsonl -o FILE | head -1`: exit 141 without a traceback; FILE keeps
    whole records."""
    paths = _draw(tmp_path / "imgs", 3)
    cmd = [EXE, "caption", *paths, *FAST, "--batch-size", 1, "--jsonl", "-o", tmp_path / "o.jsonl"]
    p = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert json.loads(p.stdout.readline())["path"] == str(paths[0])
    p.stdout.close()
    err = p.communicate(timeout=60)[1].decode()
    assert p.returncode == 141 and "Traceback" not in err and "Exception ignored" not in err, err
    assert [r["path"] for r in _jsonl(tmp_path / "o.jsonl")] == [str(p) for p in paths[:2]]


def test_bad_pixel_budget_setting_is_a_usage_error(monkeypatch, capsys, tmp_path):
    """A malformed $BLIP2_MAX_IMAGE_PIXELS is one line and exit 2, before any model or image is read."""
    from blip2.apps.cli.main import main

    monkeypatch.setenv("BLIP2_MAX_IMAGE_PIXELS", "abc")
    assert main(["caption", "--model", str(tmp_path / "no-model"), str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "BLIP2_MAX_IMAGE_PIXELS" in err and len(err.strip().splitlines()) == 1
