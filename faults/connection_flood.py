#!/usr/bin/env python3
"""Connection flood: more connections than nen-relay may hold, under a low `ulimit -n`; it
refuses the excess at once, never stops accepting, and serves again as soon as the flood ends.

Two runs, each with a fresh server:
  cap: RLIMIT_NOFILE 1024, http.max_connections 512: the connection cap is reached first.
  fds: RLIMIT_NOFILE 256, http.max_connections 4096: file descriptors run out first (EMFILE).

Pass, in each: while the flood lasts, every signed callback sent by the probes is answered
200 within Nen's 5 s budget, or refused within that budget (the connection budget or the
descriptors are exhausted): 503 with Retry-After, or closed without an answer (the 503 is
best-effort); right after the flood a callback gets 200 within 5 s; every acknowledged
callback is stored exactly once; RSS stays under 256 MiB; exit 0 on SIGTERM. The server must
also have refused connections for the scenario's reason (max_connections, or
out_of_file_descriptors).

    python3 faults/connection_flood.py [--sockets 2000] [--seconds 30] [--only cap|fds]

Runs the release binary (target/release/nen-relay, or NEN_RELAY_BIN) on a fresh PostgreSQL
database at 127.0.0.1:5432.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import horde  # noqa: E402
import relay  # noqa: E402

SCENARIOS = {
    "cap": {"max_open_files": 1024, "max_connections": 512},
    "fds": {"max_open_files": 256, "max_connections": 4096},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--only", choices=sorted(SCENARIOS))
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra setting for nen-relay, e.g. to show the check failing")
    args = parser.parse_args()
    horde.raise_own_fd_limit(args.sockets + 512)
    results = []
    for name, scenario in SCENARIOS.items():
        if args.only and name != args.only:
            continue
        with relay.Database("flood") as db:
            options = {
                "extra_env": {
                    "NEN_RELAY_HTTP__MAX_CONNECTIONS": str(scenario["max_connections"]),
                    **dict(pair.split("=", 1) for pair in args.env),
                },
                "max_open_files": scenario["max_open_files"],
            }
            figures, problems = horde.run_attack(name, db, options, args.sockets, [b""],
                                                 args.seconds, refusals_allowed=True)
            reason = "max_connections" if name == "cap" else "out_of_file_descriptors"
            if not figures[f"refused_{'max_connections' if name == 'cap' else 'out_of_fds'}"]:
                problems.append(f"no connection refused with reason {reason}")
            results.append((f"{name} nofile={scenario['max_open_files']} "
                            f"max_connections={scenario['max_connections']}", (figures, problems)))
    return horde.report("connection_flood", results)


if __name__ == "__main__":
    sys.exit(main())
