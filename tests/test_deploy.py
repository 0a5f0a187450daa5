"""docker-compose.yml and the Dockerfile, checked against what the code accepts.

No Docker engine runs here, so the file is parsed: every command line must parse with
our own CLIs' argument parsers, ports and volumes must line up with the flags, and the
settings file the daemon is given must load, its endpoints naming compose services.
"""

from __future__ import annotations

import shlex
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from luanette.cli import client as cli_client
from luanette.cli import daemon as cli_daemon
from luanette.settings import load_settings
from luanette.sim import cli as sim_cli

ROOT = Path(__file__).resolve().parents[1]
OUR_IMAGE = "luanette:dev"
PARSERS = {
    "luanette": cli_daemon.build_parser,
    "luanette-sim": sim_cli.build_parser,
    "luanette-cli": cli_client.build_parser,
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, rest) of each Dockerfile instruction, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            steps.append((word.upper(), rest.strip()))
    return steps


def parse(command: list[str]) -> tuple[str, Any]:
    """The program and its parsed arguments (argparse exits on anything it refuses)."""
    program, *args = command
    assert program in PARSERS, f"{program} is not one of our programs"
    return program, PARSERS[program]().parse_args(args)


def published(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> volume name (a ``:ro`` suffix dropped)."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_the_stack_has_its_services(compose):
    services = compose["services"]
    assert set(services) == {"keys", "luanette", "models", "garden", "jaeger"}
    for name in ("keys", "luanette", "models", "garden"):
        assert services[name]["image"] == OUR_IMAGE and services[name]["build"] == "."
    assert set(compose["volumes"]) == {"cas", "state", "keys"}


def test_the_daemon_requires_curve_with_the_keys_the_one_shot_service_makes(compose):
    services = compose["services"]
    _, keys_args = parse(services["keys"]["command"])
    assert (keys_args.command, keys_args.action) == ("keys", "init")
    assert mounts(services["keys"])[keys_args.directory] == "keys"
    _, args = parse(services["luanette"]["command"])
    assert args.curve == f"{keys_args.directory}/server" and not args.insecure
    assert "keys:/data/keys:ro" in services["luanette"]["volumes"]
    assert services["luanette"]["depends_on"]["keys"] == {"condition": "service_completed_successfully"}
    assert cli_daemon.exposure_problem(cli_daemon.config_from(args)) is None
    cmd = yaml.safe_load(next(rest for word, rest in dockerfile() if word == "CMD"))
    _, image_args = parse(cmd)
    assert image_args.curve and cli_daemon.exposure_problem(cli_daemon.config_from(image_args)) is None


def test_every_command_parses_with_our_parsers(compose):
    for name, service in compose["services"].items():
        if service.get("image") == OUR_IMAGE:
            parse(service["command"])
    cmd = next(rest for word, rest in dockerfile() if word == "CMD")
    parse(yaml.safe_load(cmd))  # the exec form is a JSON array, which YAML reads


def test_the_daemon_flags_line_up_with_ports_volumes_and_services(compose):
    services = compose["services"]
    luanette = services["luanette"]
    _, args = parse(luanette["command"])
    bind = urllib.parse.urlsplit(args.bind)
    pub = urllib.parse.urlsplit(args.pub)
    assert bind.hostname == pub.hostname == "0.0.0.0"  # reachable from the host
    assert {bind.port, pub.port} <= published(luanette)
    volumes = mounts(luanette)
    assert volumes[args.cas_root] == "cas" and volumes[args.state_dir] == "state"
    assert mounts(services["garden"]).get(args.cas_root) == "cas"  # the shared CAS
    otlp = urllib.parse.urlsplit(args.otlp_endpoint)
    assert otlp.hostname == "jaeger" and otlp.port in published(services["jaeger"])
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert set(luanette["depends_on"]) == {"keys", "models", "garden", "jaeger"}


def test_the_settings_file_names_the_compose_services(compose):
    services = compose["services"]
    _, daemon_args = parse(services["luanette"]["command"])
    workdir = next(rest for word, rest in dockerfile() if word == "WORKDIR")
    copies = {rest.split()[-1].rstrip("/") for word, rest in dockerfile() if word == "COPY"}
    config = Path(daemon_args.config)
    assert str(config.parent) == f"{workdir}/deploy" and "./deploy" in copies and "./examples" in copies
    settings = load_settings(ROOT / "deploy" / config.name)

    _, models_args = parse(services["models"]["command"])
    assert models_args.host == "0.0.0.0" and models_args.port in published(services["models"])
    used = {name for _, name, _ in settings.models.references()} | {"orpheus_children", "orpheus_mono"}
    for name in used:  # every backend a model namespace calls is the simulator
        url = urllib.parse.urlsplit(settings.backends[name].url)
        assert (url.hostname, url.port) == ("models", models_args.port), name

    _, garden_args = parse(services["garden"]["command"])
    garden_bind = urllib.parse.urlsplit(garden_args.bind)
    garden = urllib.parse.urlsplit(settings.garden.endpoint)
    assert garden.hostname == "garden" and garden.port == garden_bind.port
    assert garden_bind.port in published(services["garden"])

    # the trigger's script ships in the image, where the daemon will look for it
    (rule,) = settings.triggers
    assert rule.event_type == "generate_transition"
    assert (ROOT / "deploy" / rule.script_file).resolve() == ROOT / "examples" / "transition.lua"


@pytest.mark.parametrize("doc", ["operations.md", "garden.md"])
def test_command_lines_in_the_docs_parse(doc):
    text = (ROOT / "docs" / doc).read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(tuple(f"{p} " for p in PARSERS))]
    assert lines
    for line in lines:
        parse(shlex.split(line.split("  #")[0]))
    if doc == "operations.md":
        assert "docker compose up" in text


def test_every_serve_flag_is_in_the_quickstart_table():
    import re

    text = (ROOT / "docs" / "quickstart.md").read_text()
    documented = set(re.findall(r"^\| `(--[a-z-]+)", text, re.M))
    serve = next(
        action.choices["serve"]
        for action in cli_daemon.build_parser()._actions
        if getattr(action, "choices", None) and "serve" in action.choices
    )
    flags = {opt for action in serve._actions for opt in action.option_strings if opt.startswith("--")} - {"--help"}
    assert flags == documented
