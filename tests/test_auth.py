"""Who may talk to the daemon: CURVE with real key pairs over real sockets, admin
requests, key revocation (SIGHUP), the exposure check, and a CLI that says at once
when it cannot connect."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from hooteproto import types as t
from hooteproto.client import Client, ConnectionFailed, RequestTimeout
from hooteproto.codec import decode_broadcast
from luanette import auth
from luanette.cli import daemon as daemon_cli
from tests.conftest import BIN, cli, free_port

pytestmark = pytest.mark.timeout(60)


class Keys:
    """A daemon key directory with one client and one admin, and each one's own
    client-side directory (server.key + client.key_secret), as an operator lays them out."""

    def __init__(self, root: Path) -> None:
        self.server = root / "server"
        auth.generate(self.server, "server")
        self.client = self._person(root, "alice", auth.CLIENTS_DIR)
        self.admin = self._person(root, "root", auth.ADMINS_DIR)
        self.stranger = root / "stranger"  # a pair the daemon has never heard of
        auth.generate(self.stranger, "client")
        shutil.copy(self.server / "server.key", self.stranger / "server.key")

    def _person(self, root: Path, name: str, role: str) -> Path:
        home = root / name
        auth.generate(home, "client")
        shutil.copy(self.server / "server.key", home / "server.key")
        (self.server / role).mkdir(exist_ok=True)
        shutil.copy(home / "client.key", self.server / role / f"{name}.key")
        return home


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


@pytest.fixture
async def curved(make_server, keys):
    return await make_server(curve=str(keys.server))


def as_(home: Path, endpoint: str) -> Client:
    return Client(endpoint, curve=auth.load_client(home))


# --- keys ----------------------------------------------------------------------------


def test_keys_generate_writes_a_pair_with_a_private_secret(tmp_path, capsys):
    assert daemon_cli.main(["keys", "generate", str(tmp_path / "k"), "--name", "studio"]) == 0
    public, secret = tmp_path / "k" / "studio.key", tmp_path / "k" / "studio.key_secret"
    assert capsys.readouterr().out.split() == [str(public), str(secret)]
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" in secret.read_text() and "secret-key" not in public.read_text()
    # never overwritten: a second generate would lock every client out
    before = secret.read_bytes()
    assert daemon_cli.main(["keys", "generate", str(tmp_path / "k"), "--name", "studio"]) == 2
    assert "exists" in capsys.readouterr().err and secret.read_bytes() == before


def test_a_key_directory_that_cannot_work_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(auth.AuthError, match="luanette keys generate"):
        auth.load_server(tmp_path)
    auth.generate(tmp_path, "server")
    with pytest.raises(auth.AuthError, match="nobody could connect"):
        auth.load_server(tmp_path)
    (tmp_path / "clients").mkdir()
    (tmp_path / "clients" / "broken.key").write_text("not a certificate")
    with pytest.raises(auth.AuthError, match="broken.key"):
        auth.load_server(tmp_path)
    with pytest.raises(auth.AuthError, match="client.key_secret"):
        auth.load_client(tmp_path)


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("tcp://127.0.0.1:5570", True),
        ("tcp://localhost:5570", True),
        ("tcp://[::1]:5570", True),
        ("ipc:///tmp/x", True),
        ("tcp://0.0.0.0:5570", False),
        ("tcp://*:5570", False),
        ("tcp://10.0.0.5:5570", False),
        ("tcp://eth0:5570", False),
    ],
)
def test_which_endpoints_only_this_machine_reaches(endpoint, local):
    assert auth.is_local(endpoint) is local


# --- CURVE over real sockets -----------------------------------------------------------


async def test_a_client_key_runs_code_but_cannot_stop_the_daemon(curved, keys):
    async with as_(keys.client, curved.endpoint) as c:
        await c.connected()
        reply = await c.request(t.LuaEval(code="return 6 * 7"))
        assert isinstance(reply, t.Success) and reply.result["result"] == 42
        for admin_only in (t.Shutdown(reason="mine now"), _registration()):
            refused = await c.request(admin_only)
            assert isinstance(refused, t.Error) and refused.code == "forbidden"
            assert refused.details == {"reason": "not_admin"} and "admin key" in refused.message
    assert not curved.server.draining and curved.server.stats.forbidden == 2


async def test_an_admin_key_may_register_and_stop_the_daemon(curved, keys):
    async with as_(keys.admin, curved.endpoint) as c:
        registered = await c.request(_registration())
        assert isinstance(registered, t.Success) and registered.result["registered"] is True
        stopping = await c.request(t.Shutdown(reason="maintenance"))
        assert isinstance(stopping, t.Success) and stopping.result["shutting_down"] is True
    await asyncio.wait_for(curved.task, 15)
    assert curved.server.shutdown_reason == "maintenance"


async def test_a_client_without_keys_gets_no_answer(curved):
    async with Client(curved.endpoint) as c:
        with pytest.raises(ConnectionFailed, match="may require CURVE"):
            await c.connected(within=10)
        with pytest.raises(RequestTimeout):
            await c.request(t.Ping(), timeout=0.5)
    assert curved.server.stats.received == 0


async def test_an_unknown_key_is_refused_at_the_handshake(curved, keys):
    async with as_(keys.stranger, curved.endpoint) as c:
        with pytest.raises(ConnectionFailed, match="refused this client's key"):
            await c.connected(within=10)
        with pytest.raises(RequestTimeout):
            await c.request(t.Ping(), timeout=0.5)
    assert curved.server.stats.received == 0


async def test_a_revoked_key_is_refused_from_its_next_request_on(curved, keys):
    async with as_(keys.client, curved.endpoint) as c:
        assert isinstance(await c.request(t.Ping()), t.Pong)
        (keys.server / auth.CLIENTS_DIR / "alice.key").unlink()
        curved.server.reload_keys()
        # the open connection: refused, with the reason
        refused = await c.request(t.Ping())
        assert isinstance(refused, t.Error) and refused.code == "forbidden"
        assert refused.details == {"reason": "key_revoked"}
    async with as_(keys.client, curved.endpoint) as again:  # a new one: not even connected
        with pytest.raises(ConnectionFailed, match="refused this client's key"):
            await again.connected(within=10)
    async with as_(keys.admin, curved.endpoint) as admin:  # the others are unaffected
        assert isinstance(await admin.request(t.Ping()), t.Pong)


async def test_an_unreadable_key_directory_keeps_the_old_keys(curved, keys):
    (keys.server / auth.CLIENTS_DIR / "broken.key").write_text("garbage")
    curved.server.reload_keys()  # logged, not applied
    async with as_(keys.client, curved.endpoint) as c:
        assert isinstance(await c.request(t.Ping()), t.Pong)


async def test_broadcasts_reach_only_subscribers_with_keys(curved, keys, zctx):
    endpoint = curved.server.publisher.endpoint
    allowed = zctx.socket(zmq.SUB)
    auth.load_client(keys.client).apply(allowed)
    allowed.setsockopt(zmq.SUBSCRIBE, b"")
    allowed.connect(endpoint)
    keyless = zctx.socket(zmq.SUB)
    keyless.setsockopt(zmq.SUBSCRIBE, b"")
    monitor = keyless.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                         | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    keyless.connect(endpoint)
    event = zmq.utils.monitor.parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), 10))
    assert event["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED  # the PUB socket requires CURVE too
    async with as_(keys.client, curved.endpoint) as c:
        stored = await c.request(t.ScriptStore(content="return 1"))
        digest = stored.result["hash"]
        # a subscription takes effect some time after connect: store again until it shows
        while not await allowed.poll(50):
            await c.request(t.ScriptStore(content="return 1"))
    message = decode_broadcast(await allowed.recv())
    assert isinstance(message, t.ScriptInvalidate) and message.hash == digest
    assert not await keyless.poll(0)
    for sock in (allowed, keyless, monitor):
        sock.close(0)


async def test_registrations_keep_the_latest_per_worker_and_are_bounded(server, client):
    from luanette.dispatch import MAX_REGISTRATION_BYTES, MAX_REGISTRATIONS

    dispatcher = server.server.dispatcher
    first = _registration()
    for name in ("one", "two"):  # the same worker id twice: one entry, the latest
        assert isinstance(await client.request(_registration(first.worker_id, name)), t.Success)
    assert len(dispatcher.registrations) == 1
    assert dispatcher.registrations[first.worker_id].worker_name == "two"
    for _ in range(MAX_REGISTRATIONS + 10):
        await client.request(_registration())
    assert len(dispatcher.registrations) == MAX_REGISTRATIONS
    assert first.worker_id not in dispatcher.registrations  # the oldest went first
    huge = await client.request(_registration(name="x" * (MAX_REGISTRATION_BYTES + 1)))
    assert isinstance(huge, t.Error) and huge.code == "invalid_params"
    assert huge.details["limit"] == MAX_REGISTRATION_BYTES
    assert len(dispatcher.registrations) == MAX_REGISTRATIONS


def _registration(worker_id=None, name="w") -> t.Register:
    import uuid

    return t.Register(
        worker_id=worker_id or uuid.uuid4(),
        worker_name=name,
        worker_type=t.WorkerType.LUANETTE,
        capabilities=["lua"],
        hostname="here",
        version="1",
    )


# --- the daemon and the CLI as processes -------------------------------------------------


def test_a_public_bind_without_curve_refuses_to_start(tmp_path):
    port = free_port()
    result = subprocess.run(
        [str(BIN / "luanette"), "serve", "--bind", f"tcp://0.0.0.0:{port}", "--pub", "none",
         "--state-dir", str(tmp_path / "s"), "--cas-root", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to start" in result.stderr and "--curve" in result.stderr and "--insecure" in result.stderr


def test_insecure_starts_and_says_so(daemon_process):
    daemon = daemon_process("--insecure")
    daemon.stop()
    assert "server.insecure" in daemon.proc.stderr.read().decode()


def test_sighup_rereads_the_keys_of_a_running_daemon(daemon_process, keys):
    daemon = daemon_process("--curve", str(keys.server))
    env = os.environ | {auth.ENV_CURVE: str(keys.client)}
    first = subprocess.run([str(BIN / "luanette-cli"), "--endpoint", daemon.endpoint, "ping"],
                           capture_output=True, text=True, timeout=60, env=env)
    assert first.returncode == 0 and "pong" in first.stdout
    (keys.server / auth.CLIENTS_DIR / "alice.key").unlink()
    daemon.signal(signal.SIGHUP)

    def refused() -> bool:
        again = subprocess.run([str(BIN / "luanette-cli"), "--endpoint", daemon.endpoint, "ping"],
                               capture_output=True, text=True, timeout=60, env=env)
        return again.returncode == 3 and "refused this client's key" in again.stderr

    # (polls the daemon until the signal has been handled: there is no reply to a signal)
    deadline_rounds = 200
    while not refused():
        deadline_rounds -= 1
        assert deadline_rounds, "the revoked key was never refused"
    assert daemon.proc.poll() is None  # SIGHUP reloads; it does not stop the daemon


def test_the_cli_says_at_once_that_nothing_is_listening():
    # --timeout 60: only the connection check can end this before the test's own timeout
    result = cli(f"tcp://127.0.0.1:{free_port()}", "--timeout", "60", "ping", timeout=50)
    assert result.returncode == 3 and "nothing is listening" in result.stderr


def test_the_cli_says_at_once_that_the_daemon_wants_keys(daemon_process, keys):
    daemon = daemon_process("--curve", str(keys.server))
    result = cli(daemon.endpoint, "--timeout", "60", "ping", timeout=50)
    assert result.returncode == 3 and "CURVE" in result.stderr
    with_keys = cli(daemon.endpoint, "--curve", str(keys.admin), "ping")
    assert with_keys.returncode == 0 and "pong" in with_keys.stdout


def test_keys_init_lays_out_a_daemon_and_two_users_and_keeps_them(tmp_path, capsys):
    root = tmp_path / "keys"
    assert daemon_cli.main(["keys", "init", str(root)]) == 0
    made = capsys.readouterr().out.split()
    assert str(root / "server" / "server.key_secret") in made
    server = auth.load_server(root / "server")
    client, admin = auth.load_client(root / "client"), auth.load_client(root / "admin")
    assert client.server == admin.server == server.public
    assert server.ring.caller(client.public.decode()) == auth.Caller(client.public.decode(), admin=False)
    assert server.ring.caller(admin.public.decode()) == auth.Caller(admin.public.decode(), admin=True)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert daemon_cli.main(["keys", "init", str(root)]) == 0  # again (every container start)
    assert capsys.readouterr().out == ""
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
