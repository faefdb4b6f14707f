#!/usr/bin/env python3
"""Slow database: the events table is locked during a flood; answers stay fast and memory bounded.

A psql session holds ACCESS EXCLUSIVE on `events` while many senders flood nen-relay with signed
callbacks. Every answer during the lock must be a 503 with Retry-After that comes within Nen's
5-second budget (nothing piles up), the server's resident memory must stay under a bound, and
after the lock is released everything that was re-sent is acknowledged and stored exactly once.

    python3 faults/slow_db.py [--lock-seconds 6] [--senders 200] [--max-in-flight 64]
"""

import argparse
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import relay  # noqa: E402

NEN_BUDGET_SECONDS = 5.0


class TableLock:
    """`lock table events in access exclusive mode` in an open transaction, until released."""

    def __init__(self, db):
        self.proc = subprocess.Popen(
            relay.PG + ["-d", db.name, "-A", "-t"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)

    def acquire(self):
        self.proc.stdin.write("begin;\nlock table events in access exclusive mode;\nselect 'locked';\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        if line != "locked":
            raise RuntimeError(f"could not lock events: {line!r}")

    def release(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("commit;\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock-seconds", type=float, default=6.0)
    parser.add_argument("--senders", type=int, default=200, help="concurrent sender threads")
    parser.add_argument("--max-in-flight", type=int, default=64, help="NEN_RELAY_HTTP__MAX_IN_FLIGHT")
    parser.add_argument("--rss-bound-mib", type=float, default=256.0)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra setting for nen-relay, e.g. to show the check failing")
    args = parser.parse_args()
    secret = "whsec-slow-" + os.urandom(8).hex()
    problems = []

    with relay.Database("slowdb") as db:
        server = relay.Relay(db, relay.free_port(), secret, "token-slow-" + os.urandom(8).hex(),
                             extra_env={"NEN_RELAY_HTTP__MAX_IN_FLIGHT": str(args.max_in_flight),
                                        **dict(pair.split("=", 1) for pair in args.env)})
        server.start()
        rss = {"before": server.rss_kib(), "peak": 0}
        sampling = threading.Event()

        def sample_rss():
            while not sampling.is_set():
                rss["peak"] = max(rss["peak"], server.rss_kib())
                time.sleep(0.05)

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        lock = TableLock(db)
        load = None
        try:
            # Warm up unlocked, then lock and flood.
            load = relay.Load(server.port, secret, threads=args.senders, prefix="slow",
                              max_deliveries=200_000, timeout=30.0).start()
            time.sleep(1.0)
            lock.acquire()
            locked_at = time.monotonic()
            time.sleep(args.lock_seconds)
            released_at = time.monotonic()
        finally:
            lock.release()
        try:
            time.sleep(2.0)
            drained = load.finish(within=60.0)
        finally:
            sampling.set()
            sampler.join()
            server.stop()

        # Answered while the lock was held: must all be 503. In flight at any moment of the lock:
        # must all be answered within Nen's budget (some are answered 200 just after the release).
        during = [a for a in load.answers_between(locked_at + 0.5, released_at)
                  if a[0] + a[1] <= released_at]
        sent_during = [a for a in load.answers_between(0.0, released_at) if a[0] + a[1] > locked_at]
        statuses = {}
        for _, _, code, _ in during:
            statuses[code] = statuses.get(code, 0) + 1
        slowest = max((taken for _, taken, _, _ in sent_during), default=0.0)
        unanswered = sum(1 for _, _, code, _ in sent_during if code is None)
        no_retry_after = sum(1 for _, _, code, after in during if code == 503 and not after)
        if not during:
            problems.append("no request was answered while the table was locked")
        if statuses.get(200):
            problems.append(f"{statuses[200]} deliveries acknowledged while events was locked")
        if unanswered:
            problems.append(f"{unanswered} requests sent during the lock got no answer")
        if no_retry_after:
            problems.append(f"{no_retry_after} 503 answers without Retry-After")
        if slowest > NEN_BUDGET_SECONDS:
            problems.append(f"slowest answer during the lock took {slowest:.2f}s (> {NEN_BUDGET_SECONDS}s)")
        if not drained:
            problems.append("deliveries were still unacknowledged 60 s after the lock was released")
        problems += load.unexpected
        problems += relay.check_stored_once(db, load.acked)
        peak_mib = rss["peak"] / 1024
        if peak_mib > args.rss_bound_mib:
            problems.append(f"peak RSS {peak_mib:.0f} MiB > {args.rss_bound_mib:.0f} MiB")
        after_release = load.answers_between(released_at, float("inf"))
        recovered = [sent - released_at for sent, _, code, _ in after_release if code == 200]

    total = len(load.answers)
    print(f"slow_db: senders={args.senders} max_in_flight={args.max_in_flight} lock={args.lock_seconds}s "
          f"requests={total} answers_during_lock={len(during)} by_status={ {str(k): v for k, v in statuses.items()} } "
          f"slowest_during_lock={slowest:.2f}s rss_before={rss['before'] / 1024:.0f}MiB peak_rss={peak_mib:.0f}MiB "
          f"first_ack_after_release={min(recovered, default=float('nan')):.2f}s acked={len(load.acked)} "
          f"made={load.made}")
    if problems:
        print(f"slow_db: FAIL: {len(problems)} problem(s)")
        for line in problems[:30]:
            print("  " + line)
        return 1
    print("slow_db: PASS: 503 within budget under a locked table, memory bounded, recovered, nothing lost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
