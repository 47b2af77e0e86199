"""Ctrl-C in a ``nestar`` command: remembered whatever it turns into, and held while a native
package imports. Standard library only: the command line installs it before any heavy import."""

from __future__ import annotations

import os
import signal
import sys

#: packages whose import runs C++ that calls back into Python: a KeyboardInterrupt raised there
#: cannot unwind (pybind11 aborts the process: "terminate called ... KeyboardInterrupt", exit -6)
NATIVE = ("torch", "torchvision", "torchdiffeq", "torch_fidelity")

_state = {"seen": False}


def seen() -> bool:
    """Whether SIGINT arrived since :func:`catch_sigint`."""
    return _state["seen"]


def importing_native() -> bool:
    """Whether one of the ``NATIVE`` packages is being imported right now."""
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if name.partition(".")[0] in NATIVE and getattr(spec, "_initializing", False):
            return True
    return False


def catch_sigint():
    """From now on SIGINT raises KeyboardInterrupt as usual and is also remembered (main thread
    only); returns the handler it replaced, or None where none could be set. While torch (or
    another native package) is being imported, the interrupt is held and SIGINT sent again 50 ms
    later, until the import is done. Training installs its own handler for a clean stop while it
    runs (``train._StopFlag``), and puts this one back."""
    _state["seen"] = False

    def on_sigint(signum, frame):
        _state["seen"] = True
        if importing_native():  # raised now it would abort the process from inside C++
            import threading

            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            return
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        return None
