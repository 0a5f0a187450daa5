"""luanette-cli and luanette as processes, through their console scripts."""

from __future__ import annotations

import json
import signal
import time
import uuid

import pytest

from hooteproto import types as t
from hooteproto.client import Client
from tests.conftest import cli, free_port
from tests.waiting import TIMED

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from tests.conftest import DaemonProcess

    d = DaemonProcess(tmp_path_factory.mktemp("daemon"), "--script-timeout", "5")
    yield d
    d.stop()


def test_ping_readable_and_json(daemon):
    readable = cli(daemon.endpoint, "ping")
    assert readable.returncode == 0, readable.stderr
    assert readable.stdout.startswith("pong from ")
    machine = cli(daemon.endpoint, "--json", "ping")
    reply = json.loads(machine.stdout)
    assert reply["type"] == "pong" and uuid.UUID(reply["worker_id"])


@pytest.mark.parametrize("encoding", ["compact", "named", "json"])
def test_eval_in_each_encoding(daemon, encoding):
    r = cli(daemon.endpoint, "--encoding", encoding, "--json", "eval", "return {a = params.n + 1, b = {}}",
            "--params", '{"n": 41}')
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["type"] == "success"
    assert reply["result"]["result"] == {"a": 42, "b": {}}
    assert reply["result"]["duration_ms"] >= 0


def test_eval_file_and_stdin(daemon, tmp_path):
    script = tmp_path / "s.lua"
    script.write_text("function main(p) return p.word .. '!' end")
    r = cli(daemon.endpoint, "eval", "-f", str(script), "--params", '{"word": "hey"}')
    assert r.returncode == 0 and r.stdout.strip() == "hey!"


def test_lua_error_exits_1_with_one_line(daemon):
    r = cli(daemon.endpoint, "eval", "local x = nil\nreturn x.field")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "lua_error" in lines[0] and "line 2" in lines[0] and "index a nil value" in lines[0]


def test_error_reply_in_json_mode_is_printed_whole(daemon):
    r = cli(daemon.endpoint, "--json", "eval", "while true do end")
    assert r.returncode == 1
    reply = json.loads(r.stdout)
    assert reply["code"] == "lua_error" and reply["details"]["kind"] == "timeout"


def test_tools_and_send(daemon):
    tools = cli(daemon.endpoint, "tools")
    assert tools.returncode == 0 and "lua_eval" in tools.stdout
    sent = cli(daemon.endpoint, "--json", "send", '{"type": "cas_get", "hash": "ab"}')
    assert sent.returncode == 1 and json.loads(sent.stdout)["code"] == "unsupported"


def test_bad_usage_exits_2(daemon):
    assert cli(daemon.endpoint, "eval", "return 1", "--params", "{oops").returncode == 2
    r = cli(daemon.endpoint, "send", '{"type": "nope"}')
    assert r.returncode == 2 and "not a payload" in r.stderr


