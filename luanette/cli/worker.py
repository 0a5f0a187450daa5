"""``luanette worker``: a worker process on another machine that joins a front's pool.

It is the worker the front starts locally (luanette.engine.worker), connected over tcp
to the front's pool endpoint (``luanette serve --pool``, seed 001's ``:5571``) instead
of a private ipc socket.  It registers (seed 001's ``Register(WorkerRegistration)``),
beats every second, takes only as many runs as its ``--capacity``, and outlives its
front: when the front stops answering it drops its runs and registers again with the
front that comes back (docs/operations.md, "Scaling out").

Model backends and the garden stay the front's: a run's calls go back over the pool
socket, so the daemon-wide limits hold whichever machine runs the Lua.  The CAS is a
shared filesystem: ``--cas`` must name the same store the front uses.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

from luanette import auth
from luanette.capabilities import GROUP_PATTERN, CapabilityError, parse
from luanette.cli.argtypes import at_least


def _group(text: str) -> str:
    if not GROUP_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"not a group name (letters, digits, '_', '.', '-'): {text!r}")
    return text


def _capability(text: str) -> str:
    if text == "*":
        return text
    try:
        parse(text)
    except CapabilityError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``luanette worker``."""
    parser.add_argument("--connect", required=True, metavar="ENDPOINT",
                        help="the front's pool endpoint, e.g. tcp://front:5571")
    parser.add_argument("--curve", default=None, metavar="DIR",
                        help="join with CURVE: DIR holds the front's server.key and this worker's "
                        "worker.key_secret (its worker.key goes into the front's workers/)")
    parser.add_argument("--group", type=_group, default="default", metavar="NAME",
                        help="the worker group (scripts and triggers that name a group run only on "
                        "its workers; default 'default')")
    parser.add_argument("--capability", dest="capabilities", type=_capability, action="append", default=None,
                        metavar="CAP", help="a capability the worker offers (seed 003: model:*, garden.write, "
                        "fs.read:samples:*...); repeat it; default: every one")
    parser.add_argument("--capacity", type=at_least(int, 1), default=1024, metavar="N",
                        help="runs at once (default 1024: most runs wait on I/O)")
    parser.add_argument("--name", default=None,
                        help="its name in the pool (default HOST-PID); a worker that joins again under "
                        "the same name takes its place")
    parser.add_argument("--cas", dest="cas_root", default=None, metavar="DIR",
                        help="the CAS the front uses, on a shared filesystem (default $HOOTENANNY_CAS_PATH, "
                        "else ~/.hootenanny/cas)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="the front's config file (its backends, model and fs sections name what the "
                        "runs here may use)")
    parser.add_argument("--temp-dir", default=None, metavar="DIR",
                        help="where runs' temp directories go (default: the system's)")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines")


def run(args: argparse.Namespace) -> int:
    """Run the worker until the front tells it to stop (or it is killed)."""
    from luanette import logs
    from luanette.engine import worker
    from luanette.settings import SettingsError, load_settings

    curve = None
    if args.curve:
        try:
            curve = auth.load_worker(args.curve)
        except auth.AuthError as e:
            print(f"luanette worker: {e}", file=sys.stderr)
            return 2
    elif not auth.is_local(args.connect):
        print(
            f"luanette worker: {args.connect} is not on this machine: join it with --curve DIR "
            "(the front refuses a pool off loopback without CURVE; see docs/security.md)",
            file=sys.stderr,
        )
        return 2
    try:
        settings = load_settings(args.config)
    except SettingsError as e:
        print(f"luanette worker: {e}", file=sys.stderr)
        return 2
    name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    temp_root = Path(args.temp_dir or tempfile.gettempdir()) / f"luanette-worker-{name}"
    temp_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    config = worker.WorkerConfig(
        endpoint=args.connect,
        name=name,
        capacity=args.capacity,
        temp_root=str(temp_root),
        cas_root=args.cas_root,
        settings=settings,
        log_json=args.log_json,
        remote=True,
        group=args.group,
        capabilities=tuple(args.capabilities or ("*",)),
        curve=curve,
    )
    logs.configure(json=args.log_json)
    worker.main(config, lifeline=None, remote=True)
    return 0
