"""Which path each kind of CPU product takes, chosen by measuring the candidates on this CPU.

Flags do not tell what is fast. A Xeon with AMX runs oneDNN's bf16 GEMM 7x faster than fp32; a VM
that reports `avx512_bf16` but hides AMX ran it 1.6x *slower* than fp32 (257x1408 @ 1408x6144:
64 vs 38 ms), yet faster than fp32 for 40 rows (8 vs 13 ms). So each kind of product ("op") is timed
once with every candidate path, at first use, on synthetic tensors of model-like shapes, and the
fastest wins. Our path must beat torch's by a margin (MARGIN) to be chosen: where it is not clearly
faster, torch's runs, so the backend is never slower than torch on any CPU.

    op                where                  candidates (torch's own first)
    bf16.one          1-row products         mv: torch.mv | linear: F.linear in bf16 | kernel: kernels.c
                                             on blocked weights (bf16 weights are blocked only if it wins)
    bf16.many         products of many rows  the fewest rows (16 ... 256) from which one fp32 GEMM (the
                                             weight upcast into a reused buffer) beats F.linear in bf16
                                             (oneDNN); 0: never
    bf16.dot          bf16 x, blocked bf16   fma: each weight converted to fp32 | dot: VDPBF16PS (CPUs
                      weights, 2+ rows       with AVX512_BF16 only; slower than FMA on some of them)
    bf16.kernel_rows  blocked bf16 weights   the most rows (2..256) for which the kernel (as `bf16.dot`
                                             chose) beats unblocking the weight for the `bf16.many` path
    int8.kernel_rows  blocked int8, int4     the same for the int8 kernel (2..64)
    sdpa.bf16         attention, many rows   bf16: SDPA in bf16 | fp32: SDPA on fp32 copies
    sdpa.one          a decode step's        sdpa: SDPA in bf16 | kernel: kernels.attend_one on the
                      attention              bf16 KV cache
    int8.one, int4.one  1-row products       torch: _weight_int8pack_mm / _weight_int4pack_mm_for_cpu |
                                             kernel: kernels.c on blocked weights (blocked only if it wins)

Candidates are timed on one thread (see one_thread: far steadier on a busy machine). A measurement
taken while other work used more than BUSY of the CPUs (/proc/stat, steal time included) is marked
provisional: it is used and cached, and the next process that finds the machine quiet measures that
op again (one taken under load here chose `bf16.many` 0 and left the vision tower at 0.99x). The choices
are cached per CPU model + flags, torch version and kernel ISA, under
~/.cache/blip2/dispatch (or $BLIP2_KERNEL_CACHE/../dispatch), and `blip2 info --runtime` prints them
with the timings that decided them. BLIP2_DISPATCH="bf16.many=16,sdpa.bf16=bf16" forces choices
(tests use `force`); BLIP2_DISPATCH=torch takes torch's path for every op without measuring
("torch,bf16.many=64": all torch's but one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import build

FORMAT = "5"  # of the cached choices; part of the key (4: the bf16 kernels of issue 16; 5: sdpa.one may pick fp32)
MARGIN = 0.9  # a candidate other than torch's default must take under 90% of its time
BUSY = 0.2  # others' share of the CPUs' time during a measurement above which it is provisional
DEFAULTS: dict[str, object] = {}  # op -> torch's path (filled by `register`)

_lock = threading.RLock()
_choices: dict[str, object] = {}
_timings: dict[str, dict[str, float]] = {}
_forced: dict[str, object] = {}
_loaded_key: str | None = None
_provisional: dict[str, float] = {}  # op -> others' share of the CPUs while it was measured (> BUSY)
_stale: set[str] = set()  # provisional ops read from the cache, not yet re-checked by this process
_quiet: bool | None = None  # whether the machine looked quiet when this process first checked


# --- timing ---
def measure(candidates: dict[str, Callable[[], object]], reps: int = 11, budget_s: float = 1.5) -> dict[str, float]:
    """Seconds per call of each candidate; the first is the reference (torch's path).

    The candidates take turns, round after round (after one warm-up call each), and each is scored
    against the reference in the same round: its time is the reference's best time times the median
    of its per-round ratios to the reference. On a machine busy with other work, a burst of load
    hits one call and not its neighbour, and the median ignores it; steady load slows both alike,
    and the ratio keeps. Stops early once budget_s is spent (at least 3 rounds)."""
    for fn in candidates.values():
        fn()
    names = list(candidates)
    rounds: list[dict[str, float]] = []
    t_end = time.perf_counter() + budget_s
    for i in range(reps):
        r = {}
        for name in (names if i % 2 == 0 else names[::-1]):  # alternate the order: no one always goes first
            t = time.perf_counter()
            candidates[name]()
            r[name] = time.perf_counter() - t
        rounds.append(r)
        if i >= 2 and time.perf_counter() > t_end:
            break
    ref = names[0]
    best = min(r[ref] for r in rounds)
    return {n: best * statistics.median(r[n] / r[ref] for r in rounds) for n in names}


def pick(times: dict[str, float], default: str) -> str:
    """The fastest candidate, unless it is not clearly faster than torch's default."""
    fastest = min(times, key=times.get)
    return fastest if times[fastest] < MARGIN * times[default] else default


# --- how busy the machine is ---
def _busy_seconds() -> float | None:
    """CPU seconds all CPUs have spent busy since boot (user, nice, system, irq, softirq and the
    hypervisor's steal), from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return (sum(v[:3]) + sum(v[5:8])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Others:
    """Times a block: `share` is then the fraction of all CPUs' time that went to anything but this
    thread (other processes, this process's other threads, steal): 0 where /proc/stat is missing."""

    def __enter__(self) -> "Others":
        self.busy, self.mine, self.t = _busy_seconds(), time.thread_time(), time.perf_counter()
        self.share = 0.0
        return self

    def __exit__(self, *exc) -> None:
        busy, wall = _busy_seconds(), time.perf_counter() - self.t
        if busy is not None and self.busy is not None and wall > 0:
            others = (busy - self.busy) - (time.thread_time() - self.mine)
            self.share = max(0.0, others / (wall * (os.cpu_count() or 1)))


def quiet_now(seconds: float = 0.3) -> bool:
    """Whether other work leaves the CPUs nearly idle now (sampled over `seconds`, once a process)."""
    global _quiet
    if _quiet is None:
        with Others() as o:
            time.sleep(seconds)
        _quiet = o.share <= BUSY
    return _quiet


# --- the registry: each op's measurement lives with the code it chooses between ---
_MEASURE: dict[str, Callable[[], tuple[object, dict[str, float]]]] = {}


def register(op: str, default, measure: Callable[[], tuple[object, dict[str, float]]]) -> None:
    """Declare an op: torch's path (`default`) and a function that times the candidates and returns
    (the choice, {candidate: seconds})."""
    DEFAULTS[op] = default
    _MEASURE[op] = measure


def synthetic(*shape: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A bf16 tensor of normal values, the same on every run (for the measurements)."""
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


# --- the cache ---
_key: str | None = None  # a choice is looked up on every product: the key is made once


def cache_key() -> str:
    """What the choices depend on: the CPU (model and flags), torch, the kernels' ISA."""
    global _key
    if _key is None:
        parts = [FORMAT, build._cpu_info(), torch.__version__, str(build.isa())]
        _key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return _key


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Measure on one thread. With several, a parallel region waits for its slowest thread, and on a
    machine busy with other processes each region of a few ms then loses a scheduler slice to one of
    them (seen here: every candidate timed at ~8 ms whatever its work). One thread is preempted
    too, but only for its own share, which the per-round ratios cancel. The candidates' kernels
    scale alike with threads, so the faster one on one thread is the faster one on several."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def cache_file(key: str | None = None) -> Path:
    """Where this machine's choices are kept."""
    return build._cache_dir().parent / "dispatch" / f"{key or cache_key()}.json"


def forget() -> None:
    """Drop this machine's cached choices (in memory and on disk): the next use measures again."""
    global _loaded_key
    with _lock:
        try:
            cache_file().unlink()
        except OSError:
            pass
        _choices.clear()
        _timings.clear()
        _provisional.clear()
        _stale.clear()
        _loaded_key = None


def cpu_model() -> str:
    for line in build._cpu_info().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def _load(key: str) -> None:
    global _loaded_key
    _choices.clear()
    _timings.clear()
    _provisional.clear()
    _stale.clear()
    _loaded_key = key
    try:
        data = json.loads(cache_file(key).read_text())
        busy = data.get("provisional", {})
        for op, default in DEFAULTS.items():
            value = data.get("choices", {}).get(op)
            if type(value) is type(default):  # a choice of another kind (an older file): measure again
                _choices[op] = value
                _timings[op] = data.get("timings", {}).get(op, {})
                if op in busy:
                    _provisional[op] = float(busy[op])
                    _stale.add(op)
    except (OSError, ValueError, AttributeError):
        pass  # no cache yet, or an unreadable one: measure again


def _save(key: str) -> None:
    path = cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"cpu": cpu_model(), "torch": torch.__version__, "isa": build.isa(),
                                   "measured_on_threads": 1, "choices": _choices,
                                   "timings": _timings, "provisional": _provisional}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the choices hold for this process only


_env_parsed: tuple[str, dict[str, str]] = ("", {})


def _env() -> dict[str, str]:
    """BLIP2_DISPATCH as {op: choice} (parsed again only when it changes)."""
    global _env_parsed
    spec = os.environ.get("BLIP2_DISPATCH", "").strip()
    if spec != _env_parsed[0]:
        out: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            if item == "torch":  # torch's path for every op (later items still override)
                out.update((op, str(v)) for op, v in DEFAULTS.items())
            else:
                op, _, val = item.partition("=")
                out[op.strip()] = val.strip()
        _env_parsed = (spec, out)
    return _env_parsed[1]


def choice(op: str):
    """The path `op` takes here (see the table above); measured once, on first use."""
    if op in _forced:
        return _forced[op]
    env = _env().get(op)
    if env is not None:
        return type(DEFAULTS[op])(env)
    key = cache_key()
    if _loaded_key == key and op in _choices and op not in _stale:
        return _choices[op]
    with _lock:
        if _loaded_key != key:
            _load(key)
        if op in _stale and not torch.compiler.is_compiling():
            _stale.discard(op)
            if quiet_now():  # measured under load before, quiet now: measure again
                del _choices[op]
        if op not in _choices:
            if torch.compiler.is_compiling():
                return DEFAULTS[op]
            with torch.no_grad(), one_thread(), Others() as others:
                _choices[op], _timings[op] = _MEASURE[op]()
            if others.share > BUSY:
                _provisional[op] = round(others.share, 2)
            else:
                _provisional.pop(op, None)
            _save(key)
        return _choices[op]


def timings(op: str) -> dict[str, float]:
    """The seconds each candidate of `op` took when it was measured ({} if it was not)."""
    return _timings.get(op, {})


def report(measure: bool = True) -> list[dict]:
    """One record per op: its choice, why (forced, cached or measured) and the timings, in ms."""
    rows = []
    env = _env()
    for op in DEFAULTS:
        if measure:
            choice(op)
        why = ("forced" if op in _forced else "BLIP2_DISPATCH" if op in env
               else f"measured while others used {_provisional[op]:.0%} of the CPUs: provisional" if op in _provisional
               else "measured")
        rows.append(dict(op=op, choice=choice(op) if measure else _choices.get(op), why=why,
                         ms={k: round(v * 1e3, 3) for k, v in _timings.get(op, {}).items()}))
    return rows


@contextlib.contextmanager
def force(**choices) -> Iterator[None]:
    """Force choices inside a block (tests): force(**{"bf16.many": 16})."""
    saved = dict(_forced)
    _forced.update(choices)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)
