"""Prints compare.sh's figures as a table with ratios, and one RESULT line of JSON.

Reads key=value lines on stdin; the argument lists the connection counts measured. With
--median FILE..., reads the RESULT lines of several runs instead and prints their medians.
"""
import json
import statistics
import sys


def table(r, connections):
    def ratio(a, b):
        return f"{a / b:.2f}x" if b else "n/a"

    rows = []
    for c in connections:
        relay = r[f"relay_rate_{c}"]
        rows += [
            (f"nen-relay committed callbacks/s ({c} conn)", f"{relay:,.0f}", "1.00x"),
            (f"  p50 / p99 / p99.9 latency ms",
             f"{r[f'relay_p50_{c}']:.2f} / {r[f'relay_p99_{c}']:.2f} / {r[f'relay_p999_{c}']:.2f}", ""),
            (f"  non-2xx answers / runs loss-checked", f"{r[f'relay_non2xx_{c}']:.0f} / {r[f'relay_verified_{c}']:.0f}", ""),
            (f"nen-relay on SQLite, committed callbacks/s ({c} conn)", f"{r[f'sqlite_rate_{c}']:,.0f}",
             f"{ratio(r[f'sqlite_rate_{c}'], relay)} of PostgreSQL, {ratio(r[f'sqlite_rate_{c}'], r[f'node_rate_{c}'])} of Node"),
            (f"  p50 / p99 / p99.9 latency ms",
             f"{r[f'sqlite_p50_{c}']:.2f} / {r[f'sqlite_p99_{c}']:.2f} / {r[f'sqlite_p999_{c}']:.2f}", ""),
            (f"  non-2xx answers / runs loss-checked", f"{r[f'sqlite_non2xx_{c}']:.0f} / {r[f'sqlite_verified_{c}']:.0f}", ""),
            (f"nen-relay with one forwarding target, committed/s ({c} conn)", f"{r[f'forward_rate_{c}']:,.0f}",
             f"{ratio(r[f'forward_rate_{c}'], relay)} of without"),
            (f"  p99 ms / non-2xx / left pending", f"{r[f'forward_p99_{c}']:.2f} / {r[f'forward_non2xx_{c}']:.0f} / {r[f'forward_left_{c}']:.0f}", ""),
            (f"  forwarded messages/s, load and drain", f"{r[f'forward_delivered_per_s_{c}']:,.0f}", ""),
            (f"nen-relay 401 path requests/s ({c} conn)", f"{r[f'reject_rate_{c}']:,.0f}",
             f"committed is {ratio(relay, r[f'reject_rate_{c}'])} of it"),
            (f"reference Node receiver callbacks/s ({c} conn)", f"{r[f'node_rate_{c}']:,.0f}",
             f"nen-relay is {ratio(relay, r[f'node_rate_{c}'])}"),
            (f"  p50 / p99 latency ms", f"{r[f'node_p50_{c}']:.2f} / {r[f'node_p99_{c}']:.2f}", ""),
            (f"pgbench one callback per transaction tps ({c} clients)", f"{r[f'pgbench_tps_{c}']:,.0f}",
             f"nen-relay is {ratio(relay, r[f'pgbench_tps_{c}'])}"),
        ]
    rows.append(("nen-relay peak RSS (VmHWM) MiB", f"{r['relay_peak_rss_kib'] / 1024:.1f}", ""))
    rows.append(("nen-relay on SQLite peak RSS MiB", f"{r['sqlite_peak_rss_kib'] / 1024:.1f}", ""))
    rows.append(("nen-relay with forwarding peak RSS MiB", f"{r['forward_peak_rss_kib'] / 1024:.1f}", ""))
    rows.append(("forwarding lag, commit to sink, p50 / p99 ms",
                 f"{r['forward_lag_p50_ms']:.0f} / {r['forward_lag_p99_ms']:.0f}", ""))
    rows.append(("reference Node receiver peak RSS MiB", f"{r['node_peak_rss_kib'] / 1024:.1f}", ""))
    width = max(len(name) for name, _, _ in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>15}  {note}")


def main():
    args = sys.argv[1:]
    if args and args[0] == "--median":
        runs = []
        for path in args[1:]:
            for line in open(path):
                if line.startswith("RESULT "):
                    runs.append(json.loads(line[len("RESULT "):]))
        if not runs:
            sys.exit("no RESULT lines found")
        connections = runs[0]["connections"]
        merged = {k: statistics.median(run[k] for run in runs) for k in runs[0] if k != "connections"}
        print(f"median of {len(runs)} runs")
        table(merged, connections)
        return
    connections = args[0].split()
    r = {}
    for line in sys.stdin:
        key, _, value = line.strip().partition("=")
        if key:
            r[key] = float(value)
    table(r, connections)
    print("RESULT " + json.dumps({"connections": connections, **r}, sort_keys=True))


main()
