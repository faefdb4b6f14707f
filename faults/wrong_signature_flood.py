#!/usr/bin/env python3
"""Wrong-signature flood: well-formed but wrong signatures on large bodies, sent slowly.

A well-formed `X-Hmac-Signature` needs its body before it can be judged, so each of these
requests holds its declared length of the byte budget for unverified bodies
(`NEN_RELAY_WEBHOOK__MAX_INFLIGHT_BODY_BYTES`, 64 MiB) until its body is refused: 401 once it
has all arrived, 408 after the body timeout (3 s). With more slow senders than the budget holds,
the rest are refused at once: 503 `unavailable` with `Retry-After`.

Passes when: every attack request that gets an answer gets 401, 408 or 503 with `Retry-After`;
correctly signed callbacks sent during the attack get 200 within 5 s, or 503 `unavailable` with
`Retry-After` within 5 s (the documented budget is spent), and all get 200 right after the attack;
each acknowledged one is stored once; the peak RSS stays under 256 MiB; the budget was spent at
some point (`nen_relay_webhook_budget_exhausted_total` > 0: the attack did what it is for), and
nothing is held for unverified bodies once it ends.

    python3 faults/wrong_signature_flood.py [--seconds 20] [--connections 160] [--body-seconds 4]
"""

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attack  # noqa: E402

LIMIT = 1024 * 1024


def main():
    parser = attack.parser(__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=160, help="concurrent slow senders")
    parser.add_argument("--body-seconds", type=float, default=4.0,
                        help="how long each sender takes over its 1 MiB body")
    args = parser.parse_args()
    wrong = "sha256=" + "00" * 32
    slices = 16
    piece = b" " * (LIMIT // slices)

    def flood(server, _secret, until):
        answers = attack.Counter()
        held_peak = [0.0]

        def sender(_index):
            while time.monotonic() < until:
                head = (f"POST /webhooks/nen HTTP/1.1\r\nHost: x\r\nX-Hmac-Signature: {wrong}\r\n"
                        f"Content-Length: {LIMIT}\r\nConnection: close\r\n\r\n").encode()
                answers.add(slow_exchange(server.port, head))

        def slow_exchange(port, head):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
                    sock.sendall(head)
                    for _ in range(slices):
                        # An early answer (503, 408) arrives while we still send: read it then.
                        sock.settimeout(args.body_seconds / slices)
                        try:
                            return answer_of(sock, sock.recv(65536))
                        except socket.timeout:
                            pass
                        sock.settimeout(15)
                        sock.sendall(piece)
                    return answer_of(sock, b"")
            except OSError:
                return None

        def answer_of(sock, first):
            chunks = [first]
            sock.settimeout(15)
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except OSError:
                pass
            answer = b"".join(chunks)
            status = attack.status_of(answer)
            if status == 503 and b"retry-after" not in answer.lower():
                return "503 without Retry-After"
            return status

        def watch():
            while time.monotonic() < until:
                try:
                    page = attack.metrics_page(server.port)
                    held_peak[0] = max(held_peak[0], attack.metric(page, "nen_relay_webhook_inflight_body_bytes"))
                except (OSError, RuntimeError):
                    pass
                time.sleep(0.25)

        watcher = attack.run_in_threads(1, lambda _i: watch())
        threads = attack.run_in_threads(args.connections, sender)
        for thread in threads + watcher:
            thread.join(timeout=max(0.0, until - time.monotonic()) + 30)
        # Senders still mid-body when the attack ends hang up; their bytes must come back.
        deadline = time.monotonic() + 10
        while True:
            page = attack.metrics_page(server.port)
            held = attack.metric(page, "nen_relay_webhook_inflight_body_bytes")
            if held == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        exhausted = attack.metric(page, "nen_relay_webhook_budget_exhausted_total")
        problems = []
        for status, count in answers.counts.items():
            if status not in (401, 408, 503, None):
                problems.append(f"{count} attack requests answered {status}")
        if not exhausted:
            problems.append("the budget was never spent: the attack was too weak to test it")
        if held:
            problems.append(f"{held:.0f} bytes still held for unverified bodies after the attack")
        figures = {
            "connections": args.connections,
            "body_seconds": args.body_seconds,
            "attack_requests": answers.total(),
            "attack_answers": answers.as_dict(),
            "held_bytes_peak_mib": round(held_peak[0] / 1024 / 1024, 1),
            "budget_exhausted_total": int(exhausted),
            "held_bytes_after": int(held),
        }
        return figures, problems

    return attack.run_attack(
        "wrong_signature_flood", args, flood, allow_503=True,
        pass_line="slow wrong-signature bodies capped by the byte budget; signed callbacks 200 or "
                  "503 + Retry-After within 5 s, 200 after; memory bounded")


if __name__ == "__main__":
    sys.exit(main())
