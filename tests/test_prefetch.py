"""BatchPrefetcher against a real run-api: fetches only what was asked for, hands errors over, stops fast."""

from __future__ import annotations

import threading
import time
from functools import partial

import pytest

from recipe.atropos.trainer.batch import groups_to_dataproto
from recipe.atropos.trainer.prefetch import BatchPrefetcher
from recipe.atropos.trainer.trajectory_client import AtroposBatchTimeout, AtroposClient, Registration


def group(score: float) -> dict:
    return {"tokens": [[1, 2, 3], [1, 2, 4]], "masks": [[-100, 2, 3], [-100, 2, 4]], "scores": [score, 0.0]}


@pytest.fixture
def client(trajectory_api):
    client = AtroposClient(trajectory_api.url, timeout=10, backoff_initial_s=0.02, backoff_max_s=0.1)
    client.register(Registration(batch_size=2, max_token_len=16, num_steps=10))
    yield client
    client.close()


def test_fetches_exactly_the_requested_batches(trajectory_api, client):
    prefetcher = BatchPrefetcher(client, partial(groups_to_dataproto, max_token_len=16, pad_token_id=0))
    prefetcher.start()
    prefetcher.request(2)
    for score in (1.0, 2.0):
        trajectory_api.post("/scored_data", group(score))
        batch, _ = prefetcher.get()
        assert batch.result.data.batch["atropos_scores"][0].item() == score
        assert batch.convert_s >= 0 and batch.fetch_s >= 0
    trajectory_api.post("/scored_data", group(3.0))
    time.sleep(0.3)
    # the third batch is still queued on the API: nothing was fetched beyond the two requested
    assert client.status() == {"current_step": 2, "queue_size": 1}
    prefetcher.stop()


def test_a_batch_counts_as_not_trained_until_its_step_is_done_with_it(trajectory_api, client):
    # the generation window counts these: a batch still training must keep the next one from starting
    prefetcher = BatchPrefetcher(client, partial(groups_to_dataproto, max_token_len=16, pad_token_id=0))
    prefetcher.start()
    assert (prefetcher.unconsumed_groups, prefetcher.done_sequences) == (0, 0)
    prefetcher.request(1)
    trajectory_api.post("/scored_data", group(1.0))
    batch, _ = prefetcher.get()
    assert (prefetcher.unconsumed_groups, prefetcher.done_sequences) == (1, 0)
    prefetcher.done_with(batch)
    assert (prefetcher.unconsumed_groups, prefetcher.done_sequences) == (0, 2)
    prefetcher.stop()


def test_get_waits_for_data_and_reports_the_wait(trajectory_api, client):
    prefetcher = BatchPrefetcher(client, partial(groups_to_dataproto, max_token_len=16, pad_token_id=0))
    prefetcher.start()
    prefetcher.request(1)
    poster = threading.Timer(0.4, trajectory_api.post, args=("/scored_data", group(1.0)))
    poster.start()
    batch, waited = prefetcher.get()
    poster.join()
    assert waited >= 0.3
    assert batch.fetch_s >= 0.3
    prefetcher.stop()


def test_a_fetch_error_is_raised_in_the_training_thread(trajectory_api):
    client = AtroposClient(trajectory_api.url, timeout=0.3, backoff_initial_s=0.02, backoff_max_s=0.05)
    client.register(Registration(batch_size=2, max_token_len=16, num_steps=10))
    prefetcher = BatchPrefetcher(client, partial(groups_to_dataproto, max_token_len=16, pad_token_id=0))
    prefetcher.start()
    prefetcher.request(1)
    with pytest.raises(AtroposBatchTimeout, match="no full batch"):
        prefetcher.get()
    prefetcher.stop()


def test_stop_interrupts_a_long_wait(client):
    prefetcher = BatchPrefetcher(client, partial(groups_to_dataproto, max_token_len=16, pad_token_id=0))
    prefetcher.start()
    prefetcher.request(1)
    time.sleep(0.2)
    started = time.monotonic()
    prefetcher.stop()
    assert time.monotonic() - started < 2
    assert not prefetcher._thread.is_alive()
