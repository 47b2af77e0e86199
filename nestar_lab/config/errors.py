"""What can go wrong, as one line and an exit code (README: "Errors and exit codes").

Exit codes of ``nestar``:

====  =====================================================================================
0     done
1     the run failed: out of memory, disk full, non-finite training, an unexpected error
2     bad input: config, file (missing, corrupt, of the wrong kind), unwritable place, plugin
130   interrupted by SIGINT (Ctrl-C); 143 by SIGTERM (128 + the signal number)
====  =====================================================================================

Library code raises :class:`BadInput` (exit 2) or :class:`RunFailed` (exit 1) with a message
that names the file or field and what to do; ``cli.main`` prints :func:`describe`'s lines.
Any exception with an integer ``exit_code`` attribute is treated the same way.
"""

from __future__ import annotations

import errno
import signal
import sys

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143

DEBUG_HINT = "rerun with --debug for the traceback"


class NestarError(Exception):
    """Base of the errors nestar raises on purpose; ``exit_code`` is what ``nestar`` exits with."""

    exit_code: int = EXIT_FAILED


class BadInput(NestarError):
    """The user's input is wrong: a config, a file, a path, a plugin. Exit 2."""

    exit_code = EXIT_BAD_INPUT


class RunFailed(NestarError):
    """A run could not finish (out of memory, disk full, diverged). Exit 1."""

    exit_code = EXIT_FAILED


# errno values that mean "this path is the wrong place" (bad input), and "the disk is full"
_BAD_PLACE = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
              errno.ENAMETOOLONG, errno.ELOOP}  # fmt: skip
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class ConfigError(BadInput, ValueError):
    """A config is invalid; ``lines`` holds one readable line per problem (exit code 2)."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


def one_line(text: object) -> str:
    """The first non-empty line of ``text`` (messages must fit one line)."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def exit_code_for_signal(signum: int | None) -> int:
    """128 + the signal number (130 SIGINT, 143 SIGTERM); 130 when unknown."""
    return 128 + int(signum) if signum else EXIT_SIGINT


def _chain(exc: BaseException):
    """``exc`` and the exceptions it was raised from or during (each once)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # a torch error cannot exist unless torch was imported
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


def _os_error_line(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else None
    if name is None:  # raised with a message of our own, e.g. FileNotFoundError("PATH: no checkpoint; ...")
        return one_line(exc)
    what = exc.strerror or type(exc).__name__
    where = f"{name} -> {exc.filename2}" if exc.filename2 is not None else f"{name}"
    hints = {
        errno.ENOENT: "check the path",
        errno.EACCES: "choose a writable place (e.g. --run-dir) or fix its permissions",
        errno.EPERM: "choose a writable place (e.g. --run-dir) or fix its permissions",
        errno.EROFS: "choose a place on a writable file system (e.g. --run-dir)",
        errno.EISDIR: "give a file, not a directory",
        errno.ENOTDIR: "a part of this path is a file, not a directory; choose another path",
        errno.EEXIST: "remove it or choose another path",
    }
    hint = hints.get(exc.errno)
    return f"{what}: {where}" + (f"; {hint}" if hint else "")


def describe(exc: BaseException, batch_hint: str | None = None) -> tuple[int, list[str]]:
    """The exit code and the stderr lines (one, or one per config problem) for ``exc``.

    ``batch_hint`` (e.g. ``"train.batch_size=128"``) names the setting to lower on out of memory.
    """
    lines = getattr(exc, "lines", None)
    if isinstance(lines, list) and lines and isinstance(exc, BadInput):  # ConfigError: one line per problem
        return EXIT_BAD_INPUT, [f"config error: {one_line(line)}" for line in lines]
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_SIGINT, ["interrupted"]
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code, [f"error: {one_line(exc)}"]
    for link in _chain(exc):  # the disk filled up somewhere below (e.g. inside torch.save)
        if isinstance(link, OSError) and link.errno in _DISK_FULL:
            where = link.filename or "the output directory"
            return EXIT_FAILED, [f"error: No space left on device: {where}; free space or write elsewhere (--run-dir)"]
    if _is_out_of_memory(exc):
        where = f" at {batch_hint}" if batch_hint else ""
        what = batch_hint.split("=")[0] if batch_hint else "train.batch_size or sample.batch_size"
        return EXIT_FAILED, [f"error: out of memory{where}; lower {what} (--set {what}=...) or use a smaller model"]
    if isinstance(exc, OSError) and (exc.errno in _BAD_PLACE or isinstance(exc, (FileNotFoundError, PermissionError))):
        return EXIT_BAD_INPUT, [f"error: {_os_error_line(exc)}"]
    if isinstance(exc, KeyError):  # our KeyErrors carry a sentence; show it without repr quotes
        return EXIT_BAD_INPUT, [f"error: {one_line(exc.args[0] if exc.args else exc)}"]
    if isinstance(exc, ValueError):  # the library's way of saying "this input cannot work"
        return EXIT_BAD_INPUT, [f"error: {one_line(exc)}"]
    message = one_line(exc)
    return EXIT_FAILED, [f"error: {type(exc).__name__}: {message} ({DEBUG_HINT})" if message
                         else f"error: {type(exc).__name__} ({DEBUG_HINT})"]  # fmt: skip
