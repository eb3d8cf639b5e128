"""Reads a wrk report: the numbers every bench script tabulates.

Used from the scripts' inline Python (they run from the repository root):
    from bench.wrk import parse
"""
import re


def _ms(value):
    number = float(re.match(r"[\d.]+", value).group())
    unit = re.sub(r"[\d.]+", "", value)
    return number * {"us": 0.001, "ms": 1, "s": 1000}[unit]


def parse(path):
    """requests/s, request count, seconds, p50/p99 in ms (None without
    --latency) and the errors wrk reported."""
    text = open(path).read()

    def latency(pct):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        return _ms(m.group(1)) if m else None

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    socket = re.search(r"Socket errors: (.*)", text)
    first = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", text)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
        "requests": int(re.search(r"(\d+) requests in", text).group(1)),
        "secs": float(re.search(r"requests in ([\d.]+)s", text).group(1)),
        "p50": latency(50),
        "p99": latency(99),
        "non2xx": int(non2xx.group(1)) if non2xx else None,
        "socket_errors": socket.group(1) if socket else None,
        # The first error line as wrk wrote it, or "".
        "error": first.group(0) if first else "",
    }
