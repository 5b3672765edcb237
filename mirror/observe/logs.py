"""Logging: text or JSON lines, and a request id on every record.

The access line itself is web/accesslog.py's. Log lines hold client-chosen text (paths,
user agents, names): control characters in a text line are escaped, so nobody can forge a
line, and JSON lines are escaped by the encoder. No line holds a credential: the HTTP
libraries that would log request headers at DEBUG stay at WARNING, and what looks like a
credential in any message is redacted.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import random
import re
import secrets
import time
import weakref
from collections.abc import Callable
from typing import Any, TextIO, cast

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
REQUEST_ID_HEADER = "X-Request-ID"
_ACCEPTED_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# botocore logs every S3 request's headers (Authorization, X-Amz-Security-Token) and
# presigned URLs at DEBUG; urllib3 and aiohttp's client log URLs; aiocache logs its keys
# (the upstream token cache's hold a hash of the account's credentials). They stay at
# WARNING whatever log.level says.
QUIET_LOGGERS = (
    "botocore", "aiobotocore", "boto3", "urllib3", "s3transfer", "aiohttp.client", "aiocache",
)  # fmt: skip
# A credential after its name, in a header dump, a query string or a JSON-ish repr.
_CREDENTIAL = re.compile(
    r"(?i)\b(authorization|proxy-authorization|x-amz-security-token|x-amz-signature|"
    r"x-amz-credential|signature|password|secret_access_key|token)"
    r"(['\"]?\s*[:=]\s*(?:b?['\"])?)"
    r"((?:bearer|basic|aws4-hmac-sha256)\s+)?[^\s'\",&;]+"
)
# Every name _CREDENTIAL matches holds one of these (casefolded, as its (?i) matches): a line
# without any, nearly every line, is not searched (the search was a fifth of a request).
_CREDENTIAL_HINTS = ("authorization", "token", "signature", "credential", "password", "secret")
ISO_SECONDS = "%Y-%m-%dT%H:%M:%S"
# A request line's fields by name, made only for a line that shows them (JSON).
Fields = Callable[[], dict[str, Any]]


def new_request_id(incoming: str | None) -> str:
    """The client's (or proxy's) X-Request-ID when it is sane, else a fresh one."""
    return _sane(incoming) or secrets.token_hex(8)


def _sane(incoming: str | None) -> str | None:
    if incoming and len(incoming) <= 64 and set(incoming) <= _ACCEPTED_ID:
        return incoming
    return None


class RequestIds:
    """`new_request_id` for every request: fresh ids come from a generator seeded once by
    the OS, not a system call each. An id ties log lines together; it guards nothing."""

    def __init__(self) -> None:
        self._random = random.Random(secrets.randbits(128))

    def __call__(self, incoming: str | None) -> str:
        return _sane(incoming) or f"{self._random.getrandbits(64):016x}"


def log_info(logger: logging.Logger, msg: str, args: tuple[Any, ...], access: Any) -> None:
    """`logger.info(msg, *args, extra={"access": access})` without looking up the caller's
    file and line, which no format shows: for the lines written on every request."""
    if logger.isEnabledFor(logging.INFO):
        extra = {"access": access}
        logger.handle(
            logger.makeRecord(logger.name, logging.INFO, "", 0, msg, args, None, None, extra)
        )


def log_request_line(
    logger: logging.Logger,
    msg: str,
    args: tuple[Any, ...],
    access: Fields,
    request_id: str,
) -> None:
    """`log_info` for the one record of a request. Where setup_logging's handler is the
    only one the record would reach, as it is in `mirror serve`, the line goes straight
    into it, formatted by the same code, with no LogRecord and no dispatch: they were
    half of the line's cost, paid on every request. Anywhere else (more handlers, filters,
    a logger that stops propagating), the record goes the standard way. `access` gives
    the fields by name (`extra={"access": ...}`), asked for only where a line shows them."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _sole_line_handler(logger)
    if handler is None:
        token = request_id_var.set(request_id)
        try:
            log_info(logger, msg, args, access())
        finally:
            request_id_var.reset(token)
        return
    handler.write(logger.name, msg % args, access, request_id)


def _sole_line_handler(logger: logging.Logger) -> LineHandler | None:
    """The handler an INFO record of `logger` would reach, when it is the only one and
    setup_logging's (nothing added to it); else None."""
    if logger.filters or logger.disabled:
        return None
    node: logging.Logger | None = logger
    while node is not None:
        if node.handlers:
            found = node.handlers
            if len(found) == 1 and type(found[0]) is LineHandler and node.parent is None:
                return found[0] if found[0].plain() else None
            return None
        if not node.propagate:
            return None
        node = node.parent
    return None


