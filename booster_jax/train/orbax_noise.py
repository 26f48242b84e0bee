"""Keeps Orbax's echoes of one failed checkpoint write or read off stderr: the stage store raises that
failure once, as one clear error, and the echoes would bury it under hundreds of tracebacks.

Why there are echoes: Orbax runs a checkpoint's array writes and reads as asyncio tasks on a private
event loop that it closes as soon as the first one fails. The others are left behind, and each later
reports the same failure again:

- TensorStore completes a left-behind read or write and calls ``loop.call_soon_threadsafe`` on the
  closed loop from native code: a ``RuntimeError: Event loop is closed`` traceback (through
  ``sys.excepthook``, sometimes the unraisable hook);
- a left-behind coroutine is collected (often only at interpreter exit) and closing it raises inside
  Orbax's ``except BaseException``: ``Exception ignored in: <coroutine object
  _read_array_index_and_device_put>`` (``sys.unraisablehook``);
- a coroutine Orbax created but whose task never got to run before the loop closed (a write fragment
  queued behind the failed one) is collected unstarted: ``RuntimeWarning: coroutine
  'async_serialize_from_host.<locals>.write_fragment' was never awaited`` (a race: only some runs);
- asyncio logs "Task/Future exception was never retrieved" / "Task was destroyed but it is pending!"
  for those tasks and TensorStore's futures;
- Orbax's worker and commit threads log (absl, ERROR) "_SignalingThread.run() raised an exception" /
  "Failed to run ... Commit operations" with the traceback of the very exception they then hand to
  the waiting caller, which raises it.

``install()`` (idempotent; every ``StageStore`` calls it) drops exactly these and passes everything
else on: an exception counts only when its traceback or its task runs through Orbax code (or, for a
bare future nobody awaited, it is a TensorStore status error set by native code), or, for the
closed-loop error, when native code called ``call_soon_threadsafe`` directly; an unawaited coroutine
only when its code is Orbax's.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import orbax.checkpoint as _ocp

ORBAX_DIR = os.path.dirname(os.path.abspath(_ocp.__file__)) + os.sep
# asyncio's lines for a failed future nobody awaited ("Task", "Future", "_GatheringFuture" ...) and a pending
# task collected with its loop gone
_ASYNCIO_ECHOES = ("exception was never retrieved", "Task was destroyed but it is pending!")
# Orbax's two log lines for an exception it stores and then raises in the waiting caller
# (futures/future.py _SignalingThread.run, checkpointers/async_checkpointer.py's commit thread)
_ORBAX_HANDED_ON = ("_SignalingThread.run() raised an exception",
                    "Handler Commit operations or the Commit callback in background save thread")
_MARK = "_booster_orbax_noise"


def _frames(tb):
    while tb is not None:
        yield tb.tb_frame.f_code
        tb = tb.tb_next


def _through_orbax(exc: BaseException | None) -> bool:
    """True if ``exc`` or an exception it was raised from/during was raised through Orbax code."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(code.co_filename.startswith(ORBAX_DIR) for code in _frames(exc.__traceback__)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# absl status codes: a TensorStore error's message starts with one
_STATUS = ("CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
           "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
           "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")


def _tensorstore_error(exc: BaseException | None) -> bool:
    """A TensorStore failure handed to asyncio by native code: a status-code message, no Python frames."""
    return (exc is not None and exc.__traceback__ is None
            and str(exc).split(":", 1)[0] in _STATUS and ":" in str(exc))


def closed_loop_callback(exc: BaseException | None) -> bool:
    """``Event loop is closed`` raised in ``call_soon_threadsafe`` called straight from native code (a
    TensorStore future's callback): a Python caller would be the traceback's outermost frame instead."""
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        return False
    codes = list(_frames(exc.__traceback__))
    return bool(codes) and codes[0].co_name == "call_soon_threadsafe"


def _closing(exc: BaseException | None) -> bool:
    """True if ``exc`` was raised while a coroutine was being closed (GeneratorExit in its chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, GeneratorExit) or str(exc) == "coroutine ignored GeneratorExit":
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def abandoned_orbax_coroutine(unraisable) -> bool:
    """An Orbax coroutine closed after its loop was gone, whose close raised inside Orbax's own handler."""
    code = getattr(unraisable.object, "cr_code", None) or getattr(unraisable.object, "gi_code", None)
    return code is not None and code.co_filename.startswith(ORBAX_DIR) and _closing(unraisable.exc_value)


def unstarted_orbax_coroutine(coro) -> bool:
    """A coroutine defined in Orbax's code (``write_fragment`` ...) collected before it ever ran."""
    code = getattr(coro, "cr_code", None)
    return code is not None and code.co_filename.startswith(ORBAX_DIR)


def is_noise_record(record: logging.LogRecord) -> bool:
    """An asyncio or Orbax log record that repeats a checkpoint failure the store raises itself."""
    if record.name == "asyncio":
        text = record.getMessage()
        if not any(echo in text.split("\n", 1)[0] for echo in _ASYNCIO_ECHOES):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return ORBAX_DIR in text or _through_orbax(exc) or _tensorstore_error(exc)
    # the caller's file is Orbax's only when absl's logger class made the "absl" logger (not when run.py
    # configured that logger first); the logged exception's traceback runs through Orbax either way
    orbax = record.pathname.startswith(ORBAX_DIR) or _through_orbax(record.exc_info[1] if record.exc_info else None)
    return orbax and any(m in record.getMessage() for m in _ORBAX_HANDED_ON)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise_record(record)


def install() -> None:
    """Wrap ``sys.excepthook`` / ``sys.unraisablehook`` / ``warnings._warn_unawaited_coroutine`` (the hook
    CPython calls for a coroutine collected unstarted; a warning filter cannot see which coroutine it was)
    and filter the ``asyncio`` and ``absl`` loggers, once (again only if someone replaced the hooks since)."""
    for name in ("asyncio", "absl"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    _wrap_once(sys, "excepthook", lambda tp, value, tb: closed_loop_callback(value))
    _wrap_once(sys, "unraisablehook",
               lambda u: closed_loop_callback(u.exc_value) or abandoned_orbax_coroutine(u))
    _wrap_once(warnings, "_warn_unawaited_coroutine", unstarted_orbax_coroutine)


def _wrap_once(owner, attr: str, drop) -> None:
    """Replace the hook ``owner.attr`` by one that skips the calls ``drop(*args)`` picks and passes the
    rest on; nothing when the hook is ours already (or this Python has no such hook)."""
    inner = getattr(owner, attr, None)
    if inner is None or getattr(inner, _MARK, False):
        return

    def hook(*args):
        if not drop(*args):
            inner(*args)

    setattr(hook, _MARK, True)
    setattr(owner, attr, hook)


__all__ = ["install", "is_noise_record"]
