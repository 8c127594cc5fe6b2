"""SIGINT and SIGTERM: the first stops a run after the step in flight, the second at once, later ones wait.

One gate per process handles both signals:
- while a driver's step loop listens (`on_stop`), the first signal only sets its stop flag: the run stops after
  the step in flight, takes its checkpoint and finishes as usual; the job exits 128 + signal. The listener may
  decline the stop (its callback returns a note): a signal that comes once every step has finished (the final
  checkpoint, validation, the results being written) leaves a complete run complete (exit 0), and counts;
- the next one (or the first where no loop listens: starting Ray, between two runs of a job) raises
  `Interrupted` at once in the main thread, wherever it is (Ray's blocking calls give way to it): the driver's
  end work releases the devices, status.json says `interrupted`, summary.json and the report are written with
  what is known, and the job exits 128 + the first signal;
- any later signal is only noted on stderr: the end work goes on (kill -9 abandons it), no traceback.

Every signal counts, also when several arrive while the main thread is blocked in C (ray.get, ray.wait):
CPython's C-level handler only sets one flag per signal number and the Python handler runs once for all
of them, at the next bytecode of the main thread (0.7 s late inside Ray's waits): two SIGINTs 50 ms apart
would be one. So the gate also registers a pipe with `signal.set_wakeup_fd`: the C-level handler writes one
byte, the signal's number, per delivery, and the Python handler reads them all, handling each signal in
the order it came. (CPython trips the flag before it writes the byte, possibly in another thread: a call
that finds no byte waits up to 50 ms for it; a call whose byte an earlier call already took finds none and
handles nothing twice.) Where another wakeup fd is registered (an asyncio loop in the main thread, before
the gate or since), that one stays and each handler call counts as one signal, as before. A self-pipe rather than
`signal.sigwait` in a thread: the main thread must still be interrupted (Interrupted is raised there), and
the pipe needs no signal masks, which Ray's and gRPC's threads would inherit.

A job holds the gate for its whole main() (`job_signals`); a Driver used on its own installs it for its run()
only. `ray.init` replaces the SIGTERM handler with its own (`sys.exit(15)`: exit code 15, no end work), so
`reinstall()` puts the gate back after it. Notes go to fd 2 with os.write: printing through sys.stderr from a
handler that interrupted a write to sys.stderr fails (reentrant call).
"""
from __future__ import annotations

import os
import select
import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from orchestrator.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
BYTE_WAIT_S = 0.05   # how long a handler call that found no byte waits for the one on its way


class StopSignals:
    """The gate: what the signals received so far mean now (see the module's docstring)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.raised: Interrupted | None = None
        self.on_stop: Callable[[str], str | None] | None = None  # a step loop's graceful stop (a note: declined)
        self.armed = True                                    # False once the job's main() is over: only noted
        self.previous = {s: signal.getsignal(s) for s in SIGNALS}
        self._pipe: tuple[int, int] | None = None            # (read, write): the wakeup fd, when it is ours

    def handle(self, signum: int, frame: Any) -> None:
        raised = None
        for s in self._arrived(signum):
            raised = self._one(s) or raised
        if raised is not None:
            raise raised

    def _arrived(self, signum: int) -> list[int]:
        """The signals behind this handler call, in order: the bytes the C-level handler wrote (one per
        delivery), else this call's signal (no wakeup fd of ours)."""
        if self._pipe is None:
            return [signum]
        data = self._drain()
        if not data and select.select([self._pipe[0]], [], [], BYTE_WAIT_S)[0]:
            data = self._drain()
        if not data:
            current = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
            if current != self._pipe[1]:  # cleared or replaced since (an asyncio loop): this byte went elsewhere
                if current != -1:         # another one's: it stays, and from now on a call counts as one signal
                    signal.set_wakeup_fd(current)
                    self._close_pipe()
                return [signum]
        return [b for b in data if b in SIGNALS]

    def _drain(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = os.read(self._pipe[0], 512)
            except (BlockingIOError, InterruptedError):
                return out
            if not chunk:
                return out
            out += chunk

    def _one(self, signum: int) -> Interrupted | None:
        """One signal: the gate's answer to it (an Interrupted to raise, or None)."""
        name = signal.Signals(signum).name
        self.received.append(signum)
        if self.raised is not None or not self.armed:
            _say(f"{name}: already stopping; the end work goes on (kill -9 abandons it)")
            return None
        if self.on_stop is not None and len(self.received) == 1:
            note = self.on_stop(name)
            _say(f"{name}: {note or 'stopping after the step in flight'}; a second signal stops at once")
            return None
        second = len(self.received) > 1
        self.raised = Interrupted(signum, self.received[0] if second else None)
        _say(f"{name}{' again' if second else ''}: interrupting now; the end work follows (devices released, "
             f"status, summary, report); a further signal is ignored")
        return self.raised

    def install(self) -> None:
        for s in SIGNALS:
            signal.signal(s, self.handle)
        self._register_wakeup_fd()

    def _register_wakeup_fd(self) -> None:
        if self._pipe is None:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._pipe = (r, w)
        old = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        if old not in (-1, self._pipe[1]):   # another one's (an asyncio loop's): it stays, a handler call counts one
            signal.set_wakeup_fd(old)
            self._close_pipe()

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def uninstall(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)  # None: a handler not set from Python
        if self._pipe is not None:
            current = signal.set_wakeup_fd(-1)
            if current != self._pipe[1]:   # someone registered theirs after ours: theirs stays
                signal.set_wakeup_fd(current)
            self._close_pipe()


_active: StopSignals | None = None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _say(text: str) -> None:
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


@contextmanager
def job_signals(keep: bool = False) -> Iterator[StopSignals | None]:
    """The gate for a job's main(). On leaving, later signals are only noted (the job is on its way out); unless
    `keep`, the handlers from before are put back (for a caller that goes on: a test calling main()). Outside
    the main thread, or inside another job's gate, it does nothing."""
    global _active
    if not _main_thread() or _active is not None:
        yield _active
        return
    gate = _active = StopSignals()
    gate.install()
    try:
        yield gate
    finally:
        gate.armed, gate.on_stop = False, None
        if not keep:
            gate.uninstall()
            _active = None


def on_stop(callback: Callable[[str], str | None]) -> Callable[[], None]:
    """Route the first SIGINT/SIGTERM to `callback(signal name)` (a graceful stop; a note it returns is said
    instead of "stopping after the step in flight": it declined the stop) until the returned function is
    called; a second one raises Interrupted. Installs the gate for that long where no job holds one. Outside
    the main thread (where Python runs no handler) it does nothing."""
    global _active
    if not _main_thread():
        return lambda: None
    own = _active is None
    gate = _active = _active or StopSignals()
    gate.install()  # also where the job holds it: ray.init may have replaced its SIGTERM handler since
    gate.on_stop = callback

    def undo() -> None:
        global _active
        gate.on_stop = None
        if own and _active is gate:
            gate.uninstall()
            _active = None
    return undo


def reinstall() -> None:
    """Put the job's gate back on SIGINT/SIGTERM (after `ray.init`, which sets its own SIGTERM handler)."""
    if _active is not None and _main_thread():
        _active.install()


def interrupted(e: BaseException) -> Interrupted:
    """The Interrupted behind `e`: `e` itself, or the one the gate raised where Ray turned it into a plain
    KeyboardInterrupt; a KeyboardInterrupt from Python's own SIGINT handler (no gate) counts as SIGINT."""
    if isinstance(e, Interrupted):
        return e
    if _active is not None and _active.raised is not None:
        return _active.raised
    return Interrupted(signal.SIGINT)
