"""A horde of client sockets held open against one port: the attack half of the connection faults.

Python 3 standard library only; one thread, non-blocking sockets. Every address is 127.0.0.1.
"""

import errno
import resource
import selectors
import socket
import threading
import time

REFUSAL = b"HTTP/1.1 503 "


def raise_own_fd_limit(wanted):
    """Lets this process hold `wanted` sockets (up to the hard limit); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Horde:
    """Keeps `target` sockets open, each sending one of `payloads` (cycled) and then nothing.

    A socket the server closes is counted and replaced at once, so the pressure lasts. Counts:
    opened, closed by the server (answered with the refusal 503, with other bytes, or silently),
    connect errors, and the most held at once (connected, not yet closed by the server).
    """

    def __init__(self, port, target, payloads, burst=256):
        self.address = ("127.0.0.1", port)
        self.target, self.payloads, self.burst = target, payloads, burst
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.opened = self.connect_errors = 0
        self.closed_silently = self.closed_refused = self.closed_answered = 0
        self.held = self.held_max = 0
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def finish(self):
        self.stop.set()
        self.thread.join()

    def figures(self):
        with self.lock:
            return {
                "opened": self.opened, "held_max": self.held_max, "held_now": self.held,
                "closed_by_server": self.closed_silently + self.closed_refused + self.closed_answered,
                "refused_503": self.closed_refused, "connect_errors": self.connect_errors,
            }

    def _run(self):
        try:
            self._hold()
        except Exception as error:  # reported by run_attack: a broken horde is no attack
            self.error = repr(error)

    def _hold(self):
        selector = selectors.DefaultSelector()
        sockets = {}  # socket -> "connecting" | "held"
        payloads = {}  # socket -> what it sends once connected
        n = 0
        try:
            while not self.stop.is_set():
                opened = 0
                while len(sockets) < self.target and opened < self.burst:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    sock.setblocking(False)
                    code = sock.connect_ex(self.address)
                    if code not in (0, errno.EINPROGRESS):
                        sock.close()
                        with self.lock:
                            self.connect_errors += 1
                        break
                    payloads[sock] = self.payloads[n % len(self.payloads)]
                    n += 1
                    sockets[sock] = "connecting"
                    selector.register(sock, selectors.EVENT_WRITE)
                    opened += 1
                with self.lock:
                    self.opened += opened
                for key, _ in selector.select(timeout=0.05):
                    sock = key.fileobj
                    if sockets[sock] == "connecting":
                        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if error:
                            self._drop(selector, sockets, payloads, sock)
                            with self.lock:
                                self.connect_errors += 1
                            continue
                        try:
                            if payloads[sock]:
                                sock.send(payloads[sock])
                        except OSError:
                            pass
                        sockets[sock] = "held"
                        selector.modify(sock, selectors.EVENT_READ)
                        with self.lock:
                            self.held += 1
                            self.held_max = max(self.held_max, self.held)
                        continue
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        data = b""
                    with self.lock:
                        if data.startswith(REFUSAL):
                            self.closed_refused += 1
                        elif data:
                            self.closed_answered += 1
                        else:
                            self.closed_silently += 1
                        self.held -= 1
                    self._drop(selector, sockets, payloads, sock)
        finally:
            for sock in list(sockets):
                self._drop(selector, sockets, payloads, sock)
            with self.lock:
                self.held = 0

    @staticmethod
    def _drop(selector, sockets, payloads, sock):
        selector.unregister(sock)
        del sockets[sock]
        del payloads[sock]
        sock.close()


NEN_BUDGET_SECONDS = 5.0


def metric(port, name, labels):
    """One sample off /metrics (0 when absent)."""
    import relay  # noqa: E402 (same folder; imported late to keep this module standalone)
    status, _, page = relay.request(port, "GET", "/metrics", timeout=5)
    if status != 200:
        return None
    wanted = ",".join(f'{k}="{v}"' for k, v in labels)
    for line in page.decode().splitlines():
        series, _, value = line.rpartition(" ")
        if series.startswith(name + "{") and all(f'{k}="{v}"' in series for k, v in labels):
            return float(value)
        if series == name and not wanted:
            return float(value)
    return 0.0


def run_attack(label, db, relay_options, sockets, payloads, seconds, refusals_allowed,
               rss_bound_mib=256.0, probe_threads=2):
    """Starts nen-relay, holds `sockets` against it for `seconds` while signed callbacks probe
    it, then checks the probes' answers, recovery, storage and memory. Returns (figures, problems).

    During the attack every probe must be answered 200 within Nen's budget; when
    `refusals_allowed` (a documented budget is exhausted: connections or descriptors), a 503
    with Retry-After, or a close without an answer (the 503 is best-effort), also passes if it
    comes within the budget. "At once" as a client sees it includes the kernel's SYN
    retransmission (1 s, then 3 s) when the flood keeps the listen backlog full.
    """
    import relay  # noqa: E402
    secret = "whsec-" + label + "-" + relay.os.urandom(8).hex()
    server = relay.Relay(db, relay.free_port(), secret, "token-" + relay.os.urandom(8).hex(),
                         **relay_options)
    server.start()
    problems = []
    rss = {"before": server.rss_kib(), "peak": 0}
    sampling = threading.Event()

    def sample_rss():
        while not sampling.is_set():
            try:
                rss["peak"] = max(rss["peak"], server.rss_kib())
            except OSError:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    horde = Horde(server.port, sockets, payloads)
    load = relay.Load(server.port, secret, threads=probe_threads, prefix=label, timeout=15.0,
                      pause=0.2)
    try:
        cpu_before = server.cpu_seconds()
        load.start()
        started = time.monotonic()
        horde.start()
        time.sleep(seconds)
        held = horde.figures()
        ended = time.monotonic()
        cpu_during = server.cpu_seconds() - cpu_before
        horde.finish()
        # Right after: a probe is acknowledged within Nen's budget.
        recovered_in = None
        body_id = 0
        while time.monotonic() - ended < NEN_BUDGET_SECONDS:
            body_id += 1
            try:
                code, _, _ = relay.deliver(server.port, secret,
                                           relay.callback_body(f"{label}-after-{body_id}", "processing"))
            except OSError:
                code = None
            if code == 200:
                recovered_in = time.monotonic() - ended
                load.acked.add((f"{label}-after-{body_id}", "processing"))
                break
            time.sleep(0.05)
        drained = load.finish(within=30.0)
        refused = {reason: metric(server.port, "nen_relay_connections_refused_total",
                                  [("listener", "public"), ("reason", reason)])
                   for reason in ("max_connections", "out_of_file_descriptors")}
        timeouts = metric(server.port, "nen_relay_connection_timeouts_total", [("phase", "head")])
    finally:
        horde.stop.set()
        sampling.set()
        sampler.join()
        server.stop()
    exit_code = server.proc.returncode

    during = [a for a in load.answers if started <= a[0] and a[0] + a[1] <= ended + NEN_BUDGET_SECONDS]
    latencies = sorted(taken for _, taken, code, _ in during if code == 200)
    counts = {"200": 0, "503": 0, "closed": 0}
    for sent, taken, code, retry_after in during:
        if code == 200 and taken <= NEN_BUDGET_SECONDS:
            counts["200"] += 1
        elif refusals_allowed and code == 503 and retry_after and taken <= NEN_BUDGET_SECONDS:
            counts["503"] += 1
        elif refusals_allowed and code is None and taken <= NEN_BUDGET_SECONDS:
            counts["closed"] += 1
        else:
            problems.append(f"probe sent at +{sent - started:.1f}s: {code} after {taken:.2f}s "
                            f"(retry-after {retry_after})")
    if horde.error:
        problems.append(f"the attack itself failed: {horde.error}")
    if not held["held_max"]:
        problems.append("no socket was ever held open: no attack happened")
    if not counts["200"]:
        problems.append("no probe was acknowledged during the attack")
    if recovered_in is None:
        problems.append(f"no 200 within {NEN_BUDGET_SECONDS}s after the attack ended")
    if not drained:
        problems.append("probes still unacknowledged 30 s after the attack ended")
    problems += load.unexpected
    problems += relay.check_stored_once(db, load.acked)
    peak_mib = rss["peak"] / 1024
    if peak_mib > rss_bound_mib:
        problems.append(f"peak RSS {peak_mib:.0f} MiB > {rss_bound_mib:.0f} MiB")
    if exit_code != 0:
        problems.append(f"nen-relay exited {exit_code} after SIGTERM")

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    figures = {
        "probes": len(during), **{f"probes_{k}": v for k, v in counts.items()},
        "probe_p50_ms": round(pct(0.5), 1), "probe_max_ms": round(max(latencies, default=float("nan")) * 1000, 1),
        "sockets_held_max": held["held_max"], "sockets_opened": held["opened"],
        "closed_by_server": held["closed_by_server"], "refusal_503_seen": held["refused_503"],
        "connect_errors": held["connect_errors"],
        "refused_max_connections": refused["max_connections"],
        "refused_out_of_fds": refused["out_of_file_descriptors"],
        "header_timeouts": timeouts,
        "cpu_cores_avg": round(cpu_during / max(ended - started, 1e-9), 2),
        "recovered_in_s": None if recovered_in is None else round(recovered_in, 2),
        "rss_before_mib": round(rss["before"] / 1024), "rss_peak_mib": round(peak_mib),
    }
    return figures, problems


def report(name, results):
    """Prints each scenario's figures and problems; returns the exit code."""
    failed = False
    for label, (figures, problems) in results:
        print(f"{name}[{label}]: " + " ".join(f"{k}={v}" for k, v in figures.items()))
        for line in problems[:20]:
            print(f"  {label}: {line}")
        failed = failed or bool(problems)
    print(f"{name}: {'FAIL' if failed else 'PASS'}")
    return 1 if failed else 0
