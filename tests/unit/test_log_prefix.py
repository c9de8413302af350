"""A fan-out shard's prefix never breaks a malformed message: it is handed on as it is, for Dagster's handler
to report, and the messages released with it (``closed`` among them) still reach Dagster."""

import pytest

from dagster_gcf_pipes.orchestrator.session.message_reader import with_log_prefix


@pytest.mark.parametrize(
    "message",
    [
        {"method": "log"},
        {"method": "log", "params": None},
        {"method": "log", "params": {"level": "INFO"}},
        {"method": "log_external_stream", "params": "text"},
        {"method": "log_external_stream", "params": {"stream": "stdout"}},
    ],
)
def test_a_malformed_log_message_is_handed_on_unchanged(message):
    assert with_log_prefix(message, "[shard 1] ") == message


def test_a_log_line_and_printed_text_are_prefixed():
    line = with_log_prefix({"method": "log", "params": {"message": "hi", "level": "INFO"}}, "[shard 1] ")
    assert line["params"]["message"] == "[shard 1] hi"
    printed = with_log_prefix({"method": "log_external_stream", "params": {"stream": "stdout", "text": "a\nb"}}, "[s] ")
    assert printed["params"]["text"] == "[s] a\n[s] b\n"
