#!/usr/bin/env python3
"""Database outage: PostgreSQL stops under load; nen-relay answers 503 fast, then recovers alone.

While senders deliver signed callbacks, the local PostgreSQL cluster is stopped for a few
seconds and started again (always, in a finally block). During the outage every callback must
be answered 503 with Retry-After (never 4xx, never slower than the limit) and /readyz must say
503; after the start nen-relay must acknowledge callbacks again within seconds, without being
restarted, and every acknowledged delivery must be stored exactly once.

This stops the machine's shared PostgreSQL: other users of it see their connections cut.

    python3 faults/db_outage.py [--outage-seconds 4]
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import relay  # noqa: E402

ANSWER_LIMIT_SECONDS = 2.5
RECOVERY_LIMIT_SECONDS = 15.0


def cluster(action):
    version = os.environ.get("NEN_RELAY_FAULTS_PG_VERSION") or sorted(os.listdir("/etc/postgresql"))[-1]
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action]
    if action == "stop":
        command += ["-m", "fast"]
    subprocess.run(command, check=True, timeout=60)


def pg_accepts():
    return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"], timeout=10).returncode == 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage-seconds", type=float, default=4.0)
    parser.add_argument("--senders", type=int, default=8)
    args = parser.parse_args()
    secret = "whsec-outage-" + os.urandom(8).hex()
    problems = []
    ready_answers = []

    with relay.Database("outage") as db:
        server = relay.Relay(db, relay.free_port(), secret, "token-outage-" + os.urandom(8).hex())
        server.start()
        load = relay.Load(server.port, secret, threads=args.senders, prefix="outage",
                          max_deliveries=50_000, pause=0.01).start()
        time.sleep(1.5)
        try:
            cluster("stop")
            stopped_at = time.monotonic()
            while time.monotonic() < stopped_at + args.outage_seconds:
                sent = time.monotonic()
                try:
                    code, _, _ = relay.request(server.port, "GET", "/readyz", timeout=5)
                except OSError:
                    code = None
                ready_answers.append((sent, time.monotonic() - sent, code))
                time.sleep(0.2)
        finally:
            started_at = time.monotonic()
            cluster("start")
        while not pg_accepts() and time.monotonic() < started_at + 30:
            time.sleep(0.1)
        pg_back = time.monotonic()

        # Recovery: the first acknowledgement and the first ready answer after the start.
        recovered_at = ready_at = None
        while time.monotonic() < pg_back + RECOVERY_LIMIT_SECONDS and not (recovered_at and ready_at):
            if not recovered_at:
                acks = [s + t for s, t, c, _ in load.answers_between(pg_back, float("inf")) if c == 200]
                recovered_at = min(acks) if acks else None
            if not ready_at:
                try:
                    if relay.request(server.port, "GET", "/readyz", timeout=2)[0] == 200:
                        ready_at = time.monotonic()
                except OSError:
                    pass
            time.sleep(0.1)
        drained = load.finish(within=60.0)
        alive = server.proc.poll() is None
        server.stop()

        during = [a for a in load.answers_between(stopped_at + 0.5, started_at)
                  if a[0] + a[1] <= started_at]
        statuses = {}
        for _, _, code, _ in during:
            statuses[code] = statuses.get(code, 0) + 1
        # Every request in flight at any moment of the outage must be answered within the limit.
        in_flight = [a for a in load.answers_between(0.0, started_at) if a[0] + a[1] > stopped_at]
        slowest = max((taken for _, taken, _, _ in in_flight), default=0.0)
        ready_during = [code for sent, _, code in ready_answers if sent >= stopped_at + 0.5]
        slowest_ready = max((taken for _, taken, _ in ready_answers), default=0.0)

        if not alive:
            problems.append("nen-relay exited during the outage")
        if not during:
            problems.append("no callback was answered during the outage")
        if set(statuses) - {503}:
            problems.append(f"answers other than 503 during the outage: {statuses}")
        if any(code == 503 and not after for _, _, code, after in during):
            problems.append("a 503 without Retry-After")
        if slowest > ANSWER_LIMIT_SECONDS:
            problems.append(f"slowest callback answer during the outage {slowest:.2f}s > {ANSWER_LIMIT_SECONDS}s")
        if not ready_during or set(ready_during) != {503}:
            problems.append(f"/readyz during the outage answered {sorted(set(map(str, ready_during)))}, not only 503")
        if slowest_ready > ANSWER_LIMIT_SECONDS:
            problems.append(f"slowest /readyz answer {slowest_ready:.2f}s > {ANSWER_LIMIT_SECONDS}s")
        if not recovered_at or not ready_at:
            problems.append(f"no recovery within {RECOVERY_LIMIT_SECONDS}s of PostgreSQL accepting connections")
        if not drained:
            problems.append("deliveries were still unacknowledged 60 s after recovery")
        problems += load.unexpected
        problems += relay.check_stored_once(db, load.acked)

    def since_back(moment):
        return f"{moment - pg_back:.2f}s" if moment else "never"

    print(f"db_outage: outage={started_at - stopped_at:.1f}s requests={len(load.answers)} "
          f"answers_during_outage={len(during)} by_status={ {str(k): v for k, v in statuses.items()} } "
          f"slowest_during_outage={slowest:.2f}s readyz_during={len(ready_during)}x{sorted(set(map(str, ready_during)))} "
          f"postgres_back_after_start={pg_back - started_at:.2f}s first_ack_after_back={since_back(recovered_at)} "
          f"ready_after_back={since_back(ready_at)} acked={len(load.acked)} made={load.made}")
    if problems:
        print(f"db_outage: FAIL: {len(problems)} problem(s)")
        for line in problems[:30]:
            print("  " + line)
        return 1
    print("db_outage: PASS: 503 + Retry-After during the outage, recovered without restart, nothing lost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
