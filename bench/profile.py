#!/usr/bin/env python3
"""Where the gateway's CPU goes: groups the samples of `perf script` (recorded with
`--call-graph dwarf`) by component, for bench/run --profile.

Reads `perf script -F comm,tid,time,ip,sym,dso` on stdin and prints a Markdown list. A sample in
the kernel's TCP code counts as loopback TCP; otherwise the first component below whose pattern
appears anywhere in the sample's stack takes it (so SQLite called from a settlement counts as
SQLite, and the JSON encoder inside the log formatter counts as logging). Heuristic, by symbol
name: good for shares of ten percent, not for single percents.
"""

import collections
import re
import sys

COMPONENTS = [
    ("ledger: SQL parsing (sqlite3_prepare)",
     r"sqlite3Prepare|sqlite3_prepare|sqlite3LockAndPrepare|sqlite3RunParser"),
    ("ledger: fsync", r"fsync|fdatasync|file_write_and_wait|jbd2"),
    ("ledger: SQLite execution and WAL writes", r"sqlite3|rusqlite"),
    # Not the request scope's own frame: every request's future is polled inside it.
    ("tracing: spans and the request log line",
     r"tracing_subscriber|json_subscriber|ketchup_gateway::logging::(?!request_scope::InRequest)"),
    ("upstream client (hyper-util pool, connections to the upstream)",
     r"hyper_util::client|hyper::client|proto::h1::role::Client|HttpConnector|hyper_rustls"),
    ("status cache and ownership memo (moka)", r"moka::"),
    ("rate limits (governor)", r"governor::"),
    ("JSON (serde_json)", r"serde_json"),
    ("thread hand-offs (spawn_blocking, futex wake-ups, parking)",
     r"spawn_blocking|blocking::pool|futex|parking_lot|park_timeout|::park"),
    ("HTTP server (hyper, axum, tower)", r"hyper::|axum|tower"),
    ("tokio scheduler", r"tokio::"),
]
TCP = re.compile(r"\b(tcp_|sock_sendmsg|sock_recvmsg|__sys_sendto|__sys_recvfrom|ip_finish_output|__dev_queue_xmit)")
COMPILED = [(name, re.compile(pattern)) for name, pattern in COMPONENTS]


def samples(lines):
    header, frames = None, []
    for line in lines:
        if not line.strip():
            if header is not None:
                yield header, frames
            header, frames = None, []
        elif line[0] in " \t":
            frames.append(line.strip())
        else:
            if header is not None:
                yield header, frames
            header, frames = line, []
    if header is not None:
        yield header, frames


def classify(frames):
    text = "\n".join(frames)
    if frames and "kernel" in frames[0] and TCP.search(text) and not re.search(r"fsync|ext4|jbd2", text):
        return "kernel: TCP over loopback (both ends of each connection)"
    for name, pattern in COMPILED:
        if pattern.search(text):
            return name
    return "other"


def main():
    totals, threads = collections.Counter(), collections.Counter()
    writer = collections.Counter()
    n = 0
    for header, frames in samples(sys.stdin):
        n += 1
        comm = header.split()[0]
        threads[comm] += 1
        name = classify(frames)
        totals[name] += 1
        if comm == "ledger-writer":
            writer[name] += 1
    if not n:
        print("- (no samples)")
        return
    for name, count in totals.most_common():
        print(f"- {100 * count / n:4.1f}% {name}")
    parts = ", ".join(f"{comm} {100 * c / n:.0f}%" for comm, c in threads.most_common(4))
    print(f"- by thread: {parts} ({n} samples)")
    if writer:
        w = sum(writer.values())
        parts = ", ".join(f"{name.split(': ', 1)[-1]} {100 * c / w:.0f}%" for name, c in writer.most_common(4))
        print(f"- within the ledger writer thread: {parts}")


if __name__ == "__main__":
    main()
