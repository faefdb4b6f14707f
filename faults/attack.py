"""What the attack scripts share: a nen-relay under attack, a prober, an RSS sampler, figures.

An attack script gives `run_attack` a function that attacks a running nen-relay for a while. Around
it, `run_attack` starts the release binary on a fresh PostgreSQL database, samples its resident
memory, and has a prober send correctly signed callbacks (fresh message ids) the whole time. It
then judges, the same way for every attack:
- every probe answered during the attack got 200 within Nen's 5-second budget, or (only where the
  script allows it: the documented byte budget for unverified bodies is spent) 503 `unavailable`
  with `Retry-After`, also within 5 s;
- the probes sent right after the attack all get 200 within 5 s;
- every acknowledged probe is stored exactly once;
- the peak resident memory stays under the bound (256 MiB by default).

Python 3 standard library only; every address is 127.0.0.1; everything is bounded in count and time.
"""

import argparse
import json
import os
import re
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import relay  # noqa: E402

NEN_BUDGET_SECONDS = 5.0


class Prober:
    """Sends one signed callback after another (each a new delivery, re-sent until acknowledged,
    as Nen would) and records every answer as (sent, seconds, status, retry-after, error code)."""

    def __init__(self, port, secret, prefix="probe", pause=0.1, timeout=10.0):
        self.port, self.secret, self.prefix = port, secret, prefix
        self.pause, self.timeout = pause, timeout
        self.lock = threading.Lock()
        self.answers = []
        self.acked = set()
        self.made = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        self.thread.join(timeout=self.timeout + 5)

    def _run(self):
        while not self.stopping.is_set():
            self.made += 1
            pair = (f"{self.prefix}-{self.made:06d}-{os.urandom(3).hex()}", "processing")
            body = relay.callback_body(*pair)
            while not self.stopping.is_set():
                if self.send(pair, body) == 200:
                    break
                time.sleep(self.pause)
            time.sleep(self.pause)

    def send(self, pair, body):
        sent = time.monotonic()
        try:
            code, headers, answer = relay.deliver(self.port, self.secret, body, timeout=self.timeout)
        except OSError:
            code, headers, answer = None, {}, b""
        taken = time.monotonic() - sent
        try:
            error = json.loads(answer).get("error") if code != 200 else None
        except (ValueError, AttributeError):
            error = None
        with self.lock:
            self.answers.append((sent, taken, code, headers.get("retry-after"), error))
            if code == 200:
                self.acked.add(pair)
        return code

    def answers_between(self, start, end):
        with self.lock:
            return [a for a in self.answers if start <= a[0] < end]


class RssSampler:
    """Samples the server's resident memory every 50 ms; keeps the peak (KiB)."""

    def __init__(self, server):
        self.server = server
        self.before = server.rss_kib()
        self.peak = self.before
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        self.thread.join()

    def _run(self):
        while not self.stopping.is_set():
            try:
                self.peak = max(self.peak, self.server.rss_kib())
            except OSError:
                return
            time.sleep(0.05)


def metrics_page(port):
    status, _, body = relay.request(port, "GET", "/metrics", timeout=10)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return body.decode()


def metric(page, name, labels=None):
    """The value of the sample `name` with exactly `labels` (a dict), or 0.0."""
    wanted = sorted(f'{k}="{v}"' for k, v in (labels or {}).items())
    for line in page.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        if not match or match.group(1) != name:
            continue
        found = sorted(label for label in (match.group(2) or "").split(",") if label)
        if found == wanted:
            return float(match.group(3))
    return 0.0


def raw_exchange(port, data, timeout=10.0, read=True, linger_reset=False):
    """Sends raw bytes on a fresh connection; returns what came back until the server closed it
    (or `timeout`), or b"" when the connection failed. Never raises for a reset or refusal."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            try:
                sock.sendall(data)
            except OSError:
                pass
            if not read:
                return b""
            chunks = []
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    break
                except OSError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
    except OSError:
        return b""


def status_of(answer):
    """The status code of a raw HTTP answer, or None."""
    match = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    return int(match.group(1)) if match else None


class Counter:
    """Thread-safe counts by key."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}

    def add(self, key, n=1):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def total(self):
        with self.lock:
            return sum(self.counts.values())

    def as_dict(self):
        with self.lock:
            return {str(k): v for k, v in sorted(self.counts.items(), key=lambda kv: str(kv[0]))}


