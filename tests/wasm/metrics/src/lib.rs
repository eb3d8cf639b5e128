//! Fixture: a counter, a gauge and a histogram defined at start-up; each
//! request increments the counter, sets the gauge to the path length and
//! records 42 in the histogram; `x-requests` carries the counter's value.
use proxy_wasm::hostcalls;
use proxy_wasm::traits::*;
use proxy_wasm::types::*;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { ids: None }) });
}}

#[derive(Clone, Copy)]
struct Ids {
    counter: u32,
    gauge: u32,
    histogram: u32,
}

struct Root {
    ids: Option<Ids>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        let counter =
            hostcalls::define_metric(MetricType::Counter, "fixture_requests_total").unwrap_or(0);
        let gauge =
            hostcalls::define_metric(MetricType::Gauge, "fixture.last-path-len").unwrap_or(0);
        let histogram =
            hostcalls::define_metric(MetricType::Histogram, "fixture_answer").unwrap_or(0);
        self.ids = Some(Ids {
            counter,
            gauge,
            histogram,
        });
        true
    }
    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        self.ids
            .map(|ids| Box::new(Http { ids }) as Box<dyn HttpContext>)
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    ids: Ids,
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let _ = hostcalls::increment_metric(self.ids.counter, 1);
        let len = self
            .get_http_request_header(":path")
            .unwrap_or_default()
            .len();
        let _ = hostcalls::record_metric(self.ids.gauge, len as u64);
        let _ = hostcalls::record_metric(self.ids.histogram, 42);
        Action::Continue
    }
    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let v = hostcalls::get_metric(self.ids.counter).unwrap_or(0);
        self.set_http_response_header("x-requests", Some(&v.to_string()));
        Action::Continue
    }
}
