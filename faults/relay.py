"""Shared plumbing for the fault scripts: a throwaway database, a nen-relay process, signed sends.

Python 3 standard library only. Every address is 127.0.0.1.
"""

import hashlib
import hmac
import http.client
import json
import os
import resource
import shutil
import signal
import sqlite3
import socket
import subprocess
import tempfile
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BIN = os.path.join(REPO, "target", "release", "nen-relay")
ADMIN_DB = os.environ.get("NEN_RELAY_FAULTS_ADMIN_DB", "postgres")
PG = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-X", "-q", "-v", "ON_ERROR_STOP=1"]


def psql(database, sql, timeout=30):
    """Runs SQL and returns stdout rows as lists of fields (unaligned, tab-separated)."""
    out = subprocess.run(
        PG + ["-d", database, "-A", "-t", "-F", "\t", "-c", sql],
        check=True, capture_output=True, text=True, timeout=timeout,
    ).stdout
    return [line.split("\t") for line in out.splitlines() if line]


class Database:
    """A fresh PostgreSQL database, dropped on exit."""

    def __init__(self, prefix):
        self.name = f"nen_relay_{prefix}_{uuid.uuid4().hex[:12]}"
        self.url = f"postgres://postgres@127.0.0.1:5432/{self.name}"

    def __enter__(self):
        psql(ADMIN_DB, f'create database "{self.name}"')
        return self

    def __exit__(self, *exc):
        for _ in range(30):
            try:
                psql(ADMIN_DB, f'drop database if exists "{self.name}" with (force)')
                return
            except subprocess.SubprocessError:
                time.sleep(1)  # PostgreSQL may still be starting after an outage test


class SqliteFile:
    """A fresh SQLite file in a temporary directory, removed on exit."""

    def __init__(self, prefix):
        self.directory = tempfile.mkdtemp(prefix=f"nen_relay_{prefix}_")
        self.path = os.path.join(self.directory, "relay.db")
        self.url = f"sqlite://{self.path}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.directory, ignore_errors=True)


def store(kind, prefix):
    """A fresh store of kind "postgres" or "sqlite", as a context manager."""
    return SqliteFile(prefix) if kind == "sqlite" else Database(prefix)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """One nen-relay process on a fixed port, restartable on the same port."""

    def __init__(self, db, port, secret, token, binary=None, extra_env=None, log_path=None,
                 max_open_files=None):
        self.max_open_files = max_open_files  # RLIMIT_NOFILE of the process, like `ulimit -n`
        self.binary = binary or os.environ.get("NEN_RELAY_BIN", DEFAULT_BIN)
        self.port = port
        self.env = dict(os.environ)
        self.env.update({
            "NEN_RELAY_ENV": "local",
            "NEN_RELAY_BIND": f"127.0.0.1:{port}",
            "DATABASE_URL": db.url,
            "NEN_WEBHOOK_SECRETS": secret,
            "NEN_RELAY_API_TOKENS": token,
            "NEN_RELAY_LOG_FORMAT": "json",
            "RUST_LOG": os.environ.get("RUST_LOG", "warn"),
        })
        self.env.update(extra_env or {})
        self.log_path = log_path or f"/tmp/nen-relay-faults-{port}.log"
        self.proc = None

    def start(self, ready_within=30.0):
        log = open(self.log_path, "ab")
        limit = self.max_open_files
        self.proc = subprocess.Popen([self.binary, "serve"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=(lambda: resource.setrlimit(
                                         resource.RLIMIT_NOFILE, (limit, limit))) if limit else None)
        log.close()
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nen-relay exited with {self.proc.returncode}; see {self.log_path}")
            try:
                status, _, _ = request(self.port, "GET", "/readyz", timeout=1)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"nen-relay not ready within {ready_within}s; see {self.log_path}")

    def kill(self):
        """SIGKILL: no graceful shutdown, no drain."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def cpu_seconds(self):
        """User + system CPU time the process has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


