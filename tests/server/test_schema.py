"""schemathesis against the live server's own /openapi.json: no 5xx, and every response
(status code, content type, body) is one the document declares."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

SMALL = 4  # generated requests ask for at most this many tokens, so the run stays short


def cap_tokens(body) -> None:
    """Generated bodies may ask for up to the whole context; a small cap keeps each one quick.
    Only integers above the cap (or a missing value) change, so an invalid body stays invalid."""
    if not isinstance(body, dict):
        return
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is None or (type(value) is int and value > SMALL):
            body[field] = SMALL


def operations(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_openapi_conformance(server, mode):
    ops = operations(server)
    assert {op.label for op in ops} >= {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models"}
    for op in ops:
        if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue  # no parameters and no body: nothing to make invalid

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
        )
        def check(case):
            cap_tokens(case.body)
            # positive_data_acceptance is left out: the schema cannot express limits that depend on
            # the tokenizer and the model (a prompt that tokenizes past the context, an unknown model
            # name, an empty prompt); those get documented 4xx answers, which the other checks validate.
            response = case.call_and_validate(
                base_url=server.url, excluded_checks=[positive_data_acceptance], timeout=60
            )
            assert response.status_code < 500, response.text

        check()
