#!/usr/bin/env python3
"""Time to first byte of streamed answers, for bench/run's text rows.

    ttfb.py run URL BEARER BODY CONNECTIONS SECONDS SAMPLES
        POSTs BODY (JSON) to URL over CONNECTIONS keep-alive connections, one stream after
        another on each, for SECONDS; appends a line per stream to the file SAMPLES:
        "<µs to the first byte of the body> <µs to its end>", or "error <what>".
    ttfb.py summary SAMPLES
        prints streams|ttfb p50|ttfb p99|ttfb p99.9|whole p50 (µs)|errors

The first byte of the body, not of the head: a server may send its head before it has anything
to stream, and what a streaming client waits for is the first event. Plain sockets and HTTP/1.1,
so that nothing between the socket and the clock buffers: the time is taken when the first body
byte is read.
"""

import socket
import sys
import threading
import time
from urllib.parse import urlsplit


class Broken(Exception):
    pass


class Connection:
    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise Broken("connection closed")
        self.buffer += data

    def take_until(self, marker):
        while marker not in self.buffer:
            self.fill()
        head, self.buffer = self.buffer.split(marker, 1)
        return head

    def take(self, n):
        while len(self.buffer) < n:
            self.fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def first_byte(self):
        """Blocks until at least one body byte is buffered."""
        while not self.buffer:
            self.fill()

    def stream(self, request):
        """Sends one request; returns (ns to the first body byte, ns to the end)."""
        self.buffer = b""
        start = time.perf_counter_ns()
        self.sock.sendall(request)
        head = self.take_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = head[0].split(" ")[1]
        if status != "200":
            raise Broken("status " + status)
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip().lower()
        self.first_byte()
        first = time.perf_counter_ns()
        if fields.get("transfer-encoding") == "chunked":
            while True:
                size = int(self.take_until(b"\r\n").split(b";")[0], 16)
                self.take(size + 2)
                if size == 0:
                    break
        else:
            self.take(int(fields.get("content-length", "0")))
        return first - start, time.perf_counter_ns() - start


def run(url, bearer, body, connections, seconds, samples):
    parts = urlsplit(url)
    path = parts.path + ("?" + parts.query if parts.query else "")
    payload = body.encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {bearer}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    deadline = time.monotonic() + seconds
    lines = []
    lock = threading.Lock()

    def worker():
        mine = []
        connection = None
        while time.monotonic() < deadline:
            try:
                if connection is None:
                    connection = Connection(parts.hostname, parts.port)
                ttfb, whole = connection.stream(request)
                mine.append(f"{ttfb // 1000} {whole // 1000}")
            except (OSError, Broken, ValueError, IndexError) as e:
                mine.append(f"error {type(e).__name__}: {e}".replace("\n", " "))
                connection = None
        with lock:
            lines.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with open(samples, "a") as out:
        out.write("".join(line + "\n" for line in lines))


def summary(samples):
    ttfb, whole, errors = [], [], 0
    for line in open(samples):
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "error":
            errors += 1
        else:
            ttfb.append(int(fields[0]))
            whole.append(int(fields[1]))
    ttfb.sort()
    whole.sort()

    def at(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] if values else 0

    print(f"{len(ttfb)}|{at(ttfb, 0.5)}|{at(ttfb, 0.99)}|{at(ttfb, 0.999)}|{at(whole, 0.5)}|{errors}")


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6]), sys.argv[7])
    elif len(sys.argv) == 3 and sys.argv[1] == "summary":
        summary(sys.argv[2])
    else:
        sys.exit(__doc__)
