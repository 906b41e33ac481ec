"""The example Grafana dashboard asks only for series the gateway exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hostgpu.gateway.metrics import Metrics
from hostgpu.store import open_store

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported(tmp_path: Path) -> set[str]:
    store = open_store(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        names = set()
        for family in Metrics(store).registry.collect():
            names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
        return names
    finally:
        store.close()


def test_every_query_names_an_exported_series(tmp_path: Path) -> None:
    board = json.loads((ROOT / "deploy/grafana/hostgpu.json").read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    assert exprs
    used = {name for expr in exprs for name in re.findall(r"\bhostgpu_[a-z_]+", expr)}
    missing = used - exported(tmp_path)
    assert not missing, f"the dashboard queries series /metrics does not have: {missing}"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
