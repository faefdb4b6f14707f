#!/usr/bin/env python3
"""Forwarding under faults: every change of every run reaches the team's service, in order per
run, signed, whatever is killed or down.

One or two release nen-relay replicas share a fresh PostgreSQL database and forward to one
target: a receiving service (faults/forward_receiver.py) that checks every signature with the
PyPI `standardwebhooks` package. Sender threads start runs with signed callbacks (`processing`,
then `success` or `failed`), re-sending any that got no answer or a 503, as Nen would. Meanwhile,
as asked:
- `--kills N`: SIGKILL a replica N times (mid-send, by construction: sends go on all the time)
  and start it again;
- `--outage S`: the receiver stops listening for S seconds (connections refused), then returns;
- `--fail-first K`: the receiver answers 500 to the first K attempts of every message.
Then it waits until nothing is pending and checks:
- every message in the outbox was delivered (none failed), each accepted with a valid signature;
- per run, messages first arrived in the order of their changes (`webhook-id` msg_<n> grows);
- the last change each run forwarded is the run's stored status;
- every run the senders started has a forwarded change;
- (two replicas) no message was in two hands at once: the receiver never saw a second request
  for a `webhook-id` while one was being handled.
Prints delivery throughput and the lag from commit to first delivery (p50, p99). Exit 1 on any
problem.

    python3 faults/forwarding.py [--runs 300] [--replicas 1|2] [--kills 0] [--outage 0]
                                 [--fail-first 0] [--time-limit 180]

Needs a release build (`cargo build --release -p nen-relay`, or NEN_RELAY_BIN) and
`pip install standardwebhooks`.
"""

import argparse
import base64
import datetime
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import forward_receiver  # noqa: E402
import relay  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--replicas", type=int, choices=(1, 2), default=1)
    parser.add_argument("--kills", type=int, default=0)
    parser.add_argument("--outage", type=float, default=0.0, help="seconds the receiver is down")
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--time-limit", type=float, default=180.0)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"forwarding: seed={seed} runs={args.runs} replicas={args.replicas} kills={args.kills} "
          f"outage={args.outage}s fail_first={args.fail_first}")

    callback_secret = "whsec-forward-" + os.urandom(8).hex()
    token = "token-forward-" + os.urandom(8).hex()
    target_secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    receiver = forward_receiver.Receiver(target_secret, fail_first=args.fail_first).up()
    deadline = time.monotonic() + args.time_limit
    problems = []

    with relay.Database("forward") as db:
        env = {
            "NEN_RELAY_FORWARD__SINK__URL": receiver.url,
            "NEN_RELAY_FORWARD__SINK__SECRET": target_secret,
            # Short clocks, so that a killed replica's messages come back within the run.
            "NEN_RELAY_FORWARD__TIMEOUT": "3s",
            "NEN_RELAY_FORWARD__LEASE": "6s",
            "NEN_RELAY_FORWARD__POLL_INTERVAL": "1s",
        }
        replicas = [relay.Relay(db, relay.free_port(), callback_secret, token, extra_env=env)
                    for _ in range(args.replicas)]
        for replica in replicas:
            replica.start()

        started = []
        lock = threading.Lock()
        next_run = iter(range(args.runs))

        def sender():
            while time.monotonic() < deadline:
                with lock:
                    n = next(next_run, None)
                if n is None:
                    return
                message_id = f"fwd-{n:05d}-{os.urandom(3).hex()}"
                for status in ("processing", rng.choice(("success", "failed"))):
                    body = relay.callback_body(message_id, status)
                    while time.monotonic() < deadline:
                        replica = rng.choice(replicas)
                        try:
                            code, _, _ = relay.deliver(replica.port, callback_secret, body)
                        except OSError:
                            code = None
                        if code == 200:
                            break
                        time.sleep(0.05)
                with lock:
                    started.append(message_id)

        threads = [threading.Thread(target=sender, daemon=True) for _ in range(args.senders)]
        began = time.monotonic()
        for thread in threads:
            thread.start()

        kills = 0
        try:
            if args.outage:
                time.sleep(0.5)
                receiver.down()
                time.sleep(args.outage)
                receiver.up()
            for _ in range(args.kills):
                time.sleep(rng.uniform(0.3, 1.0))
                victim = rng.choice(replicas)
                victim.kill()
                kills += 1
                time.sleep(rng.uniform(0.0, 0.3))
                victim.start()
            for thread in threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))

            def drained():
                rows = relay.psql(db.name, "select count(*) from forward_outbox where state = 'pending'")
                return int(rows[0][0]) == 0

            if not forward_receiver.wait_until(drained, max(1.0, deadline - time.monotonic())):
                problems.append("messages still pending at the time limit")
            finished = time.monotonic()
        finally:
            for replica in replicas:
                replica.stop()
            receiver.down()

        outbox = relay.psql(db.name, "select id, message_id, state from forward_outbox order by id")
        runs = dict(relay.psql(db.name, "select message_id, status from runs"))

    expected = {f"msg_{row[0]}" for row in outbox}
    not_delivered = [row for row in outbox if row[2] != "delivered"]
    if not_delivered:
        problems.append(f"{len(not_delivered)} message(s) not delivered, e.g. {not_delivered[:3]}")
    missing = expected - receiver.delivered_ids()
    if missing:
        problems.append(f"{len(missing)} message(s) never accepted by the receiver, e.g. {sorted(missing)[:3]}")
    if receiver.bad_signatures:
        problems.append(f"{receiver.bad_signatures} request(s) failed signature verification")
    problems += receiver.order_problems()[:20]
    for run, status in receiver.final_statuses().items():
        if runs.get(run) != status:
            problems.append(f"{run}: last forwarded status {status}, stored {runs.get(run)}")
    unforwarded = set(started) - set(receiver.final_statuses())
    if unforwarded:
        problems.append(f"{len(unforwarded)} run(s) with no forwarded change, e.g. {sorted(unforwarded)[:3]}")
    if len(started) < args.runs:
        problems.append(f"only {len(started)} of {args.runs} runs were started in time")
    if args.replicas > 1 and receiver.overlaps:
        problems.append(f"{receiver.overlaps} request(s) for a message already being handled")
    if args.kills and kills < 1:
        problems.append("no replica was killed: the run proves nothing")

    lags = sorted(
        max(0.0, arrival_wall - committed)
        for arrival_wall, committed in receiver_lags(receiver)
    )
    elapsed = max(1e-9, finished - began)
    print(f"forwarding: messages={len(expected)} delivered={receiver.deliveries} "
          f"requests={receiver.arrivals} kills={kills} overlaps={receiver.overlaps} "
          f"elapsed={elapsed:.1f}s delivered_per_s={len(expected) / elapsed:.0f} "
          f"lag_p50={percentile(lags, 0.5) * 1000:.0f}ms lag_p99={percentile(lags, 0.99) * 1000:.0f}ms")
    if problems:
        print(f"forwarding: FAIL: {len(problems)} problem(s)")
        for line in problems[:30]:
            print("  " + line)
        return 1
    print("forwarding: PASS: every change delivered, in order per run, with a valid signature")
    return 0


def receiver_lags(receiver):
    """(wall-clock time the first delivery was accepted, the change's commit time) per message."""
    with receiver.lock:
        return [(accepted, datetime.datetime.fromisoformat(envelope["timestamp"].replace("Z", "+00:00")).timestamp())
                for accepted, envelope in receiver.accepted_at.values()]


def percentile(values, q):
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


if __name__ == "__main__":
    sys.exit(main())
