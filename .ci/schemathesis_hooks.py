"""Schemathesis hooks for .ci/schemathesis.sh (loaded through SCHEMATHESIS_HOOKS).

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


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.operation.path == "/webhooks/nen":
        kwargs["auth"] = _sign
