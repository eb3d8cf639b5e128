// wasp example filter in AssemblyScript, on the community AssemblyScript
// Proxy-Wasm SDK (@gcoredev/proxy-wasm-sdk-as, ABI 0.2.1). The same .wasm
// runs in wasp and in Envoy.
//
// What it does, so tests can see it:
// - request: adds `x-team: <config>` (the filter's configuration string,
//   "unset" when empty) and `x-filter-lang: assemblyscript`, logs
//   "as-filter: <method> <path>" at info level, counts requests in the
//   counter `as_filter_requests`;
// - a request whose path starts with `/private` is answered 403 by the
//   filter itself, with `x-denied-by: as-filter` and a short body;
// - response: adds `x-filter-lang: assemblyscript`.
export * from "@gcoredev/proxy-wasm-sdk-as/assembly/proxy";
import { proxy_log } from "@gcoredev/proxy-wasm-sdk-as/assembly/imports";
import {
  Context,
  Counter,
  FilterHeadersStatusValues,
  GrpcStatusValues,
  LogLevelValues,
  makeHeaderPair,
  registerRootContext,
  RootContext,
  send_local_response,
  stream_context,
} from "@gcoredev/proxy-wasm-sdk-as/assembly";

// The SDK's own `log` writes to stdout (for a host without proxy_log);
// wasp and Envoy both implement proxy_log, which keeps the level.
function info(message: string): void {
  const bytes = String.UTF8.encode(message);
  proxy_log(LogLevelValues.info, changetype<usize>(bytes), bytes.byteLength);
}

class TeamRoot extends RootContext {
  requests: Counter | null = null;

  onConfigure(configuration_size: u32): bool {
    const ok = super.onConfigure(configuration_size);
    // Defined once per VM; each request only increments it.
    this.requests = new Counter("as_filter_requests");
    return ok;
  }

  createContext(context_id: u32): Context {
    return new TeamFilter(context_id, this);
  }
}

class TeamFilter extends Context {
  team: string;
  root: TeamRoot;

  constructor(context_id: u32, root: TeamRoot) {
    super(context_id, root);
    this.root = root;
    const configured = root.getConfiguration();
    this.team = configured.length > 0 ? configured : "unset";
  }

  onRequestHeaders(_headers: u32, _end_of_stream: bool): FilterHeadersStatusValues {
    const path = stream_context.headers.request.get(":path");
    const method = stream_context.headers.request.get(":method");
    info("as-filter: " + method + " " + path);
    const requests = this.root.requests;
    if (requests !== null) {
      requests.increment(1);
    }
    if (path.startsWith("/private")) {
      const headers = [makeHeaderPair("x-denied-by", "as-filter")];
      send_local_response(
        403,
        "as_filter_denied",
        String.UTF8.encode("private paths are not served\n"),
        headers,
        GrpcStatusValues.Unknown,
      );
      return FilterHeadersStatusValues.StopIteration;
    }
    stream_context.headers.request.replace("x-team", this.team);
    stream_context.headers.request.add("x-filter-lang", "assemblyscript");
    return FilterHeadersStatusValues.Continue;
  }

  onResponseHeaders(_headers: u32, _end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.add("x-filter-lang", "assemblyscript");
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32): RootContext => {
  return new TeamRoot(context_id);
}, "");
