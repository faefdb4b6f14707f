"""Schemathesis hooks for .ci/schemathesis.sh (loaded through SCHEMATHESIS_HOOKS).

Shortens every valid `?wait=` to one second: an unknown run is held for the whole wait, and
waits of up to a minute would only slow the run down (the wait itself is tested by the suite).

Signs every generated callback with the webhook secret the service was started with, so that
POST /webhooks/nen is tested past its signature check (200, 400 invalid_payload and what the
store makes of odd bodies), not only answered 401. The signature is computed by a requests auth
callable, over the exact bytes that are sent.
"""

import hashlib
import hmac
import os

import schemathesis

SECRET = os.environ["NEN_RELAY_CI_WEBHOOK_SECRET"].encode()


def _sign(request):
    body = request.body or b""
    if isinstance(body, str):
        body = body.encode()
    request.headers["X-Hmac-Signature"] = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    return request


def _shorten_wait(params):
    if not isinstance(params, dict):
        return
    value = params.get("wait")
    if isinstance(value, (int, str)) and str(value).isdigit() and int(value) > 1:
        params["wait"] = "1"


@schemathesis.hook
def before_call(context, case, kwargs):
    _shorten_wait(case.query)
    _shorten_wait(kwargs.get("params"))
    if case.operation.path == "/webhooks/nen":
        kwargs["auth"] = _sign
