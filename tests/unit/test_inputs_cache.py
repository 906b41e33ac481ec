"""A worker's cache of fetched job inputs: bounded, least recently used first, never a file
a held job needs, and no fetch's leftovers kept."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from hostgpu.worker.inputs import STALE_PART_S, InputCache


def put(cache: InputCache, data: bytes, used_at: float) -> str:
    digest = hashlib.sha256(data).hexdigest()
    path = cache.path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (used_at, used_at))
    return digest


def test_trim_drops_the_least_recently_used_until_the_cache_fits(tmp_path: Path) -> None:
    cache = InputCache(tmp_path / "inputs", max_bytes=2500)
    now = time.time()
    old, middle, new = (put(cache, bytes([n]) * 1000, now - 300 + n * 100) for n in range(3))
    assert cache.trim(set) == 1000
    assert not cache.path(old).exists()
    assert cache.path(middle).exists() and cache.path(new).exists()
    assert cache.trim(set) == 0  # it fits now


def test_a_file_used_again_is_kept_over_a_newer_unused_one(tmp_path: Path) -> None:
    cache = InputCache(tmp_path / "inputs", max_bytes=1500)
    now = time.time()
    reused = put(cache, b"a" * 1000, now - 200)
    other = put(cache, b"b" * 1000, now - 100)
    assert cache.missing([reused, "f" * 64]) == ["f" * 64]  # a lease found it: used now
    cache.trim(set)
    assert cache.path(reused).exists() and not cache.path(other).exists()


def test_the_inputs_of_held_jobs_are_never_dropped(tmp_path: Path) -> None:
    cache = InputCache(tmp_path / "inputs", max_bytes=0)
    now = time.time()
    held = put(cache, b"held" * 100, now - 1000)
    done = put(cache, b"done" * 100, now)
    cache.trim(lambda: {held})
    assert cache.path(held).exists() and not cache.path(done).exists()


def test_an_input_goes_with_its_named_links_and_counts_once(tmp_path: Path) -> None:
    """The ingest pipeline links an upload under its owner's name beside the blob: dropping
    the blob alone would free nothing."""
    cache = InputCache(tmp_path / "inputs", max_bytes=1500)
    now = time.time()
    old = put(cache, b"o" * 1000, now - 100)
    new = put(cache, b"n" * 1000, now)
    blob = cache.path(old)
    (blob.parent / f"{old}.named").mkdir()
    os.link(blob, blob.parent / f"{old}.named" / "report.pdf")
    os.link(blob, blob.parent / f"{old}.pdf")
    assert cache.trim(set) == 1000  # three names, one file
    assert [p.name for p in blob.parent.iterdir() if p.name.startswith(old)] == []
    assert cache.path(new).exists()


def test_a_dead_fetchs_part_file_goes_and_a_live_one_stays(tmp_path: Path) -> None:
    cache = InputCache(tmp_path / "inputs", max_bytes=10**9)
    folder = tmp_path / "inputs" / "ab"
    folder.mkdir(parents=True)
    dead, live = folder / (".ab" + "0" * 62 + ".part"), folder / (".ab" + "1" * 62 + ".part")
    for part in (dead, live):
        part.write_bytes(b"x" * 10)
    stale = time.time() - STALE_PART_S - 60
    os.utime(dead, (stale, stale))
    cache.trim(set)
    assert not dead.exists() and live.exists()


def test_an_empty_or_absent_cache_trims_nothing(tmp_path: Path) -> None:
    assert InputCache(tmp_path / "none", max_bytes=0).trim(set) == 0
