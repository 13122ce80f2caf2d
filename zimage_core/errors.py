"""User-facing errors.

Every error a user can cause (bad size, missing file, wrong checkpoint, unsupported dtype) is a
``ZImageError``: a ``ValueError`` whose message names the input, the allowed range and the fix.
ComfyUI shows the message of a ``ValueError`` raised by a node as the node's error text.
"""


class ZImageError(ValueError):
    """A problem with the user's input, with a message that says how to fix it."""


class GenerationCancelled(RuntimeError):
    """The per-step callback asked the sampler to stop."""


def _interrupted_while_starting(signum, frame):  # pragma: no cover - runs in the CLI's subprocess
    import os
    import sys

    try:
        sys.stderr.write("cancelled: interrupted while starting\n")
        sys.stderr.flush()
    finally:
        os._exit(130)  # the shell's code for Ctrl-C; nothing of ours is open yet


def quiet_interrupt_while_starting() -> None:
    """Under ``python -m zimage_core`` only: Ctrl-C during the imports (torch, diffusers: seconds) ends the
    process with one line and exit code 130 instead of a traceback from inside an import. ``cli.main`` puts
    Python's own handler back once the imports are done, so its ``KeyboardInterrupt`` handling takes over. An
    ``import zimage_core`` in a user's program changes nothing."""
    import signal
    import sys

    # While ``-m`` locates the module, sys.argv[0] is "-m" (Python's docs); orig_argv names the module.
    names = {"zimage_core", "zimage_core.__main__", "-mzimage_core", "-mzimage_core.__main__"}
    if sys.argv[:1] == ["-m"] and names & set(getattr(sys, "orig_argv", [])):
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def restore_interrupt() -> None:
    """Python's ``KeyboardInterrupt`` on Ctrl-C again, where ``quiet_interrupt_while_starting`` replaced it."""
    import signal

    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
