"""Eventarc's semantics in the local dispatcher (issue 22, item 6), each next to the bare dispatcher's: a function's
capacity is max instances × their concurrency; above it a request waits up to 10 s in Cloud Run's queue, then
gets a 429 without reaching the function; 429s and errors are retried after 10 s doubling to 600 s, for the
subscription's retention. The bare dispatcher pulls no more than the capacity and retries after 1 s.

The recording function here writes one start record per request it receives (RECORDS/TOKEN-MESSAGE-N.json),
fails the first ``fail`` of them, and sleeps until the epoch time ``sleep_until`` (an attribute)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from dagster_gcf_pipes.local.dispatcher import BARE, EVENTARC, read_meter
from dagster_gcf_pipes.local.local_stack import LocalFunction, LocalStackError
from tests.integration.test_dispatcher import (  # noqa: F401 - fixtures
    Served,
    one_delivery_per_attempt,
    own_function,
    publish,
    records,
)

STARTS_FUNCTION = """
import json, os, pathlib, time, uuid

def main(event):
    message = event.data["message"]
    attributes = message["attributes"]
    records = pathlib.Path(os.environ["RECORDS"])
    prefix = attributes["token"] + "-" + message["messageId"] + "-"
    earlier = len(list(records.glob(prefix + "*.json")))
    # written whole, then renamed: the test globs *.json while other deliveries are still writing theirs
    path = records / (prefix + uuid.uuid4().hex + ".json")
    path.with_suffix(".part").write_text(json.dumps({"start": time.time()}))
    path.with_suffix(".part").replace(path)
    if earlier < int(attributes.get("fail", 0)):
        raise RuntimeError("failing this delivery on purpose")
    time.sleep(max(0.0, float(attributes.get("sleep_until", 0)) - time.time()))
"""

#: two instances serving one request each
CAPACITY_2 = {"max_instances": 2, "instance_concurrency": 1}


def starts(records: Path, token: str, messages: int, timeout: float, each: int = 1) -> dict[str, list[float]]:
    """Start times of each message's requests, once ``messages`` messages have ``each`` starts or more."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, list[float]] = {}
        for path in records.glob(f"{token}-*.json"):
            found.setdefault(path.name.split("-")[1], []).append(json.loads(path.read_text())["start"])
        if len([s for s in found.values() if len(s) >= each]) >= messages:
            return {message: sorted(s) for message, s in found.items()}
        assert time.monotonic() < deadline, f"{found} within {timeout}s"
        time.sleep(0.1)


def meter(stack: Any, served: Served) -> dict[str, Any]:
    return read_meter(stack.servers[f"dispatcher-{served.topic}"].log_path)


# ------------------------------------------------------------------------------------------ the schedules


def test_eventarcs_schedule_is_10s_doubling_to_600s_lengthened_by_up_to_a_tenth_for_24h():
    shortest, longest = (lambda: 0.0), (lambda: 1.0)
    assert [EVENTARC.retry.delay(n, shortest) for n in range(1, 10)] == [10, 20, 40, 80, 160, 320, 600, 600, 600]
    assert [EVENTARC.retry.delay(n, longest) for n in range(1, 10)] == [11, 22, 44, 88, 176, 352, 600, 600, 600]
    assert EVENTARC.retry.retention == 24 * 3600
    assert EVENTARC.queue_seconds == 10  # Cloud Run: a request waits up to 10 s for an instance, then 429


