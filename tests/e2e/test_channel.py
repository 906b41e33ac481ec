"""The worker channel (a WebSocket): leases pushed within granted slots, reports answered on
it, refusals with a reason, nothing lost when it closes, and HTTP long polls still there."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

import hostgpu
from tests import e2efuncs as f
from tests.conftest import Gateway, Worker
from tests.e2e.raw import FUNCTION, register


@pytest.fixture
def api(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.token}"}, timeout=30
    ) as client:
        yield client


def open_channel(gateway: Gateway, worker_id: str, token: str | None) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = gateway.url.replace("http://", "ws://") + f"/v1/workers/{worker_id}/channel"
    return connect(url, additional_headers=headers, compression=None)


def closed_with(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as caught:
        ws.recv(timeout=10)
    assert caught.value.rcvd is not None
    return caught.value.rcvd.code, caught.value.rcvd.reason


def submit(api: httpx.Client, n: int) -> list[str]:
    ids = []
    for i in range(n):
        reply = api.post("/v1/jobs", json={"function": FUNCTION, "payload": {"args": [i]}})
        assert reply.status_code == 201, reply.text
        ids.append(reply.json()["id"])
    return ids


def leases_within(ws: ClientConnection, seconds: float) -> list[dict]:
    leases: list[dict] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = json.loads(ws.recv(timeout=left))
        except TimeoutError:
            break
        leases += message["leases"]
    return leases


def test_pushed_leases_never_exceed_the_granted_slots(gateway: Gateway, api: httpx.Client) -> None:
    wid = register(api)
    ids = submit(api, 3)
    with open_channel(gateway, wid, gateway.token) as ws:
        assert leases_within(ws, 0.5) == []  # nothing granted, nothing pushed
        ws.send(json.dumps({"grant": 1}))
        [first] = leases_within(ws, 2)
        assert first["job_id"] in ids and first["device"]["kind"] == "cpu"

        # A report is answered under its number; it grants nothing by itself.
        done = {"job_id": first["job_id"], "lease_token": first["lease_token"]}
        ws.send(json.dumps({"seq": 7, "outcomes": [{**done, "status": "succeeded", "result": 2}]}))
        answer = json.loads(ws.recv(timeout=10))
        assert answer["seq"] == 7 and answer["leases"] == []
        assert answer["results"][0]["accepted"] is True
        assert leases_within(ws, 0.5) == []

        # Fencing holds on the channel: a second result for the job is refused.
        ws.send(json.dumps({"seq": 8, "outcomes": [{**done, "status": "succeeded", "result": 3}]}))
        assert json.loads(ws.recv(timeout=10))["results"][0]["accepted"] is False

        ws.send(json.dumps({"grant": 5}))
        rest = leases_within(ws, 2)
        assert sorted(lease["job_id"] for lease in rest) == sorted(set(ids) - {first["job_id"]})
    job = api.get(f"/v1/jobs/{first['job_id']}").json()
    assert job["state"] == "succeeded" and job["result"] == 2


def test_stream_text_of_a_job_not_its_own_is_refused_on_the_channel(
    gateway: Gateway, api: httpx.Client
) -> None:
    """A model server's text goes on its channel; the gateway relays only the text of jobs
    leased to that server, and answers the others with the jobs to stop."""
    wid = register(api)
    [job_id] = submit(api, 1)  # queued, leased to nobody
    event = {"job_id": job_id, "lease_token": "ab", "text": "not yours", "offset": 0}
    with open_channel(gateway, wid, gateway.token) as ws:
        ws.send(json.dumps({"stream": {"events": [event]}}))
        answer = json.loads(ws.recv(timeout=10))
        assert answer["cancelled"] == [job_id] and answer["leases"] == []
        # The channel stays: the worker still takes jobs on it.
        ws.send(json.dumps({"grant": 1}))
        assert [lease["job_id"] for lease in leases_within(ws, 3)] == [job_id]
    assert gateway.requests_to("/v1/workers/{worker_id}/streams") == 0


def test_a_closed_channel_loses_no_job(gateway: Gateway, api: httpx.Client) -> None:
    wid = register(api)
    with open_channel(gateway, wid, gateway.token) as ws:
        ws.send(json.dumps({"grant": 4}))
        time.sleep(0.3)  # the gateway waits for jobs on its behalf now
    time.sleep(0.3)
    [job_id] = submit(api, 1)
    time.sleep(1.0)
    # Nobody to deliver it to: it is not leased to the closed channel.
    assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"
    leased = api.post(f"/v1/workers/{wid}/lease", json={"max_jobs": 1, "wait": 5}).json()
    assert [lease["job_id"] for lease in leased["leases"]] == [job_id]


def test_a_new_channel_replaces_the_old_one(gateway: Gateway, api: httpx.Client) -> None:
    wid = register(api)
    with open_channel(gateway, wid, gateway.token) as old:
        old.send(json.dumps({"grant": 1}))
        time.sleep(0.3)
        # The worker lost its link without a close, and opens a new channel.
        with open_channel(gateway, wid, gateway.token) as new:
            new.send(json.dumps({"grant": 1}))
            assert closed_with(old) == (4409, "replaced by a newer channel of this worker")
            [job_id] = submit(api, 1)
            # The old channel's waiter took no wake-up meant for the new one.
            assert [lease["job_id"] for lease in leases_within(new, 3)] == [job_id]


def test_revoking_its_token_closes_an_open_channel(gateway: Gateway, api: httpx.Client) -> None:
    created = api.post("/v1/tokens", json={"name": "w", "scope": "worker"}).json()
    wid = register(api)
    with open_channel(gateway, wid, created["token"]) as ws:
        ws.send(json.dumps({"grant": 1}))
        time.sleep(0.3)
        assert api.delete(f"/v1/tokens/{created['id']}").status_code == 200
        assert closed_with(ws) == (4401, "the token was revoked")
    [job_id] = submit(api, 1)
    time.sleep(0.5)
    assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"


def test_the_channel_refuses_with_a_reason(gateway: Gateway, api: httpx.Client) -> None:
    wid = register(api)
    submitter = api.post("/v1/tokens", json={"name": "s", "scope": "submit"}).json()["token"]
    cases = [
        (None, wid, 4401, "bearer token"),
        ("not-a-token", wid, 4401, "invalid"),
        (submitter, wid, 4403, "cannot do this"),
        (gateway.token, "f" * 32, 4404, "register again"),
        (gateway.token, "not-an-id", 4404, "not a worker id"),
    ]
    for token, worker_id, code, reason in cases:
        with open_channel(gateway, worker_id, token) as ws:
            got = closed_with(ws)
            assert got[0] == code and reason in got[1], (token, worker_id, got)
    for message, why in [
        ('{"grant": -1}', "grant"),
        ('{"grant": true}', "grant"),
        ('{"grant": 1001}', "grant"),
        ('{"outcomes": [{"job_id": "x"}]}', "outcomes"),
        ('{"seq": 1, "surprise": 1}', "surprise"),
        ("not json", "invalid"),
    ]:
        with open_channel(gateway, wid, gateway.token) as ws:
            ws.send(message)
            code, text = closed_with(ws)
            assert code == 1007 and why in text.lower(), (message, text)
    with open_channel(gateway, wid, gateway.token) as ws:
        ws.send(b"\x00binary")
        assert closed_with(ws) == (1007, "send ChannelUp messages as JSON text frames")
    # The gateway is unharmed: the worker still leases over the channel.
    [job_id] = submit(api, 1)
    with open_channel(gateway, wid, gateway.token) as ws:
        ws.send(json.dumps({"grant": 1}))
        assert [lease["job_id"] for lease in leases_within(ws, 3)] == [job_id]


def test_a_worker_takes_jobs_over_its_channel(gateway: Gateway, workers: list[Worker]) -> None:
    workers.append(Worker(gateway, concurrency=2).start())
    hostgpu.connect(gateway.url, gateway.token)
    assert [f.add.remote(i, 1) for i in range(20)] == [i + 1 for i in range(20)]
    assert f.add.map(range(200), [1] * 200) == [i + 1 for i in range(200)]
    # Leases and reports went over the WebSocket: no long poll, no report request.
    assert gateway.requests_to("/v1/workers/{worker_id}/lease") == 0
    assert gateway.requests_to("/v1/workers/{worker_id}/report") == 0


def test_without_the_channel_the_worker_long_polls(gateway: Gateway, workers: list[Worker]) -> None:
    workers.append(Worker(gateway, concurrency=2, extra_args=("--no-channel",)).start())
    hostgpu.connect(gateway.url, gateway.token)
    assert [f.add.remote(i, 1) for i in range(5)] == [1, 2, 3, 4, 5]
    assert gateway.requests_to("/v1/workers/{worker_id}/lease") > 0


def test_a_worker_opens_its_channel_again_after_a_gateway_restart(
    gateway: Gateway, workers: list[Worker]
) -> None:
    workers.append(Worker(gateway).start())
    hostgpu.connect(gateway.url, gateway.token)
    assert f.add.remote(1, 1) == 2
    gateway.stop()
    gateway.start()
    assert f.add.remote(2, 2) == 4
    assert gateway.requests_to("/v1/workers/{worker_id}/lease") == 0


def test_a_lent_machine_answers_only_to_the_share_token_that_registered_it(
    gateway: Gateway, api: httpx.Client
) -> None:
    """Every per-worker action, over HTTP and the channel: a `worker` token, or another
    `share` token, cannot drive a lent machine (403 / 4403 with the reason); its own share
    token and an admin token can. A lender label a worker token claims is not kept."""
    made = {
        name: api.post("/v1/tokens", json={"name": name, "scope": scope}).json()
        for name, scope in (("lender", "share"), ("other lender", "share"), ("box", "worker"))
    }
    secrets = {name: token["token"] for name, token in made.items()}
    machine = {
        "name": "lent",
        "devices": [{"kind": "cpu", "name": "cpu"}],
        "labels": {"hostgpu.model/smollm2": "serve"},
    }

    def http(name: str) -> httpx.Client:
        headers = {"Authorization": f"Bearer {secrets[name]}"}
        return httpx.Client(base_url=gateway.url, headers=headers, timeout=30)

    with http("lender") as lender:
        lent = lender.post("/v1/workers", json=machine).json()["worker_id"]
    actions: list[tuple[str, str, dict | None, int]] = [
        ("POST", f"/v1/workers/{lent}/lease", {"max_jobs": 1, "wait": 0}, 200),
        ("POST", f"/v1/workers/{lent}/heartbeat", {}, 200),
        ("POST", f"/v1/workers/{lent}/report", {"outcomes": []}, 200),
        ("POST", f"/v1/workers/{lent}/streams", {"events": []}, 200),
        ("POST", f"/v1/workers?worker_id={lent}", machine, 201),
        ("POST", f"/v1/workers/{lent}/drain", None, 204),
        ("DELETE", f"/v1/workers/{lent}", None, 204),
    ]
    for name in ("box", "other lender"):
        with http(name) as client:
            for method, path, body, _ in actions:
                reply = client.request(method, path, json=body)
                assert reply.status_code == 403, (name, path, reply.text)
                assert "share token" in reply.json()["detail"], (name, path)
        with open_channel(gateway, lent, secrets[name]) as ws:
            code, reason = closed_with(ws)
            assert code == 4403 and "share token" in reason, (name, reason)
    assert api.post(f"/v1/workers/{lent}/heartbeat", json={}).status_code == 200  # admin
    with open_channel(gateway, lent, secrets["lender"]) as ws:
        ws.send(json.dumps({"grant": 1}))
        assert leases_within(ws, 0.5) == []  # open, and nothing to push
    with http("lender") as lender:
        for method, path, body, status in actions:
            reply = lender.request(method, path, json=body)
            assert reply.status_code == status, (path, reply.text)
            if "worker_id=" in path:
                assert reply.json()["worker_id"] == lent  # re-registered, the same machine

    # Only the gateway marks a machine lent: a worker token's claim to be one is dropped, so
    # it keeps its worker and the share token it named gains nothing.
    claim = {**machine, "labels": {"hostgpu.lender": made["lender"]["id"]}}
    with http("box") as box:
        own = box.post("/v1/workers", json=claim).json()["worker_id"]
        assert box.post(f"/v1/workers/{own}/heartbeat", json={}).status_code == 200
    [info] = [w for w in api.get("/v1/workers").json()["workers"] if w["id"] == own]
    assert "hostgpu.lender" not in info["capabilities"]["labels"]
    with http("lender") as lender:
        assert lender.post(f"/v1/workers/{own}/heartbeat", json={}).status_code == 403
