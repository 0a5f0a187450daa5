"""The README's promises: CI runs its exact test command; its CLI session works."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    install_and_serve, install_and_test = (b.strip() for b in _shell_blocks()[:2])
    assert install_and_serve.endswith("luanette serve")
    assert "pytest" in install_and_test
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines()


def test_readme_cli_session_works_as_written(daemon_process):
    daemon = daemon_process()
    session = [line for line in _shell_blocks()[2].splitlines() if line.strip()]
    assert len(session) == 5
    outputs = []
    for line in session:
        command = line.split("#")[0].strip()
        assert command.startswith(".venv/bin/luanette-cli ")
        import shlex

        args = shlex.split(command)[1:]
        outputs.append(cli(daemon.endpoint, *args))
    ping, four, table, typo, tools = outputs
    assert ping.returncode == 0 and "pong from" in ping.stdout
    assert four.returncode == 0 and four.stdout.strip() == "4"
    assert table.returncode == 0 and '"sum": 3' in table.stdout
    assert typo.returncode == 1 and "did you mean 'print'" in typo.stderr
    assert len(typo.stderr.strip().splitlines()) == 1
    assert tools.returncode == 0 and '"lua_eval"' in tools.stdout
