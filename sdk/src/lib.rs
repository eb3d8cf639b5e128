//! # wasp-sdk: write wasp filters in Rust
//!
//! A filter is a type implementing [`Filter`]: typed hooks for the request
//! and the response, returning an [`Action`]. Its configuration is any serde
//! type, deserialized from the filter's `config = { ... }` in wasp.toml. One
//! macro, [`register!`], turns the crate into a Proxy-Wasm module. Build it
//! with `cargo build --target wasm32-wasip1 --release` and drop the `.wasm`
//! into the proxy's filters directory.
//!
//! ```
//! use std::rc::Rc;
//! use wasp_sdk::{Action, ConfigError, Filter, LocalResponse, Request, Root};
//!
//! #[derive(serde::Deserialize)]
//! struct Config { #[serde(default)] deny_prefix: Option<String> }
//!
//! struct Guard { cfg: Rc<Config> }
//!
//! impl Filter for Guard {
//!     type Config = Config;
//!     type State = Config;
//!     fn configure(cfg: Config, _: &mut Root) -> Result<Config, ConfigError> { Ok(cfg) }
//!     fn new(cfg: &Rc<Config>) -> Self { Guard { cfg: cfg.clone() } }
//!
//!     fn on_request_headers(&mut self, req: &mut Request) -> Action {
//!         match (&self.cfg.deny_prefix, req.path()) {
//!             (Some(p), Some(path)) if path.starts_with(p.as_str()) => {
//!                 LocalResponse::text(403, "forbidden\n").into()
//!             }
//!             _ => Action::Continue,
//!         }
//!     }
//! }
//!
//! wasp_sdk::register!(Guard);
//!
//! // And test it without a proxy:
//! use wasp_sdk::testing::{Harness, TestRequest};
//! let mut h = Harness::<Guard>::new().config_json(r#"{"deny_prefix": "/admin"}"#).build();
//! assert_eq!(h.run(TestRequest::get("/admin/x")).status(), 403);
//! assert_eq!(h.run(TestRequest::get("/shop")).status(), 200);
//! ```
//!
//! ## Map of the crate
//! * [`Filter`], [`Root`], [`NoConfig`]: the contract ([`filter`](crate::Filter) docs give the life cycle).
//! * [`Request`], [`Response`], [`Log`], [`Headers`]: what hooks see.
//! * [`Action`], [`LocalResponse`]: what hooks answer.
//! * [`props`]: properties (method, path, route, cluster, `wasp.*`).
//! * [`metrics`], [`shared`], [`callout`], [`time`], [`random`]: the rest of the ABI.
//! * [`trace!`], [`debug!`], [`info!`], [`warn!`], [`error!`]: logging ([`log`]).
//! * [`testing`] (not in `.wasm` builds): run a filter in ordinary `#[test]`s.
//!
//! The Proxy-Wasm ABI v0.2.1 is implemented here directly (no dependency on
//! the community `proxy-wasm` crate); modules built with this SDK run in any
//! Proxy-Wasm host as long as they use standard properties.
#![cfg_attr(not(target_arch = "wasm32"), forbid(unsafe_code))]
#![cfg_attr(target_arch = "wasm32", deny(unsafe_code))]
#![warn(missing_docs)]

mod abi;
mod action;
mod body;
pub mod callout;
mod error;
mod filter;
mod headers;
mod host;
mod http;
pub mod log;
pub mod metrics;
pub mod props;
pub mod random;
mod runtime;
pub mod shared;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
pub mod time;

pub use abi::Status;
pub use action::{Action, LocalResponse};
pub use callout::{Callout, CalloutId, CalloutResponse};
pub use error::{ConfigError, HostError};
pub use filter::{Filter, NoConfig, Root};
pub use headers::Headers;
pub use http::{Log, Request, Response};

/// Internals the macros expand to. Not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::runtime::{dispatcher, Dispatch};
}

/// Registers `Type` (a [`Filter`]) as this module's filter: one per crate.
///
/// In a `wasm32` build it defines the function the SDK's `proxy_on_*` exports
/// use to create the dispatcher. On the host target it only checks that the
/// type is a `Filter` (tests use [`testing::Harness`] directly).
///
/// ```
/// # use std::rc::Rc;
/// # struct Noop;
/// # impl wasp_sdk::Filter for Noop {
/// #     type Config = wasp_sdk::NoConfig;
/// #     type State = ();
/// #     fn configure(_: wasp_sdk::NoConfig, _: &mut wasp_sdk::Root) -> Result<(), wasp_sdk::ConfigError> { Ok(()) }
/// #     fn new(_: &Rc<()>) -> Self { Noop }
/// # }
/// wasp_sdk::register!(Noop);
/// ```
#[macro_export]
macro_rules! register {
    ($filter:ty) => {
        const _: () = {
            fn __wasp_sdk_assert_filter<F: $crate::Filter>() {}
            let _ = __wasp_sdk_assert_filter::<$filter>;
        };

        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        #[unsafe(no_mangle)]
        pub fn __wasp_sdk_create_dispatch() -> ::std::boxed::Box<dyn $crate::__private::Dispatch> {
            $crate::__private::dispatcher::<$filter>()
        }
    };
}
