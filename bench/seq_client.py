"""Sends N sequential keep-alive GETs on one connection and checks each answer.

    python3 bench/seq_client.py HOST:PORT N [PATH]

For counting per-request work (bench/instructions.sh): one request at a
time, so the proxy does the same work for each and nothing overlaps.
"""
import http.client
import sys

host, port = sys.argv[1].rsplit(":", 1)
n = int(sys.argv[2])
path = sys.argv[3] if len(sys.argv) > 3 else "/"
conn = http.client.HTTPConnection(host, int(port), timeout=60)
for i in range(n):
    conn.request("GET", path, headers={"user-agent": "seq-client"})
    r = conn.getresponse()
    r.read()
    if r.status != 200:
        sys.exit(f"request {i}: status {r.status}")
conn.close()