@TIMED
def test_no_daemon_times_out_with_exit_3(timed):
    started = time.monotonic()
    r = cli(f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5", "ping")
    assert r.returncode == 3
    assert "nothing is listening" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    if timed:
        assert time.monotonic() - started < 10


async def _read_log_until(d, marker: bytes, timeout: float = 60) -> bytes:
    """The daemon's stderr up to and including the first line holding ``marker``."""
    import asyncio
    import threading

    loop = asyncio.get_running_loop()
    found: asyncio.Future[bytes] = loop.create_future()

    def read() -> None:  # a daemon thread: a blocked read must not hold up the loop's shutdown
        seen = b""
        for line in iter(d.proc.stderr.readline, b""):
            seen += line
            if marker in line:
                break
        if not loop.is_closed():
            loop.call_soon_threadsafe(lambda: found.done() or found.set_result(seen))

    threading.Thread(target=read, daemon=True).start()
    seen = await asyncio.wait_for(found, timeout)
    assert marker in seen, f"the daemon's log ended before {marker!r}: {seen.decode()}"
    return seen


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_and_exits_0(daemon_process, sig):
    d = daemon_process("--drain-timeout", "30")
    code = "log.info('drain-probe-running') local s = os.clock() + 0.6 while os.clock() < s do end return 'finished'"
    async with Client(d.endpoint) as c:
        import asyncio

        work = asyncio.create_task(c.request(t.LuaEval(code=code)))
        log = await _read_log_until(d, b"drain-probe-running")  # the script runs
        d.signal(sig)
        reply = await work
    assert isinstance(reply, t.Success) and reply.result["result"] == "finished"
    assert d.wait() == 0
    assert b"server.draining" in log + d.proc.stderr.read()


async def test_shutdown_request_stops_the_process(daemon_process):
    d = daemon_process()
    async with Client(d.endpoint) as c:
        reply = await c.request(t.Shutdown(reason="bye"))
    assert isinstance(reply, t.Success)
    assert d.wait() == 0


def test_daemon_refuses_a_bad_flag_and_a_busy_port(daemon):
    import subprocess

    from tests.conftest import BIN

    bad = subprocess.run([str(BIN / "luanette"), "serve", "--script-timeout", "-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "greater than 0" in bad.stderr
    busy = subprocess.run([str(BIN / "luanette"), "serve", "--bind", daemon.endpoint, "--pub", "none",
                           "--state-dir", str(daemon.state_dir) + "-2", "--cas-root", str(daemon.cas_root)],
                          capture_output=True, text=True, timeout=20)
    assert busy.returncode == 1 and "server.failed" in busy.stderr


@TIMED
async def test_a_script_stuck_in_c_does_not_hold_the_process(daemon_process, timed):
    """A pattern match that backtracks for minutes runs inside one C call, where no hook
    fires: the caller still gets a timeout, its worker process is replaced, and shutdown
    does not wait for it."""
    d = daemon_process("--script-timeout", "0.5")
    stuck = "return string.find(string.rep('a', 28), string.rep('a?', 28) .. string.rep('a', 28) .. 'b')"
    async with Client(d.endpoint) as c:
        started = time.monotonic()
        reply = await c.request(t.LuaEval(code=stuck), timeout=30)
        assert isinstance(reply, t.Error) and reply.details["kind"] == "timeout"
        if timed:
            assert time.monotonic() - started < 4
        assert isinstance(await c.request(t.Ping()), t.Pong)  # the daemon still serves
    d.signal(signal.SIGTERM)
    assert d.wait(timeout=10) == 0
    assert b"engine.worker_quarantined" in d.proc.stderr.read()


# --- scripts and jobs ----------------------------------------------------------------

PROGRESSING = """
function describe() return {name = "countdown", description = "counts slowly", params = {n = {type = "integer", default = 3}}} end
function main(p)
  for i = 1, p.n do
    progress.update(i * 100 / p.n, "step " .. i)
    local s = os.clock() + 0.25 while os.clock() < s do end
  end
  return "liftoff " .. p.n
end
"""


def test_script_store_search_describe_run_and_job_commands(daemon, tmp_path):
    src = tmp_path / "countdown.lua"
    src.write_text(PROGRESSING)
    stored = cli(daemon.endpoint, "script", "store", str(src), "--tag", "demo", "--creator", "cli")
    assert stored.returncode == 0, stored.stderr
    digest, name = stored.stdout.split()
    assert len(digest) == 32 and name == "countdown"
    found = cli(daemon.endpoint, "script", "search", "--vibe", "slowly")
    assert found.returncode == 0 and digest in found.stdout and "type:lua" in found.stdout
    described = cli(daemon.endpoint, "--json", "describe", digest)
    assert json.loads(described.stdout)["result"]["params"]["n"]["default"] == 3
    started = cli(daemon.endpoint, "run", digest, "--params", '{"n": 1}')
    job_id = started.stdout.strip()
    assert started.returncode == 0 and job_id.startswith("job_")
    polled = cli(daemon.endpoint, "--json", "job", "poll", job_id, "--all")
    assert json.loads(polled.stdout)["result"]["completed"][0]["result"] == "liftoff 1"
    status = cli(daemon.endpoint, "job", "status", job_id)
    assert json.loads(status.stdout)["status"] == "complete"
    listed = cli(daemon.endpoint, "job", "list", "--status", "complete")
    assert job_id in listed.stdout
    waited = cli(daemon.endpoint, "run", digest, "--wait", "--params", '{"n": 2}')
    assert waited.returncode == 0 and waited.stdout.strip() == "liftoff 2"
    cancelled = cli(daemon.endpoint, "job", "cancel", job_id)
    assert cancelled.returncode == 1 and "invalid_state" in cancelled.stderr


def test_run_wait_reports_a_failed_job_in_one_line(daemon, tmp_path):
    src = tmp_path / "bad.lua"
    src.write_text("function main()\n  error('no drums')\nend")
    digest = cli(daemon.endpoint, "script", "store", str(src)).stdout.split()[0]
    r = cli(daemon.endpoint, "run", digest, "--wait", "--no-progress")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"luanette-cli: job {r.stderr.split()[2]} failed: lua_runtime: no drums (line 2)"]


def test_run_wait_shows_live_progress_on_a_terminal(daemon_process, tmp_path):
    import os
    import pty
    import subprocess

    from tests.conftest import BIN

    daemon = daemon_process("--script-timeout", "30")

    src = tmp_path / "countdown.lua"
    src.write_text(PROGRESSING)
    digest = cli(daemon.endpoint, "script", "store", str(src)).stdout.split()[0]
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [str(BIN / "luanette-cli"), "--endpoint", daemon.endpoint, "run", digest, "--wait", "--params", '{"n": 8}'],
        stdout=subprocess.PIPE, stderr=terminal, text=True,
    )
    os.close(terminal)
    screen = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    out, _ = proc.communicate(timeout=30)
    os.close(controller)
    assert proc.returncode == 0 and out.strip() == "liftoff 8"
    text = screen.decode()
    assert "\r" in text and "%" in text
    assert "step " in text  # progress was shown while it ran (2 s: several refreshes)


def test_watch_prints_broadcasts(daemon, tmp_path):
    import queue
    import subprocess
    import threading

    from tests.conftest import BIN

    watcher = subprocess.Popen(
        [str(BIN / "luanette-cli"), "watch", "--pub", daemon.pub],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    printed: queue.Queue[dict] = queue.Queue()
    threading.Thread(target=lambda: [printed.put(json.loads(x)) for x in watcher.stdout], daemon=True).start()

    def store(name: str, content: str) -> str:
        src = tmp_path / name
        src.write_text(content)
        return cli(daemon.endpoint, "script", "store", str(src)).stdout.split()[0]

    try:
        # PUB drops what it sends before the watcher's subscription arrives: store fresh
        # probe scripts until the watcher prints one, then read up to the last probe.
        probes: list[str] = []
        while True:
            assert len(probes) < 100, "the watcher never printed a broadcast"
            probes.append(store(f"probe{len(probes)}.lua", f"return {len(probes)}"))
            try:
                seen = printed.get(timeout=0.2)
                break
            except queue.Empty:
                pass
        while seen != {"type": "script_invalidate", "hash": probes[-1]}:
            seen = printed.get(timeout=30)

        digest = store("w.lua", "return 'watched'")
        cli(daemon.endpoint, "run", digest)
        lines = [printed.get(timeout=30) for _ in range(3)]
    finally:
        watcher.terminate()
        watcher.wait(10)
    assert lines[0] == {"type": "script_invalidate", "hash": digest}
    assert [x["state"] for x in lines[1:]] == ["pending", "running"]


def test_daemon_refuses_a_bad_config_file(tmp_path):
    import subprocess

    from tests.conftest import BIN

    bad = tmp_path / "luanette.toml"
    bad.write_text('[backends.orpheus]\nconcurrency = "lots"\n')
    r = subprocess.run([str(BIN / "luanette"), "serve", "--config", str(bad)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2
    assert "backends.orpheus.concurrency" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --- run --wait progress, closed pipes, one --json shape ------------------------------

STALLING = """
function main()
  progress.update(50, "half way")
  while true do end
end
"""


def test_run_wait_prints_progress_lines_when_stdout_is_not_a_terminal(daemon_process, tmp_path):
    """Piped (as in CI or a log file): a plain line on stderr at each change, none
    rewritten in place; stdout stays for the outcome."""
    import subprocess

    from tests.conftest import BIN

    daemon = daemon_process("--script-timeout", "60")
    src = tmp_path / "stall.lua"
    src.write_text(STALLING)
    digest = cli(daemon.endpoint, "script", "store", str(src)).stdout.split()[0]
    proc = subprocess.Popen(
        [str(BIN / "luanette-cli"), "--endpoint", daemon.endpoint, "run", digest, "--wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines = []
    for line in proc.stderr:  # the job stalls at 50 % until it is cancelled
        lines.append(line)
        if "half way" in line:
            break
    job_id = lines[-1].split()[0]
    assert job_id.startswith("job_") and "running" in lines[-1] and "%" in lines[-1]
    assert cli(daemon.endpoint, "job", "cancel", job_id).returncode == 0
    out, err = proc.communicate(timeout=30)
    lines += err.splitlines(keepends=True)
    assert proc.returncode == 1 and out == ""
    assert not any("\r" in line for line in lines)
    assert lines[-2].startswith(f"{job_id}  cancelled")  # the last progress line: how it ended
    assert lines[-1].startswith(f"luanette-cli: job {job_id} cancelled: cancelled: ")


def test_a_reader_closing_the_pipe_ends_the_cli_quietly(daemon):
    """`luanette-cli ... | head -1` exits 0 and prints no BrokenPipe traceback."""
    import shlex
    import subprocess

    from tests.conftest import BIN

    for args in (["eval", "return string.rep('line\\n', 200000)"], ["--json", "tools"], ["tools"]):
        command = shlex.join([str(BIN / "luanette-cli"), "--endpoint", daemon.endpoint, *args])
        r = subprocess.run(["bash", "-o", "pipefail", "-c", f"{command} | head -c 10"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert len(r.stdout) == 10 and r.stderr == ""


def test_json_prints_one_reply_payload_for_every_command(daemon, tmp_path):
    src = tmp_path / "countdown.lua"
    src.write_text(PROGRESSING)
    digest = json.loads(cli(daemon.endpoint, "--json", "script", "store", str(src)).stdout)["result"]["hash"]
    started = cli(daemon.endpoint, "--json", "run", digest, "--params", '{"n": 1}')
    job_id = json.loads(started.stdout)["result"]["job_id"]
    commands = [
        ["ping"], ["tools"], ["eval", "return 1"], ["send", '{"type": "ping"}'], ["script", "search"],
        ["describe", digest], ["run", digest, "--params", '{"n": 1}'], ["job", "poll", job_id, "--all"],
        ["job", "status", job_id], ["job", "list"], ["job", "cancel", job_id], ["session", "list"],
        ["run", digest, "--wait", "--params", '{"n": 1}'], ["workers"],
    ]
    for command in commands:
        r = cli(daemon.endpoint, "--json", *command)
        (line,) = r.stdout.splitlines()  # one JSON object, on one line
        reply = json.loads(line)
        assert reply["type"] in ("success", "error", "pong", "tool_list"), (command, reply)
        assert r.returncode == (1 if reply["type"] == "error" else 0), (command, r)

    # run --wait: the reply job_status gives for the finished job
    waited = json.loads(cli(daemon.endpoint, "--json", "run", digest, "--wait", "--params", '{"n": 1}').stdout)
    status = json.loads(cli(daemon.endpoint, "--json", "job", "status", waited["result"]["job_id"]).stdout)
    assert waited == status and waited["result"]["result"] == "liftoff 1"


def test_workers_lists_the_pool_as_a_table_and_as_json(daemon_process):
    d = daemon_process("--workers", "2")
    deadline = time.monotonic() + 20
    while True:  # the workers say hello once they have started
        view = json.loads(cli(d.endpoint, "--json", "workers").stdout)
        assert view["type"] == "success", view
        if [w["state"] for w in view["result"]["workers"]] == ["ready", "ready"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    workers, pool = view["result"]["workers"], view["result"]["pool"]
    assert len(workers) == 2 and {w["group"] for w in workers} == {"local"}
    assert {w["state"] for w in workers} == {"ready"} and not any(w["remote"] for w in workers)
    assert pool["workers"] == 2 and pool["groups"]["local"]["workers"] == 2 and pool["waiting"] == 0

    table = cli(d.endpoint, "workers")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["NAME", "GROUP", "HOST", "STATE", "RUNS", "HEARTBEAT", "CAPABILITIES"]
    for worker in workers:
        row = next(line for line in rows if line.startswith(worker["name"] + " "))
        assert " local " in row and " ready " in row and f"/{worker['capacity']}" in row
    assert "group local: 2 workers" in table.stdout
    assert rows[-1] == "0 runs waiting for a worker"


def test_workers_table_shows_remote_workers_groups_and_waiting_runs():
    import argparse

    from luanette.cli.client import render

    view = {
        "workers": [
            {"name": "w0", "group": "local", "capabilities": ["*"], "hostname": "front", "pid": 10,
             "remote": False, "state": "ready", "runs": 1, "capacity": 4, "last_heartbeat_s": 0.25},
            {"name": "gpu-a", "group": "gpu-host", "capabilities": ["net", "cas.write"], "hostname": "box7",
             "pid": 77, "remote": True, "state": "leaving", "runs": 0, "capacity": 8},
        ],
        "pool": {"workers": 2, "waiting": 3, "oldest_waiting_s": 12.5,
                 "groups": {"local": {"workers": 1, "busy": 1, "idle": 0, "runs": 1, "capacity": 4},
                            "gpu-host": {"workers": 1, "busy": 0, "idle": 0, "runs": 0, "capacity": 8}}},
    }  # fmt: skip
    text = render(argparse.Namespace(command="workers"), t.Success(result=view))
    header, first, second, *tail = text.splitlines()
    assert first.split() == ["w0", "local", "front:10", "ready", "1/4", "0.2", "s", "ago", "*"]
    assert second.split() == ["gpu-a", "gpu-host", "(remote)", "box7:77", "leaving", "0/8", "-", "net,cas.write"]
    assert header.index("STATE") == first.index("ready") == second.index("leaving")
    assert tail == [
        "group gpu-host: 1 workers, 0 busy, 0 idle, 0/8 runs",
        "group local: 1 workers, 1 busy, 0 idle, 1/4 runs",
        "3 runs waiting for a worker (the oldest for 12.5 s)",
    ]


def test_json_failures_are_error_payloads_too(daemon, tmp_path):
    src = tmp_path / "bad.lua"
    src.write_text("function main()\n  error('no drums')\nend")
    digest = cli(daemon.endpoint, "script", "store", str(src)).stdout.split()[0]
    failed = cli(daemon.endpoint, "--json", "run", digest, "--wait")
    info = json.loads(failed.stdout)
    assert failed.returncode == 1 and info["type"] == "success"  # the daemon answered; the job failed
    assert info["result"]["status"] == "failed" and info["result"]["error"]["message"] == "no drums"

    usage = cli(daemon.endpoint, "--json", "eval", "return 1", "--params", "{oops")
    assert usage.returncode == 2 and json.loads(usage.stdout)["code"] == "cli_usage"
    unreachable = cli(f"tcp://127.0.0.1:{free_port()}", "--json", "--timeout", "0.5", "ping")
    reply = json.loads(unreachable.stdout)
    assert unreachable.returncode == 3 and reply["type"] == "error" and reply["code"] == "cli_no_reply"
    assert "nothing is listening" in reply["message"]
