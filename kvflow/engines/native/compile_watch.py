"""Kernel compiles after start-up: each one a request waited for, named in a warning.

Start-up warms every kernel variant serving can hit (warmup.py). Should a request still meet
a new Triton specialisation (a shape class, an integer argument that newly is or is not a
multiple of 16, a constexpr the warm-up never passed), Triton compiles it on the request
path and that request waits. `CompileWatch` is armed once the engine is warm: from then on
every Triton compile in this process is counted and logged once, with the kernel's
specialisation and the engine code that launched it — what the warm-up must add.

It uses Triton's process-wide compile hook (`triton.knobs.runtime.jit_cache_hook`), chained
to any hook already set; without Triton (CPU) there is nothing to watch.
"""

from __future__ import annotations

import logging
import threading
import traceback
import weakref
from typing import Any

log = logging.getLogger(__name__)

_PACKAGE_FRAME = "/kvflow/"
_watchers: weakref.WeakSet[CompileWatch] = weakref.WeakSet()
_installed = False
_install_lock = threading.Lock()


def _install() -> bool:
    """Chain one hook into Triton's compile hook, once per process."""
    global _installed
    with _install_lock:
        if _installed:
            return True
        try:
            from triton import knobs
        except ImportError:
            return False
        runtime = getattr(knobs, "runtime", None)
        if runtime is None or not hasattr(runtime, "jit_cache_hook"):
            return False
        previous = runtime.jit_cache_hook

        def hook(*args: Any, **kwargs: Any) -> Any:
            if previous is not None:
                result = previous(*args, **kwargs)
                if result:
                    return result
            if not kwargs.get("is_manual_warmup", False) and len(_watchers):
                entry = _describe(kwargs)
                for watch in list(_watchers):
                    watch.record(entry)
            return False  # go on and compile

        runtime.jit_cache_hook = hook
        _installed = True
        return True


def _describe(hook_args: dict[str, Any]) -> str:
    """The kernel, its specialisation key (argument types, which integers and pointers were
    taken as multiples of 16, constexprs) and the kvflow frames that launched it."""
    name = str(hook_args.get("repr", "")).split("[", 1)[0] or "a Triton kernel"
    kernel = f"{name} {hook_args.get('key', '')}"
    frames = [f for f in traceback.extract_stack()
              if _PACKAGE_FRAME in f.filename and f.filename != __file__]
    where = " <- ".join(f"{f.filename.rsplit(_PACKAGE_FRAME, 1)[-1]}:{f.lineno} {f.name}"
                        for f in reversed(frames[-4:]))
    return f"{kernel} (from {where or 'outside kvflow'})"


class CompileWatch:
    """Counts the Triton compiles between `arm()` and `disarm()` (any in this process: the
    hook is process-wide); `compiles` lists what compiled and from where."""

    def __init__(self) -> None:
        self.compiles: list[str] = []
        self._lock = threading.Lock()

    def arm(self) -> bool:
        """Watch from now on. False when Triton (or its compile hook) is not there."""
        if not _install():
            return False
        _watchers.add(self)
        return True

    def disarm(self) -> None:
        _watchers.discard(self)

    @property
    def armed(self) -> bool:
        return self in _watchers

    def record(self, entry: str) -> None:
        with self._lock:
            self.compiles.append(entry)
        log.warning("native engine: Triton compiled a kernel on the request path (the "
                    "start-up warm-up missed it; that request waited): %s", entry)
