"""The worker launcher: one small process that has imported the worker and forks it.

Starting a worker as a new interpreter costs a second or more of imports on a small
machine; forking it from a process that has already imported everything costs a few
milliseconds, so a stuck worker is replaced at once.  multiprocessing's forkserver does
the same but re-imports the parent's ``__main__`` in every child; this one forks a clean,
single-threaded process that holds nothing but the imports.

Protocol on the launcher's stdin/stdout: frames of a 4-byte big-endian length and a
MessagePack body.  In: a ``WorkerConfig``.  Out: ``["started", pid]`` for each request,
in order, and ``["exited", pid, code]`` when a worker ends (``code`` negative: killed by
that signal).  The launcher exits when its stdin closes (the front is gone).

The front also hands over the read end of a *lifeline* pipe whose write end only it
holds; every worker keeps it and exits when it reads end-of-file, which happens the
moment the front's process ends, however it ends (a front that is a zombie still
counts as alive to ``kill(pid, 0)``, so a pid check is not enough).
"""

from __future__ import annotations

import os
import select
import signal
import struct
import sys
from typing import Any, Final

import msgspec

_LENGTH: Final = struct.Struct(">I")
MAX_FRAME: Final = 64 * 2**20


def write_frame(fd: int, body: bytes) -> None:
    """Write one frame (blocking, all of it)."""
    data = _LENGTH.pack(len(body)) + body
    while data:
        data = data[os.write(fd, data) :]


class FrameReader:
    """Frames out of a byte stream that arrives in pieces."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; the frames now complete."""
        self._buffer += data
        frames = []
        while len(self._buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes")
            if len(self._buffer) < _LENGTH.size + size:
                break
            frames.append(bytes(self._buffer[_LENGTH.size : _LENGTH.size + size]))
            del self._buffer[: _LENGTH.size + size]
        return frames


def _exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main(lifeline: int) -> None:
    """Serve launch requests until stdin closes."""
    from luanette import gcpolicy
    from luanette.engine import worker  # the preload: every child starts with it imported

    gcpolicy.settle()  # before the forks: the children's collections leave these pages shared

    decoder = msgspec.msgpack.Decoder(worker.WorkerConfig)
    requests, replies = sys.stdin.fileno(), sys.stdout.fileno()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # (wakes select through the wakeup fd)
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the front
    # decides when workers stop, and stops them itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reader = FrameReader()
    while True:
        try:
            ready, _, _ = select.select([requests, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
            _reap(replies)
        if requests in ready:
            data = os.read(requests, 65536)
            if not data:
                return  # the front is gone; its workers notice on their own
            for frame in reader.feed(data):
                pid = os.fork()
                if pid == 0:
                    _child(decoder.decode(frame), [requests, replies, wake_r, wake_w], worker, lifeline)
                write_frame(replies, msgspec.msgpack.encode(["started", pid]))


def _reap(replies: int) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        write_frame(replies, msgspec.msgpack.encode(["exited", pid, _exit_code(status)]))


def _child(config: Any, fds: list[int], worker: Any, lifeline: int) -> None:
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in fds:
        os.close(fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # stdout (the launcher's replies) becomes stderr: prints go to the log
    code = 0
    try:
        worker.main(config, lifeline)
    except BaseException:  # noqa: BLE001 (the last word of a worker: logged, then exit)
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main(int(sys.argv[1]))
