"""Chaos: several gateways on one database, workers and a gateway SIGKILLed mid-run.

    python benchmarks/chaos.py [--jobs 10000] [--workers 4] [--gateways 2]
                               [--backend postgres|sqlite] [--kill-every 3.0]

Real gateway and worker processes on 127.0.0.1 share one store (a fresh PostgreSQL
database, or one SQLite file). Every job (``tests.chaos.chaosfuncs:record``) writes a
row to a separate execution table, so duplicate executions can be counted. During the
run a random worker is SIGKILLed and restarted every ``--kill-every`` seconds, and one
gateway is SIGKILLed and restarted once; clients and workers retry through the outage.
At the end every job must have succeeded, with exactly one recorded result (its key),
and none may be lost. The same core (:func:`run_chaos`) runs in CI at a reduced size
(``tests/chaos/test_chaos.py``).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so `tests.chaos.chaosfuncs` imports when run as a script
    sys.path.insert(0, str(ROOT))

from tests.chaos import chaosfuncs  # noqa: E402

from hostgpu.client import Client  # noqa: E402
from hostgpu.errors import GatewayError, GatewayUnavailable  # noqa: E402
from hostgpu.jobs import JobSpec, Payload  # noqa: E402
from hostgpu.testing import Gateway, Worker  # noqa: E402

PG_ADMIN_URL = os.environ.get("HOSTGPU_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
FUNCTION = "tests.chaos.chaosfuncs:record"
SUBMIT_BATCH = 500
LEASE_SECONDS = "2"


def fresh_pg_database() -> str:
    import psycopg

    name = f"hostgpu_chaos_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_pg_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _call_any(gateways: list[Gateway], first: int, call: Callable[[Client], Any]) -> Any:
    """Run ``call`` on gateway ``first``, else the others, retrying until one answers."""
    delay = 0.1
    deadline = time.monotonic() + 120
    while True:
        for offset in range(len(gateways)):
            gw = gateways[(first + offset) % len(gateways)]
            try:
                with Client(gw.url, gw.token, timeout=60) as client:
                    return call(client)
            except GatewayUnavailable:
                continue
            except GatewayError as exc:  # a 5xx while a gateway dies mid-request
                if exc.status is None or exc.status < 500:
                    raise
        if time.monotonic() > deadline:
            raise GatewayUnavailable("no gateway answered for two minutes")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


class Chaos(threading.Thread):
    """Kill a random worker every ``kill_every`` s; kill one gateway once, when asked."""

    def __init__(
        self,
        gateways: list[Gateway],
        fleet: list[Worker],
        kill_every: float,
        *,
        seed: int | None = None,
        gateway_outage_s: float = 1.0,
        say: Callable[[str], None] = lambda _: None,
    ) -> None:
        super().__init__(name="chaos", daemon=True)
        self.gateways = gateways
        self.fleet = fleet
        self.kill_every = kill_every
        self.rng = random.Random(seed)
        self.gateway_outage_s = gateway_outage_s
        self.say = say
        self.stop_event = threading.Event()
        self.kill_gateway = threading.Event()  # set by the main loop mid-run
        self.gateway_done = threading.Event()
        self.worker_kills = 0
        self.gateway_kills = 0
        self.lock = threading.Lock()  # guards `fleet` against the final shutdown
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            next_kill = time.monotonic() + self.kill_every
            generation = 0
            while not self.stop_event.wait(0.05):
                if self.kill_gateway.is_set() and not self.gateway_done.is_set():
                    self._gateway_once()
                if self.kill_every > 0 and time.monotonic() >= next_kill:
                    generation += 1
                    self._kill_worker(generation)
                    next_kill = time.monotonic() + self.kill_every
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _registered(self) -> set[str]:
        """Names of the workers the gateways see alive (registered and heartbeating)."""
        workers = _call_any(self.gateways, 0, lambda c: c.workers(alive=True))
        return {w.capabilities.name for w in workers}

    def _kill_worker(self, generation: int) -> None:
        # Only workers that are up: on a busy machine a worker can take longer to start
        # than the kill interval, and killing it before it registers tests nothing.
        registered = self._registered()
        with self.lock:
            if self.stop_event.is_set():
                return
            up = [
                i
                for i, w in enumerate(self.fleet)
                if w.name in registered and w.proc is not None and w.proc.poll() is None
            ]
            if not up:
                self.say("no worker up yet; no kill this round")
                return
            index = self.rng.choice(up)
            old = self.fleet[index]
            old.kill()
            self.worker_kills += 1
            fresh = Worker(
                old.gateway,
                imports=old.imports,
                concurrency=old.concurrency,
                name=f"chaos{index}-{generation}",
            )
            # Not waiting for it to register: the chaos goes on meanwhile.
            self.fleet[index] = fresh.start(wait=False)
        self.say(f"killed worker {old.name}, started {fresh.name}")

    def _gateway_once(self) -> None:
        gw = self.gateways[self.rng.randrange(len(self.gateways))]
        gw.kill()
        self.gateway_kills += 1
        self.say(f"killed gateway {gw.url}")
        time.sleep(self.gateway_outage_s)
        gw.start()  # same port: its workers and clients reconnect to it
        self.say(f"restarted gateway {gw.url}")
        self.gateway_done.set()


def _stop_all(fleet: list[Worker], gateways: list[Gateway]) -> None:
    """SIGTERM every worker at once (then every gateway) and wait; SIGKILL stragglers."""
    for w in fleet:
        if w.proc and w.proc.poll() is None:
            w.proc.terminate()
    deadline = time.monotonic() + 15
    for w in fleet:
        if w.proc:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
    for gw in gateways:
        gw.stop()


def _verify(
    gateways: list[Gateway], ids: list[str], keys: list[str], store_url: str
) -> dict[str, Any]:
    """Read every job back through the API and the store; count what went wrong."""
    by_id: dict[str, Any] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        for job in _call_any(gateways, 0, partial(Client.wait, job_ids=chunk, timeout=0)):
            by_id[job.id] = job
    succeeded = failed = wrong_result = 0
    for job_id, key in zip(ids, keys, strict=True):
        job = by_id.get(job_id)
        if job is None:
            continue
        if job.state.value == "succeeded":
            succeeded += 1
            if job.result != key:
                wrong_result += 1
        else:
            failed += 1
    counts = _call_any(gateways, 0, lambda c: c.summary().counts)
    # Exactly one attempt per job may carry the outcome "succeeded": the store's own
    # record that one (and only one) completion was accepted.
    conn = chaosfuncs.connect(
        store_url if store_url.startswith("sqlite") else store_url.replace("+psycopg", "")
    )
    try:
        multi = conn.execute(
            "SELECT COUNT(*) FROM (SELECT job_id FROM attempts WHERE outcome = 'succeeded' "
            "GROUP BY job_id HAVING COUNT(*) > 1) AS x"
        ).fetchone()[0]
        max_attempts = conn.execute("SELECT COALESCE(MAX(attempts), 0) FROM jobs").fetchone()[0]
    finally:
        conn.close()
    return {
        "succeeded": succeeded,
        "failed": failed,
        "lost": len(ids) - len(by_id),
        "wrong_result": wrong_result,
        "double_results": int(multi),
        "jobs_in_store": sum(counts.values()),
        "max_attempts": int(max_attempts),
    }


def run_chaos(
    backend: str,
    jobs: int,
    workers: int,
    gateways: int,
    kill_every: float,
    home: Path,
    *,
    database_url: str | None = None,
    concurrency: int = 2,
    sleep_s: float = 0.005,
    kill_gateway: bool = True,
    gateway_kill_at: float = 0.3,
    timeout: float = 900.0,
    seed: int | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """One chaos run; returns its numbers (see the module docstring).

    ``database_url``: the store for ``backend="postgres"`` (default: a fresh database,
    dropped afterwards). The execution table lives in that database on PostgreSQL and
    in ``home/executions.db`` on SQLite. The gateway kill happens once
    ``gateway_kill_at`` of the jobs are finished.
    """
    home.mkdir(parents=True, exist_ok=True)
    created_db = False
    if backend == "postgres":
        if database_url is None:
            database_url = fresh_pg_database()
            created_db = True
        exec_url = database_url
    elif backend == "sqlite":
        database_url = database_url or f"sqlite:///{home / 'hostgpu.db'}"
        exec_url = chaosfuncs.sqlite_url(home / "executions.db")
    else:
        raise ValueError(f"backend must be postgres or sqlite, not {backend!r}")
    chaosfuncs.create_table(exec_url)

    env = {"HOSTGPU_LEASE_SECONDS": LEASE_SECONDS, "HOSTGPU_WORKER_TTL_SECONDS": "10"}
    gws = [
        Gateway(home, database_url, env_extra=dict(env), pythonpath=str(ROOT))
        for _ in range(gateways)
    ]
    fleet: list[Worker] = []
    chaos: Chaos | None = None
    try:
        for gw in gws:  # one after another: the first creates the admin token
            gw.start()
        for gw in gws[1:]:
            gw.token = gws[0].token
        fleet.extend(
            Worker(
                gws[i % gateways],
                imports=("tests.chaos.chaosfuncs",),
                concurrency=concurrency,
                name=f"chaos{i}-0",
            ).start()
            for i in range(workers)
        )
        say(f"{gateways} gateway(s) and {workers} worker(s) up on {backend}")
        chaos = Chaos(gws, fleet, kill_every, seed=seed, say=say)
        keys = [f"k{i:06d}" for i in range(jobs)]
        specs = [
            JobSpec(
                function=FUNCTION,
                payload=Payload(args=[key, exec_url], kwargs={"sleep_s": sleep_s}),
                gpu="cpu",
                timeout_s=30,
                max_retries=20,
                # A batch re-sent after a gateway died mid-request names the same jobs.
                idempotency_key=f"chaos-{key}",
            )
            for key in keys
        ]
        started = time.monotonic()
        chaos.start()
        ids: list[str] = []
        for n, start in enumerate(range(0, jobs, SUBMIT_BATCH)):
            batch = specs[start : start + SUBMIT_BATCH]
            ids += _call_any(gws, n, partial(Client.submit_batch, specs=batch))
        say(f"submitted {len(ids)} jobs in {time.monotonic() - started:.1f}s")

        deadline = started + timeout
        timed_out = False
        last_note = 0.0
        while True:
            counts = _call_any(gws, 0, lambda c: c.summary().counts)
            finished = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
            if kill_gateway and finished >= gateway_kill_at * jobs:
                chaos.kill_gateway.set()
            gateway_ok = not kill_gateway or chaos.gateway_done.is_set()
            if finished >= jobs and gateway_ok:
                break
            if chaos.error is not None:
                raise RuntimeError("the chaos thread failed") from chaos.error
            if time.monotonic() > deadline:
                # Report what is there: unfinished jobs count as lost.
                say(f"timed out after {timeout:.0f}s with {counts}")
                timed_out = True
                break
            if time.monotonic() - last_note > 5:
                say(f"{finished}/{jobs} finished: {counts}")
                last_note = time.monotonic()
            time.sleep(0.2)
        wall = time.monotonic() - started
        chaos.stop_event.set()
        chaos.join(timeout=60)
        if chaos.error is not None:
            raise RuntimeError("the chaos thread failed") from chaos.error

        checked = _verify(gws, ids, keys, database_url)
        executions, distinct = chaosfuncs.count_executions(exec_url)
        return {
            "backend": backend,
            "gateways": gateways,
            "workers": workers,
            "concurrency": concurrency,
            "jobs": jobs,
            "submitted": len(ids),
            **checked,
            "executions": executions,
            "executed_keys": distinct,
            "duplicates": executions - distinct,
            "worker_kills": chaos.worker_kills,
            "gateway_kills": chaos.gateway_kills,
            "wall_s": wall,
            "jobs_per_s": jobs / wall if wall else 0.0,
            "timed_out": timed_out,
        }
    finally:
        if chaos is not None:
            chaos.stop_event.set()
            chaos.join(timeout=60)
        _stop_all(fleet, gws)
        if created_db and database_url:
            drop_pg_database(database_url)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2, help="children per worker")
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills")
    parser.add_argument("--sleep", type=float, default=0.005, help="seconds each job lingers")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    console = Console()
    gateways = args.gateways
    if args.backend == "sqlite" and gateways != 1:
        console.print("SQLite: one gateway (several gateways need PostgreSQL)")
        gateways = 1
    with tempfile.TemporaryDirectory(prefix="hostgpu-chaos-") as tmp:
        out = run_chaos(
            args.backend,
            args.jobs,
            args.workers,
            gateways,
            args.kill_every,
            Path(tmp),
            concurrency=args.concurrency,
            sleep_s=args.sleep,
            timeout=args.timeout,
            seed=args.seed,
            say=lambda msg: console.log(msg),
        )
    table = Table(
        title=f"chaos on {out['backend']}: {out['gateways']} gateway(s), {out['workers']} "
        f"workers × {out['concurrency']}, a worker SIGKILLed every {args.kill_every:g}s, "
        f"one gateway SIGKILLed once"
    )
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_column("meaning")
    rows = [
        ("jobs", "jobs", "submitted"),
        ("succeeded", "succeeded", "must equal jobs"),
        ("failed", "failed", "must be 0"),
        ("lost", "lost", "submitted but not finished or not found: must be 0"),
        ("double results", "double_results", "jobs with two accepted completions: must be 0"),
        ("wrong results", "wrong_result", "result differs from the job's key: must be 0"),
        ("executions", "executions", "rows in the execution table"),
        ("duplicates", "duplicates", "executions beyond one per job (at-least-once)"),
        ("worker kills", "worker_kills", "SIGKILL + restart"),
        ("gateway kills", "gateway_kills", "SIGKILL + restart"),
        ("max attempts", "max_attempts", "most attempts any job needed"),
        ("wall s", "wall_s", "first submit to last job finished"),
        ("jobs/s", "jobs_per_s", "through the chaos"),
    ]
    for title, key, meaning in rows:
        value = out[key]
        table.add_row(title, f"{value:,.1f}" if isinstance(value, float) else f"{value:,}", meaning)
    console.print(table)
    ok = (
        out["succeeded"] == out["jobs"]
        and out["failed"] == 0
        and out["lost"] == 0
        and out["double_results"] == 0
        and out["wrong_result"] == 0
        and out["jobs_in_store"] == out["jobs"]
    )
    console.print("[green]OK[/green]" if ok else "[red]FAILED[/red]: see the numbers above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
