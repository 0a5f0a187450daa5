"""docker-compose.yml and the Dockerfile, checked against what the code accepts.

No Docker engine runs here, so the file is parsed: every command line must parse with
our own CLIs' argument parsers, ports and volumes must line up with the flags, and the
settings file the daemon is given must load, its endpoints naming compose services.
"""

from __future__ import annotations

import re
import shlex
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from luanette import auth, telemetry
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
    assert set(services) == {"keys", "luanette", "worker", "models", "garden", "jaeger"}
    for name in ("keys", "luanette", "worker", "models", "garden"):
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
    for service in compose["services"].values():
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


def flag(command: list[str], name: str) -> str | None:
    """The value of ``name`` on a command line (None when it is not given)."""
    return command[command.index(name) + 1] if name in command else None


def test_the_worker_service_joins_the_fronts_pool_and_scales(compose, tmp_path):
    services = compose["services"]
    front, worker = services["luanette"], services["worker"]
    _, front_args = parse(front["command"])
    pool = urllib.parse.urlsplit(front_args.pool)
    assert pool.hostname == "0.0.0.0" and pool.port in published(front)  # workers on other machines too
    assert cli_daemon.exposure_problem(cli_daemon.config_from(front_args)) is None  # CURVE on the pool too

    _, worker_args = parse(worker["command"])
    assert worker_args.command == "worker"
    command = worker["command"]
    connect = urllib.parse.urlsplit(flag(command, "--connect") or "")
    assert (connect.scheme, connect.hostname, connect.port) == ("tcp", "luanette", pool.port)
    # the same CAS (a shared volume) and the same settings file as the front
    assert mounts(worker)[flag(command, "--cas") or ""] == "cas" == mounts(front)[front_args.cas_root]
    assert flag(command, "--cas") == front_args.cas_root
    assert flag(command, "--config") == front_args.config
    # `--scale worker=N`: nothing a replica would share (a host port, a container or worker name)
    assert "ports" not in worker and "container_name" not in worker and "--name" not in command
    assert services["worker"]["depends_on"] == {
        "keys": {"condition": "service_completed_successfully"},
        "luanette": {"condition": "service_started"},
    }

    # the keys: what `keys init` lays out in the keys volume lets this worker into that pool
    assert "keys:/data/keys:ro" in worker["volumes"]
    _, keys_args = parse(services["keys"]["command"])
    auth.init(tmp_path)
    on_volume = lambda path: tmp_path / Path(path).relative_to(keys_args.directory)  # noqa: E731
    server = auth.load_server(on_volume(front_args.curve))
    server_key, public, _ = auth.load_worker(on_volume(flag(command, "--curve")))
    assert server_key == server.public.decode() and public in server.ring.workers
    assert public not in server.ring.clients  # a worker key is no client key


def k8s() -> dict[str, dict[str, Any]]:
    """Every object of deploy/k8s/*.yaml, by "Kind/name"."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                key = f"{doc['kind']}/{doc['metadata']['name']}"
                assert key not in objects, f"{key} twice"
                objects[key] = doc
    return objects


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def pod_mounts(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mount path -> the pod volume mounted there."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container(deployment)["volumeMounts"]}


def test_the_kubernetes_sketch_fits_together(tmp_path):
    objects = k8s()
    assert {
        "PersistentVolumeClaim/luanette-cas", "ConfigMap/luanette-config", "Deployment/luanette",
        "Service/luanette", "Deployment/luanette-worker", "ScaledObject/luanette-worker",
    } <= set(objects)  # fmt: skip
    assert objects["PersistentVolumeClaim/luanette-cas"]["spec"]["accessModes"] == ["ReadWriteMany"]

    front = objects["Deployment/luanette"]
    assert front["spec"]["replicas"] == 1 and front["spec"]["strategy"]["type"] == "Recreate"
    _, args = parse(container(front)["command"])
    assert args.command == "serve" and cli_daemon.exposure_problem(cli_daemon.config_from(args)) is None
    ports = {urllib.parse.urlsplit(e).port for e in (args.bind, args.pub, args.pool)}
    assert ports == {5570, 5571, 5572} == {p["containerPort"] for p in container(front)["ports"]}
    service = objects["Service/luanette"]
    assert service["spec"]["selector"] == front["spec"]["template"]["metadata"]["labels"]
    assert {p["port"] for p in service["spec"]["ports"]} == ports
    front_volumes = pod_mounts(front)
    assert front_volumes[args.cas_root]["persistentVolumeClaim"]["claimName"] == "luanette-cas"
    keys = {item["path"] for item in front_volumes[args.curve]["secret"]["items"]}
    assert auth.SERVER_SECRET in keys and any(k.startswith(f"{auth.WORKERS_DIR}/") for k in keys)
    assert any(k.startswith((f"{auth.CLIENTS_DIR}/", f"{auth.ADMINS_DIR}/")) for k in keys)

    worker = objects["Deployment/luanette-worker"]
    command = container(worker)["command"]
    _, worker_args = parse(command)
    assert worker_args.command == "worker" and "--name" not in command  # replicas name themselves
    connect = urllib.parse.urlsplit(worker_args.connect)
    assert connect.hostname == service["metadata"]["name"] and connect.port == urllib.parse.urlsplit(args.pool).port
    worker_volumes = pod_mounts(worker)
    assert worker_volumes[worker_args.cas_root]["persistentVolumeClaim"]["claimName"] == "luanette-cas"
    worker_keys = {item["path"] for item in worker_volumes[worker_args.curve]["secret"]["items"]}
    assert worker_keys == {auth.SERVER_KEY, auth.WORKER_SECRET}
    config = worker_volumes[str(Path(worker_args.config).parent)]["configMap"]["name"]
    assert config == front_volumes[str(Path(args.config).parent)]["configMap"]["name"] == "luanette-config"
    settings_file = tmp_path / Path(args.config).name
    settings_file.write_text(objects["ConfigMap/luanette-config"]["data"][settings_file.name])
    load_settings(settings_file)

    # the autoscaler scales the workers on the gauges the front exports (OTLP names as
    # Prometheus spells them), through the collector the front exports to
    scaler = objects["ScaledObject/luanette-worker"]["spec"]
    assert scaler["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert 1 <= scaler["minReplicaCount"] < scaler["maxReplicaCount"]
    queries = " ".join(trigger["metadata"]["query"] for trigger in scaler["triggers"])
    exported = {name.replace(".", "_") for name in (*telemetry.POOL_GAUGES, *getattr(telemetry, "QUEUE_GAUGES", ()))}
    named = set(re.findall(r"luanette_[a-z_]+", queries))
    assert named and named <= exported and "luanette_pool_waiting_runs" in named
    otlp = urllib.parse.urlsplit(args.otlp_endpoint)
    collector = objects.get(f"Service/{otlp.hostname}")
    assert collector is not None and otlp.port in {p["port"] for p in collector["spec"]["ports"]}


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