def request(port, method, path, body=None, headers=None, timeout=5.0):
    """One request on a fresh connection: (status, headers dict lower-cased, body bytes).

    Raises OSError (refused, reset, timeout) when no answer came: the caller decides to retry.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    except http.client.HTTPException as error:
        # A half-written answer (server killed mid-response) is no answer.
        raise ConnectionResetError(str(error)) from error
    finally:
        conn.close()


def sign(secret, body):
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def callback_body(message_id, status):
    return json.dumps({
        "workflow_id": "12345678-1234-1234-1234-123456789abc",
        "message_id": message_id,
        "status": status,
        "result": {"n": message_id[-6:]} if status == "success" else None,
    }, separators=(",", ":")).encode()


def deliver(port, secret, body, timeout=5.0):
    return request(port, "POST", "/webhooks/nen", body=body, timeout=timeout, headers={
        "Content-Type": "application/json",
        "X-Hmac-Signature": sign(secret, body),
    })


def stored_events(db):
    """{(message_id, status): row count} straight from the events table."""
    query = "select message_id, status, count(*) from events group by 1, 2"
    if isinstance(db, SqliteFile):
        with sqlite3.connect(db.path) as connection:
            rows = connection.execute(query).fetchall()
    else:
        rows = psql(db.name, query)
    return {(m, s): int(c) for m, s, c in rows}


def check_stored_once(db, acked):
    """Problems: acked pairs stored zero or several times, and pairs nobody sent."""
    stored = stored_events(db)
    problems = []
    for pair in sorted(acked):
        count = stored.get(pair, 0)
        if count != 1:
            problems.append(f"{pair} acknowledged but stored {count} time(s)")
    for pair in sorted(set(stored) - set(acked)):
        problems.append(f"{pair} stored but never acknowledged")
    return problems


class Load:
    """Sender threads that deliver fresh callbacks, each re-sent until acknowledged.

    Every answer is recorded as (time sent, seconds taken, status or None, retry-after header),
    so a script can judge the answers given during a fault window.
    """

    def __init__(self, port, secret, threads, prefix, max_deliveries=100_000, timeout=10.0, pause=0.0):
        self.port, self.secret, self.prefix, self.pause = port, secret, prefix, pause
        self.max_deliveries, self.timeout = max_deliveries, timeout
        self.lock = threading.Lock()
        self.answers = []
        self.acked = set()
        self.made = 0
        self.unexpected = []
        self.producing = threading.Event()
        self.producing.set()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self):
        for thread in self.threads:
            thread.start()
        return self

    def finish(self, within):
        """Stops making new deliveries and waits until the outstanding ones are acknowledged."""
        self.producing.clear()
        deadline = time.monotonic() + within
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.stopping.set()
        return all(not thread.is_alive() for thread in self.threads)

    def answers_between(self, start, end):
        with self.lock:
            return [a for a in self.answers if start <= a[0] < end]

    def _next(self):
        with self.lock:
            if not self.producing.is_set() or self.made >= self.max_deliveries:
                return None
            self.made += 1
            return (f"{self.prefix}-{self.made:06d}-{os.urandom(3).hex()}", "processing")

    def _run(self):
        while True:
            pair = self._next()
            if pair is None:
                return
            if self.pause:
                time.sleep(self.pause)
            body = callback_body(*pair)
            while not self.stopping.is_set():
                sent = time.monotonic()
                try:
                    code, headers, answer = deliver(self.port, self.secret, body, timeout=self.timeout)
                except OSError:
                    code, headers, answer = None, {}, b""
                taken = time.monotonic() - sent
                with self.lock:
                    self.answers.append((sent, taken, code, headers.get("retry-after")))
                if code == 200:
                    with self.lock:
                        self.acked.add(pair)
                    break
                if code not in (None, 503):
                    with self.lock:
                        self.unexpected.append(f"{pair}: {code} {answer[:200]!r}")
                    break
                time.sleep(0.1)  # as Nen would, a little later
