"""Database tables: a launch and the events it emitted."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names so Alembic autogenerate and downgrades stay tidy.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Status(enum.StrEnum):
    queued = "queued"
    building = "building"
    launching = "launching"
    # A warm-pool server, running and never used, waiting for a visitor (worker/pool.py).
    pooled = "pooled"
    ready = "ready"
    failed = "failed"
    ended = "ended"


TERMINAL = frozenset({Status.failed, Status.ended})
# Statuses that hold, or are about to hold, a Hub server (a pooled one counts: issue 12): what
# the caps on active sessions and each Hub's capacity count.
ACTIVE = (Status.launching, Status.pooled, Status.ready)


class Phase(enum.StrEnum):
    """Event phases, named as BinderHub names them."""

    waiting = "waiting"
    fetching = "fetching"
    building = "building"
    built = "built"
    launching = "launching"
    # A warm-pool server, running and never used, waiting for a visitor (worker/pool.py).
    pooled = "pooled"
    ready = "ready"
    failed = "failed"


class EndReason(enum.StrEnum):
    # A pooled server went to a visitor's launch, which owns its Hub user from then on.
    handed_over = "handed_over"
    # A pooled server no longer wanted (the pool shrank, or its repository has a new commit).
    drained = "drained"
    expired = "expired"
    idle = "idle"
    requested = "requested"
    failed = "failed"
    orphan = "orphan"
    gone = "gone"
    # The sandbox ended the session: it went past its memory limit.
    out_of_memory = "out_of_memory"
    # A /build launch whose visitor left (the event stream closed) before it was ready.
    abandoned = "abandoned"
    # A build-only launch (BinderHub's ?build_only=true): its environment is built, and no
    # server was ever asked for.
    built = "built"


Timestamp = DateTime(timezone=True)
# An image name is at most 256 characters and a repository URL 2048 (worker/repos.py): keys
# of longer URLs are cut, which only makes two such repositories share one cap.
SPEC_KEY_LENGTH = 512
POOL_KEY_LENGTH = 640  # a repository's key and its ref
CLIENT_LENGTH = 32  # worker/clients.py: 128 bits of a keyed digest


E = TypeVar("E", bound=enum.StrEnum)


class StrEnumColumn(TypeDecorator[E]):
    """A ``StrEnum`` stored as its value in a VARCHAR (the schema stays what the migrations made):
    rows come back as members, and a value outside the enum is refused before it is written."""

    impl = String
    cache_ok = True

    def __init__(self, enum_type: type[E], length: int = 16) -> None:
        super().__init__(length)
        self.enum_type = enum_type

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> str | None:
        return None if value is None else self.enum_type(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        return None if value is None else self.enum_type(value)


class Launch(Base):
    __tablename__ = "launches"

    # secrets.token_urlsafe(16): 128 random bits, the capability to watch and end this launch.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[Status] = mapped_column(StrEnumColumn(Status), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Chosen once, before the first Hub call, and reused by every retry.
    hub_user: Mapped[str | None] = mapped_column(String(64), unique=True)
    lifetime: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    end_reason: Mapped[EndReason | None] = mapped_column(StrEnumColumn(EndReason))
    # Fernet ciphertext of the server token; never the plaintext.
    token_ciphertext: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = mapped_column(Timestamp)
    ready_at: Mapped[datetime | None] = mapped_column(Timestamp)
    expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    ended_at: Mapped[datetime | None] = mapped_column(Timestamp)
    end_requested_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # When the Hub user was confirmed gone (or never existed); NULL means cleanup is owed.
    user_removed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # Repository launches: the commit the ref resolved to, and the environment built from it.
    commit: Mapped[str | None] = mapped_column(String(40))
    env_name: Mapped[str | None] = mapped_column(String(255), index=True)
    # Until when the launch may still be starting (extended while its environment builds).
    deadline_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # A cleanup pass holds the row until then, so overlapping passes never act on it twice.
    lease_until: Mapped[datetime | None] = mapped_column(Timestamp)
    # The launch task run working on it (worker.claims): held while the run lives, kept alive
    # by its process's heartbeat. Past ``claim_expires_at`` the run is taken for dead (or its
    # retry for lost) and the launch is sent again.
    claimed_by: Mapped[str | None] = mapped_column(String(32))
    claim_expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # The environment it runs, as the per-spec cap counts it (transitions.spec_key).
    spec_key: Mapped[str | None] = mapped_column(String(SPEC_KEY_LENGTH))
    # Servers started for this launch that did not come up (each try gets a fresh one).
    spawn_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Set on a warm-pool launch (worker/pool.py): the pool it fills. None for a visitor's.
    pool_key: Mapped[str | None] = mapped_column(String(POOL_KEY_LENGTH))
    # The Hub it was placed on (worker/hubs.py), chosen with its slot; None: the first Hub.
    hub: Mapped[str | None] = mapped_column(String(63), index=True)
    # Who asked for it: a keyed digest of the visitor's address (worker/clients.py), never the
    # address. The waiting line is fair between clients (worker/admission.py). None: the pool's.
    client: Mapped[str | None] = mapped_column(String(CLIENT_LENGTH))

    __table_args__ = (
        # Rows whose Hub user may still exist: everything live plus owed removals. Every query
        # of a cleanup pass starts here, so its cost follows live sessions, not history.
        Index(
            "ix_launches_active",
            "status",
            "expires_at",
            postgresql_where=text("user_removed_at IS NULL"),
            sqlite_where=text("user_removed_at IS NULL"),
        ),
        # The per-spec cap counts by spec; a demand-sized pool reads a spec's recent launches
        # and its servers' recent starts (worker/pool_demand.py).
        Index("ix_launches_spec_key_created", "spec_key", "created_at"),
        Index("ix_launches_pool_key_ready", "pool_key", "ready_at"),
    )

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    def server_url(self, public_url: str) -> str:
        """The URL of this launch's server, without any token."""
        if self.hub_user is None:
            raise ValueError(f"launch {self.id} has no Hub user yet")
        return f"{public_url}/user/{self.hub_user}/"


