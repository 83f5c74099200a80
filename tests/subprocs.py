"""Helpers for tests that run the CLI in a child process."""

import signal


def default_sigint() -> None:
    """preexec_fn for a child the test will interrupt: SIGINT back to its default. A shell that
    starts a job in the background (`cmd &`, as some CI runners do) sets SIGINT to ignored, children
    inherit that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
