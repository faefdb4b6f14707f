#!/usr/bin/env python3
"""Idle-socket flood: thousands of sockets that send nothing, a partial HTTP/2 preface or a
partial HTTP/1 head; nen-relay closes each at its header timeout and keeps serving.

Pass: while the sockets are held (below `http.max_connections`), every signed callback sent by
the probes is answered 200 within Nen's 5 s budget; right after the flood, a callback gets 200
within 5 s; every acknowledged callback is stored exactly once; the server's RSS stays under
256 MiB; the server closes the held sockets by itself (header timeouts counted); exit 0 on SIGTERM.

    python3 faults/idle_sockets.py [--sockets 3000] [--seconds 60] [--env NAME=VALUE ...]

Runs the release binary (target/release/nen-relay, or NEN_RELAY_BIN) on a fresh PostgreSQL
database at 127.0.0.1:5432.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import horde  # noqa: E402
import relay  # noqa: E402

PAYLOADS = [
    b"",                                               # connect, then nothing
    b"PRI * HTTP/",                                    # a partial HTTP/2 preface
    b"POST /webhooks/nen HTTP/1.1\r\nHost: relay\r\n",  # a partial HTTP/1 head
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",               # a whole preface: refused at once, reopened
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--header-read-timeout", default="10s",
                        help="NEN_RELAY_HTTP__HEADER_READ_TIMEOUT (the default)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra setting for nen-relay, e.g. to show the check failing")
    args = parser.parse_args()
    horde.raise_own_fd_limit(args.sockets + 512)
    with relay.Database("idle") as db:
        options = {
            "extra_env": {"NEN_RELAY_HTTP__HEADER_READ_TIMEOUT": args.header_read_timeout,
                          **dict(pair.split("=", 1) for pair in args.env)},
            # Room for every socket: this checks the clocks, not the descriptor limit.
            "max_open_files": args.sockets + 1024,
        }
        figures, problems = horde.run_attack("idle", db, options, args.sockets, PAYLOADS,
                                             args.seconds, refusals_allowed=False)
        if not figures["header_timeouts"]:
            problems.append("no connection was closed by the header timeout")
    return horde.report("idle_sockets", [(f"sockets={args.sockets}", (figures, problems))])


if __name__ == "__main__":
    sys.exit(main())
