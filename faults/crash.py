#!/usr/bin/env python3
"""Crash test: SIGKILL nen-relay under concurrent signed callbacks; nothing acknowledged is lost.

Starts a release nen-relay on a fresh PostgreSQL database (or SQLite file: --db sqlite), sends every (message_id, status)
delivery from several threads, and kills the server with SIGKILL at random moments, restarting
it on the same port each time. A delivery that got no answer (refused, reset, timed out) or a
503 is sent again, as Nen would, until it is acknowledged with 200. At the end every delivery
must be stored exactly once. Exit status 1 on any loss, duplicate or unexpected answer.

    python3 faults/crash.py [--db postgres|sqlite] [--kills 5] [--messages 400] [--workers 12] [--seed N]
"""

import argparse
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import relay  # noqa: E402

STATUSES = ("processing", "success")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--messages", type=int, default=20000,
                        help="at most this many runs (each gets %d deliveries)" % len(STATUSES))
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--time-limit", type=float, default=300.0, help="give up (fail) after this many seconds")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"crash: db={args.db} seed={seed} kills={args.kills} messages={args.messages} workers={args.workers}")

    secret = "whsec-crash-" + os.urandom(8).hex()
    token = "token-crash-" + os.urandom(8).hex()
    # Deliveries are made while the kills go on (so every kill lands under load), then the
    # senders finish what is outstanding.
    outstanding = []
    made = []
    kills_done = threading.Event()

    lock = threading.Lock()
    counts = {"sent": 0, "acked": 0, "retried": 0, "duplicate_acks": 0, "no_answer": 0, "503": 0}
    acked = set()
    unexpected = []
    deadline = time.monotonic() + args.time_limit
    done = threading.Event()

    with relay.store(args.db, "crash") as db:
        server = relay.Relay(db, relay.free_port(), secret, token)
        server.start()

        def worker():
            while not done.is_set() and time.monotonic() < deadline:
                with lock:
                    if outstanding:
                        message_id, status = outstanding.pop()
                    elif not kills_done.is_set() and len(made) < args.messages:
                        message_id = f"crash-{len(made):06d}-{os.urandom(3).hex()}"
                        status = rng.choice(STATUSES)
                        made.append(message_id)
                        outstanding.extend((message_id, s) for s in STATUSES if s != status)
                    else:
                        break
                body = relay.callback_body(message_id, status)
                attempts = 0
                while time.monotonic() < deadline:
                    attempts += 1
                    with lock:
                        counts["sent"] += 1
                        if attempts > 1:
                            counts["retried"] += 1
                    try:
                        code, _, answer = relay.deliver(server.port, secret, body)
                    except OSError:
                        with lock:
                            counts["no_answer"] += 1
                        time.sleep(0.05)
                        continue
                    if code == 200:
                        with lock:
                            counts["acked"] += 1
                            acked.add((message_id, status))
                            if b'"duplicate":true' in answer:
                                counts["duplicate_acks"] += 1
                        break
                    if code == 503:
                        with lock:
                            counts["503"] += 1
                        time.sleep(0.05)
                        continue
                    with lock:
                        unexpected.append(f"{message_id}/{status}: {code} {answer[:200]!r}")
                    break

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
        for thread in threads:
            thread.start()

        kills = 0
        try:
            for _ in range(args.kills):
                # Spread the kills over the run; most of them land while requests are in flight.
                time.sleep(rng.uniform(0.2, 1.2))
                server.kill()
                kills += 1
                time.sleep(rng.uniform(0.0, 0.3))  # senders meet a refused port meanwhile
                server.start()
        except BaseException:
            done.set()  # the senders stop at once; the error is reported as it is
            raise
        finally:
            kills_done.set()
            for thread in threads:
                thread.join(timeout=max(1.0, deadline - time.monotonic()) + 10)
            done.set()
            server.stop()

        problems = list(unexpected)
        deliveries = len(made) * len(STATUSES)
        missing_acks = deliveries - len(acked)
        if missing_acks:
            problems.append(f"{missing_acks} deliveries never acknowledged within {args.time_limit}s")
        problems += relay.check_stored_once(db, acked)
        stored = sum(relay.stored_events(db).values())

    print(f"crash: deliveries={deliveries} sent={counts['sent']} acked={counts['acked']} "
          f"retried={counts['retried']} no_answer={counts['no_answer']} answered_503={counts['503']} "
          f"duplicate_acks={counts['duplicate_acks']} kills={kills} events_stored={stored}")
    if kills < min(args.kills, 1):
        problems.append("the server was never killed: the run proves nothing")
    if problems:
        print(f"crash: FAIL: {len(problems)} problem(s)")
        for line in problems[:30]:
            print("  " + line)
        return 1
    print("crash: PASS: every acknowledged delivery is stored exactly once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
