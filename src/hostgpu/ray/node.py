"""``hostgpu ray start`` and ``hostgpu ray status``: a Ray node that advertises what the probe
found, and the cluster's nodes with their hostgpu devices."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hostgpu.errors import ConfigError
from hostgpu.ray.resources import NODE_ENV, NodeAdvert

#: Runs Ray's own CLI with this interpreter (no `ray` script on PATH needed).
RAY_CLI = "import sys; from ray.scripts.scripts import main; sys.exit(main())"
#: `ray start` options whose values hostgpu computes and merges with the user's.
_MERGED = ("--num-gpus", "--resources", "--labels")


@dataclass
class StartPlan:
    """The ``ray start`` command for this node, and what the user's own options changed."""

    argv: list[str]
    env: dict[str, str]
    notes: list[str] = field(default_factory=list)


def _split_options(extra: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Pull ``--num-gpus``, ``--resources`` and ``--labels`` (``--x v`` or ``--x=v``) out of
    the options meant for ``ray start``; return them and the rest, in order."""
    found: dict[str, str] = {}
    rest: list[str] = []
    args = list(extra)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in _MERGED:
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"{name} needs a value")
                value = args[i + 1]
                i += 1
            found[name] = value
        else:
            rest.append(arg)
        i += 1
    return found, rest


def plan_start(
    advert: NodeAdvert,
    *,
    head: bool,
    address: str | None,
    extra: Sequence[str] = (),
    environ: dict[str, str] | None = None,
) -> StartPlan:
    """The ``ray start`` command line: the advert's resources and labels, merged with the
    user's own ``ray start`` options (theirs win, and the notes say so)."""
    from hostgpu.ray.resources import parse_labels

    if head and address:
        raise ConfigError("--head starts a new cluster; --address joins one: give one of them")
    if not head and not address:
        raise ConfigError(
            "give --head to start a cluster, or --address HOST:PORT to join one "
            "(the head's `ray start` output prints it)"
        )
    given, rest = _split_options(extra)
    notes: list[str] = []
    num_gpus = advert.num_gpus
    if "--num-gpus" in given:
        try:
            asked = int(given["--num-gpus"])
        except ValueError:
            raise ConfigError(f"--num-gpus {given['--num-gpus']!r} is not a number") from None
        if asked != num_gpus:
            notes.append(f"--num-gpus {asked} overrides the probe's {num_gpus} CUDA device(s)")
        num_gpus = asked
    resources = dict(advert.resources)
    if "--resources" in given:
        try:
            theirs = json.loads(given["--resources"])
        except ValueError as exc:
            raise ConfigError(f"--resources is not JSON: {exc}") from None
        if not isinstance(theirs, dict):
            raise ConfigError("--resources must be a JSON object, e.g. '{\"ssd\": 1}'")
        for key in sorted(set(theirs) & set(resources)):
            if theirs[key] != resources[key]:
                notes.append(
                    f"--resources sets {key}={theirs[key]} (the probe found {resources[key]})"
                )
        resources.update(theirs)
    labels = dict(advert.labels)
    if "--labels" in given:
        labels.update(parse_labels(given["--labels"]))
    argv = [sys.executable, "-c", RAY_CLI, "start"]
    if head:
        argv.append("--head")
    if address:
        argv += ["--address", address]
    merged = NodeAdvert(
        num_gpus=num_gpus,
        resources=resources,
        labels=labels,
        devices=advert.devices,
        unavailable=advert.unavailable,
    )
    argv += merged.ray_args() + rest
    env = dict(environ or {})
    env[NODE_ENV] = merged.node_json()
    if address and "RAY_AUTH_MODE" not in env and _has_auth_token(env):
        # `ray start --head` turns token auth on by itself when a token exists; `ray start
        # --address` never does (Ray will not send a local token to an address it was given),
        # and a head with token auth then refuses the node with "InvalidAuthToken".
        notes.append(
            "a Ray auth token exists here but RAY_AUTH_MODE is unset: if the head uses token "
            "auth (`ray start --head` turns it on where a token exists), set RAY_AUTH_MODE=token"
        )
    return StartPlan(argv=argv, env=env, notes=notes)


def _has_auth_token(env: dict[str, str]) -> bool:
    """Whether Ray would find an auth token: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token`` (Ray's own order)."""
    if env.get("RAY_AUTH_TOKEN"):
        return True
    path = env.get("RAY_AUTH_TOKEN_PATH") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".ray", "auth_token"
    )
    return os.path.isfile(path)


# -- status -------------------------------------------------------------------------------------
@dataclass
class NodeStatus:
    node_id: str
    address: str
    head: bool
    cpus: float
    resources: dict[str, float]
    labels: dict[str, str]
    devices: list[dict[str, Any]] | None  # hostgpu's probe, or None: not started by hostgpu
    unavailable: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def cluster_status(address: str | None, timeout: float = 20.0) -> list[NodeStatus]:
    """Connect to the cluster as a driver and describe its live nodes."""
    import logging

    try:
        import ray
    except ImportError:
        raise ConfigError("this needs Ray: pip install 'hostgpu[ray]'") from None
    from hostgpu.ray.backend import node_descriptions

    owns = not ray.is_initialized()
    if owns and address and "RAY_AUTH_MODE" not in os.environ and _has_auth_token(dict(os.environ)):
        # ray.init(address=X) never turns token auth on by itself (only "auto" does), and
        # a head started while a token existed requires it.
        os.environ["RAY_AUTH_MODE"] = "token"
    if owns:
        try:
            ray.init(address=address or "auto", logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise ConfigError(
                f"no Ray cluster at {address or 'RAY_ADDRESS / this machine'}: {exc}"
            ) from None
    try:
        live = [n for n in ray.nodes() if n.get("Alive")]
        described = node_descriptions([n["NodeID"] for n in live], timeout=timeout)
        found = []
        for node in live:
            description = described.get(node["NodeID"])
            resources = dict(node.get("Resources") or {})
            labels = {
                k: v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")
            }
            found.append(
                NodeStatus(
                    node_id=node["NodeID"],
                    address=f"{node.get('NodeManagerAddress')}:{node.get('NodeManagerPort')}",
                    head="node:__internal_head__" in resources,
                    cpus=resources.get("CPU", 0.0),
                    resources=resources,
                    labels=labels,
                    devices=description.get("devices") if description else None,
                    unavailable=dict(description.get("unavailable") or {}) if description else {},
                )
            )
        return found
    finally:
        if owns:
            ray.shutdown()
