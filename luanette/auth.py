"""Who may talk to the daemon: CURVE key pairs, the ZAP handler, admin rights.

Keys are files in pyzmq's certificate format (``zmq.auth``): ``NAME.key`` holds a
public key, ``NAME.key_secret`` the pair. ``luanette serve --curve DIR`` reads

- ``DIR/server.key_secret``: the daemon's own pair (clients need ``server.key``);
- ``DIR/clients/*.key``: public keys allowed to connect and make ordinary requests;
- ``DIR/admins/*.key``: public keys allowed to connect and make admin requests too;
- ``DIR/workers/*.key``: public keys of remote workers (``luanette worker --curve``)
  allowed to join the pool endpoint, and nothing else: a worker key is not a client
  key, and a client key cannot join the pool (it would be sent other users' scripts).

pyzmq's ZAP authenticator checks each connecting key against the key ring; every
message also carries its sender's key (the ZAP User-Id), which the server checks
against the ring as it is *now*, so a key removed and re-read (SIGHUP) is refused from
its next request on, on connections opened before too.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from hooteproto.client import CurveKeys

SERVER_KEY = "server.key"
SERVER_SECRET = "server.key_secret"
CLIENT_SECRET = "client.key_secret"
CLIENTS_DIR = "clients"
ADMINS_DIR = "admins"
WORKERS_DIR = "workers"
WORKER_SECRET = "worker.key_secret"
ZAP_DOMAIN = b"luanette"
POOL_DOMAIN = b"luanette-pool"

ENV_CURVE = "LUANETTE_CURVE"
"""The client's key directory when ``--curve`` is not given."""


class AuthError(Exception):
    """A key directory or file that cannot be used; the message says what to do."""


class Caller(msgspec.Struct, frozen=True):
    """Who sent a request: their public key (z85) under CURVE, and whether it may make
    admin requests. Without CURVE (loopback only) every caller is an admin."""

    key: str | None = None
    admin: bool = True


ANYONE = Caller()
"""The caller of a daemon without CURVE."""


class KeyRing(msgspec.Struct, frozen=True):
    """The public keys (z85 text) allowed to connect, and those of them that are admins."""

    clients: frozenset[str]
    admins: frozenset[str]
    workers: frozenset[str] = frozenset()  # may join the pool endpoint, nothing more

    def caller(self, key: str | None) -> Caller | None:
        """The caller a key is now, or None when the ring no longer has it."""
        if key in self.admins:
            return Caller(key, admin=True)
        if key in self.clients:
            return Caller(key, admin=False)
        return None


class ServerKeys(msgspec.Struct, frozen=True):
    """The daemon's key pair (z85 bytes) and its key ring."""

    public: bytes
    secret: bytes
    ring: KeyRing


# --- files ---------------------------------------------------------------------------


def generate(directory: Path | str, name: str = "server") -> tuple[Path, Path]:
    """Write a new key pair ``NAME.key`` and ``NAME.key_secret`` (mode 0600) into
    ``directory`` (created 0700 when missing). Refuses to overwrite a pair."""
    if not name or "/" in name or name.startswith("."):
        raise AuthError(f"a key name is a plain file name, got {name!r}")
    directory = Path(directory)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise AuthError(f"{path} exists; remove it first or pick another --name")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # the secret is written readable by us only from its first byte
    old = os.umask(0o077)
    try:
        written_public, written_secret = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old)
    os.chmod(written_public, 0o644)
    return Path(written_public), Path(written_secret)


def init(directory: Path | str) -> list[Path]:
    """Lay out a key directory for a daemon, its first two users and its remote workers,
    keeping whatever is there already (safe to run at every start): ``DIR/server`` (for
    ``serve --curve``), ``DIR/client`` and ``DIR/admin`` (each for ``luanette-cli
    --curve``: the daemon's public key and the user's pair, whose public key is in the
    server's ``clients/`` or ``admins/``), ``DIR/worker`` (for ``luanette worker
    --curve``: the daemon's public key and the workers' pair ``worker.key_secret``, whose
    public key is in the server's ``workers/``). Returns the files it wrote."""
    directory = Path(directory)
    server = directory / "server"
    written: list[Path] = []
    if not (server / SERVER_SECRET).exists():
        written.extend(generate(server, "server"))
    for user, role, pair in (("client", CLIENTS_DIR, "client"), ("admin", ADMINS_DIR, "client"),
                             ("worker", WORKERS_DIR, "worker")):  # fmt: skip
        home = directory / user
        if not (home / f"{pair}.key_secret").exists():
            written.extend(generate(home, pair))
        for source, target in (
            (server / SERVER_KEY, home / SERVER_KEY),
            (home / f"{pair}.key", server / role / f"{user}.key"),
        ):
            if not target.exists():
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                target.write_bytes(source.read_bytes())
                written.append(target)
    return written


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise AuthError(f"cannot read the key file {path}: {e}") from None
    if secret and secret_key is None:
        raise AuthError(f"{path} holds no secret key (expected a .key_secret file)")
    return public, secret_key


def _public_keys(directory: Path) -> frozenset[str]:
    if not directory.is_dir():
        return frozenset()
    keys = set()
    for path in sorted(directory.glob("*.key")):
        public, _ = _load(path, secret=False)
        keys.add(public.decode("ascii"))
    return frozenset(keys)


