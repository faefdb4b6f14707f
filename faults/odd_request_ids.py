#!/usr/bin/env python3
"""Odd request ids: long or odd `x-request-id` values on every kind of request.

An incoming `x-request-id` is kept only if it is 1-128 characters of `[A-Za-z0-9._:-]`; anything
else is replaced by a fresh id, so a client cannot write what it likes into answers, logs or
metrics. The attack mixes requests that nen-relay logs (signed callbacks that are not valid
payloads: a WARN inside the request's span, which carries the request id; the server runs with
RUST_LOG=info so that the span is on the line) with 401s and 404s.

Passes when: no answer echoes an odd id (the `x-request-id` answered is a fresh one of at most 128
plain characters, or none when hyper refuses a head with control characters (400); a valid id sent
is echoed unchanged); none of the odd ids appears in the log or in `/metrics`, while valid ones do
appear in the log (so the search can see an id); the log grows by less than 4 KiB per logged request and `/metrics` by less than
32 KiB; correctly signed callbacks sent during the attack get 200 within 5 s, and 200 right after
it; each acknowledged one is stored once; the peak RSS stays under 256 MiB.

    python3 faults/odd_request_ids.py [--seconds 20] [--connections 16]
"""

import os
import random
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attack  # noqa: E402
import relay  # noqa: E402

LOG_BYTES_PER_LOGGED_REQUEST = 4096
METRICS_GROWTH_BOUND = 32 * 1024
PLAIN_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def odd_id(rng, marker):
    """An id nen-relay must not keep, holding `marker` so that a leak can be searched for."""
    kind = rng.randrange(6)
    if kind == 0:
        return marker + b"x" * rng.randint(120, 8000)          # too long
    if kind == 1:
        return marker + b" with spaces"
    if kind == 2:
        return marker + b"\x01\x7f control"                    # control characters: hyper refuses the head (400)
    if kind == 3:
        return marker + b"caf\xe9-\xff\xfe"                     # Latin-1 and non-UTF-8 bytes
    if kind == 4:
        return marker + b"\"}{\"injected\":\"json"              # would break a JSON log line
    return marker + b"/../../etc/passwd%00"


def main():
    parser = attack.parser(__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=16, help="concurrent attackers")
    args = parser.parse_args()

    def flood(server, secret, until):
        answers = attack.Counter()
        echoes = attack.Counter()
        logged = attack.Counter()
        log_before = os.path.getsize(server.log_path)
        metrics_before = attack.metrics_page(server.port)
        not_a_callback = b'{"no_message_id":true}'
        signature = relay.sign(secret, not_a_callback).encode()

        def attacker(index):
            rng = random.Random(index)
            n = 0
            while time.monotonic() < until:
                n += 1
                valid = rng.random() < 0.1
                # Odd ids all hold ODDID, so that a leak anywhere is found by that alone.
                marker = f"{'OKID' if valid else 'ODDID'}{index:03d}x{n:07d}".encode()
                rid = marker if valid else odd_id(rng, marker)
                kind = rng.randrange(4)
                if kind == 0:
                    logged.add("logged")
                    request = (b"POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nX-Hmac-Signature: " + signature
                               + b"\r\nContent-Length: " + str(len(not_a_callback)).encode() + b"\r\n")
                    body = not_a_callback
                elif kind == 1:
                    request = b"POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                    body = b"{}"
                elif kind == 2:
                    request = b"GET /v1/runs HTTP/1.1\r\nHost: x\r\n"
                    body = b""
                else:
                    request = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n"
                    body = b""
                request += b"X-Request-Id: " + rid + b"\r\nConnection: close\r\n\r\n" + body
                answer = attack.raw_exchange(server.port, request, timeout=10.0)
                status = attack.status_of(answer)
                answers.add(status)
                head = answer.split(b"\r\n\r\n", 1)[0]
                echoed = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]
                          if line.lower().startswith(b"x-request-id:")]
                if status is None:
                    continue
                if valid:
                    echoes.add("valid id echoed" if echoed == [rid] else "valid id NOT echoed")
                elif b"ODDID" in head:
                    echoes.add("odd id echoed")
                elif len(echoed) == 1 and PLAIN_ID.match(echoed[0]):
                    echoes.add("odd id replaced")
                elif not echoed and status == 400 and b"\x01" in rid:
                    # A control character in a header: hyper refuses the head before nen-relay
                    # sees the request, so there is no id to answer with.
                    echoes.add("odd id refused by hyper")
                else:
                    echoes.add(f"odd id: answered x-request-id {echoed!r}")

        threads = attack.run_in_threads(args.connections, attacker)
        for thread in threads:
            thread.join(timeout=max(0.0, until - time.monotonic()) + 15)
        time.sleep(0.5)  # let the last log lines reach the file
        log_growth = os.path.getsize(server.log_path) - log_before
        with open(server.log_path, "rb") as log:
            log.seek(log_before)
            log_text = log.read()
        metrics_after = attack.metrics_page(server.port)
        problems = []
        for status, count in answers.counts.items():
            if status not in (None, 400, 401, 404):
                problems.append(f"{count} attack requests answered {status}")
        counts = echoes.as_dict()
        for outcome, count in counts.items():
            if outcome not in ("valid id echoed", "odd id replaced", "odd id refused by hyper"):
                problems.append(f"{count} x {outcome}")
        # A valid id is rightly kept and logged; an odd one must never be.
        leaked_to_log = log_text.count(b"ODDID")
        if leaked_to_log:
            problems.append(f"odd ids reached the log {leaked_to_log} time(s)")
        valid_logged = log_text.count(b"OKID")
        if not valid_logged:
            problems.append("no valid request id reached the log: the leak check sees nothing")
        if "OKID" in metrics_after or "ODDID" in metrics_after:
            problems.append("request ids reached /metrics")
        logged_requests = logged.total()
        per_logged = log_growth / logged_requests if logged_requests else 0
        if per_logged >= LOG_BYTES_PER_LOGGED_REQUEST:
            problems.append(f"the log grew by {per_logged:.0f} bytes per logged request")
        metrics_growth = len(metrics_after) - len(metrics_before)
        if metrics_growth >= METRICS_GROWTH_BOUND:
            problems.append(f"/metrics grew by {metrics_growth} bytes")
        figures = {
            "connections": args.connections,
            "attack_requests": answers.total(),
            "attack_answers": answers.as_dict(),
            "ids": counts,
            "logged_requests": logged_requests,
            "valid_ids_in_log": valid_logged,
            "log_growth_bytes": log_growth,
            "log_bytes_per_logged_request": round(per_logged),
            "metrics_bytes_before": len(metrics_before),
            "metrics_bytes_after": len(metrics_after),
        }
        return figures, problems

    # info: the request span (and so its id) is on every log line written inside it.
    return attack.run_attack(
        "odd_request_ids", args, flood, extra_env={"RUST_LOG": "info"},
        pass_line="odd request ids replaced, never echoed or logged; log and /metrics bounded; "
                  "signed callbacks served")


if __name__ == "__main__":
    sys.exit(main())
