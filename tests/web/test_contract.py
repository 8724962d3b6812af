"""Contract tests: every endpoint of the edge (the JSON API and ``/predict/image``) called with
inputs generated from its OpenAPI document by schemathesis, against the real stack
(`conftest.web_stack`). Every answer must match the document (status code declared, body of the
declared schema, content type) and none may be a server error (5xx). Left out: schemathesis's
"schema-valid data is accepted" check, because no OpenAPI type says "bytes that decode as a
photo" or "a listing id that exists": random bytes are rightly a 400 from the gateway, and a
random id a 404. Writes carry the real write
token, so generated listings travel all the way to the gateway's own checks.

The document is built from the application at import (schemathesis parametrizes at collection
time); the first test checks that the running edge serves exactly that document.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from services.web.app import create_app
from services.web.config import WebConfig
from tests.web.conftest import WRITE_TOKEN

pytestmark = pytest.mark.timeout(900)

DOCUMENT = create_app(WebConfig()).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_edge_serves_the_document_the_contract_tests_use(web_stack):
    assert httpx.get(f"{web_stack.url}/openapi.json", timeout=60).json() == DOCUMENT


@schema.parametrize()
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_endpoint_keeps_its_contract(case, web_stack):
    response = case.call_and_validate(
        base_url=web_stack.url,
        timeout=120,
        headers={"Authorization": f"Bearer {WRITE_TOKEN}"},
        excluded_checks=[positive_data_acceptance],
    )
    assert response.status_code < 500, response.text
