#!/usr/bin/env python3
"""Rolling restart under load behind HAProxy: no callback is dropped.

PASS when, over the whole run:
- every callback sent through the balancer is answered 200 on its first try: no other status,
  no refused, reset or timed-out connection (a real sender would re-send those, but the
  hand-off is meant to make re-sending unnecessary);
- HAProxy counts no connection error, response error, retry or redispatch on either replica
  (its `retries`/`redispatch` would hide a refused connection from the sender: not counted as
  a pass here);
- every replica exits 0 on SIGTERM, and HAProxy marks it down (from its 503 `/readyz`) before
  it stops accepting;
- every acknowledged (message_id, status) is stored exactly once, and nothing else is stored;
- both replicas are restarted at least once and serve callbacks again afterwards.
Exit status 1 otherwise.

Two release nen-relay replicas share one fresh PostgreSQL database, each on its own 127.0.0.1
port, with `NEN_RELAY_HTTP__SHUTDOWN_DELAY` longer than HAProxy needs to see a failing health
check. HAProxy (a child process, config generated into a temporary directory) balances between
them. Sender threads deliver signed callbacks with unique (message_id, status) pairs through it
for the whole run, half of them on keep-alive connections, half on a new connection per
callback. Meanwhile each replica in turn gets SIGTERM, must exit 0, is started again on the same
port, and HAProxy must see it up again before the other one goes; `--rounds` times.

    python3 faults/rolling_restart.py [--seconds 60] [--rounds 2] [--senders 8] [--shutdown-delay 3]

Needs `haproxy` on PATH (Debian: `apt-get install -y haproxy`) and a release build
(`cargo build --release -p nen-relay`, or set NEN_RELAY_BIN). Python 3 standard library only.
"""

import argparse
import collections
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import relay  # noqa: E402

# HAProxy's health check: every INTER_MS, FALL failures mark a server down, RISE passes up.
INTER_MS, FALL, RISE = 500, 2, 2
CHECK_TIMEOUT_MS = 1000

HAPROXY_CFG = """\
global
    # The runtime API: the script reads each server's state from it (`show stat`).
    stats socket {sock} mode 600 level admin
    maxconn 4096

defaults
    mode http
    # Give up connecting to a replica after 1 s (on loopback a refusal is immediate anyway).
    timeout connect 1s
    # A callback is answered within Nen's 5 s; 10 s is ample without hiding a hung replica.
    timeout server 10s
    # Idle client connections are kept 30 s; a sender that stalls gets 10 s for its request head.
    timeout client 30s
    timeout http-request 10s
    timeout http-keep-alive 30s
    # A health check that takes over 1 s counts as failed.
    timeout check {check_timeout}ms
    # A connection refused or failed (a replica that died or was not yet seen down) is tried 3
    # more times, and `redispatch 1` sends each retry to another replica. HAProxy's default
    # `retry-on conn-failure` only: a request already sent is never replayed, so a replica
    # that dropped one would show here as a 502/503 instead of being papered over.
    retries 3
    option redispatch 1

frontend relay
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    # Readiness: nen-relay answers /readyz 503 from SIGTERM on, while it keeps serving for the
    # shutdown delay; two failed checks 500 ms apart take the replica out, two passes put it
    # back (the delay must cover inter x fall + the check timeout, and then some).
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    default-server check inter {inter}ms fall {fall} rise {rise}
    # Tells the sender which replica answered, for the per-replica counts.
    http-response set-header X-Relay-Replica %s
{servers}
"""


