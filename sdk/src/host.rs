//! The one seam between filter code and the proxy: the internal [`Host`] trait.
//!
//! Every helper in the SDK (headers, body, properties, metrics, ...) calls the
//! host through [`with`]. In a `.wasm` module that is the zero-sized
//! `WasmHost` over the `env.proxy_*` imports; on the host target it is whatever
//! [`crate::testing`] installed for the current thread, or a no-op host that
//! answers "not found" when nothing is installed (so doc examples run).
//!
//! The trait speaks Rust types (strings, slices, `Result<_, Status>`) and hides
//! pointers; it is object safe so the test host is a plain `Rc<dyn Host>`.
//! Invariant: a host never calls back into the guest from inside a method.

use crate::abi::{BufferType, MapType, MetricType, Status, StreamType};
use crate::log::Level;

/// Header pairs as the SDK hands them around.
pub(crate) type Pairs = Vec<(String, String)>;

/// What a filter can ask of the proxy. One method per ABI host function the
/// SDK uses; see `abi::imports` for the wasm implementation.
pub(crate) trait Host {
    fn log(&self, level: Level, message: &str);
    fn now_nanos(&self) -> u64;
    fn random_fill(&self, buf: &mut [u8]);
    fn set_tick_period_ms(&self, period: u32) -> Result<(), Status>;

    fn buffer(&self, which: BufferType, start: usize, max: usize) -> Result<Vec<u8>, Status>;
    fn set_buffer(
        &self,
        which: BufferType,
        start: usize,
        size: usize,
        value: &[u8],
    ) -> Result<(), Status>;

    fn map_pairs(&self, map: MapType) -> Result<Pairs, Status>;
    fn set_map_pairs(&self, map: MapType, pairs: &[(&str, &str)]) -> Result<(), Status>;
    fn map_value(&self, map: MapType, key: &str) -> Result<Option<String>, Status>;
    fn replace_map_value(&self, map: MapType, key: &str, value: &str) -> Result<(), Status>;
    fn add_map_value(&self, map: MapType, key: &str, value: &str) -> Result<(), Status>;
    fn remove_map_value(&self, map: MapType, key: &str) -> Result<(), Status>;

    fn property(&self, path: &[u8]) -> Result<Option<Vec<u8>>, Status>;
    fn set_property(&self, path: &[u8], value: &[u8]) -> Result<(), Status>;

    fn send_local_response(
        &self,
        status: u32,
        details: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(), Status>;
    fn continue_stream(&self, stream: StreamType) -> Result<(), Status>;
    fn set_effective_context(&self, context_id: u32) -> Result<(), Status>;

    fn http_call(
        &self,
        upstream: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        trailers: &[(&str, &str)],
        timeout_ms: u32,
    ) -> Result<u32, Status>;

    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status>;
    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), Status>;
    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status>;
    fn metric(&self, id: u32) -> Result<u64, Status>;

    /// Returns `(value, cas)`; `None` when the key does not exist.
    fn shared_data(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, Status>;
    fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status>;
}

/// Runs `f` with the current host.
#[cfg(target_arch = "wasm32")]
pub(crate) fn with<R>(f: impl FnOnce(&dyn Host) -> R) -> R {
    f(&crate::abi::imports::WasmHost)
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use native::*;

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    thread_local! {
        static CURRENT: RefCell<Option<Rc<dyn Host>>> = const { RefCell::new(None) };
    }

    /// Runs `f` with the host installed on this thread, or a no-op host.
    pub(crate) fn with<R>(f: impl FnOnce(&dyn Host) -> R) -> R {
        let current = CURRENT.with(|c| c.borrow().clone());
        match current {
            Some(h) => f(&*h),
            None => f(&NullHost),
        }
    }

    /// Installs `host` for this thread until the guard drops (then the
    /// previous host comes back, so harnesses may nest).
    pub(crate) fn enter(host: Rc<dyn Host>) -> HostGuard {
        let prev = CURRENT.with(|c| c.borrow_mut().replace(host));
        HostGuard { prev }
    }

    pub(crate) struct HostGuard {
        prev: Option<Rc<dyn Host>>,
    }

    impl Drop for HostGuard {
        fn drop(&mut self) {
            let prev = self.prev.take();
            CURRENT.with(|c| *c.borrow_mut() = prev);
        }
    }

    /// Answers everything with "nothing here"; writes are accepted and dropped.
    struct NullHost;

    impl Host for NullHost {
        fn log(&self, _: Level, _: &str) {}
        fn now_nanos(&self) -> u64 {
            0
        }
        fn random_fill(&self, buf: &mut [u8]) {
            buf.fill(0x5a);
        }
        fn set_tick_period_ms(&self, _: u32) -> Result<(), Status> {
            Ok(())
        }
        fn buffer(&self, _: BufferType, _: usize, _: usize) -> Result<Vec<u8>, Status> {
            Ok(Vec::new())
        }
        fn set_buffer(&self, _: BufferType, _: usize, _: usize, _: &[u8]) -> Result<(), Status> {
            Ok(())
        }
        fn map_pairs(&self, _: MapType) -> Result<Pairs, Status> {
            Ok(Vec::new())
        }
        fn set_map_pairs(&self, _: MapType, _: &[(&str, &str)]) -> Result<(), Status> {
            Ok(())
        }
        fn map_value(&self, _: MapType, _: &str) -> Result<Option<String>, Status> {
            Ok(None)
        }
        fn replace_map_value(&self, _: MapType, _: &str, _: &str) -> Result<(), Status> {
            Ok(())
        }
        fn add_map_value(&self, _: MapType, _: &str, _: &str) -> Result<(), Status> {
            Ok(())
        }
        fn remove_map_value(&self, _: MapType, _: &str) -> Result<(), Status> {
            Ok(())
        }
        fn property(&self, _: &[u8]) -> Result<Option<Vec<u8>>, Status> {
            Ok(None)
        }
        fn set_property(&self, _: &[u8], _: &[u8]) -> Result<(), Status> {
            Ok(())
        }
        fn send_local_response(
            &self,
            _: u32,
            _: &str,
            _: &[u8],
            _: &[(&str, &str)],
        ) -> Result<(), Status> {
            Ok(())
        }
        fn continue_stream(&self, _: StreamType) -> Result<(), Status> {
            Ok(())
        }
        fn set_effective_context(&self, _: u32) -> Result<(), Status> {
            Ok(())
        }
        fn http_call(
            &self,
            _: &str,
            _: &[(&str, &str)],
            _: &[u8],
            _: &[(&str, &str)],
            _: u32,
        ) -> Result<u32, Status> {
            Err(Status::BadArgument)
        }
        fn define_metric(&self, _: MetricType, _: &str) -> Result<u32, Status> {
            Ok(0)
        }
        fn increment_metric(&self, _: u32, _: i64) -> Result<(), Status> {
            Ok(())
        }
        fn record_metric(&self, _: u32, _: u64) -> Result<(), Status> {
            Ok(())
        }
        fn metric(&self, _: u32) -> Result<u64, Status> {
            Ok(0)
        }
        fn shared_data(&self, _: &str) -> Result<Option<(Vec<u8>, u32)>, Status> {
            Ok(None)
        }
        fn set_shared_data(&self, _: &str, _: &[u8], _: u32) -> Result<(), Status> {
            Ok(())
        }
    }
}