class _SecondStamps(logging.Formatter):
    """`formatTime` with the date and time to the second formatted once per second: every
    request writes a line, and strftime is the dearest part of formatting one."""

    _last: tuple[int, str | None, str] = (-1, None, "")  # second, datefmt, stamp: one swap

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._stamp(int(record.created), datefmt)

    def _stamp(self, second: int, datefmt: str | None) -> str:
        last_second, last_datefmt, stamp = self._last
        if second != last_second or datefmt != last_datefmt:
            stamp = time.strftime(datefmt or self.default_time_format, self.converter(second))
            self._last = (second, datefmt, stamp)
        return stamp


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def escape_controls(text: str) -> str:
    """Control characters (newlines, ESC, Unicode line separators) as escapes: a
    client-chosen value cannot end a log line or start a forged one."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    return ch.encode("unicode_escape").decode("ascii")


def redact(text: str) -> str:
    """Credentials that follow their name (Authorization: ..., X-Amz-Signature=...) hidden."""
    folded = text.casefold()
    # A loop, not any() over a generator: this runs for every log line, and the
    # generator's frames were most of its cost (1.6 against 1.0 µs for an audit line).
    for hint in _CREDENTIAL_HINTS:
        if hint in folded:
            return _CREDENTIAL.sub(lambda m: f"{m.group(1)}{m.group(2)}<redacted>", text)
    return text


class WorkerFilter(logging.Filter):
    """Stamps each record with the index of the worker process that wrote it (`workers`)."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self._worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self._worker
        return True


def _continuation(text: str) -> str:
    """A traceback in a text log: an exception's message holds what a client sent (aiohttp
    quotes a header it refused, credentials and all). Each line is redacted and escaped, and
    indented, so none of them can pass for a record of its own."""
    return "\n".join("  " + escape_controls(line) for line in redact(text).splitlines())


def _millis(created: float) -> int:
    """A record's `msecs`, as LogRecord works it out."""
    return int((created - int(created)) * 1000)


class TextFormatter(_SecondStamps):
    """`time level logger [request id] message`, the milliseconds after a comma; one line
    per record: client-chosen text escaped, credentials redacted."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{super().formatTime(record, datefmt)},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        """The message line, then any traceback and stack, each of their lines escaped,
        redacted and indented (what another handler may have cached on the record is not
        used: it is neither)."""
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        more = [self.formatException(record.exc_info) if record.exc_info else record.exc_text]
        more.append(self.formatStack(record.stack_info) if record.stack_info else None)
        return "\n".join([line, *(_continuation(text) for text in more if text)])

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(redact(super().formatMessage(record)))

    def direct(
        self, created: float, name: str, message: str, request_id: str, _: int | None, __: Fields
    ) -> str:
        """The line `format` gives an INFO record of `name` made at `created` (the worker's
        index is in the format already)."""
        asctime = f"{self._stamp(int(created), self.datefmt)},{_millis(created):03d}"
        values = {
            "asctime": asctime, "levelname": "INFO", "name": name,
            "request_id": request_id, "message": message,
        }  # fmt: skip
        return escape_controls(redact(self._fmt % values if self._fmt else message))


class JsonFormatter(_SecondStamps):
    """One JSON object per line: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else None
        if exception is not None:
            exception = redact(exception)  # a client's refused header is quoted in it
        return self._line(
            self._time(record.created, int(record.msecs)), record.levelname.lower(), record.name,
            record.getMessage(), getattr(record, "request_id", "-"),
            getattr(record, "worker", None), getattr(record, "access", None), exception,
        )  # fmt: skip

    def direct(
        self,
        created: float,
        name: str,
        message: str,
        request_id: str,
        worker: int | None,
        access: Fields,
    ) -> str:
        """The line `format` gives an INFO record of `name` made at `created`."""
        return self._line(
            self._time(created, _millis(created)),
            "info",
            name,
            message,
            request_id,
            worker,
            access(),
            None,
        )

    def _time(self, created: float, millis: int) -> str:
        return f"{self._stamp(int(created), ISO_SECONDS)}.{millis:03d}Z"

    def _line(
        self, when: str, level: str, name: str, message: str, request_id: str,
        worker: int | None, access: Any, exception: str | None,
    ) -> str:  # fmt: skip
        entry: dict[str, Any] = {
            "time": when, "level": level, "logger": name,
            "message": redact(message), "request_id": request_id,
        }  # fmt: skip
        if worker is not None:
            entry["worker"] = worker
        if isinstance(access, dict):
            entry.update(access)
        if exception is not None:
            entry["exception"] = exception
        return json.dumps(entry)


