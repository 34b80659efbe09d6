"""docker-compose.yml as Compose reads it (`docker-compose config`; no Docker engine needed).

Sessions are on a network of their own that holds the Hub and nothing of the service's; Redis
requires a password; every secret comes from the environment (required, no default) and reaches
only the services that use it; the Hub spawns sessions with DockerSpawner. The Redis service's
own command is run against a local redis-server to show it refuses clients without the password.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

REPO = Path(__file__).resolve().parents[2]
# Distinct placeholder values, so where each one lands can be told apart.
SECRETS = {
    "POSTGRES_PASSWORD": "pg-placeholder-5b1e",
    "REDIS_PASSWORD": "redis-placeholder-77c2",
    "HUBLAUNCH_HUB_API_TOKEN": "hub-token-placeholder-0d9a",
    "HUBLAUNCH_SECRET_KEY": "fernet-placeholder-c3f0",
    "CONFIGPROXY_AUTH_TOKEN": "proxy-token-placeholder-e41b",
}
REQUIRED = {**SECRETS, "DOCKER_GID": "4242"}
# Who may hold each secret.
HOLDERS = {
    "POSTGRES_PASSWORD": {"postgres", "migrate", "api", "worker", "builder"},
    "REDIS_PASSWORD": {"redis", "api", "worker", "builder", "beat"},
    "HUBLAUNCH_HUB_API_TOKEN": {"hub", "worker", "builder"},
    "HUBLAUNCH_SECRET_KEY": {"api", "worker", "builder"},
    "CONFIGPROXY_AUTH_TOKEN": {"hub"},
}


Compose = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Compose:
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.fail("docker-compose is required (apt-get install docker-compose; .ci/run does)")
    # An operator's .env beside the file must not fill in what a test leaves out.
    no_env_file = tmp_path_factory.mktemp("compose") / "empty.env"
    no_env_file.write_text("")
    clean = {k: v for k, v in os.environ.items() if k not in REQUIRED}

    def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        files = ["--env-file", str(no_env_file), "-f", str(REPO / "docker-compose.yml")]
        return subprocess.run(
            [executable, "--project-directory", str(REPO), *files, *args],
            env={**clean, **env},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


@pytest.fixture(scope="module")
def config(compose: Compose) -> dict[str, Any]:
    result = compose("config", env=REQUIRED)
    assert result.returncode == 0, result.stderr
    parsed = yaml.safe_load(result.stdout)
    assert isinstance(parsed, dict)
    return parsed


def _networks(service: dict[str, Any]) -> set[str]:
    networks = service.get("networks") or {}
    return set(networks)


def test_sessions_have_a_network_of_their_own_with_the_hub_only(config: dict[str, Any]) -> None:
    services = config["services"]
    assert {"postgres", "redis", "hub", "api", "worker", "beat", "builder"} <= set(services)
    networks = config["networks"]
    assert set(networks) == {"backend", "sessions"}
    # No route out of it: sessions reach neither the internet nor the host.
    assert networks["sessions"]["internal"] is True
    for name, service in services.items():
        # Every service says where it is; none falls back to a shared default network.
        assert _networks(service), f"{name} lists no network (it would join `default`)"
    on_sessions = {name for name, s in services.items() if "sessions" in _networks(s)}
    assert on_sessions == {"hub"}
    assert _networks(services["hub"]) == {"backend", "sessions"}
    for name in ("redis", "postgres", "api", "worker", "builder", "beat", "registry"):
        assert _networks(services[name]) == {"backend"}, name
    # Only the proxy, Prometheus and Grafana are published, on the host's loopback.
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert published == {
        "hub": ["127.0.0.1:8000:8000/tcp"],
        "prometheus": ["127.0.0.1:9090:9090/tcp"],
        "grafana": ["127.0.0.1:3000:3000/tcp"],
    }


def test_the_hub_spawns_session_containers_on_the_sessions_network(
    config: dict[str, Any],
) -> None:
    hub = config["services"]["hub"]
    env = hub["environment"]
    assert env["HUBLAUNCH_HUB_SPAWNER"] == "docker"
    assert env["HUBLAUNCH_DOCKER_NETWORK"] == config["networks"]["sessions"]["name"]
    assert env["HUBLAUNCH_HUB_CONNECT_IP"] == "hub"
    # Images a builder made are allowed by their prefix: the Hub's and the builder's agree.
    assert (
        env["HUBLAUNCH_IMAGE_PREFIX"]
        == (config["services"]["builder"]["environment"]["HUBLAUNCH_IMAGE_PREFIX"])
    )
    sockets = {
        name
        for name, s in config["services"].items()
        if any("docker.sock" in v for v in s.get("volumes", []))
    }
    assert sockets == {"hub", "builder"}
    for name in sockets:
        assert config["services"][name]["group_add"] == [REQUIRED["DOCKER_GID"]]
    # Builds stay with repo2docker.
    assert config["services"]["builder"]["environment"]["HUBLAUNCH_BUILDER"] == "repo2docker"


def test_each_secret_reaches_only_the_services_that_use_it(config: dict[str, Any]) -> None:
    for secret, value in SECRETS.items():
        holders = {name for name, s in config["services"].items() if value in yaml.safe_dump(s)}
        assert holders == HOLDERS[secret], f"{secret} is in {sorted(holders)}"
    api = config["services"]["api"]["environment"]
    assert api["HUBLAUNCH_BROKER_URL"] == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    for name in ("api", "worker", "builder", "beat"):
        env = config["services"][name]["environment"]
        assert env["HUBLAUNCH_BROKER_URL"] == api["HUBLAUNCH_BROKER_URL"], name


def test_compose_refuses_to_start_without_a_secret(compose: Compose) -> None:
    missing = "REDIS_PASSWORD"
    result = compose("config", "-q", env={k: v for k, v in REQUIRED.items() if k != missing})
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr, result.stderr


def test_no_secret_is_written_in_the_file(compose: Compose) -> None:
    """Uninterpolated: every password in a URL and every secret-named variable is `${VAR:?}`."""
    result = compose("config", "--no-interpolate", env={})
    assert result.returncode == 0, result.stderr
    raw = yaml.safe_load(result.stdout)
    reference = re.compile(r"\$\{[A-Z_]+:\?[^}]*\}")
    checked = 0
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            for password in re.findall(r"://[^/@\s]*?:([^@/\s]*)@", value):
                assert reference.fullmatch(password), f"{name}: {key} has a literal password"
                checked += 1
            if re.search(r"PASSWORD|TOKEN|SECRET", key):
                assert reference.fullmatch(value), f"{name}: {key} is not from the environment"
                checked += 1
    assert checked >= 9  # the database and broker URLs, the tokens, the key, the passwords
    # Required, with no default: each is used only as ${VAR:?message}, never ${VAR:-default}.
    for variable in REQUIRED:
        uses = re.findall(r"\$\{" + variable + r"(\W[^}]*)?\}", result.stdout)
        assert uses, f"{variable} is not used"
        assert all(use.startswith(":?") for use in uses), f"{variable}: {uses}"
    text = (REPO / "docker-compose.yml").read_text()
    for value in SECRETS.values():
        assert value not in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def compose_redis(config: dict[str, Any], tmp_path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The redis service's own command, run here: `redis-server` and `redis-cli` are wrapped
    to use a free loopback port and a scratch folder instead of the container's, and Redis keeps
    its real command line in /proc (it rewrites it into a title by default)."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.fail("redis-server and redis-cli are required (.ci/run installs them)")
    port = _free_port()
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "redis-server").write_text(
        f'#!/bin/sh\nexec {server} "$@" --port {port} --bind 127.0.0.1 --dir {tmp_path} '
        "--set-proc-title no\n"
    )
    (shims / "redis-cli").write_text(f'#!/bin/sh\nexec {cli} -p {port} "$@"\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    service = config["services"]["redis"]
    # What Compose runs: `$$` in the printed file is a literal `$` for the container's shell.
    command = [part.replace("$$", "$") for part in service["command"]]
    env = {
        "PATH": f"{shims}:{os.environ['PATH']}",
        "REDIS_PASSWORD": service["environment"]["REDIS_PASSWORD"],
    }
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:
        yield port, {"pid": proc.pid, "env": env, "service": service}
    finally:
        proc.terminate()
        proc.wait(10)


def test_redis_refuses_clients_without_its_password(
    compose_redis: tuple[int, dict[str, Any]],
) -> None:
    port, run = compose_redis
    password = SECRETS["REDIS_PASSWORD"]
    authenticated = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=5)
    deadline = time.monotonic() + 10
    while True:
        try:
            assert authenticated.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).ping()
    assert authenticated.config_get("appendonly") == {"appendonly": "yes"}
    # On no command line: the shell exec'd redis-server, and the password came on its stdin.
    cmdline = Path(f"/proc/{run['pid']}/cmdline").read_bytes()
    assert b"redis-server\0-\0--appendonly\0yes\0" in cmdline, cmdline
    assert password.encode() not in cmdline

    health = [p.replace("$$", "$") for p in run["service"]["healthcheck"]["test"]]
    assert health[0] == "CMD-SHELL" and password not in health[1]

    def check(env: dict[str, str]) -> int:
        return subprocess.run(["sh", "-c", health[1]], env=env, timeout=10).returncode

    assert check(run["env"]) == 0
    assert check({**run["env"], "REDIS_PASSWORD": "wrong"}) != 0


# -- monitoring: Prometheus and Grafana, and the secrets given as files ------------------------

# Secrets Compose mounts from files (top-level `secrets:`), and who may have each mounted.
FILE_SECRETS = {
    "hublaunch_admin_token": {"api", "prometheus"},
    "grafana_admin_password": {"grafana"},
}


def test_monitoring_runs_on_the_backend_with_its_secrets_as_files(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in ("prometheus", "grafana"):
        assert _networks(services[name]) == {"backend"}, name
        # Neither holds a secret in its environment or its command.
        assert not services[name].get("environment"), name
    for secret, holders in FILE_SECRETS.items():
        mounted = {
            name
            for name, s in services.items()
            if secret in [m if isinstance(m, str) else m["source"] for m in s.get("secrets", [])]
        }
        assert mounted == holders, f"{secret} is mounted in {sorted(mounted)}"
        # By default outside the repository, so a secret file is never committed by accident.
        source = Path(config["secrets"][secret]["file"])
        assert source.is_absolute() and not source.is_relative_to(REPO), source
    # Prometheus reads the admin token where Compose mounts it, and evaluates the alert rules.
    scrape = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    [job] = [j for j in scrape["scrape_configs"] if j["job_name"] == "hublaunch"]
    assert job["authorization"]["credentials_file"] == "/run/secrets/hublaunch_admin_token"
    assert job["static_configs"] == [{"targets": ["api:8010"]}]
    assert scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]
    prometheus_volumes = services["prometheus"]["volumes"]
    for mounted in ("prometheus.yml", "alerts.yml"):
        volume = f"{REPO}/deploy/prometheus/{mounted}:/etc/prometheus/{mounted}:ro"
        assert volume in prometheus_volumes, prometheus_volumes
    grafana_ini = (REPO / "deploy/grafana/grafana.ini").read_text()
    assert "admin_password = $__file{/run/secrets/grafana_admin_password}" in grafana_ini


def test_the_app_takes_the_admin_token_from_its_secret_file(
    config: dict[str, Any], tmp_path: Path
) -> None:
    """The api service's own command, run here with a stand-in `hublaunch` that prints what it
    got, and the secret file at a scratch path instead of /run/secrets."""
    token_file = tmp_path / "admin-token"
    token_file.write_text("admin-token-placeholder-9f3c\n")
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "hublaunch").write_text(
        '#!/bin/sh\necho "token=$HUBLAUNCH_ADMIN_TOKEN"\necho "args=$*"\n'
    )
    (shims / "hublaunch").chmod(0o755)
    command = [
        part.replace("$$", "$").replace("/run/secrets/hublaunch_admin_token", str(token_file))
        for part in config["services"]["api"]["command"]
    ]
    env = {"PATH": f"{shims}:{os.environ['PATH']}"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "token=admin-token-placeholder-9f3c",
        "args=api --host 0.0.0.0 --port 8010",
    ]
    assert "placeholder" not in " ".join(command)  # never on a command line
    # Without its secret the app does not start (it would serve /metrics and no admin API).
    token_file.unlink()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=10)
    assert result.returncode != 0 and "token=" not in result.stdout


def test_env_example_lists_every_setting_and_compose_variable(compose: Compose) -> None:
    from worker.settings import Settings

    text = (REPO / ".env.example").read_text()
    assigned = dict(
        line.split("=", 1)
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    for field in Settings.model_fields:
        assert f"HUBLAUNCH_{field.upper()}" in assigned, f"HUBLAUNCH_{field.upper()} is missing"
    # Every variable docker-compose.yml reads.
    result = compose("config", "--no-interpolate", env={})
    assert result.returncode == 0, result.stderr
    used = set(re.findall(r"\$\{([A-Z_]+)", result.stdout))
    assert used, "docker-compose.yml reads no variable?"
    assert used <= set(assigned), sorted(used - set(assigned))
    # Placeholders only: no value looks like a generated secret.
    for key, value in assigned.items():
        if re.search(r"PASSWORD|TOKEN|SECRET_KEY$", key):
            assert not re.fullmatch(r"[0-9a-f]{32,}|[A-Za-z0-9_-]{40,}=?", value), key
    # The example works as an env file: compose accepts it as it stands.
    example = subprocess.run(
        [
            shutil.which("docker-compose") or "docker-compose",
            "--project-directory",
            str(REPO),
            "--env-file",
            str(REPO / ".env.example"),
            "-f",
            str(REPO / "docker-compose.yml"),
            "config",
            "-q",
        ],
        env={k: v for k, v in os.environ.items() if k not in REQUIRED},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert example.returncode == 0, example.stderr
