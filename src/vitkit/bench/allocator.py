"""glibc malloc policy for CPU runs: keep freed tensor memory in the process instead of returning it each call.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc's defaults give a large block (above a
dynamic threshold of 128 KiB to 32 MiB) its own ``mmap`` and hand it back on ``free``, and trim the heap top
once 2x that threshold is free, so a model that allocates and frees megabytes of activations per layer
page-faults the same memory in again on every call. Measured on the project's 2-core Xeon VM (torch 2.13,
batch 16): ``halonet26t`` 11.6 img/s with the defaults, 16.0 with :func:`tune_allocator`; ``mobilevit_xxs``
45.5 -> 51.9; a halo attention layer 42.6 ms -> 16.1 ms. This is what ``LD_PRELOAD``-ing jemalloc or tcmalloc
does for PyTorch on CPU, done in-process with ``mallopt`` and no extra dependency.

Policies (``policy()`` reports the current one):

* ``"default"``: glibc's own dynamic behaviour; the state of a fresh process. Once changed, glibc cannot
  return to it (setting the mmap threshold disables the dynamic adjustment for good).
* ``"speed"`` (:func:`tune_allocator`): blocks up to 32 MiB (glibc's ceiling) come from the heap, and the heap
  keeps up to 1 GiB of free memory for reuse. The resident set stays near its high-water mark, as with any
  caching allocator. The vitkit CLI sets it at start-up (``VITKIT_MALLOC=default`` opts out); ``vitkit bench``
  takes it as a runtime option, ``--malloc speed|default``, and records it in each row.
* ``"exact"`` (:func:`exact_accounting`, used by peak-memory measurement): every block from 64 KiB up is its own
  mapping, returned to the OS on ``free``, so the resident-set high-water mark is the true peak of live
  tensors. Slow; on leaving, the previous policy is restored (``"default"`` becomes glibc's saturated
  dynamic state: threshold 32 MiB, trim 64 MiB).

Off glibc (macOS, Windows, musl) every function is a no-op and ``policy()`` returns ``"unavailable"``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator
from functools import cache

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MIB = 1 << 20
# (mmap threshold, trim threshold, top pad) in bytes
_SETTINGS = {
    "speed": (32 * _MIB, 1 << 30, 64 * _MIB),
    "exact": (64 << 10, 128 << 10, 0),
    "default": (32 * _MIB, 64 * _MIB, 0),  # glibc's dynamic state at its ceiling; see the module docstring
}
_policy = "default"


@cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def policy() -> str:
    """The current policy: ``"default"``, ``"speed"``, ``"exact"``, or ``"unavailable"`` off glibc."""
    return _policy if _libc() is not None else "unavailable"


def _apply(name: str) -> bool:
    global _policy
    libc = _libc()
    if libc is None:
        return False
    mmap_threshold, trim, pad = _SETTINGS[name]
    ok = all(
        libc.mallopt(param, value) == 1
        for param, value in ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim), (_M_TOP_PAD, pad))
    )
    _policy = name
    return ok


def tune_allocator() -> bool:
    """Switch this process to the ``"speed"`` policy; True if glibc accepted it (False off glibc)."""
    return _apply("speed")


def choice(option: str | None = None) -> str:
    """The policy asked for: ``option`` (``vitkit bench --malloc``) if given, else ``$VITKIT_MALLOC``, else speed."""
    name = (option or os.environ.get("VITKIT_MALLOC", "speed")).strip().lower()
    if name not in ("speed", "default"):
        source = "--malloc" if option else "VITKIT_MALLOC"
        raise ValueError(f"{source} must be 'speed' or 'default', got {name!r}")
    return name


def tune_from_env() -> None:
    """What the CLI calls at start-up (every command but ``bench``, which has ``--malloc``): the speed policy
    unless ``VITKIT_MALLOC=default``."""
    if choice() == "speed":
        tune_allocator()


@contextlib.contextmanager
def exact_accounting() -> Iterator[None]:
    """Inside: freed memory goes back to the OS and large blocks are mapped on demand (see ``"exact"``)."""
    libc = _libc()
    if libc is None:
        yield
        return
    previous = _policy
    _apply("exact")
    libc.malloc_trim(0)  # release what the heap holds now, so the resident set starts from live memory
    try:
        yield
    finally:
        _apply(previous)
