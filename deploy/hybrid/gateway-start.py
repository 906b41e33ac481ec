"""Start the containerised gateway once its database answers (PostgreSQL may start later).

Compose v1 has no optional `depends_on` and the `postgres` profile may be off, so the
gateway waits for its own database instead: up to HOSTGPU_DB_WAIT_S seconds (default 120),
then `hostgpu gateway` takes over this process (exec, so signals reach it directly).
"""

from __future__ import annotations

import os
import sys
import time


def wait_for_database(url: str, limit_s: float) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    engine = create_engine(url, pool_pre_ping=True)
    safe = make_url(url).render_as_string(hide_password=True)
    deadline = time.monotonic() + limit_s
    while True:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            break
        except Exception as exc:
            if time.monotonic() > deadline:
                print(f"database {safe} did not answer within {limit_s:.0f} s: {exc}", flush=True)
                sys.exit(1)
            print(f"waiting for database {safe}: {type(exc).__name__}", flush=True)
            time.sleep(1)
    engine.dispose()


def main() -> None:
    url = os.environ.get("HOSTGPU_DATABASE_URL", "").strip()
    if url.startswith("postgresql"):
        wait_for_database(url, float(os.environ.get("HOSTGPU_DB_WAIT_S", "120")))
    elif not url:
        # An empty value means SQLite under HOSTGPU_HOME; drop it so settings see "unset".
        os.environ.pop("HOSTGPU_DATABASE_URL", None)
    os.execvp("hostgpu", ["hostgpu", "gateway", *sys.argv[1:]])


if __name__ == "__main__":
    main()