class LineHandler(logging.StreamHandler[TextIO]):
    """setup_logging's handler: each record stamped with its request id and the worker's
    index; `write` takes a request's one line with no record made (log_request_line).

    The lines of the requests answered in one turn of the event loop go out in one write at
    its end, not one write each: under load a turn answers dozens. A record written the
    standard way (a warning, a thread's line) first sends the lines before it, so the order
    stays; a process killed outright loses one turn's lines at most."""

    def __init__(self, formatter: TextFormatter | JsonFormatter, worker: int | None) -> None:
        super().__init__()
        self.addFilter(RequestIdFilter())
        if worker is not None:
            self.addFilter(WorkerFilter(worker))
        self._own_filters = len(self.filters)
        self.setFormatter(formatter)
        self._worker = worker
        self._pending: list[str] = []

    def plain(self) -> bool:
        """As setup_logging made it: an INFO line written here is what a record gives."""
        return (
            len(self.filters) == self._own_filters
            and self.level <= logging.INFO
            and type(self.formatter) in (TextFormatter, JsonFormatter)
        )

    def write(self, name: str, message: str, access: Fields, request_id: str) -> None:
        formatter = cast(TextFormatter | JsonFormatter, self.formatter)
        try:
            line = formatter.direct(time.time(), name, message, request_id, self._worker, access)
        except Exception:  # as StreamHandler.emit: a log line never fails a request
            self.handleError(logging.makeLogRecord({"name": name, "msg": message}))
            return
        self.acquire()  # threads log too
        try:
            self._pending.append(line)
            first = len(self._pending) == 1
        finally:
            self.release()
        if first:
            try:
                asyncio.get_running_loop().call_soon(self.write_pending)
            except RuntimeError:  # no event loop in this thread: at once
                self.write_pending()

    def write_pending(self) -> None:
        """The lines `write` has kept, in one write."""
        self.acquire()
        try:
            lines, self._pending = self._pending, []
            if lines:
                self.stream.write(self.terminator.join(lines) + self.terminator)
                self.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "request lines"}))
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending:  # the lines before it first
            self.write_pending()
        super().emit(record)

    def close(self) -> None:
        self.write_pending()
        super().close()


def setup_logging(level: str, fmt: str, worker: int | None = None) -> None:
    """Configure the root logger once, for `mirror serve` and the other commands; a worker
    of `workers: N` names itself on every line."""
    formatter: TextFormatter | JsonFormatter
    if fmt == "json":
        formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        where = "" if worker is None else f" worker={worker}"
        formatter = TextFormatter(TEXT_FORMAT.replace(" [", f"{where} [", 1))
    handler = LineHandler(formatter, worker)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # No format shows a record's thread or process, and finding them out is a third of the
    # cost of making a record, paid on every request (the logging HOWTO's "Optimization").
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # Audit lines (web/audit.py) are kept whatever the level: a record, not chatter.
    logging.getLogger("mirror.audit").setLevel(logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


class FailureLog:
    """Upstream failures that clients saw: one WARNING each, naming the upstream, the
    repository and the cause, at most one line per upstream and cause every `interval`
    (an outage must not flood the log); the next line counts the ones held back."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._wall = wall
        self._next: dict[tuple[str, str], float] = {}
        # Held back per key: how many, and since when (wall time): the next line may come
        # minutes after the burst it counts.
        self._held: dict[tuple[str, str], tuple[int, float]] = {}
        # The same error reaches every client of one download: it is logged once.
        self._seen: weakref.WeakSet[BaseException] = weakref.WeakSet()

    def warn(self, upstream: str, repository: str, error: BaseException, cause: str) -> None:
        if error in self._seen:
            return
        self._seen.add(error)
        key = (upstream, type(error).__name__)
        now = self._clock()
        if now < self._next.get(key, 0.0):
            count, since = self._held.get(key, (0, self._wall()))
            self._held[key] = (count + 1, since)
            return
        self._next[key] = now + self._interval
        held, since = self._held.pop(key, (0, 0.0))
        shown = time.strftime("%H:%M:%S", time.localtime(since))
        more = f" ({held} more like it since {shown})" if held else ""
        self._log.warning(
            "upstream %s failed for %s: %s%s",
            escape_controls(upstream), escape_controls(repository), escape_controls(cause), more,
        )  # fmt: skip
