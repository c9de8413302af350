"""What a handler prints reaches its Dagster step: stdout and stderr forwarded as Pipes ``log_external_stream``
messages, which Dagster writes to the step's own stdout and stderr (its captured compute logs).

``capture_output(pipes)`` installs, once per process, proxies for ``sys.stdout`` and ``sys.stderr`` that pass
every write through to the stream they replaced (so the function's own log, Cloud Logging, still has it)
and also hand it to the session that wrote it. A session's text is buffered per stream and sent as
complete lines, many lines a message, every ``interval`` seconds (or at once when ``max_chars`` piled up);
what is left is sent when the session ends, before ``closed``. A proxy, once made, is never freed (one per
stream it stands in for): a ``print()`` in another thread may still be writing through one just swapped out.

Which session wrote a line: the one whose ``capture_output`` block the writing code runs in (a context
variable, so the request thread, and asyncio tasks and ``asyncio.to_thread`` workers it starts, are
attributed even when one instance serves several requests at once on the Functions Framework's threads). A
plain ``threading.Thread`` does not inherit context variables: its writes go to the only session running,
if exactly one is, else only to the function's log.

The streams the proxies replaced keep capturing what is written to them directly, where Python lets us
patch their ``write``: a stream someone else put in place and may put back while a session runs (the
Functions Framework does with LOG_EXECUTION_ID=true, around every request), or one a logging handler
holds. Logging handlers holding the original stream are also pointed at the proxies, so a library's log
records reach Dagster's stderr. The library's own JSON log lines (``logs.py``) are never
forwarded, nor is anything else written to the stream their handler holds without going through a
proxy: they are in Cloud Logging already, and Dagster's own events carry what they say.

Not captured: writes to the file descriptors themselves (C extensions, subprocesses, ``os.write(1, ...)``,
``sys.stdout.buffer``), and text the handler sends elsewhere itself (``contextlib.redirect_stdout`` to a
buffer of its own).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any, Literal, TextIO

from dagster_pipes import PipesContext

from dagster_gcf_pipes.function.logs import CloudLoggingFormatter

Stream = Literal["stdout", "stderr"]
STREAMS: tuple[Stream, ...] = ("stdout", "stderr")

_log = logging.getLogger(__name__)

_current: ContextVar[SessionOutput | None] = ContextVar("pipes_session_output", default=None)
_active: tuple[SessionOutput, ...] = ()  # replaced, never mutated: read without a lock on every write
_lock = threading.Lock()
_local = threading.local()  # .passing: inside a proxy's pass-through or a forwarding thread: never capture


def _owner() -> SessionOutput | None:
    if getattr(_local, "passing", False):
        return None
    owner = _current.get()
    if owner is not None:
        return owner
    active = _active
    return active[0] if len(active) == 1 else None


def _write_and_capture(name: Stream, write: Callable[[str], int], text: str) -> int:
    """``write(text)``, and hand ``text`` to the session that owns the writing code. When one capturing
    writer wraps another (ours or someone's), the outermost one captures, once."""
    passing = getattr(_local, "passing", False)
    _local.passing = True
    try:
        written = write(text)
    finally:
        _local.passing = passing
    owner = None if passing else _owner()
    if owner is not None and text:
        owner.add(name, text)
    return written


class _Tee:
    """A stand-in for ``sys.stdout``/``sys.stderr``: writes go to the original stream, and to the session
    that owns the writing code. Everything else (``fileno``, ``encoding``, ``buffer``...) is the original's."""

    def __init__(self, name: Stream, original: TextIO) -> None:
        self._name = name
        self._original = original

    def write(self, text: str) -> int:
        return _write_and_capture(self._name, self._original.write, text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


#: every proxy put in place, one per stream it stands in for, kept for the life of the process (see ``_proxy``)
_proxies: dict[tuple[Stream, int], _Tee] = {}


def _install() -> None:
    """Put the proxies in place (once; again if something swapped them out since)."""
    with _lock:
        for name in STREAMS:
            current = getattr(sys, name)
            if not isinstance(current, _Tee):
                setattr(sys, name, _proxy(name, current))
                _capture_writes_of(name, current)
                _repoint_handlers(current, getattr(sys, name))


def _proxy(name: Stream, stream: TextIO) -> _Tee:
    """The proxy standing in for ``stream``: made once, never freed. CPython's ``print()`` holds ``sys.stdout``
    by a borrowed reference while it writes (python/cpython#130163, still so in 3.11): when another thread
    swaps the stream out (the Functions Framework does as each request ends, with LOG_EXECUTION_ID=true) and
    that drops the last reference to the proxy a print writes through, the print goes on through freed memory
    and the process dies (SIGSEGV). One proxy per stream also keeps their number bounded, however many
    requests put the framework's wrapper back in place."""
    key = (name, id(stream))  # the proxy holds ``stream``: its id is not reused while the entry lives
    if key not in _proxies:
        _proxies[key] = _Tee(name, stream)
    return _proxies[key]


def _capture_writes_of(name: Stream, stream: TextIO) -> None:
    """Make a replaced stream capture its own writes too, where it lets us (the interpreter's own streams do
    not): whoever swapped it in may swap it back while a session runs. The Functions Framework does, with
    LOG_EXECUTION_ID=true: one JSON wrapper per stream made at start-up, put in place around each request
    (``contextlib.redirect_stdout``), so a request that starts while another session prints brings it back."""
    if getattr(stream.write, "_pipes_capturing", False) or stream in _structured_log_streams():
        return
    original_write = stream.write

    def write(text: str) -> int:
        return _write_and_capture(name, original_write, text)

    write._pipes_capturing = True  # type: ignore[attr-defined]
    with contextlib.suppress(AttributeError, TypeError):
        stream.write = write  # type: ignore[method-assign]


def _stream_handlers() -> Iterator[logging.StreamHandler]:
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, logging.StreamHandler):
                yield handler


def _structured_log_streams() -> list[Any]:
    """The streams the library's JSON log lines go to: never captured, those lines stay out of Dagster."""
    return [h.stream for h in _stream_handlers() if isinstance(h.formatter, CloudLoggingFormatter)]


def _repoint_handlers(original: TextIO, tee: _Tee) -> None:
    """Logging handlers created before the proxies hold the original stream; point them at the proxy,
    except the library's own JSON handlers."""
    for handler in _stream_handlers():
        if (
            type(handler) is logging.StreamHandler
            and handler.stream is original
            and not isinstance(handler.formatter, CloudLoggingFormatter)
        ):
            handler.setStream(tee)  # type: ignore[arg-type]


class SessionOutput:
    """One session's printed text, buffered per stream and forwarded by a thread of its own."""

    def __init__(self, pipes: PipesContext, interval: float, max_chars: int) -> None:
        self._pipes = pipes
        self._interval = interval
        self._max_chars = max_chars
        self._cond = threading.Condition()
        self._pending: dict[Stream, list[str]] = {name: [] for name in STREAMS}
        self._pending_chars = 0
        self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._forward_loop, name="pipes-stdio-forwarder", daemon=True)

    def add(self, stream: Stream, text: str) -> None:
        with self._cond:
            self._pending[stream].append(text)
            self._pending_chars += len(text)
            if self._pending_chars >= self._max_chars:
                self._cond.notify()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Send what is left (a last line without its newline too) and stop forwarding."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _forward_loop(self) -> None:
        _local.passing = True  # what this thread writes (a warning, a traceback) is nobody's print
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closing or self._pending_chars >= self._max_chars, self._interval)
                closing = self._closing
                ready = [(name, self._take(name, everything=closing)) for name in STREAMS]
            for name, text in ready:
                self._send(name, text)
            if closing:
                return

    def _take(self, stream: Stream, everything: bool) -> str:
        """The complete lines pending on ``stream``; the unfinished rest stays pending, unless ``everything``
        or it is half of ``max_chars`` long already (so what stays in both streams never fills the buffer)."""
        text = "".join(self._pending[stream])
        cut = len(text) if everything else max(text.rfind("\n"), text.rfind("\r")) + 1
        if len(text) - cut >= self._max_chars // 2:
            cut = len(text)
        rest = text[cut:]
        self._pending[stream] = [rest] if rest else []
        self._pending_chars -= cut
        return text[:cut]

    def _send(self, stream: Stream, text: str) -> None:
        if self._error is not None:
            return
        try:
            for chunk in _chunks(text, self._max_chars):
                self._pipes.log_external_stream(stream, chunk)
        except Exception as exc:  # noqa: BLE001 - the reply channel's own error ends the session; prints only stop
            self._error = exc
            _log.warning("forwarding %s to Dagster stopped: %s (it still goes to the function's log)", stream, exc)


def _chunks(text: str, size: int) -> Iterator[str]:
    """``text`` in pieces of at most about ``size`` characters, cut after a newline where there is one, so a
    message carries whole lines (another shard's lines may come between two messages)."""
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline >= start else end
        yield text[start:end]
        start = end


@contextlib.contextmanager
def capture_output(pipes: PipesContext, interval: float = 0.1, max_chars: int = 64_000) -> Iterator[None]:
    """Forward what the code in this block (and its threads, see the module docstring) writes to
    ``sys.stdout``/``sys.stderr`` to the Dagster step of ``pipes``, as well as to the original streams.
    Leave the block before the Pipes context closes: the last of the text is sent on the way out."""
    global _active
    _install()
    output = SessionOutput(pipes, interval, max_chars)
    output.start()
    token = _current.set(output)
    with _lock:
        _active = (*_active, output)
    try:
        yield
    finally:
        with _lock:
            _active = tuple(o for o in _active if o is not output)
        _current.reset(token)
        output.close()
