#!/usr/bin/env python3
"""Durable publishes through redis-py: a MULTI/EXEC transaction against a plain pipeline of the
same publishes, interleaved, against a herald node on 127.0.0.1:PORT (default 50996).

    herald serve --resp-addr 127.0.0.1:50996 --http-addr 127.0.0.1:50995 --data-dir /tmp/hbench &
    scripts/bench-transactions.py [PORT]

Needs redis-py (pip install redis). Figures: docs/benchmarks.md, "Transactions cost what a
pipeline costs".
"""
import redis, time, sys
r = redis.Redis(port=int(sys.argv[1]) if len(sys.argv) > 1 else 50996)
def run(transaction, depth, seconds=4.0):
    n = 0; t0 = time.perf_counter(); lat = []
    payload = b"x" * 64
    while time.perf_counter() - t0 < seconds:
        p = r.pipeline(transaction=transaction)
        for _ in range(depth): p.publish("bench", payload)
        s = time.perf_counter(); p.execute(); lat.append(time.perf_counter() - s)
        n += depth
    el = time.perf_counter() - t0
    lat.sort()
    return n / el, lat[len(lat)//2] * 1e6, lat[int(len(lat)*0.99)] * 1e6
for rnd in range(3):
    for depth in (1, 32):
        for tx in (False, True):
            rate, p50, p99 = run(tx, depth)
            print(f"round {rnd} depth {depth:2} {'MULTI/EXEC' if tx else 'pipeline  '}: {rate:8.0f} publishes/s  p50 {p50:7.0f} us  p99 {p99:7.0f} us", flush=True)
