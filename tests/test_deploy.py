"""The scale-out deployment files: docker-compose.yml, .env.example, Dockerfile, infra/.

No Docker engine runs where these tests run, so no container is started. What is checked:
- docker-compose.yml validates against the Compose Specification's JSON schema (vendored in
  infra/compose-spec/, see its README for where it came from), before and after `${...}`
  interpolation with .env.example, and refuses to interpolate without the secrets;
- every product service runs a `vlm4rec` CLI command that exists (click), with options that
  parse; every third-party service runs its image's own program;
- every VLM4REC_* variable (compose file and .env.example) is a field of `Settings` and the
  product services' settings load; third-party variables are the images' documented ones;
- ports, volumes, depends_on conditions, profiles, GPU reservations and image pins;
- infra/prometheus.yml targets are compose services and ports; Grafana's provisioning matches
  the compose mounts and the dashboard's data source;
- `promtool check config`, `promtool check rules` and `promtool test rules` pass;
- a real Prometheus runs every PromQL expression of the dashboard and the alert rules, and
  (integration) scrapes a real embedding worker, then the whole local stack (`vlm4rec up`:
  worker + Faust app) through a short replay, so that the throughput, latency, freshness and
  batch panels return finite data and no alert fires.
promtool / prometheus come from the Debian package `prometheus`; the tests that need them skip
cleanly without it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from conftest import REPO, RunningStack, free_port

COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
INFRA = REPO / "infra"
COMPOSE_SCHEMA = INFRA / "compose-spec" / "compose-spec.json"
PROMETHEUS_YML = INFRA / "prometheus.yml"
ALERTS_YML = INFRA / "alerts.yml"
ALERTS_TEST_YML = INFRA / "alerts.test.yml"
DASHBOARDS = INFRA / "grafana" / "dashboards"
DASHBOARD = DASHBOARDS / "vlm4rec.json"
GRAFANA_PROVISIONING = INFRA / "grafana" / "provisioning"

PRODUCT_IMAGE = "vlm4rec:"

#: What each third-party image runs, from its own documentation: the programs a `command`,
#: `entrypoint` or healthcheck may start (`None`: the image's entrypoint takes flags, so a
#: command must be flags only), and the environment variables it reads (exact names, or a
#: prefix ending in `_*`).
THIRD_PARTY: dict[str, dict[str, Any]] = {
    # apache/kafka: every KAFKA_* variable becomes a server.properties entry; CLUSTER_ID
    # formats KRaft storage (docker/examples/README.md of apache/kafka)
    "apache/kafka": {"programs": {"/opt/kafka/bin/kafka-broker-api-versions.sh"}, "env": {"KAFKA_*", "CLUSTER_ID"}},
    "danielqsj/kafka-exporter": {"programs": {None, "wget"}, "env": set()},
    # etcd reads every flag from ETCD_<FLAG> (etcd docs, "Configuration options")
    "quay.io/coreos/etcd": {"programs": {"etcd", "etcdctl"}, "env": {"ETCD_*"}},
    "minio/minio": {"programs": {"minio", "curl"}, "env": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}},
    # Milvus reads any milvus.yaml key from the environment (pkg/config/env_source.go):
    # minio.accessKeyID -> MINIO_ACCESS_KEY_ID, common.security.* -> COMMON_SECURITY_*
    "milvusdb/milvus": {
        "programs": {"milvus", "curl"},
        "env": {"ETCD_ENDPOINTS", "MINIO_ADDRESS", "MINIO_ACCESS_KEY_ID", "MINIO_SECRET_ACCESS_KEY", "MQ_TYPE", "COMMON_SECURITY_*",
                # milvus.yaml's proxy.timeTickInterval (in every Milvus 2.x milvus.yaml)
                "PROXY_TIMETICKINTERVAL"},
    },
    "vllm/vllm-openai": {"programs": {"vllm", "python3"}, "env": {"HF_TOKEN", "VLLM_API_KEY"}},
    "prom/prometheus": {"programs": {None, "wget"}, "env": set()},
    "grafana/grafana": {"programs": {"wget"}, "env": {"GF_*"}},
}
#: programs the product image provides besides `vlm4rec` (for healthchecks)
PRODUCT_PROGRAMS = {"vlm4rec", "python"}

#: Grafana's built-in variables, replaced as Grafana would before a query reaches Prometheus
GRAFANA_MACROS = {"$__rate_interval": "1m", "${__rate_interval}": "1m", "$__interval": "30s", "$__range": "1h"}

REQUIRED_SECRETS = {"MINIO_SECRET_KEY", "GRAFANA_ADMIN_PASSWORD"}


# --- helpers -----------------------------------------------------------------------------


class MissingVariable(Exception):
    pass


_VAR = re.compile(r"\$(?:(\$)|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])(.*))?$", re.S)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`,
    `${VAR?error}`, `$VAR` and `$$` (a literal dollar)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(1):
            return "$"
        if match.group(3):
            return env.get(match.group(3), "")
        braced = _BRACED.match(match.group(2))
        assert braced, f"unsupported interpolation ${{{match.group(2)}}}"
        name, op, arg = braced.groups()
        value = env.get(name)
        if op is None:
            return value or ""
        empty_counts = op.startswith(":")
        missing = value is None or (empty_counts and value == "")
        if op.endswith("-"):
            return arg if missing else value  # type: ignore[return-value]
        if missing:
            raise MissingVariable(f"{name}: {arg}")
        return value  # type: ignore[return-value]

    return _VAR.sub(replace, text)


def interpolate_tree(node: Any, env: dict[str, str], missing: set[str] | None = None) -> Any:
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env, missing) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env, missing) for v in node]
    if isinstance(node, str):
        try:
            return interpolate(node, env)
        except MissingVariable as exc:
            if missing is None:
                raise
            missing.add(str(exc).split(":")[0])
            return ""
    return node


def variables_used(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for value in node.values():
            found |= variables_used(value)
    elif isinstance(node, list):
        for value in node:
            found |= variables_used(value)
    elif isinstance(node, str):
        for match in _VAR.finditer(node):
            if match.group(3):
                found.add(match.group(3))
            elif match.group(2):
                found.add(_BRACED.match(match.group(2)).group(1))  # type: ignore[union-attr]
    return found


def parse_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path.name}:{number}: not KEY=value: {line!r}"
        assert key not in values, f"{path.name}:{number}: {key} set twice"
        values[key] = value
    return values


def image_name(image: str) -> tuple[str, str]:
    """'quay.io/coreos/etcd:v3.5.18' -> ('quay.io/coreos/etcd', 'v3.5.18')."""
    name, _, tag = image.rpartition(":")
    if "/" in tag or not name:  # a registry port, no tag
        return image, ""
    return name, tag


def is_product(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).startswith(PRODUCT_IMAGE)


def as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    return [str(v) for v in value]


def env_dict(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def settings_fields() -> set[str]:
    from vlm4rec.settings import Settings

    return {Settings.env_name(name) for name in Settings.model_fields}


def resolve_cli(argv: list[str]) -> tuple[tuple[str, ...], click.Command | None, list[str]]:
    """Walk `vlm4rec a b --opt` down the click groups: (path, command or None, rest)."""
    from vlm4rec.cli import main

    command: click.Command = main
    path: list[str] = []
    args = list(argv)
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        name = args.pop(0)
        path.append(name)
        sub = command.commands.get(name)
        if sub is None:
            return tuple(path), None, args
        command = sub
    return tuple(path), command, args


def published_ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of every `ports:` entry."""
    out = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            out.append((entry.get("host_ip", ""), int(entry["published"]), int(entry["target"])))
            continue
        spec = str(entry).split("/")[0]
        parts = spec.rsplit(":", 2)
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            out.append(("", int(parts[0]), int(parts[1])))
        else:
            raise AssertionError(f"a port with no host side is published on a random port: {entry}")
    return out


