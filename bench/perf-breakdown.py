#!/usr/bin/env python3
"""Group the CPU samples of a `perf record -g` profile of the dtm server by component.

Usage:
  perf record -e cpu-clock -F 2000 --call-graph dwarf,16384 -p <server pid> -o srv.data -- sleep 8
  perf script -i srv.data -F comm,tid,ip,sym | python3 bench/perf-breakdown.py

Each sample is put in the first bucket whose rule matches any frame of its stack (so
a branch call made inside the submit handler counts as a branch call, not as the
handler). Kernel time is attributed to the user-space code that entered the kernel.
"""
import re
import sys
from collections import Counter

# (bucket, predicate over the whole stack text), first match wins
RULES = [
    ("store writer: fsync", lambda s: "writer_loop" in s and ("fsync" in s or "unixSync" in s)),
    ("store writer: commit (WAL append, checksums)", lambda s: "writer_loop" in s
        and re.search(r"\bcommit\b|vdbeCommit|PagerCommit|sqlite3VdbeHalt|walFrames", s)),
    ("store writer: INSERT/UPDATE statements", lambda s: "writer_loop" in s and "apply_one" in s),
    ("store writer: begin, savepoints, queue", lambda s: "writer_loop" in s),
    ("store checkpointer thread", lambda s: "checkpointer_loop" in s),
    ("store reads (find_global/find_branches, spawn_blocking)", lambda s: re.search(
        r"SqliteStore.*(find_global|find_branches|read)|BlockingTask.*sqlite3|sqlite3_step", s)),
    ("branch calls (reqwest + hyper client, sockets)", lambda s: re.search(
        r"HttpCaller|reqwest|hyper_util::client|role::Client|dispatch::Client|PoolClient", s)),
    ("request JSON decoding", lambda s: re.search(r"from_json|serde_json::de", s)),
    ("response/other JSON encoding", lambda s: re.search(r"serde_json::ser|to_string", s)),
    ("engine (dtm_core, excluding the above)", lambda s: "dtm_core" in s),
    ("HTTP server (h1_server, hyper/axum, sockets)", lambda s: re.search(r"h1_server|hyper::proto|axum::serve|handle_connection|axum::", s)),
    ("tokio scheduler, timers, wake-ups", lambda s: re.search(r"tokio::runtime|futex|schedule", s)),
]


def samples(stream):
    head, frames = None, []
    for line in stream:
        line = line.rstrip("\n")
        if not line.strip():
            if head is not None:
                yield head, frames
            head, frames = None, []
            continue
        if not line.startswith(("\t", " ")):
            if head is not None:
                yield head, frames
            head, frames = line, []
        else:
            parts = line.strip().split(" ", 1)
            frames.append(parts[1] if len(parts) > 1 else parts[0])
    if head is not None:
        yield head, frames


def main():
    buckets = Counter()
    threads = Counter()
    total = 0
    for head, frames in samples(sys.stdin):
        total += 1
        comm = head.split()[0] if head.split() else "?"
        threads[comm] += 1
        s = "\n".join(frames)
        for name, rule in RULES:
            if rule(s):
                buckets[name] += 1
                break
        else:
            buckets["other"] += 1
    if total == 0:
        print("no samples")
        return 1
    print(f"{total} samples")
    print("by thread:")
    for k, v in threads.most_common():
        print(f"  {100.0 * v / total:5.1f}%  {k}")
    print("by component:")
    for k, v in buckets.most_common():
        print(f"  {100.0 * v / total:5.1f}%  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
