//! Fixture: shared queues. The root context registers `jobs`; each request
//! enqueues its path (found with `resolve_shared_queue`); the root context
//! drains the queue in `on_queue_ready` and records what it saw in shared
//! data (`queue.seen`, `queue.last`), which responses carry as
//! `x-queue-seen` / `x-queue-last`.
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { queue: 0 }) });
}}

struct Root {
    queue: u32,
}

impl Context for Root {}

fn text(ctx: &dyn Context, key: &str) -> String {
    ctx.get_shared_data(key)
        .0
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default()
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        self.queue = self.register_shared_queue("jobs");
        true
    }
    fn on_queue_ready(&mut self, queue_id: u32) {
        if queue_id != self.queue {
            return;
        }
        while let Ok(Some(item)) = self.dequeue_shared_queue(queue_id) {
            let seen: u64 = text(self, "queue.seen").parse().unwrap_or(0);
            let _ =
                self.set_shared_data("queue.seen", Some((seen + 1).to_string().as_bytes()), None);
            let _ = self.set_shared_data("queue.last", Some(&item), None);
        }
    }
    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http;

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        match self.resolve_shared_queue("", "jobs") {
            Some(q) => {
                let _ = self.enqueue_shared_queue(q, Some(path.as_bytes()));
            }
            None => self.set_http_request_header("x-queue-missing", Some("1")),
        }
        if self.resolve_shared_queue("", "no-such-queue").is_none() {
            self.set_http_request_header("x-queue-unknown", Some("not-found"));
        }
        Action::Continue
    }
    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.set_http_response_header("x-queue-seen", Some(&text(self, "queue.seen")));
        self.set_http_response_header("x-queue-last", Some(&text(self, "queue.last")));
        Action::Continue
    }
}