def load_ring(directory: Path | str) -> KeyRing:
    """The key ring of a server key directory (``clients/`` and ``admins/``)."""
    directory = Path(directory)
    admins = _public_keys(directory / ADMINS_DIR)
    return KeyRing(
        clients=_public_keys(directory / CLIENTS_DIR) | admins,
        admins=admins,
        workers=_public_keys(directory / WORKERS_DIR),
    )


def load_server(directory: Path | str) -> ServerKeys:
    """The daemon's pair and key ring from ``directory``; :class:`AuthError` says what
    is missing."""
    directory = Path(directory)
    path = directory / SERVER_SECRET
    if not path.is_file():
        raise AuthError(
            f"no {SERVER_SECRET} in {directory}: create it with `luanette keys generate {directory}`, "
            f"and put the public keys of clients in {directory / CLIENTS_DIR}/ and of admins in "
            f"{directory / ADMINS_DIR}/"
        )
    public, secret = _load(path, secret=True)
    assert secret is not None
    ring = load_ring(directory)
    if not ring.clients:
        raise AuthError(
            f"no client keys in {directory / CLIENTS_DIR}/ or {directory / ADMINS_DIR}/: nobody could connect"
        )
    return ServerKeys(public=public, secret=secret, ring=ring)


def load_client(directory: Path | str) -> CurveKeys:
    """A client's keys from ``directory``: ``server.key`` (the daemon's public key) and
    ``client.key_secret`` (its own pair)."""
    directory = Path(directory)
    server_path, client_path = directory / SERVER_KEY, directory / CLIENT_SECRET
    for path, hint in ((server_path, "copy the daemon's server.key here"),
                       (client_path, f"create it with `luanette keys generate {directory} --name client`")):
        if not path.is_file():
            raise AuthError(f"no {path.name} in {directory}: {hint}")
    server, _ = _load(server_path, secret=False)
    public, secret = _load(client_path, secret=True)
    assert secret is not None
    return CurveKeys(server=server, public=public, secret=secret)


# --- sockets -------------------------------------------------------------------------


def secure_server_socket(sock: zmq.Socket, keys: ServerKeys, domain: bytes = ZAP_DOMAIN) -> None:
    """Make ``sock`` (before bind) a CURVE server checked by the ZAP handler: clients'
    keys in ``ZAP_DOMAIN``, workers' keys in ``POOL_DOMAIN``."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    sock.zap_domain = domain


def load_worker(directory: Path | str) -> tuple[str, str, str]:
    """A remote worker's keys from ``directory``: ``server.key`` (the front's public
    key) and ``worker.key_secret`` (its own pair, whose ``worker.key`` goes into the
    front's ``workers/``), as z85 text: (server, public, secret)."""
    directory = Path(directory)
    server_path, worker_path = directory / SERVER_KEY, directory / WORKER_SECRET
    for path, hint in ((server_path, "copy the front's server.key here"),
                       (worker_path, f"create it with `luanette keys generate {directory} --name worker` "
                        "and copy worker.key into the front's workers/ directory")):
        if not path.is_file():
            raise AuthError(f"no {path.name} in {directory}: {hint}")
    server, _ = _load(server_path, secret=False)
    public, secret = _load(worker_path, secret=True)
    assert secret is not None
    return server.decode("ascii"), public.decode("ascii"), secret.decode("ascii")


class Gate:
    """The ZAP handler of a daemon's ZeroMQ context and the current key ring.  A
    context has one ZAP endpoint: one Gate per context at a time (stop it to start
    another)."""

    def __init__(self, context: zmq.Context, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.keys = load_server(self.directory)
        self._context = context
        self._auth: AsyncioAuthenticator | None = None

    @property
    def ring(self) -> KeyRing:
        return self.keys.ring

    def start(self) -> None:
        """Answer ZAP requests (on the running event loop) from now on."""
        auth = AsyncioAuthenticator(self._context)
        auth.start()
        auth.configure_curve_callback(domain=ZAP_DOMAIN.decode(), credentials_provider=self)
        auth.configure_curve_callback(domain=POOL_DOMAIN.decode(), credentials_provider=_PoolKeys(self))
        self._auth = auth

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: whether the z85 public ``key`` may connect."""
        return key.decode("ascii", "replace") in self.keys.ring.clients

    def reload(self) -> KeyRing:
        """Re-read ``clients/`` and ``admins/``; the old ring stays when they cannot be
        read (:class:`AuthError` tells why)."""
        ring = load_ring(self.directory)
        self.keys = msgspec.structs.replace(self.keys, ring=ring)
        return ring

    def caller(self, user_id: str | None) -> Caller | None:
        """Who sent a message whose ZAP User-Id is ``user_id``; None: no longer allowed."""
        return self.keys.ring.caller(user_id)


class _PoolKeys:
    """ZAP for the pool endpoint: only the ring's worker keys may join."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def callback(self, domain: str, key: bytes) -> bool:
        return key.decode("ascii", "replace") in self._gate.keys.ring.workers


# --- endpoints -----------------------------------------------------------------------

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]", "lo"}


def is_local(endpoint: str) -> bool:
    """Whether only this machine can reach ``endpoint`` (loopback tcp, ipc, inproc)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0]
    if ";" in host:  # "source;destination" (a connect form): the destination matters
        host = host.rsplit(";", 1)[1]
    return host in _LOCAL_HOSTS or host.startswith("127.")