def test_the_bare_schedule_is_1s_doubling_to_60s_forever_and_nothing_waits_for_an_instance():
    assert [BARE.retry.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert BARE.retry.retention is None and BARE.queue_seconds is None


@pytest.mark.parametrize(("switch", "eventarc", "semantics"), [
    (True, None, "eventarc"), (False, None, "bare"), (False, True, "eventarc"), (True, False, "bare"),
])
def test_a_functions_delivery_follows_the_production_semantics_switch_unless_it_says_otherwise(
    stack, own_function, monkeypatch, switch, eventarc, semantics,
):
    monkeypatch.setattr(stack, "production_semantics", switch)  # what LocalStack(production_semantics=...) set
    served = own_function(STARTS_FUNCTION, eventarc=eventarc)
    assert meter(stack, served)["semantics"] == semantics


# ------------------------------------------------------------------------------------------ capacity


def test_a_functions_capacity_is_max_instances_times_their_concurrency_or_concurrency_itself():
    assert LocalFunction("main.py", "main", "t").capacity == 100  # Cloud Run functions' defaults: 100 x 1
    assert LocalFunction("main.py", "main", "t", max_instances=3, instance_concurrency=4).capacity == 12
    assert LocalFunction("main.py", "main", "t", concurrency=5).capacity == 5
    with pytest.raises(LocalStackError, match="LocalFunction.instance_concurrency=0 must be at least 1"):
        LocalFunction("main.py", "main", "t", instance_concurrency=0)


def test_above_its_capacity_a_request_gets_429_after_10s_queued_and_comes_back_10s_later(stack, own_function, records):
    served = own_function(STARTS_FUNCTION, eventarc=True, **CAPACITY_2)
    published = time.time()
    token, _ = publish(stack.project, served.topic, count=5, sleep_until=str(published + 12))
    first = sorted(s[0] - published for s in starts(records, token, 5, timeout=40).values())
    assert all(t < 3 for t in first[:2]), first  # two instances take two at once
    assert all(t >= EVENTARC.queue_seconds + 10 - 0.5 for t in first[2:]), first  # 10 s queued, 429, 10 s backoff
    counts = meter(stack, served)
    assert counts["rejected"] == 3, counts
    rejected = [r for r in counts["retries"] if r["reason"].startswith("429")]
    assert len(rejected) == 3 and all(10 <= r["delay"] <= 11 for r in rejected), counts["retries"]
    assert counts["deliveries"] == 5, counts  # a 429 never reached the function


def test_within_10s_a_request_above_the_capacity_waits_for_a_free_instance_instead(stack, own_function, records):
    served = own_function(STARTS_FUNCTION, eventarc=True, **CAPACITY_2)
    published = time.time()
    token, _ = publish(stack.project, served.topic, count=3, sleep_until=str(published + 3))
    first = sorted(s[0] - published for s in starts(records, token, 3, timeout=20).values())
    assert first[2] < 6, first  # it ran once an instance was free, at about 3 s
    counts = meter(stack, served)
    assert (counts["queued"], counts["rejected"], counts["retries"]) == (1, 0, []), counts


def test_the_bare_dispatcher_holds_deliveries_back_for_a_free_slot_and_never_answers_429(stack, own_function, records):
    served = own_function(STARTS_FUNCTION, eventarc=False, **CAPACITY_2)
    published = time.time()
    token, _ = publish(stack.project, served.topic, count=5, sleep_until=str(published + 3))
    first = sorted(s[0] - published for s in starts(records, token, 5, timeout=20).values())
    assert first[-1] < 6, first  # the other three right after the first two, none 10 s later
    counts = meter(stack, served)
    assert (counts["queued"], counts["rejected"], counts["retries"]) == (0, 0, []), counts


# ------------------------------------------------------------------------------------------ retries


@pytest.mark.parametrize(("eventarc", "delays"), [(True, (10, 20)), (False, (1, 2))], ids=["eventarc", "bare"])
def test_an_error_answer_is_retried_after_the_schedules_delays(stack, own_function, records, eventarc, delays):
    served = own_function(STARTS_FUNCTION, eventarc=eventarc)
    token, _ = publish(stack.project, served.topic, fail="2")
    [three] = starts(records, token, 1, timeout=40, each=3).values()
    gaps = [later - earlier for earlier, later in zip(three, three[1:])]
    retried = [r["delay"] for r in meter(stack, served)["retries"]]
    assert [r["reason"] for r in meter(stack, served)["retries"]] == ["HTTP 500", "HTTP 500"]
    for gap, delay, scheduled in zip(gaps, delays, retried):
        assert delay <= scheduled <= delay * (1 + EVENTARC.retry.jitter if eventarc else 1), retried
        assert scheduled - 0.2 <= gap <= scheduled + 1.5, (gaps, retried)  # the emulator redelivers on time


def test_a_message_whose_next_retry_falls_past_the_retention_is_given_up(stack, own_function, records):
    served = own_function(STARTS_FUNCTION, eventarc=True, dispatcher_args=("--retention=15",))
    token, [message_id] = publish(stack.project, served.topic, fail="99")
    deadline = time.monotonic() + 30
    while (counts := meter(stack, served))["given_up"] < 1:
        assert time.monotonic() < deadline, counts
        time.sleep(0.2)
    [tried] = starts(records, token, 1, timeout=1).values()
    assert len(tried) == 2, tried  # at 0 s and 10 s; the next, at 30 s, would be past the 15 s retention
    assert [r["delay"] for r in counts["retries"]] in ([10], [11]), counts
    log = stack.servers[f"dispatcher-{served.topic}"].log_path.read_text()
    assert f"giving message {message_id} up after 2 attempts (last: HTTP 500)" in log, log
    time.sleep(2)
    assert len(starts(records, token, 1, timeout=1)[message_id]) == 2  # acked: never delivered again
