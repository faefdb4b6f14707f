#!/usr/bin/env python3
"""Method flood: requests with made-up, long HTTP methods on made-up paths.

Every made-up method is counted as `method="other"` and every unmatched path as
`route="unmatched"`, so `/metrics` cannot grow with what clients send.

Passes when: every attack request that gets an answer gets a 4xx (404, 405, or hyper's 400 for a
request line it will not parse); `/metrics` grows by less than 32 KiB over the whole attack,
holds at most 8 series with `method="other"`, and contains none of the methods or paths sent;
correctly signed callbacks sent during the attack get 200 within 5 s, and 200 right after it;
each acknowledged one is stored once; the peak RSS stays under 256 MiB.

    python3 faults/method_flood.py [--seconds 20] [--connections 16]
"""

import os
import random
import re
import string
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attack  # noqa: E402

GROWTH_BOUND_BYTES = 32 * 1024
OTHER_SERIES_BOUND = 8


def main():
    parser = attack.parser(__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=16, help="concurrent attackers")
    args = parser.parse_args()

    def flood(server, _secret, until):
        answers = attack.Counter()
        before = attack.metrics_page(server.port)
        sent_samples = []

        def attacker(index):
            rng = random.Random(index)
            while time.monotonic() < until:
                method = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(8, 2000)))
                path = rng.choice(["/webhooks/nen", "/metrics", "/healthz", "/v1/runs",
                                   "/" + "".join(rng.choice(string.ascii_lowercase) for _ in range(40))])
                if len(sent_samples) < 200:
                    sent_samples.append((method, path))
                request = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                           f"Connection: close\r\n\r\n").encode()
                answers.add(attack.status_of(attack.raw_exchange(server.port, request, timeout=10.0)))

        threads = attack.run_in_threads(args.connections, attacker)
        for thread in threads:
            thread.join(timeout=max(0.0, until - time.monotonic()) + 15)
        after = attack.metrics_page(server.port)
        other_series = sorted(set(re.findall(r'nen_relay_http_request_duration_seconds_count\{[^}]*method="other"[^}]*\}', after)))
        problems = []
        for status, count in answers.counts.items():
            if status is not None and not 400 <= status < 500:
                problems.append(f"{count} attack requests answered {status}")
        if answers.total() == 0:
            problems.append("no attack request was sent")
        growth = len(after) - len(before)
        if growth >= GROWTH_BOUND_BYTES:
            problems.append(f"/metrics grew by {growth} bytes (>= {GROWTH_BOUND_BYTES})")
        if len(other_series) > OTHER_SERIES_BOUND:
            problems.append(f"{len(other_series)} series with method=\"other\" (> {OTHER_SERIES_BOUND})")
        leaked = [m for m, p in sent_samples if m in after or (len(p) > 20 and p in after)]
        if leaked:
            problems.append(f"{len(leaked)} sent methods or paths appear in /metrics")
        figures = {
            "connections": args.connections,
            "attack_requests": answers.total(),
            "attack_requests_per_s": round(answers.total() / args.seconds),
            "attack_answers": answers.as_dict(),
            "metrics_bytes_before": len(before),
            "metrics_bytes_after": len(after),
            "method_other_series": len(other_series),
        }
        return figures, problems

    return attack.run_attack(
        "method_flood", args, flood,
        pass_line="made-up methods counted as one label, /metrics bounded, signed callbacks served")


if __name__ == "__main__":
    sys.exit(main())