def run_in_threads(count, target, *args):
    threads = [threading.Thread(target=target, args=(i, *args), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads


def parser(description, seconds=20.0):
    """The options every attack script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=seconds, help="how long the attack lasts")
    parser.add_argument("--rss-bound-mib", type=float, default=256.0)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra setting for nen-relay, e.g. to show the check failing")
    return parser


def run_attack(name, args, attack, extra_env=None, allow_503=False, pass_line=""):
    """Runs `attack(server, secret, until)` against a fresh nen-relay and judges it (see the module
    docstring). `attack` returns (figures dict, problems list). Returns the exit code."""
    secret = f"whsec-{name}-" + os.urandom(8).hex()
    token = f"token-{name}-" + os.urandom(8).hex()
    env = dict(extra_env or {})
    env.update(dict(pair.split("=", 1) for pair in args.env))
    problems = []
    with relay.Database(name.replace("-", "_")[:20]) as db:
        server = relay.Relay(db, relay.free_port(), secret, token, extra_env=env,
                             log_path=f"/tmp/nen-relay-{name}-{os.getpid()}.log")
        if os.path.exists(server.log_path):
            os.remove(server.log_path)
        server.start()
        sampler = RssSampler(server).start()
        prober = Prober(server.port, secret).start()
        try:
            time.sleep(1.0)
            started = time.monotonic()
            figures, attack_problems = attack(server, secret, started + args.seconds)
            ended = time.monotonic()
            problems += attack_problems
            # Right after the attack: fresh callbacks, each 200 within the budget.
            after = []
            for i in range(20):
                pair = (f"after-{i:03d}-{os.urandom(3).hex()}", "processing")
                sent = time.monotonic()
                code = prober.send(pair, relay.callback_body(*pair))
                after.append((code, time.monotonic() - sent))
        finally:
            prober.stop()
            sampler.stop()
            alive = server.proc.poll() is None
            server.stop()

        during = prober.answers_between(started, ended)
        by_status = {}
        for _, _, code, _, _ in during:
            by_status[str(code)] = by_status.get(str(code), 0) + 1
        slowest = max((taken for _, taken, _, _, _ in during), default=0.0)
        latencies = sorted(taken for _, taken, code, _, _ in during if code == 200)
        p50 = latencies[len(latencies) // 2] if latencies else float("nan")
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else float("nan")
        if not alive:
            problems.append("nen-relay died during the attack")
        if not during:
            problems.append("no probe was answered during the attack")
        for sent, taken, code, retry_after, error in during:
            at = sent - started
            if taken > NEN_BUDGET_SECONDS:
                problems.append(f"probe at +{at:.1f}s answered {code} after {taken:.2f}s (> 5 s)")
            elif code == 200:
                continue
            elif code == 503 and allow_503 and retry_after and error == "unavailable":
                continue
            else:
                problems.append(f"probe at +{at:.1f}s answered {code} ({error}, retry-after {retry_after})")
        not_ok_after = [(code, taken) for code, taken in after if code != 200 or taken > NEN_BUDGET_SECONDS]
        if not_ok_after:
            problems.append(f"after the attack, {len(not_ok_after)} of {len(after)} probes were not "
                            f"200 within 5 s: {not_ok_after[:5]}")
        problems += relay.check_stored_once(db, prober.acked)
        peak_mib = sampler.peak / 1024
        if peak_mib > args.rss_bound_mib:
            problems.append(f"peak RSS {peak_mib:.0f} MiB > {args.rss_bound_mib:.0f} MiB")

    figures = dict(figures)
    figures.update({
        "attack_seconds": round(ended - started, 1),
        "probes_during": len(during),
        "probes_by_status": by_status,
        "probe_p50_200": round(p50, 3),
        "probe_p99_200": round(p99, 3),
        "probe_slowest": round(slowest, 3),
        "after_attack_200": sum(1 for code, _ in after if code == 200),
        "after_attack_slowest": round(max((t for _, t in after), default=0.0), 3),
        "rss_before_mib": round(sampler.before / 1024, 1),
        "rss_peak_mib": round(peak_mib, 1),
    })
    print(f"{name}: " + " ".join(f"{k}={v}" for k, v in figures.items()))
    if problems:
        print(f"{name}: FAIL: {len(problems)} problem(s)")
        for line in problems[:30]:
            print("  " + line)
        return 1
    print(f"{name}: PASS: {pass_line}")
    return 0
