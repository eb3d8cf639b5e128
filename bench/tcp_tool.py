#!/usr/bin/env python3
"""Client and server for bench/tcp.sh (standard library only).

  tcp_tool.py serve PORT            upstream: see below; prints "ready"
  tcp_tool.py bulk ADDR SECONDS     one connection sending 1 MiB writes; MB/s
  tcp_tool.py rate ADDR SECONDS     connect, 1 byte each way, close; conn/s
  tcp_tool.py latency ADDR N MODE [SRC]
                                    MODE http|raw: N fresh connections, the
                                    time from the client's first byte to the
                                    upstream reading it (CLOCK_MONOTONIC is
                                    one clock for every process); median and
                                    p90 in microseconds

The upstream reads a connection's first chunk and notes when: "BULK..."
then discards to the end and answers the byte count; anything else is
answered at once with an HTTP/1.1 response whose body is that time in ns.
"""
import asyncio
import socket
import statistics
import sys
import time


def addr(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


async def handle(reader, writer):
    try:
        first = await reader.read(65536)
        seen = time.monotonic_ns()
        if first.startswith(b"BULK"):
            total = len(first)
            while True:
                chunk = await reader.read(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
            writer.write(b"%d\n" % total)
        else:
            body = b"%d" % seen
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(body), body))
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(port):
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def bulk(target, seconds):
    chunk = b"BULK" + b"x" * ((1 << 20) - 4)
    s = socket.create_connection(target)
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < seconds:
        s.sendall(chunk)
        sent += len(chunk)
    s.shutdown(socket.SHUT_WR)
    answer = b""
    while True:
        got = s.recv(64)
        if not got:
            break
        answer += got
    elapsed = time.monotonic() - start
    received = int(answer.strip() or 0)
    if received != sent:
        sys.exit(f"upstream got {received} of {sent} bytes")
    print(f"{sent / elapsed / 1e6:.0f}")


def rate(target, seconds):
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        s = socket.create_connection(target)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x")
        while s.recv(4096):
            pass
        s.close()
        n += 1
    print(f"{n / (time.monotonic() - start):.0f}")


def latency(target, n, mode, src=None):
    samples = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if src:
            s.bind((src, 0))
        s.connect(target)
        # The connection is accepted (and, captured, its detection waiting)
        # before the first byte leaves.
        time.sleep(0.002)
        if mode == "http":
            msg = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
        else:
            msg = b"hello, opaque bytes"
        t0 = time.monotonic_ns()
        s.sendall(msg)
        data = b""
        while True:
            got = s.recv(4096)
            if not got:
                break
            data += got
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                length = [int(l.split(b":")[1]) for l in head.split(b"\r\n")
                          if l.lower().startswith(b"content-length")]
                if length and len(body) >= length[0]:
                    break
        s.close()
        body = data.partition(b"\r\n\r\n")[2]
        samples.append((int(body) - t0) / 1000)
    samples.sort()
    p90 = samples[min(len(samples) - 1, int(len(samples) * 0.9))]
    print(f"{statistics.median(samples):.0f} {p90:.0f}")


def main():
    cmd = sys.argv[1]
    if cmd == "serve":
        asyncio.run(serve(int(sys.argv[2])))
    elif cmd == "bulk":
        bulk(addr(sys.argv[2]), float(sys.argv[3]))
    elif cmd == "rate":
        rate(addr(sys.argv[2]), float(sys.argv[3]))
    elif cmd == "latency":
        latency(addr(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                sys.argv[5] if len(sys.argv) > 5 else None)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
