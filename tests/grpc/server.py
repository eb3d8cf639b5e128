"""A real gRPC server (Python grpcio) for the gRPC callout tests (tests/grpc.rs).

Service `wasp.test.Auth`, raw bytes in and out (no generated code):
- Check (unary): a token starting with "allow" (or "alice") answers
  b"ok-<token>-<x-user metadata>"; "slow" sleeps 3 s first; anything else fails PERMISSION_DENIED
  with the message "token denied: <token>".
- Echo (bidi stream): initial metadata x-initial=hello, each message back in
  upper case, trailing metadata x-trailing=bye, status OK.
- Hold (bidi stream): initial metadata, then waits for the client; prints
  "HOLD-CANCELLED" if the client resets the stream, "HOLD-ENDED" if it ends it.

Prints "PORT <n>" once listening on 127.0.0.1 (port from argv[1], or any),
then one line per event, flushed.
"""

import sys
import threading
import time
from concurrent import futures

import grpc


def say(line):
    print(line, flush=True)


def check(request, context):
    token = request.decode("utf-8", "replace")
    user = dict(context.invocation_metadata()).get("x-user", "")
    say(f"CHECK {token}")
    if token.startswith("slow"):
        time.sleep(3)
    if token.startswith(("allow", "alice", "slow")):
        return f"ok-{token}-{user}".encode()
    context.abort(grpc.StatusCode.PERMISSION_DENIED, f"token denied: {token}")


def echo(requests, context):
    context.send_initial_metadata((("x-initial", "hello"),))
    for r in requests:
        yield r.upper()
    context.set_trailing_metadata((("x-trailing", "bye"),))


def hold(requests, context):
    done = threading.Event()

    def gone():
        if not done.is_set():
            say("HOLD-CANCELLED")

    context.add_callback(gone)
    context.send_initial_metadata((("x-initial", "holding"),))
    say("HOLD-START")
    try:
        for _ in requests:
            pass
    except Exception:  # the iterator may fail when the stream is reset
        return
    # A reset may end the iterator too; the RPC is then no longer active
    # (its callback reports it). A half-close leaves it active.
    time.sleep(0.3)
    if context.is_active():
        done.set()
        say("HOLD-ENDED")
    return
    yield  # a generator: a stream of answers, none sent


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    handler = grpc.method_handlers_generic_handler(
        "wasp.test.Auth",
        {
            "Check": grpc.unary_unary_rpc_method_handler(check),
            "Echo": grpc.stream_stream_rpc_method_handler(echo),
            "Hold": grpc.stream_stream_rpc_method_handler(hold),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    say(f"PORT {port}")
    # Ends with the test: stdin closes when the test drops the process.
    sys.stdin.read()
    server.stop(0)


if __name__ == "__main__":
    main()