def listening_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split("/")[0]) for p in service.get("expose") or []} | {
        target for _, _, target in published_ports(service)
    }


def dashboard_panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", []):
        yield panel
        yield from dashboard_panels(panel)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's macros replaced) for every target."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for macro, value in GRAFANA_MACROS.items():
                expr = expr.replace(macro, value)
            assert "$" not in expr, f"{panel['title']}: unknown Grafana variable in {expr}"
            out.append((panel["title"], expr))
    return out


def alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS_YML.read_text())
    return [
        (rule.get("alert") or rule.get("record"), rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def filled_env(env_example: dict[str, str]) -> dict[str, str]:
    """.env.example with the secrets a user must fill in filled in."""
    return {**env_example, **{name: "test-secret-value" for name in REQUIRED_SECRETS}}


@pytest.fixture(scope="module")
def resolved(compose: dict[str, Any], filled_env: dict[str, str]) -> dict[str, Any]:
    """The compose file as Compose sees it after interpolation."""
    return interpolate_tree(copy.deepcopy(compose), filled_env)


@pytest.fixture(scope="module")
def services(resolved: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return resolved["services"]


# --- the compose file --------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_specification(compose: dict[str, Any], resolved: dict[str, Any]) -> None:
    import jsonschema

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # the schema says draft 2019-09 (with a trailing '#' that jsonschema does not recognise)
    assert "2019-09" in schema["$schema"]
    validator = jsonschema.Draft201909Validator(schema)
    for label, document in (("as written", compose), ("interpolated", resolved)):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
        assert not errors, f"{label}:\n" + "\n".join(errors)


def test_the_schema_check_has_teeth(compose: dict[str, Any]) -> None:
    """The vendored schema rejects what Compose rejects, so a pass above means something."""
    import jsonschema

    validator = jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["depends_on"]["topics"]["condition"] = "service_finished"
    broken["services"]["kafka"]["helthcheck"] = broken["services"]["kafka"].pop("healthcheck")
    assert len(list(validator.iter_errors(broken))) >= 2


def test_compose_refuses_to_start_without_the_secrets(compose: dict[str, Any], env_example: dict[str, str]) -> None:
    """.env.example leaves the secrets empty, and `${VAR:?...}` makes Compose stop on them."""
    missing: set[str] = set()
    interpolate_tree(copy.deepcopy(compose), env_example, missing)
    assert missing == REQUIRED_SECRETS
    for name in REQUIRED_SECRETS:
        assert env_example[name] == "", f"{name} must be empty in .env.example"


def test_every_interpolated_variable_is_documented_in_env_example(compose: dict[str, Any], env_example: dict[str, str]) -> None:
    undocumented = variables_used(compose) - set(env_example)
    assert not undocumented, f"add to .env.example: {sorted(undocumented)}"


def test_env_example_lines_are_plain(env_example: dict[str, str]) -> None:
    """No inline comments or quotes: `docker run --env-file` would keep them in the value."""
    for key, value in env_example.items():
        assert not re.search(r"\s#", value), f"{key}: inline comment"
        assert not value.startswith(("'", '"')), f"{key}: quoted value"


def test_no_secret_is_written_in_the_compose_file(compose: dict[str, Any]) -> None:
    secretish = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY)", re.I)
    for name, service in compose["services"].items():
        for key, value in env_dict(service).items():
            if secretish.search(key):
                assert value.startswith("${") and value.endswith("}"), f"{name}.{key} must come from .env, not be written here"
    for line in COMPOSE_FILE.read_text().splitlines():
        assert "minioadmin" not in line, "default MinIO credentials"


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "image" in service, f"{name}: no image"
        repo, tag = image_name(service["image"])
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: image {service['image']} is not pinned"
        if not is_product(service):
            assert repo in THIRD_PARTY, f"{name}: {repo} is not described in THIRD_PARTY"


def test_product_services_run_existing_cli_commands(services: dict[str, dict[str, Any]]) -> None:
    product = {name: s for name, s in services.items() if is_product(s)}
    assert {"topics", "worker", "streams"} <= set(product)
    for name, service in product.items():
        argv = as_list(service.get("command"))
        assert "entrypoint" not in service
        assert argv and argv[0] == "vlm4rec", f"{name}: {argv}"
        path, command, rest = resolve_cli(argv[1:])
        assert command is not None, f"{name}: `vlm4rec {' '.join(path)}` is not a CLI command"
        assert not isinstance(command, click.Group), f"{name}: `vlm4rec {' '.join(path)}` is a group, not a command"
        # the options parse (click raises on an unknown option or a bad value)
        command.make_context(path[-1], list(rest))


def test_third_party_services_run_their_images_own_programs(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if is_product(service):
            programs = PRODUCT_PROGRAMS
        else:
            programs = THIRD_PARTY[image_name(service["image"])[0]]["programs"]
            entrypoint = as_list(service.get("entrypoint"))
            command = as_list(service.get("command"))
            if entrypoint:
                assert entrypoint[0] in programs, f"{name}: entrypoint {entrypoint}"
            elif command:
                if None in programs and command[0].startswith("-"):
                    assert all(arg.startswith("-") for arg in command), f"{name}: {command}"
                else:
                    assert command[0] in programs, f"{name}: command {command}"
        test = service.get("healthcheck", {}).get("test")
        if test:
            kind, *words = as_list(test) if isinstance(test, list) else ["CMD-SHELL", test]
            program = words[0] if kind == "CMD" else words[0].split()[0]
            assert program in programs, f"{name}: healthcheck runs {program}"


def test_product_environment_variables_are_settings(compose: dict[str, Any], env_example: dict[str, str]) -> None:
    fields = settings_fields()
    for key in env_example:
        if key.startswith("VLM4REC_"):
            assert key in fields, f".env.example: {key} is not a field of vlm4rec.settings.Settings"
    for name, service in compose["services"].items():
        if not is_product(service):
            continue
        assert service.get("env_file") == ".env", f"{name}: settings come from .env"
        for key in env_dict(service):
            assert key in fields, f"{name}: {key} is not a field of vlm4rec.settings.Settings"


def test_third_party_environment_variables_are_the_images_own(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if is_product(service):
            continue
        allowed = THIRD_PARTY[image_name(service["image"])[0]]["env"]
        for key in env_dict(service):
            ok = key in allowed or any(p.endswith("_*") and key.startswith(p[:-1]) for p in allowed)
            assert ok, f"{name}: {key} is not a documented variable of {service['image']}"
        assert "env_file" not in service, f"{name}: third-party services get only what they need"


def test_product_settings_load_and_point_at_compose_services(
    services: dict[str, dict[str, Any]], filled_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlm4rec.settings import Settings

    for key in list(os.environ):
        if key.startswith("VLM4REC_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(REPO / "infra")  # no stray .env is read
    for name, service in services.items():
        if not is_product(service):
            continue
        env = {k: v for k, v in filled_env.items() if k.startswith("VLM4REC_")} | env_dict(service)
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            settings = Settings()
        host, port = settings.bootstrap_servers.split(",")[0].rsplit(":", 1)
        assert host in services and int(port) in listening_ports(services[host]), f"{name}: {settings.bootstrap_servers}"
        milvus = urllib.parse.urlsplit(settings.milvus_uri)
        assert milvus.hostname in services and milvus.port in listening_ports(services[milvus.hostname])
        for url in (settings.vllm_describer_url, settings.vllm_text_url):
            parts = urllib.parse.urlsplit(url)
            assert parts.hostname in services and parts.port in listening_ports(services[parts.hostname]), url
        assert settings.web_host == "0.0.0.0", f"{name}: metrics must be reachable from Prometheus"


def test_host_ports_are_unique_and_bound_to_localhost(services: dict[str, dict[str, Any]]) -> None:
    seen: dict[int, str] = {}
    for name, service in services.items():
        for host_ip, host_port, target in published_ports(service):
            assert host_ip == "127.0.0.1", f"{name}: {host_port} is published on every interface"
            assert host_port not in seen, f"host port {host_port}: {seen.get(host_port)} and {name}"
            seen[host_port] = name
            assert target in listening_ports(service)


def test_volumes_are_declared_and_bind_mounts_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, service in compose["services"].items():
        for entry in service.get("volumes") or []:
            source = entry["source"] if isinstance(entry, dict) else str(entry).split(":")[0]
            if source.startswith((".", "/")):
                path = (REPO / source).resolve()
                assert path.exists(), f"{name}: bind mount {source} does not exist"
                assert REPO in path.parents, f"{name}: bind mount outside the repository: {source}"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert declared == used, f"declared but unused: {sorted(declared - used)}"


def test_depends_on_conditions_are_meaningful(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert services[target].get("healthcheck"), f"{name} waits for {target} to be healthy, which has no healthcheck"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is one-shot"
            # a service outside a profile cannot depend on one inside it: Compose would refuse
            # to start the default (CPU-only) stack
            assert set(services[target].get("profiles", [])) <= set(service.get("profiles", [])), f"{name} -> {target}"
    # every long-running service has a healthcheck
    for name, service in services.items():
        if service.get("restart") != "no":
            assert service.get("healthcheck"), f"{name}: no healthcheck"


def test_one_shot_topics_service_gates_the_product(services: dict[str, dict[str, Any]]) -> None:
    for name in ("worker", "streams"):
        assert services[name]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_scalable_services_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    """`docker compose up --scale worker=N` fails on a container_name or a fixed host port."""
    for name, service in services.items():
        assert "container_name" not in service, f"{name}: container_name prevents --scale"
    assert not services["worker"].get("ports")


def test_gpu_services_are_in_the_gpu_profile_and_reserve_a_gpu(services: dict[str, dict[str, Any]]) -> None:
    gpu = {name for name, s in services.items() if image_name(s["image"])[0] == "vllm/vllm-openai"}
    assert gpu == {"vllm-describer", "vllm-embedder"}
    for name, service in services.items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name in gpu:
            assert service.get("profiles") == ["gpu"]
            assert any("gpu" in device.get("capabilities", []) for device in devices), name
        else:
            assert not service.get("profiles"), f"{name} must run without a profile"
            assert not devices, f"{name} reserves a device"
    embedder = as_list(services["vllm-embedder"]["command"])
    assert "--runner=pooling" in embedder


# --- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_builds_every_package_with_cpu_torch_as_a_non_root_user() -> None:
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", text, re.M))
    base = args["PYTHON_IMAGE"]
    assert image_name(base)[1] and re.search(r"\d+\.\d+\.\d+", base), f"base image {base} is not pinned"
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    copied = {src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1] if not src.startswith("--")}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"packages not copied into the image: {sorted(packages - copied)}"
    assert pyproject["project"]["readme"] in copied and "pyproject.toml" in copied
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^CMD \["vlm4rec"', text, re.M)
    ignored = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ".env" in ignored and ".venv" in ignored and ".git" in ignored
    for source in copied:
        assert source not in ignored, f".dockerignore drops {source}, which the Dockerfile copies"


# --- Prometheus and Grafana ----------------------------------------------------------------


def test_prometheus_targets_are_compose_services_and_their_ports(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                host = "prometheus" if host == "localhost" and job["job_name"] == "prometheus" else host
                scraped[host] = int(port)
        for sd in job.get("dns_sd_configs", []):
            assert sd.get("type", "SRV") == "A", "Docker's DNS answers A records"
            for host in sd["names"]:
                scraped[host] = int(sd["port"])
    for host, port in scraped.items():
        assert host in services, f"scrape target {host} is not a compose service"
        assert port in listening_ports(services[host]), f"{host} does not listen on {port}"
    # every process with a /metrics endpoint is scraped, on the port its settings give it
    assert scraped["worker"] == int(env_dict(services["worker"])["VLM4REC_WORKER_METRICS_PORT"])
    assert scraped["streams"] == int(env_dict(services["streams"])["VLM4REC_WEB_PORT"])
    for name in ("kafka-exporter", "milvus", "prometheus", "vllm-describer", "vllm-embedder"):
        assert name in scraped, f"{name} is not scraped"
    # the rule file is mounted next to the config, where rule_files points
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in services["prometheus"]["volumes"]}
    config_dir = Path("/etc/prometheus")
    assert mounts[str(config_dir / "prometheus.yml")] == "./infra/prometheus.yml"
    for rule_file in config["rule_files"]:
        assert (REPO / mounts[str(config_dir / rule_file)]).resolve() == (PROMETHEUS_YML.parent / rule_file).resolve()


def test_grafana_provisioning_matches_the_mounts_and_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in services["grafana"]["volumes"]}
    assert (REPO / mounts["/etc/grafana/provisioning"]).resolve() == GRAFANA_PROVISIONING.resolve()
    datasources = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    (prometheus,) = datasources
    url = urllib.parse.urlsplit(prometheus["url"])
    assert url.hostname in services and url.port in listening_ports(services[url.hostname])
    providers = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "vlm4rec.yml").read_text())["providers"]
    (provider,) = providers
    path = provider["options"]["path"]
    assert (REPO / mounts[path]).resolve() == DASHBOARDS.resolve()
    assert env_dict(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{path}/{DASHBOARD.name}"
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard_panels(dashboard) if p["type"] != "row"]
    assert len({p["id"] for p in dashboard_panels(dashboard)}) == len(list(dashboard_panels(dashboard)))
    for panel in panels:
        assert panel["datasource"]["uid"] == prometheus["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == prometheus["uid"]


def test_dashboard_covers_what_the_issue_asks_for() -> None:
    metrics = " ".join(expr for _, expr in dashboard_queries())
    for needed in (
        "vlm4rec_worker_items_total", "vlm4rec_streams_interactions_total",   # throughput
        "vlm4rec_worker_item_latency_seconds_bucket", "vlm4rec_streams_interaction_to_recs_seconds_bucket",
        "vlm4rec_streams_search_seconds_bucket",                              # latencies
        "vlm4rec_streams_consumer_lag", "kafka_consumergroup_lag",            # lag
        "vlm4rec_worker_failures_total", "vlm4rec_streams_dead_letters_total",  # dead letters
        "vlm4rec_streams_fresh_item_seconds_bucket",                          # freshness
        "vlm4rec_streams_recs_pushed_total",                                  # recs pushed
        "vlm4rec_worker_batch_size", "vlm4rec_worker_stage_seconds",          # model and batch
        "vlm4rec_streams_search_batch_size", "vlm4rec_streams_fanout_users",
    ):
        assert needed in metrics, needed


def test_dashboard_and_alerts_use_only_metrics_that_exist() -> None:
    """Every vlm4rec_* name in a query is defined in workers/metrics.py or streams/metrics.py."""
    from prometheus_client import Counter, Histogram

    import streams.metrics
    import workers.metrics

    known: set[str] = set()
    for module in (workers.metrics, streams.metrics):
        for value in vars(module).values():
            if hasattr(value, "_name") and hasattr(value, "_type"):
                name = value._name
                if isinstance(value, Counter):
                    known.add(f"{name}_total")
                elif isinstance(value, Histogram):
                    known |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
                else:
                    known.add(name)
    queries = dashboard_queries() + alert_expressions()
    for title, expr in queries:
        for name in re.findall(r"\bvlm4rec_[a-z0-9_]+", expr):
            assert name in known, f"{title}: {name} is not a metric of the product"


def test_alerts_cover_what_the_issue_asks_for() -> None:
    exprs = dict(alert_expressions())
    joined = " ".join(exprs.values())
    for needed in (
        "vlm4rec_streams_consumer_lag", "kafka_consumergroup_lag",                 # lag growing
        'outcome="dead_letter"',                                                   # dead-letter rate
        'vlm4rec_worker_failures_total{reason="model_error"}',                    # embedding errors
        "histogram_quantile(0.99,\n  sum by (le) (rate(vlm4rec_streams_interaction_to_recs_seconds_bucket",
        "vlm4rec_streams_fresh_item_seconds_bucket",                               # freshness
    ):
        assert needed in joined, needed


# --- promtool ------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian: apt-get install -y --no-install-recommends prometheus)")
    return path


@pytest.mark.parametrize(
    "args",
    [["check", "config", PROMETHEUS_YML.name], ["check", "rules", ALERTS_YML.name], ["test", "rules", ALERTS_TEST_YML.name]],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool(args: list[str]) -> None:
    result = subprocess.run([promtool(), *args], cwd=INFRA, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


# --- a real Prometheus ---------------------------------------------------------------------


def at_least(n: float) -> Any:
    """A check for Prometheus.wait_for: the values of the result add up to n or more."""
    return lambda result: sum(float(series["value"][1]) for series in result) >= n


def positive(result: list[dict[str, Any]]) -> bool:
    """A check for Prometheus.wait_for: some value is above 0 (a rate() that saw an increase)."""
    return any(float(series["value"][1]) > 0 for series in result)


class Prometheus:
    def __init__(self, tmp_path: Path, scrape_configs: list[dict[str, Any]], interval: str = "1s") -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus not installed (Debian: apt-get install -y --no-install-recommends prometheus)")
        tmp_path.mkdir(parents=True, exist_ok=True)
        shutil.copy(ALERTS_YML, tmp_path / "alerts.yml")
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": ["alerts.yml"],
            "scrape_configs": scrape_configs,
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--web.console.templates=/dev/null",
                "--web.console.libraries=/dev/null",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.tmp_path = tmp_path
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{(tmp_path / 'prometheus.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("prometheus did not become ready")

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry the error body
            return json.loads(exc.read())

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def wait_for(self, expr: str, ok: Any, what: str, timeout_s: float = 120, alive: Any = lambda: None) -> list[dict[str, Any]]:
        """Poll `expr` until its result is non-empty and `ok(result)`; `alive()` raises when
        the process under test has died."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)["data"]["result"]
            if result and ok(result):
                return result
            alive()
            assert time.monotonic() < deadline, f"{what}: {expr} -> {result}"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.mark.integration
def test_every_promql_expression_runs_on_a_real_prometheus(tmp_path: Path) -> None:
    prometheus = Prometheus(tmp_path, scrape_configs=[])
    try:
        queries = dashboard_queries() + alert_expressions()
        assert len(queries) > 30
        failures = []
        for title, expr in queries:
            answer = prometheus.query(expr)
            if answer.get("status") != "success":
                failures.append(f"{title}: {expr}\n  -> {answer.get('errorType')}: {answer.get('error')}")
        assert not failures, "\n".join(failures)
        # a syntax error is reported as such (the check above can fail)
        assert prometheus.query("sum by (le (rate(x[1m]))")["status"] == "error"
        # the alert rules load and evaluate without error ("unknown" until the first evaluation)
        deadline = time.monotonic() + 30
        while True:
            rules = [r for g in prometheus.api("rules")["data"]["groups"] for r in g["rules"]]
            if rules and all(r["health"] == "ok" for r in rules):
                break
            assert time.monotonic() < deadline, [(r["name"], r["health"], r.get("lastError")) for r in rules]
            time.sleep(0.5)
        assert {r["name"] for r in rules} == {name for name, _ in alert_expressions()}
    finally:
        prometheus.stop()


@pytest.mark.integration
def test_a_real_worker_scraped_by_prometheus_feeds_the_worker_panels(isolated: RunningStack, tmp_path: Path) -> None:
    """The embedded broker + Milvus Lite, one real `vlm4rec worker` with its /metrics, and a
    real Prometheus scraping it as the compose stack's job `vlm4rec-worker`: after two waves
    of items, the worker's throughput, latency and batch panels return data, and no alert
    fires."""
    from topics.producer import EventProducer

    metrics_port = free_port()
    env = {**isolated.env, "VLM4REC_WORKER_METRICS_PORT": str(metrics_port), "VLM4REC_WORKER_BATCH_MS": "50"}
    settings = isolated.settings(worker_metrics_port=str(metrics_port))
    # Prometheus first: the test skips before starting anything else when it is missing
    prometheus = Prometheus(
        tmp_path / "prometheus",
        scrape_configs=[{"job_name": "vlm4rec-worker", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    )
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115
    worker = subprocess.Popen([sys.executable, "-m", "vlm4rec", "worker"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:

        def alive() -> None:
            if worker.poll() is not None:
                raise AssertionError(f"worker exited {worker.returncode}:\n{(tmp_path / 'worker.log').read_text()[-3000:]}")

        # scraped at least once before any item, so that every counter has a 'before'
        prometheus.wait_for('up{job="vlm4rec-worker"}', at_least(1), "worker not scraped", 180, alive)
        prometheus.wait_for("vlm4rec_worker_batch_size_count", lambda r: True, "worker metrics missing", 30, alive)
        sent = 0
        for wave in range(2):
            with EventProducer(settings.kafka_config()) as producer:
                for i in range(12):
                    item_id = f"w{wave}-{i}"
                    producer.send_raw(
                        settings.topics.items_new,
                        json.dumps({"item_id": item_id, "title": f"Item {item_id}", "text": "linen summer shirt"}).encode(),
                        item_id.encode(),
                    )
                    sent += 1
            prometheus.wait_for(
                'sum(vlm4rec_worker_items_total{outcome="embedded"})', at_least(sent), f"{sent} items not embedded", 180, alive
            )
        # the second wave scraped after the first: rate() sees the increase
        prometheus.wait_for('sum(rate(vlm4rec_worker_items_total{outcome="embedded"}[1m]))', positive, "rate() of items embedded", 60, alive)
        panels: dict[str, list[list[dict[str, Any]]]] = {}
        for title, expr in dashboard_queries():
            answer = prometheus.query(expr)
            assert answer["status"] == "success", (title, answer)
            panels.setdefault(title, []).append(answer["data"]["result"])

        def values(title: str) -> list[float]:
            return [float(s["value"][1]) for results in panels[title] for s in results]

        # throughput
        assert any(v > 0 for v in values("Items embedded /s")), panels["Items embedded /s"]
        assert any(v > 0 for v in values("Embedding workers: items by outcome"))
        # latency: quantiles of a real histogram, finite and positive
        latency = values("Embedding latency (publish → vector in Milvus)")
        assert latency and all(0 < v < 300 for v in latency), latency
        # model and batch figures
        assert any(v >= 1 for v in values("Embedding batch size"))
        assert values("Worker time per batch by stage (mean)")
        assert values("Model time per batch p95")
        assert values("Replicas up") == [1.0]
        # and nothing fires on a healthy worker
        alerts = prometheus.api("alerts")["data"]["alerts"]
        assert not [a for a in alerts if a["state"] == "firing"], alerts
    finally:
        prometheus.stop()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()


@pytest.mark.integration
def test_the_whole_local_stack_scraped_by_prometheus_feeds_the_streams_panels(tmp_path: Path) -> None:
    """`vlm4rec up` (broker, Milvus Lite, worker, streams) on free ports, scraped by a real
    Prometheus as the compose stack's jobs. A short replay (items, then interactions on them,
    then a fresh item) must make the interactions, recs, interaction-to-recs, search and
    fresh-item panels return finite data, with both replicas up."""
    from conftest import stack_env, start_stack
    from topics import Interaction, ItemNew
    from topics.producer import EventProducer

    env = stack_env(tmp_path / "stack", VLM4REC_WORKER_BATCH_MS="50")
    worker_port, web_port = env["VLM4REC_WORKER_METRICS_PORT"], env["VLM4REC_WEB_PORT"]
    prometheus = Prometheus(
        tmp_path / "prometheus",
        scrape_configs=[
            {"job_name": "vlm4rec-worker", "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]},
            {"job_name": "vlm4rec-streams", "static_configs": [{"targets": [f"127.0.0.1:{web_port}"]}]},
        ],
    )
    stack = None
    try:
        stack = start_stack(tmp_path / "stack", [], env=env, timeout_s=180)
        settings = stack.settings()

        def alive() -> None:
            assert stack.process.poll() is None, f"vlm4rec up exited:\n{stack.log_path.read_text()[-3000:]}"

        def wait_for(expr: str, n: float, what: str, timeout_s: float = 120) -> None:
            prometheus.wait_for(expr, at_least(n), what, timeout_s, alive)

        wait_for('sum(up{job=~"vlm4rec-.*"})', 2, "worker and streams not both scraped", 180)
        styles = {"red": "red silk evening dress", "blue": "blue denim work jacket", "green": "green wool hiking sock"}
        items = [ItemNew(item_id=f"{style}-{n}", title=f"{text} {n}", text=text) for style, text in styles.items() for n in range(4)]
        with EventProducer(settings.kafka_config()) as producer:
            for item in items:
                producer.send(settings.topics.items_new, item)
        wait_for('sum(vlm4rec_worker_items_total{outcome="embedded"})', len(items), "items not embedded", 180)
        now = time.time()
        for wave in range(2):  # two waves, a few scrapes apart, so that rate() sees an increase
            with EventProducer(settings.kafka_config()) as producer:
                for user, style in (("ann", "red"), ("ben", "blue"), ("cat", "green")):
                    for n in range(2):
                        producer.send(
                            settings.topics.interactions,
                            Interaction(user_id=f"{user}-{wave}", item_id=f"{style}-{n + wave}", event="click", ts=now),
                        )
            wait_for("sum(vlm4rec_streams_recs_pushed_total)", 3 * (wave + 1), "no recs pushed")
            # the ranking process's search timings reach /metrics relayed, up to a second late:
            # the first wave's must be scraped before the second's, or rate() sees no increase
            wait_for("sum(vlm4rec_streams_search_seconds_count)", wave + 1, "search timings not relayed")
        prometheus.wait_for("sum(rate(vlm4rec_streams_recs_pushed_total[1m]))", positive, "rate() of recs pushed", 60, alive)
        with EventProducer(settings.kafka_config()) as producer:
            producer.send(settings.topics.items_new, ItemNew(item_id="red-new", title="red silk evening dress, new", text=styles["red"]))
        wait_for("sum(vlm4rec_streams_fresh_item_seconds_count)", 1, "fresh item not pushed")
        prometheus.wait_for("sum(rate(vlm4rec_streams_fresh_item_seconds_count[1m]))", positive, "rate() of fresh items", 60, alive)
        # every throughput panel asserted below has scraped an increase (each process is scraped on its own)
        throughput = ("Interactions /s", "Recs pushed /s", "Items embedded /s")
        for title, expr in dashboard_queries():
            if title in throughput:
                prometheus.wait_for(expr, positive, title, 60, alive)

        panels: dict[str, list[dict[str, Any]]] = {}
        for title, expr in dashboard_queries():
            answer = prometheus.query(expr)
            assert answer["status"] == "success", (title, answer)
            panels.setdefault(title, []).extend(answer["data"]["result"])

        def finite(title: str) -> list[float]:
            found = [float(s["value"][1]) for s in panels[title]]
            return [v for v in found if v == v and abs(v) != float("inf")]

        for title in (
            "Interactions /s", "Stream processor: interactions by outcome", "Recs pushed /s", "Recs pushed by trigger",
            "Items embedded /s",  # throughput
        ):
            assert any(v > 0 for v in finite(title)), (title, panels[title])
        for title in (
            "Interaction → recs latency", "Interaction → recs p99", "Milvus search latency",
            "Fresh item → first push to users", "Embedding latency (publish → vector in Milvus)",  # latency
        ):
            assert finite(title) and all(v > 0 for v in finite(title)), (title, panels[title])
        assert sorted(finite("Replicas up")) == [1.0, 1.0]
        assert finite("User profiles held") and finite("Milvus search batch size")
        firing = [a for a in prometheus.api("alerts")["data"]["alerts"] if a["state"] == "firing"]
        assert not firing, firing
    finally:
        prometheus.stop()
        if stack is not None:
            stack.stop()


# --- an independent Compose implementation, where one is installed --------------------------


def test_docker_compose_accepts_the_file(tmp_path: Path, filled_env: dict[str, str]) -> None:
    """`docker compose config` (v2 plugin) or `docker-compose config` (v1, Debian package
    `docker-compose`) parses, interpolates and validates without a Docker engine."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        tool = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        tool = ["docker-compose"]
    else:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    for name in ("docker-compose.yml", "Dockerfile", "infra"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in filled_env.items()))
    for profile in ([], ["--profile", "gpu"]):
        result = subprocess.run([*tool, *profile, "config", "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
    # without the secrets Compose refuses, naming them
    (tmp_path / ".env").write_text(ENV_EXAMPLE.read_text())
    result = subprocess.run([*tool, "config", "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "MINIO_SECRET_KEY" in result.stdout + result.stderr
