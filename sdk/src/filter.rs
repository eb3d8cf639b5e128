//! The user contract: the [`Filter`] trait and the [`Root`] handle for
//! plugin-wide work (timers).
//!
//! Life cycle, as the proxy drives it (each worker has its own VM, so all of
//! this happens once per worker):
//!
//! 1. `proxy_on_configure`: the JSON config is deserialized into
//!    [`Filter::Config`] and handed to [`Filter::configure`], which builds the
//!    plugin-wide [`Filter::State`] (define metrics here). Any error rejects
//!    the filter with its message.
//! 2. Per HTTP stream: [`Filter::new`] creates one value of your type, then
//!    the request hooks, the response hooks, and [`Filter::on_log`] run on it,
//!    and it is dropped.
//! 3. Timers and root callouts run [`Filter::on_tick`] and
//!    [`Filter::on_root_callout_response`] with the state.

use crate::callout::CalloutResponse;
use crate::http::{Log, Request, Response};
use crate::{Action, ConfigError, HostError};
use serde::de::DeserializeOwned;
use std::rc::Rc;
use std::time::Duration;

/// A wasp filter. Implement the hooks you need (all default to
/// `Continue`/no-op) and register the type with [`register!`](crate::register).
///
/// ```
/// use std::rc::Rc;
/// use wasp_sdk::{Action, ConfigError, Filter, Request, Root};
///
/// #[derive(serde::Deserialize)]
/// struct Config { header: String, value: String }
///
/// struct AddHeader { cfg: Rc<Config> }
///
/// impl Filter for AddHeader {
///     type Config = Config;
///     type State = Config;
///
///     fn configure(cfg: Config, _root: &mut Root) -> Result<Config, ConfigError> {
///         if cfg.header.is_empty() {
///             return Err("header must not be empty".into());
///         }
///         Ok(cfg)
///     }
///
///     fn new(state: &Rc<Config>) -> Self {
///         AddHeader { cfg: state.clone() }
///     }
///
///     fn on_request_headers(&mut self, req: &mut Request) -> Action {
///         req.set_header(&self.cfg.header, &self.cfg.value);
///         Action::Continue
///     }
/// }
///
/// wasp_sdk::register!(AddHeader);
/// ```
pub trait Filter: Sized + 'static {
    /// The filter's configuration, deserialized with serde from the
    /// `config = { ... }` table of the filter in wasp.toml (passed as JSON).
    /// A missing config is `{}` (so `#[serde(default)]` fields work); use
    /// [`NoConfig`](crate::NoConfig) when there is none.
    type Config: DeserializeOwned + 'static;

    /// Plugin-wide state built once per configure and shared by every
    /// stream (often just `Config`, or a struct holding it and metric
    /// handles). Use `Cell`/`RefCell` inside for anything that changes.
    type State: 'static;

    /// Validates the config and builds the state. An `Err` rejects the filter:
    /// the message is logged at error level and the proxy refuses to load it.
    fn configure(config: Self::Config, root: &mut Root) -> Result<Self::State, ConfigError>;

    /// Creates the filter for one HTTP stream.
    fn new(state: &Rc<Self::State>) -> Self;

    /// Request headers arrived (`req.end_of_stream()` when there is no body).
    fn on_request_headers(&mut self, req: &mut Request) -> Action {
        let _ = req;
        Action::Continue
    }

    /// A request body chunk arrived; `Pause` until `end_of_stream()` to
    /// buffer the whole body.
    fn on_request_body(&mut self, req: &mut Request) -> Action {
        let _ = req;
        Action::Continue
    }

    /// Request trailers arrived (`req.trailers()`).
    fn on_request_trailers(&mut self, req: &mut Request) -> Action {
        let _ = req;
        Action::Continue
    }

    /// Response headers arrived.
    fn on_response_headers(&mut self, resp: &mut Response) -> Action {
        let _ = resp;
        Action::Continue
    }

    /// A response body chunk arrived.
    fn on_response_body(&mut self, resp: &mut Response) -> Action {
        let _ = resp;
        Action::Continue
    }

    /// Response trailers arrived.
    fn on_response_trailers(&mut self, resp: &mut Response) -> Action {
        let _ = resp;
        Action::Continue
    }

    /// The stream is over (also after a local response or a reset): write
    /// access logs, record metrics.
    fn on_log(&mut self, log: &Log) {
        let _ = log;
    }

    /// The answer to a callout this stream sent. Return `Continue` to resume
    /// the paused stream, `Respond(..)` to reject it, `Pause` to keep waiting
    /// (e.g. for another callout).
    fn on_callout_response(&mut self, resp: &CalloutResponse, req: &mut Request) -> Action {
        let _ = (resp, req);
        Action::Continue
    }

    /// Timer tick (after [`Root::set_tick_period`]).
    fn on_tick(state: &Rc<Self::State>, root: &mut Root) {
        let _ = (state, root);
    }

    /// The answer to a callout sent outside any stream (e.g. from `on_tick`).
    fn on_root_callout_response(state: &Rc<Self::State>, root: &mut Root, resp: &CalloutResponse) {
        let _ = (state, root, resp);
    }
}

/// A config type for filters without configuration: accepts anything.
///
/// ```
/// let _: wasp_sdk::NoConfig = serde_json::from_str(r#"{"ignored": 1}"#).unwrap();
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoConfig;

impl<'de> serde::Deserialize<'de> for NoConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| NoConfig)
    }
}

/// The plugin (root) context: what a filter can do outside any stream.
#[derive(Debug)]
pub struct Root {
    context_id: u32,
}

impl Root {
    pub(crate) fn new(context_id: u32) -> Self {
        Self { context_id }
    }

    /// The root context id (for diagnostics).
    pub fn context_id(&self) -> u32 {
        self.context_id
    }

    /// Calls [`Filter::on_tick`] every `period` (zero stops the timer).
    ///
    /// ```
    /// # let mut root = wasp_sdk::Root::new_for_docs();
    /// root.set_tick_period(std::time::Duration::from_secs(5)).unwrap();
    /// ```
    pub fn set_tick_period(&mut self, period: Duration) -> Result<(), HostError> {
        let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
        crate::host::with(|h| h.set_tick_period_ms(ms))
            .map_err(|s| HostError::new("proxy_set_tick_period_milliseconds", s))
    }

    /// This filter's name in wasp.toml (`plugin_name`).
    pub fn plugin_name(&self) -> Option<String> {
        crate::props::get_string(crate::props::PLUGIN_NAME)
    }

    #[doc(hidden)]
    pub fn new_for_docs() -> Self {
        Self::new(1)
    }
}
