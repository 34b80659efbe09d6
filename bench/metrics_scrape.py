"""What one scrape of /metrics costs, with 10,000 live sessions and 100,000 rows of history.

The app is built in this process (``create_app``) on a fresh PostgreSQL database and a Redis
namespace of its own, with counters in Redis for every family. Each scrape is a real HTTP
request through the ASGI app (``TestClient``), so it includes the collector's SQL, the Redis
reads and the text exposition. Baseline, in the same run: the same scrape against the same app
before any session exists.

    .venv/bin/python -m bench.metrics_scrape                     # 10000 live, 100000 history
    .venv/bin/python -m bench.metrics_scrape --live 2000 --history 20000 --scrapes 20
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from datetime import timedelta
from typing import Any

import redis
import sqlalchemy as sa
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient

from api.main import create_app
from bench.common import (
    BROKER_URL,
    bench_database,
    compare,
    machine_info,
    print_info,
)
from worker import metrics
from worker.db import dispose_all, utcnow
from worker.metrics import Recorder, observation
from worker.migrate import upgrade
from worker.models import EndReason, Launch, Status
from worker.settings import Settings

IMAGES = [f"image-{n:02d}" for n in range(40)]


def rows(live: int, history: int) -> list[dict[str, Any]]:
    now = utcnow()
    out: list[dict[str, Any]] = []
    for n in range(live):
        out.append(
            {
                "id": secrets.token_urlsafe(16),
                "status": Status.ready,
                "spec": {"image": IMAGES[n % len(IMAGES)]},
                "hub_user": f"hl-{n:08d}",
                "lifetime": 3600,
                "created_at": now - timedelta(minutes=5),
                "updated_at": now - timedelta(minutes=5),
                "ready_at": now - timedelta(minutes=4),
                "expires_at": now + timedelta(hours=1),
            }
        )
    for n in range(history):
        ended = now - timedelta(days=1 + n % 30)
        out.append(
            {
                "id": secrets.token_urlsafe(16),
                "status": Status.ended if n % 10 else Status.failed,
                "spec": {"image": IMAGES[n % len(IMAGES)]},
                "hub_user": None,
                "lifetime": 3600,
                "created_at": ended - timedelta(hours=1),
                "updated_at": ended,
                "ended_at": ended,
                "end_reason": EndReason.expired if n % 10 else EndReason.failed,
                "user_removed_at": ended,
            }
        )
    return out


def fill_counters(redis_url: str, namespace: str) -> None:
    """One series for every label set a busy service would have, so reading them costs what
    it would."""
    recorder = Recorder(redis_url, namespace)
    for reason in ("", "hub_refused", "timeout", "build_failed", "requested", "expired"):
        for provider in ("image", "github.com", "git"):
            recorder.add(
                [
                    observation(
                        "hublaunch_launches_finished",
                        provider=provider,
                        outcome="failed",
                        reason=reason,
                    ),
                    observation("hublaunch_launch_ready_seconds", 3.0, provider=provider),
                    observation("hublaunch_launch_queue_seconds", 0.1, provider=provider),
                ]
            )
    for family in ("GET /users", "POST /users/:name", "POST /users/:name/tokens"):
        for code in ("200", "201", "404", "timeout"):
            recorder.add(
                [
                    observation("hublaunch_hub_requests", family=family, code=code),
                    observation("hublaunch_hub_request_seconds", 0.02, family=family),
                ]
            )
    recorder.flush()


def scrape_times(client: TestClient, scrapes: int) -> list[float]:
    times = []
    for _ in range(scrapes):
        t0 = time.perf_counter()
        response = client.get("/metrics")
        times.append((time.perf_counter() - t0) * 1000)
        if response.status_code != 200 or "hublaunch_sessions_active" not in response.text:
            raise SystemExit(f"scrape failed: {response.status_code}")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, default=10_000, help="live sessions (10000)")
    parser.add_argument("--history", type=int, default=100_000, help="history rows (100000)")
    parser.add_argument("--scrapes", type=int, default=50, help="scrapes per side (50)")
    args = parser.parse_args()
    namespace = f"bench-metrics-{secrets.token_hex(4)}"
    store = redis.Redis.from_url(BROKER_URL)
    try:
        with bench_database() as database:
            upgrade(database.url)
            settings = Settings(
                database_url=database.url,
                broker_url=BROKER_URL,
                queue=namespace,
                secret_key=Fernet.generate_key().decode(),
            )
            fill_counters(BROKER_URL, namespace)
            with TestClient(create_app(settings)) as client:
                scrape_times(client, 5)  # warm-up: connections, statement cache
                empty = scrape_times(client, args.scrapes)
                t0 = time.perf_counter()
                engine = sa.create_engine(database.url)
                with engine.begin() as conn:
                    data = rows(args.live, args.history)
                    for i in range(0, len(data), 5000):
                        conn.execute(sa.insert(Launch), data[i : i + 5000])
                    conn.execute(sa.text("ANALYZE launches"))
                engine.dispose()
                print(
                    f"{args.live} live sessions and {args.history} history rows inserted in "
                    f"{time.perf_counter() - t0:.1f} s",
                    file=sys.stderr,
                )
                scrape_times(client, 5)
                full = scrape_times(client, args.scrapes)
                size = len(client.get("/metrics").content)
            print_info(machine_info(("database", database.kind)))
            print()
            result = compare(
                "scrape of /metrics (ms)",
                full,
                empty,
                (f"{args.live} live, {args.history} history", "no session (same app)"),
            )
            if result is not None:
                print()
                print(
                    f"difference p50: {result.extra_p50:+.1f} ms   p95: {result.extra_p95:+.1f} ms"
                )
                print(f"ratio at p50: {result.ratio:.2f}; page size with sessions: {size} bytes")
    finally:
        dispose_all()
        for key in store.scan_iter(f"{metrics.KEY_PREFIX}{namespace}:*"):
            store.delete(key)
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
