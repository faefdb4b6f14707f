"""Latency of the run query API on one keep-alive connection: p50/p99 per request kind.

    python3 bench/reads.py BASE_URL TOKEN RUNS [REQUESTS_PER_KIND]
RUNS is how many runs the database holds (named run-1 .. run-RUNS by bench/reads.sh).
"""
import base64
import http.client
import json
import random
import sys
import time
import urllib.parse

base, token, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
per_kind = int(sys.argv[4]) if len(sys.argv) > 4 else 2000
url = urllib.parse.urlparse(base)
assert url.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"
connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
headers = {"Authorization": f"Bearer {token}"}
rng = random.Random(1)


def cursor(seq):
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode().rstrip("=")


# seq follows insertion order, so a cursor near 1% of the runs is a page near the very end.
deep = max(runs // 100, 60)
kinds = {
    "GET /v1/runs/{id}": lambda: f"/v1/runs/run-{rng.randint(1, runs)}",
    "GET /v1/runs (first page, 50)": lambda: "/v1/runs?limit=50",
    "GET /v1/runs (deep page, 50)": lambda: f"/v1/runs?limit=50&cursor={cursor(deep + rng.randint(0, 50))}",
    "GET /v1/runs?status=failed (first page)": lambda: "/v1/runs?status=failed&limit=50",
    "GET /v1/runs?status=failed (deep page)": lambda: f"/v1/runs?status=failed&limit=50&cursor={cursor(deep)}",
    "GET /v1/runs?workflow_id= (deep page)": lambda: f"/v1/runs?workflow_id=wf-7&limit=50&cursor={cursor(deep)}",
}
results = {}
for name, path in kinds.items():
    samples = []
    for i in range(per_kind + 50):
        target = path()
        began = time.perf_counter_ns()
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        body = response.read()
        elapsed = (time.perf_counter_ns() - began) / 1e6
        if response.status != 200:
            sys.exit(f"{target} answered {response.status}: {body[:200]!r}")
        if i >= 50:  # the first requests warm caches and prepare statements
            samples.append(elapsed)
    samples.sort()
    p50 = samples[len(samples) // 2]
    p99 = samples[int(len(samples) * 0.99) - 1]
    results[name] = (p50, p99)
    print(f"{runs:>9} runs  {name:<42} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms")
print("RESULT " + json.dumps({"runs": runs, "p99_ms": {k: v[1] for k, v in results.items()}}))
