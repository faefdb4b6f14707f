#!/usr/bin/env python3
"""Unsigned body flood: many concurrent large bodies with no (or a malformed) signature.

Passes when: every attack request that gets an answer gets 401 `invalid_signature` (its body is
never read, so the server does not wait for it: partial sends are answered too), or 413 for a
declared length over the limit; correctly signed callbacks sent during the attack get 200 within
5 s, and 200 right after it; each acknowledged one is stored once; the peak RSS stays under 256
MiB; nothing is held for the unverified bodies (`nen_relay_webhook_inflight_body_bytes` is 0
after the attack, and the budget was never spent: `nen_relay_webhook_budget_exhausted_total` 0).

    python3 faults/unsigned_body_flood.py [--seconds 20] [--connections 64]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attack  # noqa: E402

LIMIT = 1024 * 1024


def main():
    parser = attack.parser(__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=64, help="concurrent attackers")
    args = parser.parse_args()
    full_body = b"{" + b" " * (LIMIT - 2) + b"}"

    def flood(server, _secret, until):
        answers = attack.Counter()
        kinds = [
            # (name, signature header line, declared length, bytes of body actually sent)
            ("unsigned, whole 1 MiB body", b"", LIMIT, LIMIT),
            ("unsigned, head only", b"", LIMIT, 0),
            ("unsigned, 64 KiB of 1 MiB", b"", LIMIT, 64 * 1024),
            ("malformed signature, 64 KiB of 1 MiB", b"X-Hmac-Signature: sha256=xyz\r\n", LIMIT, 64 * 1024),
            ("unsigned, declared 8 MiB", b"", 8 * LIMIT, 64 * 1024),
        ]

        def attacker(index):
            n = 0
            while time.monotonic() < until:
                name, signature, declared, sent = kinds[(index + n) % len(kinds)]
                n += 1
                head = (b"POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        + signature + f"Content-Length: {declared}\r\n\r\n".encode())
                answer = attack.raw_exchange(server.port, head + full_body[:sent], timeout=10.0)
                answers.add((name, attack.status_of(answer)))

        threads = attack.run_in_threads(args.connections, attacker)
        for thread in threads:
            thread.join(timeout=max(0.0, until - time.monotonic()) + 15)
        page = attack.metrics_page(server.port)
        held = attack.metric(page, "nen_relay_webhook_inflight_body_bytes")
        exhausted = attack.metric(page, "nen_relay_webhook_budget_exhausted_total")
        problems = []
        for (name, status), count in answers.counts.items():
            expected = 413 if "8 MiB" in name else 401
            # None: the connection was reset while the client still wrote the unread body.
            if status not in (expected, None):
                problems.append(f"{count} x '{name}' answered {status}")
        unanswered = sum(c for (_, s), c in answers.counts.items() if s is None)
        answered = answers.total() - unanswered
        if answered == 0:
            problems.append("no attack request was answered")
        if held:
            problems.append(f"{held:.0f} bytes still held for unverified bodies after the attack")
        if exhausted:
            problems.append(f"unsigned bodies spent the budget {exhausted:.0f} time(s)")
        figures = {
            "connections": args.connections,
            "attack_requests": answers.total(),
            "attack_requests_per_s": round(answers.total() / args.seconds),
            "attack_answers": {f"{n}: {s}": c for (n, s), c in sorted(answers.counts.items(), key=str)},
            "held_bytes_after": int(held),
            "budget_exhausted": int(exhausted),
        }
        return figures, problems

    return attack.run_attack(
        "unsigned_body_flood", args, flood,
        pass_line="unsigned bodies refused unread, signed callbacks served within 5 s, memory bounded")


if __name__ == "__main__":
    sys.exit(main())
