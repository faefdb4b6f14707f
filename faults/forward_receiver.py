"""A receiving service for forwarded run changes, as a team would write one.

Every request's signature is checked with the PyPI `standardwebhooks` package (an
implementation of the Standard Webhooks spec independent of nen-relay's). The receiver records
each accepted message by its `webhook-id`, counts requests that overlap for one `webhook-id`
(one message in two hands at once), and can misbehave on purpose:
- `fail_first`: answer 500 to the first N attempts of every message;
- `down()` / `up()`: stop listening (connections refused) and start again on the same port.

Only 127.0.0.1. Needs `pip install standardwebhooks`.
"""

import collections
import http.server
import json
import socket
import threading
import time

from standardwebhooks.webhooks import Webhook


class Receiver:
    def __init__(self, secret, fail_first=0, port=0):
        self.webhook = Webhook(secret)
        self.fail_first = fail_first
        self.lock = threading.Lock()
        self.attempts = collections.Counter()      # webhook-id -> requests seen
        self.first_delivery = {}                   # webhook-id -> (arrival number, envelope)
        self.accepted_at = {}                      # webhook-id -> (wall-clock time, envelope)
        self.deliveries = 0                        # 2xx answers given
        self.bad_signatures = 0
        self.in_flight = collections.Counter()     # webhook-id -> requests being handled now
        self.overlaps = 0                          # a request for an id already being handled
        self.arrivals = 0
        self.server = None
        self.thread = None
        self.port = port or _free_port()

    # --- the server ---------------------------------------------------------------------

    def up(self):
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                code = receiver._handle(body, {k.lower(): v for k, v in self.headers.items()})
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = _QuietServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def down(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/hooks/nen"

    def _handle(self, body, headers):
        webhook_id = headers.get("webhook-id", "")
        with self.lock:
            self.arrivals += 1
            if self.in_flight[webhook_id]:
                self.overlaps += 1
            self.in_flight[webhook_id] += 1
            self.attempts[webhook_id] += 1
            attempt = self.attempts[webhook_id]
        try:
            try:
                envelope = self.webhook.verify(body, headers)
            except Exception:  # any verification failure
                with self.lock:
                    self.bad_signatures += 1
                return 400
            if attempt <= self.fail_first:
                return 500
            with self.lock:
                self.deliveries += 1
                if webhook_id not in self.first_delivery:
                    self.first_delivery[webhook_id] = (self.arrivals, envelope)
                    self.accepted_at[webhook_id] = (time.time(), envelope)
            return 204
        finally:
            with self.lock:
                self.in_flight[webhook_id] -= 1

    # --- what arrived ---------------------------------------------------------------------

    def delivered_ids(self):
        with self.lock:
            return set(self.first_delivery)

    def order_problems(self):
        """Per run, messages must first arrive in id order (msg_<n>: n grows per run)."""
        with self.lock:
            items = sorted(self.first_delivery.items(), key=lambda item: item[1][0])
        last = {}
        problems = []
        for webhook_id, (_, envelope) in items:
            number = int(webhook_id.removeprefix("msg_"))
            run = envelope["data"]["message_id"]
            if run in last and last[run] > number:
                problems.append(f"{run}: {webhook_id} arrived after msg_{last[run]}")
            last[run] = max(number, last.get(run, 0))
        return problems

    def final_statuses(self):
        """Per run, the status of its highest-numbered run.status_changed message."""
        with self.lock:
            items = list(self.first_delivery.items())
        best = {}
        for webhook_id, (_, envelope) in items:
            if envelope.get("type") != "run.status_changed":
                continue
            number = int(webhook_id.removeprefix("msg_"))
            run = envelope["data"]["message_id"]
            if run not in best or best[run][0] < number:
                best[run] = (number, envelope["data"]["status"])
        return {run: status for run, (_, status) in best.items()}


class _QuietServer(http.server.ThreadingHTTPServer):
    # A sender killed mid-request resets its connection: expected here, not worth a traceback.
    def handle_error(self, request, client_address):
        pass


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, within, step=0.2):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def envelope_json(body):
    return json.loads(body)
