#!/usr/bin/env python3
"""Prints run.sh's table from the sides' JSON outputs (powertools.py, the idem example).

Each input: {"side", "versions", "baseline": {...}, "miss": {...}, "hit": {...}} where each
phase has "calls", "ns_per_call", "server_ns_per_call" (the proxy's wait on the server) and
"requests_per_call" ({operation: requests per call}).
"""

import json
import sys


def ops(per_call):
    return " + ".join(
        f"{op}" if v == 1 else f"{v:g} {op}" for op, v in sorted(per_call.items())
    ) or "none"


def main():
    sides = [json.load(open(p)) for p in sys.argv[1:]]
    print("| side | call | calls | round trips per call (by X-Amz-Target) | total | us per call | of which in the server | vs own GetItem |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for s in sides:
        base = s["baseline"]["ns_per_call"]
        for phase in ("miss", "hit", "baseline"):
            p = s[phase]
            label = s["baseline"]["name"] if phase == "baseline" else phase
            total = sum(p["requests_per_call"].values())
            print(
                f"| {s['side']} | {label} | {p['calls']} | {ops(p['requests_per_call'])} | {total:g} "
                f"| {p['ns_per_call'] / 1e3:.0f} | {p['server_ns_per_call'] / 1e3:.0f} "
                f"| {p['ns_per_call'] / base:.2f}x |"
            )
    print()
    for s in sides:
        print(f"{s['side']}: " + ", ".join(f"{k} {v}" for k, v in s["versions"].items()))


if __name__ == "__main__":
    main()
