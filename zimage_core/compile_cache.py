"""Compiled code kept across processes: PyTorch's compile caches in a persistent folder of ours.

``torch.compile`` of the block function costs a new process 6-11 s on an H200 (issue 13) unless PyTorch finds
its earlier work on disk. Two of its caches hold it, keyed by the graph, the shapes' symbols, the torch/Triton
versions and the device: inductor's FX graph cache (the generated code and Triton kernels) and the AOTAutograd
cache. Their default home, ``/tmp/torchinductor_$USER``, is emptied at reboot and absent in a new container, so

- ``enable(path)`` points them at ``path`` (else ``$ZIMAGE_COMPILE_CACHE``, else ``$XDG_CACHE_HOME`` or
  ``~/.cache``/``zimage-turbo/compile``) before the first compile, and loads the portable bundle (below) if one
  is there. Inside ComfyUI the node layer passes a folder under ComfyUI's *user* directory (its temp directory
  is emptied at every start, so it keeps nothing across processes).
- ``save()`` after the first compiled generation writes PyTorch's "mega cache" bundle
  (``torch.compiler.save_cache_artifacts``, where the installed torch has it) to ``path/artifacts.bin``: every
  artifact this process compiled, in one file that ``load_cache_artifacts`` puts back into any cache folder
  (a folder that was wiped, or one the user redirected with ``TORCHINDUCTOR_CACHE_DIR``).

What stays per process: dynamo still traces the Python function (about a second for a block), then finds the
compiled graph in the cache instead of running inductor and Triton's compiler.

The cache files and the bundle are PyTorch's own formats (which pickle); this module writes no file of its own
format and reads the bundle only from the folder it writes it to. ``ZIMAGE_COMPILE_CACHE=0`` turns all of this
off (torch's defaults then apply). A user's own ``TORCHINDUCTOR_CACHE_DIR`` is respected (the bundle still goes
to our folder).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

import torch

from .errors import ZImageError

log = logging.getLogger(__name__)

ENV = "ZIMAGE_COMPILE_CACHE"
BUNDLE = "artifacts.bin"
_lock = threading.Lock()
_state = {"folder": None, "loaded": None, "saved": False, "redirected": False, "preferred": None}


def prefer_folder(path: str | os.PathLike) -> None:
    """The folder ``enable()`` uses when no path is given and ``$ZIMAGE_COMPILE_CACHE`` is unset (the ComfyUI nodes
    pass one under ComfyUI's user directory). Nothing is created or changed until the first compile."""
    _state["preferred"] = Path(path).expanduser()


def default_folder() -> Path:
    """``$ZIMAGE_COMPILE_CACHE``, else the preferred folder (``prefer_folder``), else the user cache:
    ``$XDG_CACHE_HOME`` or ``~/.cache``, ``zimage-turbo/compile``."""
    env = os.environ.get(ENV)
    if env and env not in ("0", "off"):
        return Path(env).expanduser()
    if _state["preferred"] is not None:
        return _state["preferred"]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zimage-turbo" / "compile"


def disabled() -> bool:
    return os.environ.get(ENV, "") in ("0", "off")


def has_bundles() -> bool:
    """Whether the installed torch has the portable "mega cache" (``save_cache_artifacts``, torch >= 2.7)."""
    return hasattr(torch.compiler, "save_cache_artifacts") and hasattr(torch.compiler, "load_cache_artifacts")


def folder() -> Path | None:
    """The folder ``enable`` chose, None before it (or when disabled)."""
    return _state["folder"]


def enable(path: str | os.PathLike | None = None) -> Path | None:
    """Use ``path`` (or ``default_folder()``) for this process's compile caches; call before the first compile.

    Idempotent: later calls return the first folder (the caches' home can't move once torch compiled with it).
    Returns the folder, or None when ``ZIMAGE_COMPILE_CACHE=0``.
    """
    with _lock:
        if _state["folder"] is not None:
            return _state["folder"]
        if disabled() and path is None:
            return None
        target = Path(path).expanduser() if path is not None else default_folder()
        try:
            target.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=target, prefix=".probe", delete=True)
            probe.close()
        except OSError as err:
            raise ZImageError(f"compile cache folder {str(target)!r} is not writable ({err.strerror}): pass a "
                              f"writable folder, set {ENV} to one, or set {ENV}=0 to keep torch's default.") from err
        if not _user_cache_dir():  # the FX graph, AOTAutograd and Triton caches live here
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(target / "inductor")
            _state["redirected"] = True
        _enable_caches()
        _state["folder"] = target
        _state["loaded"] = _load_bundle(target)
        return target


def _user_cache_dir() -> bool:
    """Whether ``TORCHINDUCTOR_CACHE_DIR`` was chosen by the user. torch writes its default there itself the first
    time anything asks for the cache folder (importing Triton kernels does), so the default doesn't count."""
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not value:
        return False
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(value) != os.path.abspath(default_cache_dir())


def _enable_caches() -> None:
    """The FX graph and AOTAutograd caches on (their defaults since torch 2.5/2.6; an env var may have turned them
    off, which we respect)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if os.environ.get("TORCHINDUCTOR_FX_GRAPH_CACHE") != "0":
        inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache") and os.environ.get("TORCHINDUCTOR_AUTOGRAD_CACHE") != "0":
        functorch_config.enable_autograd_cache = True


def _load_bundle(target: Path) -> int | None:
    """Put the bundle's artifacts into the cache folder; returns its size, None when there is none."""
    bundle = target / BUNDLE
    if not has_bundles() or not bundle.is_file():
        return None
    data = bundle.read_bytes()
    try:
        torch.compiler.load_cache_artifacts(data)
    except Exception as err:  # another torch version's bundle, a truncated file: compile afresh, rewrite it
        log.warning("compile cache bundle %s not loaded (%s); compiling afresh.", bundle, err)
        bundle.unlink(missing_ok=True)
        return None
    return len(data)


def save() -> int | None:
    """Write this process's compiled artifacts as the bundle (atomically: a reader never sees half a file).
    Returns its size; None when there is nothing to save, bundles are unsupported, or ``enable`` was not called.
    Call after the first compiled generation (``save_once`` does it once per process)."""
    target = _state["folder"]
    if target is None or not has_bundles():
        return None
    result = torch.compiler.save_cache_artifacts()
    if result is None:
        return None
    data, _info = result
    if not data:
        return None
    tmp = target / f".{BUNDLE}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, target / BUNDLE)
    _state["saved"] = True
    return len(data)


def save_once() -> int | None:
    """``save()`` the first time it is called in this process (after the first compiled generation)."""
    with _lock:
        if _state["saved"] or _state["folder"] is None:
            return None
    return save()


def counters() -> dict:
    """This process's compile-cache hit and miss counts (torch's own counters)."""
    from torch._dynamo.utils import counters as c

    keys = ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")
    out = {k: int(c["inductor"].get(k, 0)) for k in keys}
    for k in ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass"):
        out[k] = int(c["aot_autograd"].get(k, 0))
    return out


def status() -> dict:
    """Where the caches are and what this process got from them."""
    return {"folder": str(_state["folder"]) if _state["folder"] else None,
            "inductor_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "redirected": _state["redirected"],
            "bundle_loaded_bytes": _state["loaded"], "saved": _state["saved"], **counters()}