class Balancer:
    """HAProxy in front of the replicas, run in the foreground (`-db`) as a child process."""

    def __init__(self, workdir, replicas):
        self.port = relay.free_port()
        self.sock = os.path.join(workdir, "haproxy.sock")
        self.cfg = os.path.join(workdir, "haproxy.cfg")
        self.log = os.path.join(workdir, "haproxy.log")
        servers = "\n".join(f"    server {name} 127.0.0.1:{r.port}" for name, r in replicas.items())
        with open(self.cfg, "w") as f:
            f.write(HAPROXY_CFG.format(sock=self.sock, port=self.port, inter=INTER_MS, fall=FALL,
                                       rise=RISE, check_timeout=CHECK_TIMEOUT_MS, servers=servers))
        self.proc = None

    def start(self):
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        subprocess.run([binary, "-c", "-q", "-f", self.cfg], check=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([binary, "-f", self.cfg, "-db"], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def command(self, line):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(self.sock)
            s.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return b"".join(chunks).decode()
                chunks.append(chunk)

    def stats(self):
        """{(proxy, server): {column: value}} from `show stat`."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = {}
        for line in lines[1:]:
            if line:
                row = dict(zip(header, line.split(",")))
                rows[(row["pxname"], row["svname"])] = row
        return rows

    def server_status(self, name):
        return self.stats()[("replicas", name)]["status"]

    def wait_status(self, name, wanted, within):
        """Waits until `wanted(status)` holds; returns the seconds it took, or None."""
        start = time.monotonic()
        while time.monotonic() - start < within:
            try:
                if wanted(self.server_status(name)):
                    return time.monotonic() - start
            except (OSError, KeyError, IndexError):
                pass  # the socket is not there yet while HAProxy starts
            time.sleep(0.02)
        return None


class Senders:
    """Threads that deliver fresh signed callbacks through the balancer, one after another.

    A callback not answered 200 is recorded as a failure and re-sent (as Nen would) until it
    is, so that every delivery made ends up acknowledged and the loss check covers all of them.
    """

    def __init__(self, port, secret, threads, max_deliveries, timeout=10.0):
        self.port, self.secret, self.timeout = port, secret, timeout
        self.max_deliveries = max_deliveries
        self.lock = threading.Lock()
        self.made = 0
        self.acked = set()
        self.per_replica = collections.Counter()
        self.ack_times = []  # (monotonic time answered, replica)
        self.duplicates = 0
        self.failures = []  # (seconds since start, pair, "status 502" | "ConnectionResetError ...")
        self.producing = threading.Event()
        self.producing.set()
        self.started = time.monotonic()
        self.threads = [threading.Thread(target=self._run, args=(i % 2 == 0,), daemon=True)
                        for i in range(threads)]

    def start(self):
        for thread in self.threads:
            thread.start()
        return self

    def finish(self, within):
        self.producing.clear()
        deadline = time.monotonic() + within
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return all(not thread.is_alive() for thread in self.threads)

    def acked_between(self, replica, start, end):
        with self.lock:
            return sum(1 for t, r in self.ack_times if r == replica and start <= t < end)

    def acked_since(self, replica):
        with self.lock:
            return self.per_replica[replica]

    def _next(self):
        with self.lock:
            if not self.producing.is_set() or self.made >= self.max_deliveries:
                return None
            self.made += 1
            return (f"roll-{self.made:07d}-{os.urandom(3).hex()}",
                    "processing" if self.made % 2 else "success")

    def _run(self, keep_alive):
        conn = None
        deadline_after_stop = None
        pair = self._next()
        while pair is not None:
            body = relay.callback_body(*pair)
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            failure = None
            try:
                conn.request("POST", "/webhooks/nen", body=body, headers={
                    "Content-Type": "application/json",
                    "X-Hmac-Signature": relay.sign(self.secret, body),
                })
                response = conn.getresponse()
                answer = response.read()
                status = response.status
                if status != 200:
                    failure = f"status {status} {answer[:120]!r}"
                replica = response.getheader("X-Relay-Replica", "?")
                if not keep_alive or response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as error:
                failure = f"{type(error).__name__} {error}"
                conn.close()
                conn = None
            if failure is None:
                with self.lock:
                    self.acked.add(pair)
                    self.per_replica[replica] += 1
                    self.ack_times.append((time.monotonic(), replica))
                    if b'"duplicate":true' in answer:
                        self.duplicates += 1
                pair = self._next()
                continue
            with self.lock:
                self.failures.append((time.monotonic() - self.started, pair, failure))
            if not self.producing.is_set():
                deadline_after_stop = deadline_after_stop or time.monotonic() + 30
                if time.monotonic() > deadline_after_stop:
                    return  # never acknowledged: reported as missing
            time.sleep(0.1)  # and send the same pair again, as Nen would
        if conn is not None:
            conn.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="send for at least this long (longer if the restarts need it)")
    parser.add_argument("--rounds", type=int, default=2, help="restart every replica this many times")
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--shutdown-delay", type=float, default=3.0,
                        help="NEN_RELAY_HTTP__SHUTDOWN_DELAY of the replicas, seconds")
    parser.add_argument("--max-deliveries", type=int, default=500_000)
    parser.add_argument("--allow-short-delay", action="store_true",
                        help="accept a --shutdown-delay too short for HAProxy (to see the check fail)")
    args = parser.parse_args()

    # HAProxy needs up to inter x fall (plus a check in flight) to take a replica out; the
    # replica must keep serving at least that long after SIGTERM, with a margin.
    needed = (INTER_MS * (FALL + 1) + CHECK_TIMEOUT_MS) / 1000
    if args.shutdown_delay < needed and not args.allow_short_delay:
        parser.error(f"--shutdown-delay must be at least {needed}s "
                     "(HAProxy's inter x (fall + 1) + check timeout)")
    if shutil.which("haproxy") is None and not os.path.exists("/usr/sbin/haproxy"):
        print("rolling_restart: haproxy not found (apt-get install -y haproxy)")
        return 1

    secret = "whsec-roll-" + os.urandom(8).hex()
    token = "token-roll-" + os.urandom(8).hex()
    delay_ms = int(args.shutdown_delay * 1000)
    shutdown_timeout = 20.0
    print(f"rolling_restart: seconds={args.seconds} rounds={args.rounds} senders={args.senders} "
          f"shutdown_delay={delay_ms}ms haproxy inter={INTER_MS}ms fall={FALL} rise={RISE}")

    problems = []
    restarts = []  # (replica, seconds to DOWN, exit status, seconds to UP after start)
    workdir = tempfile.mkdtemp(prefix="nen-relay-rolling-")
    with relay.Database("rolling") as db:
        replicas = {}
        for name in ("a", "b"):
            replicas[name] = relay.Relay(
                db, relay.free_port(), secret, token,
                log_path=os.path.join(workdir, f"relay-{name}.log"),
                extra_env={"NEN_RELAY_HTTP__SHUTDOWN_DELAY": f"{delay_ms}ms",
                           "NEN_RELAY_HTTP__SHUTDOWN_TIMEOUT": f"{int(shutdown_timeout)}s",
                           "RUST_LOG": os.environ.get("RUST_LOG", "info")})
        balancer = Balancer(workdir, replicas)
        senders = None
        try:
            for r in replicas.values():
                r.start()
            balancer.start()
            for name in replicas:
                if balancer.wait_status(name, lambda s: s == "UP", 15) is None:
                    raise RuntimeError(f"HAProxy never saw replica {name} up; see {balancer.log}")
            started = time.monotonic()
            senders = Senders(balancer.port, secret, args.senders, args.max_deliveries).start()
            time.sleep(2)  # both replicas under load before the first SIGTERM

            for round_no in range(1, args.rounds + 1):
                for name, r in replicas.items():
                    t_term = time.monotonic()
                    r.proc.send_signal(signal.SIGTERM)
                    # Watch both: when HAProxy marks it down, and when the process exits.
                    to_down = exited = None
                    limit = args.shutdown_delay + shutdown_timeout + 5
                    while (to_down is None or exited is None) and time.monotonic() - t_term < limit:
                        now = time.monotonic() - t_term
                        if exited is None and r.proc.poll() is not None:
                            exited = now
                        if to_down is None:
                            try:
                                if balancer.server_status(name).startswith("DOWN"):
                                    to_down = now
                            except (OSError, KeyError, IndexError):
                                pass
                        time.sleep(0.01)
                    if exited is None:
                        r.kill()
                        code, exited = None, time.monotonic() - t_term
                    else:
                        code = r.proc.returncode
                    if code != 0:
                        problems.append(f"round {round_no}: replica {name} exited with {code}, not 0")
                    if to_down is None:
                        problems.append(f"round {round_no}: HAProxy never marked {name} down")
                    elif to_down >= min(args.shutdown_delay, exited):
                        problems.append(f"round {round_no}: HAProxy marked {name} down {to_down:.2f}s "
                                        f"after SIGTERM, after its listener closed")
                    # Acknowledged by this replica after its SIGTERM: what the delay saved.
                    handed_off = senders.acked_between(name, t_term, t_term + exited)
                    r.start()  # returns once its own /readyz is 200
                    t_start = time.monotonic()
                    to_up = balancer.wait_status(name, lambda s: s == "UP", 15)
                    if to_up is None:
                        problems.append(f"round {round_no}: HAProxy never saw {name} up again")
                        raise RuntimeError("replica not back in the balancer")
                    # It must take its share again before the other one goes.
                    before = senders.acked_since(name)
                    t_serve = time.monotonic()
                    while senders.acked_since(name) == before and time.monotonic() - t_serve < 10:
                        time.sleep(0.02)
                    served = senders.acked_since(name) > before
                    if not served:
                        problems.append(f"round {round_no}: {name} served nothing after its restart")
                    restarts.append((name, to_down, code, exited, handed_off))
                    print(f"rolling_restart: round {round_no} replica {name}: down in HAProxy "
                          f"{to_down if to_down is None else round(to_down, 2)}s after SIGTERM, "
                          f"exit {code} after {exited:.2f}s, {handed_off} acknowledged by it "
                          f"after SIGTERM, up in HAProxy {to_up:.2f}s after its start, "
                          f"serving again: {served}")
                    time.sleep(1)  # both replicas under load again

            remaining = args.seconds - (time.monotonic() - started)
            if remaining > 0:
                time.sleep(remaining)
            if not senders.finish(within=40):
                problems.append("senders still busy 40 s after the end")
            elapsed = time.monotonic() - started
            stats = balancer.stats()
        finally:
            if senders is not None:
                senders.producing.clear()
            balancer.stop()
            for r in replicas.values():
                r.stop()

        failures = list(senders.failures)
        by_kind = collections.Counter(f[2].split(" ")[0] + (" " + f[2].split(" ")[1]
                                      if f[2].startswith("status") else "") for f in failures)
        missing = senders.made - len(senders.acked)
        if failures:
            problems.append(f"{len(failures)} send(s) not answered 200: {dict(by_kind)}")
            problems += [f"  at {t:.2f}s {pair}: {what}" for t, pair, what in failures[:20]]
        if missing:
            problems.append(f"{missing} deliveries never acknowledged")
        # The balancer must have had nothing to hide either: a replica that refused or cut a
        # connection shows here even when HAProxy's retry made it invisible to the sender.
        for name in replicas:
            row = stats[("replicas", name)]
            hidden = {k: row[k] for k in ("econ", "eresp", "wretr", "wredis") if row[k] not in ("", "0")}
            if hidden:
                problems.append(f"HAProxy met errors on replica {name}: {hidden} (econ connection "
                                "errors, eresp response errors, wretr retries, wredis redispatches)")
        problems += relay.check_stored_once(db, senders.acked)
        stored = sum(relay.stored_events(db).values())

    backend = stats[("replicas", "BACKEND")]
    per_server = {name: stats[("replicas", name)] for name in replicas}
    print(f"rolling_restart: {elapsed:.1f}s, {len(restarts)} restarts, {senders.made} deliveries, "
          f"{len(senders.acked)} acknowledged ({len(senders.acked) / elapsed:.0f}/s), "
          f"{senders.duplicates} answered as duplicates, {stored} events stored; "
          f"not 200: {len(failures)} {dict(by_kind)}")
    print("rolling_restart: acknowledged per replica: "
          + ", ".join(f"{k}={v}" for k, v in sorted(senders.per_replica.items())))
    print("rolling_restart: HAProxy: "
          + ", ".join(f"{name} 2xx={s['hrsp_2xx']} 5xx={s['hrsp_5xx']} conn_errors={s['econ']} "
                      f"resp_errors={s['eresp']} retries={s['wretr']} redispatches={s['wredis']}"
                      for name, s in per_server.items())
          + f"; backend 5xx={backend['hrsp_5xx']}")
    if len(restarts) < len(replicas) * max(args.rounds, 1):
        problems.append("not every replica was restarted: the run proves nothing")
    if problems:
        print(f"rolling_restart: FAIL: {len(problems)} problem(s); logs in {workdir}")
        for line in problems[:40]:
            print("  " + line)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    print("rolling_restart: PASS: no callback dropped; every acknowledged one stored exactly once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