class LaunchEvent(Base):
    __tablename__ = "launch_events"
    __table_args__ = (Index("ix_launch_events_launch_id_id", "launch_id", "id"),)

    # The id doubles as the SSE event id, so reconnects resume with Last-Event-ID.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    launch_id: Mapped[str] = mapped_column(ForeignKey("launches.id", ondelete="CASCADE"))
    phase: Mapped[Phase] = mapped_column(StrEnumColumn(Phase))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(Timestamp)


class BuildStatus(enum.StrEnum):
    building = "building"
    built = "built"
    failed = "failed"
    evicted = "evicted"


class HubHealth(Base):
    """What the last checks of each Hub said (worker/hub_health.py): launches are placed only
    on Hubs that answer. No row yet: taken as healthy (a new Hub is used at once)."""

    __tablename__ = "hub_health"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    healthy: Mapped[bool] = mapped_column(Boolean)
    checked_at: Mapped[datetime] = mapped_column(Timestamp)
    # Since when it has failed every check (None while healthy): the failover's clock.
    failing_since: Mapped[datetime | None] = mapped_column(Timestamp)
    error: Mapped[str | None] = mapped_column(Text)


class Build(Base):
    """One environment per (repo, commit, builder version): the row is the build's lock."""

    __tablename__ = "builds"

    # Deterministic name of the environment / image: the dedup and cache key.
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    repo: Mapped[str] = mapped_column(Text)
    commit: Mapped[str] = mapped_column(String(40))
    builder: Mapped[str] = mapped_column(String(32))
    status: Mapped[BuildStatus] = mapped_column(StrEnumColumn(BuildStatus))
    # How many times a build was started for this name (1 when deduplication worked).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    log_tail: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    started_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # Refreshed while the build runs; a stale heartbeat means its worker died.
    heartbeat_at: Mapped[datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    last_used_at: Mapped[datetime | None] = mapped_column(Timestamp)
