//! Fixture: a network (TCP) filter written against the community SDK's
//! `StreamContext`. Counts the bytes each way in two counters
//! (`tcp_rewrite_downstream_bytes`, `tcp_rewrite_upstream_bytes`, as the
//! filter saw them before rewriting), upper-cases what the client sends,
//! and prefixes each chunk the upstream sends with `[wasm]`. A client
//! chunk containing `close` makes it close the connection; one containing
//! `hold` is held (paused) until the next chunk arrives. Logs its totals
//! when the connection ends. With the plugin configuration `deny` it
//! closes every connection in `on_new_connection` (an allow-list filter
//! refusing a peer before anything is sent); with `wait` it pauses there
//! (the proxy then connects upstream only once the client has sent).
//! Two modes for a chain of network filters: `redact` replaces each
//! `secret` the client sends with `******` and passes everything on
//! unchanged otherwise (an inspector); `line` pauses on client bytes until
//! they end with a newline, then passes them on unchanged (a buffering
//! filter that sees its whole accumulated buffer).
use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { ids: (0, 0), deny: false, wait: false, mode: Mode::Rewrite }) });
}}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Rewrite,
    Redact,
    Line,
}

struct Root {
    ids: (u32, u32),
    deny: bool,
    wait: bool,
    mode: Mode,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        let down = hostcalls::define_metric(MetricType::Counter, "tcp_rewrite_downstream_bytes")
            .unwrap_or(0);
        let up = hostcalls::define_metric(MetricType::Counter, "tcp_rewrite_upstream_bytes")
            .unwrap_or(0);
        self.ids = (down, up);
        true
    }
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        self.deny = config == b"deny";
        self.wait = config == b"wait";
        self.mode = match config.as_slice() {
            b"redact" => Mode::Redact,
            b"line" => Mode::Line,
            _ => Mode::Rewrite,
        };
        true
    }
    fn create_stream_context(&self, _id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Tcp {
            ids: self.ids,
            down: 0,
            up: 0,
            opened: false,
            deny: self.deny,
            wait: self.wait,
            mode: self.mode,
        }))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }
}

struct Tcp {
    ids: (u32, u32),
    down: usize,
    up: usize,
    opened: bool,
    deny: bool,
    wait: bool,
    mode: Mode,
}

impl Context for Tcp {}

impl StreamContext for Tcp {
    fn on_new_connection(&mut self) -> Action {
        self.opened = true;
        if self.deny {
            log::info!("tcp-rewrite: denied a connection");
            self.close_downstream();
            return Action::Pause;
        }
        if self.wait {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_downstream_data(&mut self, size: usize, eos: bool) -> Action {
        if size == 0 {
            return Action::Continue;
        }
        let data = self.get_downstream_data(0, size).unwrap_or_default();
        match self.mode {
            Mode::Rewrite => {}
            Mode::Redact => {
                let mut out = data.clone();
                let mut i = 0;
                while let Some(at) = out
                    .get(i..)
                    .and_then(|t| t.windows(6).position(|w| w == b"secret"))
                {
                    let start = i + at;
                    out.splice(start..start + 6, b"******".iter().copied());
                    i = start + 6;
                }
                if out != data {
                    self.set_downstream_data(0, size, &out);
                }
                return Action::Continue;
            }
            Mode::Line => {
                if !eos && !data.ends_with(b"\n") {
                    return Action::Pause;
                }
                return Action::Continue;
            }
        }
        if data.windows(5).any(|w| w == b"close") {
            self.close_downstream();
            return Action::Continue;
        }
        if !eos && data.windows(4).any(|w| w == b"hold") && !data.ends_with(b"!") {
            return Action::Pause;
        }
        self.down += size;
        let _ = hostcalls::increment_metric(self.ids.0, size as i64);
        self.set_downstream_data(0, size, &data.to_ascii_uppercase());
        Action::Continue
    }

    fn on_upstream_data(&mut self, size: usize, _eos: bool) -> Action {
        if size == 0 || self.mode != Mode::Rewrite {
            return Action::Continue;
        }
        self.up += size;
        let _ = hostcalls::increment_metric(self.ids.1, size as i64);
        self.set_upstream_data(0, 0, b"[wasm]");
        Action::Continue
    }

    fn on_log(&mut self) {
        log::info!(
            "tcp-rewrite: opened={} down={} up={}",
            self.opened,
            self.down,
            self.up
        );
    }
}
