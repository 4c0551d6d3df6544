"""AtroposClient against the real trajectory API, a dead port, and a misbehaving loopback server."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from recipe.atropos.settings import AtroposConfig
from recipe.atropos.trainer.trajectory_client import (
    AtroposBatchTimeout,
    AtroposClient,
    AtroposConnectionError,
    AtroposRequestError,
    Registration,
)
from tests.processes import free_port


def make_group(size: int = 2, env_id: int | None = None) -> dict:
    group = {
        "tokens": [[1, 2, 3, 10 + i] for i in range(size)],
        "masks": [[-100, -100, 3, 10 + i] for i in range(size)],
        "scores": [float(i) for i in range(size)],
    }
    if env_id is not None:
        group["env_id"] = env_id
    return group


def test_register_sends_every_field(trajectory_api):
    client = AtroposClient(trajectory_api.url, timeout=5)
    registration = Registration(
        batch_size=8,
        max_token_len=512,
        num_steps=20,
        starting_step=3,
        checkpoint_dir="/tmp/ckpt",
        save_checkpoint_interval=5,
        wandb_group="grp",
        wandb_project="proj",
    )
    assert client.register(registration)
    assert client.info() == {"batch_size": 8, "max_token_len": 512}
    assert client.status() == {"current_step": 3, "queue_size": 0}
    assert trajectory_api.get("/wandb_info") == {"group": "grp", "project": "proj"}
    with pytest.raises(AtroposBatchTimeout):  # envs may register only after the trainer's first /batch
        client.fetch_batch(timeout=0.05)
    answer = trajectory_api.post(
        "/register-env", {"max_token_length": 512, "desired_name": "e", "weight": 1.0, "group_size": 2}
    )
    assert answer["starting_step"] == 3
    assert answer["checkpoint_dir"] == "/tmp/ckpt"
    assert answer["checkpoint_interval"] == 5
    assert answer["num_steps"] == 20


def test_fetch_waits_for_a_full_batch_then_returns_whole_groups(trajectory_api):
    client = AtroposClient(trajectory_api.url, timeout=10, backoff_initial_s=0.02, backoff_max_s=0.2)
    client.register(Registration(batch_size=4, max_token_len=64, num_steps=5))

    def post_later():
        time.sleep(0.5)
        trajectory_api.post("/scored_data", make_group(2))
        trajectory_api.post("/scored_data_list", [make_group(2)])

    poster = threading.Thread(target=post_later)
    poster.start()
    batch = client.fetch_batch()
    poster.join()
    assert batch.num_sequences == 4
    assert [len(group["tokens"]) for group in batch.groups] == [2, 2]
    assert batch.wait_s >= 0.4
    assert batch.polls > 1
    assert client.status()["current_step"] == 1


def test_a_batch_that_never_fills_ends_in_a_timeout_naming_url_and_wait(trajectory_api):
    client = AtroposClient(trajectory_api.url, timeout=0.6, backoff_initial_s=0.02, backoff_max_s=0.1)
    client.register(Registration(batch_size=4, max_token_len=64, num_steps=5))
    trajectory_api.post("/scored_data", make_group(2))  # half a batch: never enough
    started = time.monotonic()
    with pytest.raises(AtroposBatchTimeout) as caught:
        client.fetch_batch()
    waited = time.monotonic() - started
    assert 0.5 <= waited < 3
    message = str(caught.value)
    assert f"{trajectory_api.url}/batch" in message
    assert "trainer.atropos.timeout=0.6" in message
    assert "1 groups queued" in message
    assert "batch_size=4" in message


def test_fetch_before_register_fails_with_the_servers_reason(trajectory_api):
    client = AtroposClient(trajectory_api.url, timeout=5)
    with pytest.raises(AtroposRequestError, match="Trainer not registered"):
        client.fetch_batch()


def test_a_dead_api_ends_in_a_connection_error_naming_url_and_cause():
    port = free_port()  # nothing listens here
    client = AtroposClient(f"http://127.0.0.1:{port}", timeout=2, max_retries=2, backoff_initial_s=0.01)
    with pytest.raises(AtroposConnectionError) as caught:
        client.status()
    message = str(caught.value)
    assert f"GET http://127.0.0.1:{port}/status failed after 3 attempts" in message
    assert "ConnectError" in message
    assert "trainer.atropos.api_url" in message


class ScriptedServer:
    """A real loopback HTTP server answering a fixed list of (status, body) replies in order."""

    def __init__(self, replies: list[tuple[int, str]]):
        self.replies = list(replies)
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests += 1
                status, body = owner.replies.pop(0) if owner.replies else (200, '{"batch": null}')
                payload = body.encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_5xx_and_malformed_json_are_retried_then_succeed():
    status = json.dumps({"current_step": 7, "queue_size": 1})
    replies = [(503, "busy"), (200, "not json {"), (500, "boom"), (200, status)]
    with ScriptedServer(replies) as server:
        client = AtroposClient(server.url, timeout=5, max_retries=3, backoff_initial_s=0.01)
        assert client.status() == {"current_step": 7, "queue_size": 1}
        assert server.requests == 4


def test_5xx_through_every_retry_names_the_last_cause():
    with ScriptedServer([(502, "bad gateway")] * 3) as server:
        client = AtroposClient(server.url, timeout=5, max_retries=2, backoff_initial_s=0.01)
        with pytest.raises(AtroposConnectionError, match=r"HTTP 502: 'bad gateway'"):
            client.status()
        assert server.requests == 3


def test_malformed_json_through_every_retry_is_a_connection_error():
    with ScriptedServer([(200, "<html>")] * 2) as server:
        client = AtroposClient(server.url, timeout=5, max_retries=1, backoff_initial_s=0.01)
        with pytest.raises(AtroposConnectionError, match="not JSON"):
            client.info()


def test_4xx_fails_at_once_with_the_servers_message():
    with ScriptedServer([(422, '{"detail": "field required: batch_size"}')]) as server:
        client = AtroposClient(server.url, timeout=5, max_retries=5, backoff_initial_s=0.01)
        with pytest.raises(AtroposRequestError, match="HTTP 422.*field required: batch_size"):
            client.status()
        assert server.requests == 1


def test_client_from_config_uses_every_setting():
    config = AtroposConfig(
        api_url="http://127.0.0.1:1/", timeout=3, max_retries=0, backoff_initial_s=0.5, backoff_max_s=1
    )
    client = AtroposClient.from_config(config)
    assert (client.api_url, client.timeout, client.max_retries) == ("http://127.0.0.1:1", 3, 0)
    assert (client.backoff_initial_s, client.backoff_max_s) == (0.5, 1)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"api_url": "localhost:9001"}, "api_url must be an http"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"max_retries": -1}, "max_retries must be >= 0"),
        ({"backoff_initial_s": 3, "backoff_max_s": 1}, "backoff_initial_s must be > 0 and <="),
    ],
)
def test_config_rejects_bad_values_naming_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        AtroposConfig(**bad)


def test_registration_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        Registration(batch_size=0, max_token_len=10, num_steps=1)


class RecordingTransport(httpx.HTTPTransport):
    """The real HTTP transport, keeping each response's headers."""

    def __init__(self):
        super().__init__()
        self.encodings: list[tuple[str, str | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.encodings.append((request.url.path, response.headers.get("content-encoding")))
        return response


def test_batches_come_uncompressed(project_api):
    # a batch big enough for the API's gzip middleware (1 kB): the client must not ask for gzip,
    # whose level-9 compression of a real batch costs more than the transfer it saves
    transport = RecordingTransport()
    client = AtroposClient(project_api.url, timeout=10, backoff_initial_s=0.02, transport=transport)
    client.register(Registration(batch_size=4, max_token_len=4096, num_steps=5))
    assert project_api.get("/batch")["batch"] is None  # environments register after the trainer's first poll
    project_api.register_env("e", group_size=2)
    for _ in range(2):
        group = make_group(2)
        group["tokens"] = [list(range(1, 400)) for _ in range(2)]
        group["masks"] = [[-100] * 100 + list(range(101, 400)) for _ in range(2)]
        project_api.post("/scored_data", group)
    batch = client.fetch_batch()
    assert batch.num_sequences == 4
    batch_answers = [encoding for path, encoding in transport.encodings if path == "/batch"]
    assert batch_answers and all(encoding is None for encoding in batch_answers)
    # the API does compress for a client that asks: the test above is not vacuous
    project_api.post("/scored_data", group)
    project_api.post("/scored_data", group)
    raw = httpx.get(f"{project_api.url}/batch", headers={"Accept-Encoding": "gzip"})
    assert raw.headers.get("content-encoding") == "gzip" and len(raw.json()["batch"]) == 2
