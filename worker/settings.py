"""One settings object for every process (API, worker, beat, CLI), from HUBLAUNCH_* variables."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DATA_DIR = Path(".hublaunch")


class Settings(BaseSettings):
    # HUBLAUNCH_SECRETS_DIR: a folder of files named like the variables (HUBLAUNCH_DATABASE_URL,
    # ...), each holding one setting: secrets mounted as files (Kubernetes, Docker secrets)
    # instead of in the environment, where any process of the same user could read them.
    model_config = SettingsConfigDict(
        env_prefix="HUBLAUNCH_",
        extra="ignore",
        secrets_dir=os.environ.get("HUBLAUNCH_SECRETS_DIR") or None,
    )

    database_url: str = f"sqlite:///{DATA_DIR / 'hublaunch.sqlite'}"
    broker_url: str = "redis://127.0.0.1:6379/0"
    hub_api_url: str = "http://127.0.0.1:8000/hub/api"
    hub_api_token: SecretStr = SecretStr("")
    public_url: str = "http://127.0.0.1:8000"
    # Several Hubs (worker/hubs.py): a JSON list of {"name", "api_url", "api_token",
    # "public_url", "capacity"}; launches go to the healthy Hub with the most room. Empty: the
    # one Hub of hub_api_url/hub_api_token, its sessions on public_url.
    hubs: str = ""
    # Seconds between checks of every Hub (beat); a Hub that fails a check gets no new launch
    # until one passes.
    hub_health_interval: float = Field(5.0, gt=0)
    user_prefix: str = "hl-"
    session_max_age: int = Field(21600, gt=0)
    launch_timeout: int = Field(600, gt=0)
    # Caps on sessions holding (or about to hold) a Hub server, all together and per spec (an
    # image, or a repository whatever its ref); a launch over a cap waits in line up to
    # max_wait s. 0 derives the cap from this machine's memory and CPUs (worker/admission.py,
    # docs/capacity.md); the per-spec default is half the total.
    max_active: int = Field(0, ge=0)
    max_active_per_spec: int = Field(0, ge=0)
    max_wait: int = Field(600, gt=0)
    # Fernet key for tokens at rest; when empty a key file is created under DATA_DIR (dev only).
    secret_key: SecretStr = SecretStr("")
    secret_key_file: Path = DATA_DIR / "secret.key"
    # Operators: the bearer token of the admin API (/api/admin/...); the API is off when empty.
    admin_token: SecretStr = SecretStr("")
    # Log lines: one JSON object per line ("json"), or plain text ("text", what `hublaunch dev`
    # prints); a line about a launch carries its id either way.
    log_format: Literal["json", "text"] = "json"
    # Seconds one Hub request may take; transient failures are retried by the task with backoff.
    hub_request_timeout: float = Field(10.0, gt=0)
    # Cleanup: one pass every cull_interval s (beat). Ready sessions idle longer than
    # idle_timeout s end; prefixed Hub users with no live launch are deleted once older than
    # orphan_grace s; launches silent for redispatch_after s (or never taken by a worker that
    # long after they were made: their message may be lost) are sent to the queue again.
    cull_interval: float = Field(60.0, gt=0)
    idle_timeout: int = Field(600, gt=0)
    cull_concurrency: int = Field(16, gt=0, le=256)
    orphan_grace: int = Field(300, ge=0)
    redispatch_after: int = Field(30, gt=0)
    # Recovery (worker.claims): a launch task run holds its launch for launch_lease s at a time,
    # extended by its process's heartbeat; every recover_interval s (beat) a launch whose run
    # stopped holding it (a dead worker, a lost retry) is sent again. A launch whose worker
    # died resumes within about launch_lease + recover_interval s.
    launch_lease: float = Field(10.0, ge=3)
    recover_interval: float = Field(5.0, gt=0)
    # A server that fails to come up for a reason that can pass (a timeout, a server that
    # died, the Hub's 5xx) is replaced by a fresh one, up to spawn_tries servers in all.
    spawn_tries: int = Field(4, ge=1, le=20)
    beat_schedule_file: Path = DATA_DIR / "celerybeat-schedule"
    # Repository launches. http:// and file:// URLs and hosts on loopback or private networks are
    # refused unless allow_local_repos is set (tests, development).
    allow_local_repos: bool = False
    # Regular expressions matched against "<url>@<ref>"; a match is refused (comma-separated).
    banned_specs: Annotated[list[str], NoDecode] = []
    resolve_timeout: float = Field(30.0, gt=0)
    # "venv": Python environments on this machine (no Docker); "repo2docker": images + registry.
    builder: Literal["venv", "repo2docker"] = "venv"
    build_timeout: int = Field(1800, gt=0)
    # Builds run on their own queue so launches of built specs never wait behind them.
    build_queue: str = ""
    envs_dir: Path = DATA_DIR / "envs"
    # Bytes the venv builder may use; least recently used environments no session uses go first.
    envs_disk_budget: int = Field(20 * 2**30, gt=0)
    clone_size_limit: int = Field(2**30, gt=0)
    # Builds run a visitor's code (pip runs a repository's build backend), so each step runs in a
    # box (sandbox/) as this unprivileged uid, never root: it sees only its own work folder, the
    # system and the base environment read-only, and reaches only what its step needs. Keep it
    # outside the sessions' uid range (the Hub's HUBLAUNCH_SESSION_UID_MIN..MAX).
    build_uid: int = Field(59000, gt=0)
    # Limits of one build step's box: bytes of memory (swap and its /tmp included), processes
    # and threads, CPUs' worth of time.
    build_memory: int = Field(4 * 2**30, gt=0)
    build_pids: int = Field(1024, gt=0)
    build_cpus: float = Field(1.0, gt=0)
    # host:port the pip step may reach (comma-separated), through the build's egress proxy; a
    # host that resolves to a loopback, private or link-local address is refused even here.
    package_index_hosts: Annotated[list[str], NoDecode] = [
        "pypi.org:443",
        "files.pythonhosted.org:443",
    ]
    # Where no box can be made (not root, no bubblewrap), builds are refused unless this is set:
    # then they run as the worker itself, and a repository can read everything the worker can.
    # Trusted repositories on a laptop only.
    allow_unsandboxed_builds: bool = False
    # repo2docker: images are named <image_prefix><environment name> and checked in the registry.
    image_prefix: str = ""
    registry_url: str = ""
    registry_push: bool = False
    # Celery queue for launches; tests use a fresh name per run so stale workers cannot steal.
    queue: str = "launches"
    log_level: str = "INFO"
    # Who may read the /build event stream from a browser (Binder clients on docs sites).
    cors_allow_origin: str = "*"
    # Addresses whose X-Forwarded-* headers the API trusts (the proxy), comma-separated.
    forwarded_allow_ips: str = "127.0.0.1"
    # Launches one client (address) may start: "<n>/<second|minute|hour>"; "0" or empty = no
    # limit. Counted in Redis across every app process; a resumed /build stream is not counted.
    client_rate: str = "10/minute"
    # Seconds a /build launch not yet ready may stay without a watcher before it is ended (the
    # visitor closed the page); a reconnect within it keeps the launch.
    build_watch_grace: float = Field(30.0, ge=0)
    # Data providers (worker/providers): where records are looked up. A Dataverse DOI is resolved
    # through doi_resolver_url and must land on one of dataverse_urls (comma-separated). A record
    # holds at most record_files_limit files; its bytes are held to clone_size_limit and each
    # request to resolve_timeout.
    zenodo_url: str = "https://zenodo.org"
    figshare_api_url: str = "https://api.figshare.com/v2"
    dataverse_urls: Annotated[list[str], NoDecode] = ["https://dataverse.harvard.edu"]
    hydroshare_url: str = "https://www.hydroshare.org"
    doi_resolver_url: str = "https://doi.org"
    record_files_limit: int = Field(1000, gt=0)

    # Build-only launches (BinderHub's ?build_only=true, "build_only" in POST /api/launches):
    # build the environment and start no server. Each counts against the client's rate.
    allow_build_only: bool = True
    # BinderHub's build tokens: a JWT (HS256, this secret) naming the "<provider>/<spec>" it
    # may start (aud) and when it expires (exp). With a secret, the launch page carries one for
    # its own spec and a token sent to /build is checked (a bad one: 403); with
    # require_build_token, /build starts nothing without a valid one (links from other sites
    # and scripts need the page, or a token from `hublaunch build-token`).
    build_token_secret: SecretStr = SecretStr("")
    require_build_token: bool = False
    build_token_lifetime: int = Field(3600, gt=0)
    # Warm pool (worker/pool.py): ready servers kept per spec, "<spec>=<n>" comma-separated:
    # images by name, repositories by spec and ref ("default=3,gh:org/repo@main=2"). Empty: none.
    # "<spec>=<min>..<max>" sizes that pool by demand within those bounds (worker/pool_demand.py).
    pool: str = ""
    # Seconds between the pool's refill passes (a claim also asks for one at once).
    pool_interval: float = Field(5.0, gt=0)
    # Seconds of launches a demand-sized pool reads its launch rate from.
    pool_demand_window: float = Field(600.0, ge=60)

    @field_validator("client_rate")
    @classmethod
    def _rate(cls, value: str) -> str:
        text = value.strip().lower()
        if text in ("", "0"):
            return ""
        count, sep, period = text.partition("/")
        if not sep or not count.isdigit() or period not in ("second", "minute", "hour"):
            raise ValueError(
                f"client_rate {value!r} must read <n>/<second|minute|hour> (e.g. 10/minute), "
                "or 0 for no limit"
            )
        return "" if int(count) == 0 else f"{int(count)}/{period}"

    @field_validator("pool")
    @classmethod
    def _pool_sizes(cls, value: str) -> str:
        for entry in (part.strip() for part in value.split(",")):
            if not entry:
                continue
            spec, sep, size = entry.rpartition("=")
            low, dots, high = size.strip().partition("..")
            bounds = (low, high) if dots else (low,)
            if not sep or not spec.strip() or not all(b.strip().isdigit() for b in bounds):
                raise ValueError(
                    f"pool: {entry!r} must read <spec>=<n> or <spec>=<min>..<max>, e.g. "
                    "default=3, gh:org/repo@main=2 or default=1..8"
                )
            if dots and int(low) > int(high):
                raise ValueError(f"pool: {entry!r}: the minimum is above the maximum")
        return value

    @field_validator("hubs")
    @classmethod
    def _hub_list(cls, value: str) -> str:
        from worker.hubs import BadHubs, parse  # the parser lives with the Hubs it makes

        try:
            parse(value, "http://unused", "", "http://unused")
        except BadHubs as e:
            raise ValueError(str(e)) from e
        return value

    @field_validator("hub_api_url", "public_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("banned_specs", "package_index_hosts", "dataverse_urls", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("package_index_hosts")
    @classmethod
    def _host_ports(cls, value: list[str]) -> list[str]:
        for entry in value:
            host, sep, port = entry.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"package_index_hosts: {entry!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _default_build_queue(self) -> Settings:
        if not self.build_queue:
            self.build_queue = f"{self.queue}.builds"
        return self

    @field_validator("user_prefix")
    @classmethod
    def _prefix_is_a_name(cls, value: str) -> str:
        if not value or not value[0].isalpha() or not all(c.isalnum() or c == "-" for c in value):
            raise ValueError("user_prefix must start with a letter and hold only [a-z0-9-]")
        return value.lower()


@functools.cache
def get_settings() -> Settings:
    return Settings()
