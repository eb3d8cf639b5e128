//! The dispatcher: turns the raw `proxy_on_*` callbacks into [`Filter`] calls.
//!
//! Owns the per-VM bookkeeping: root contexts (one per configured plugin
//! sharing this VM; normally one) with their built state, one filter value per
//! HTTP stream context, which side of a stream is paused, and which context
//! sent which callout. It is plain Rust over [`crate::host`], so the same code
//! runs in a VM (driven by `abi::exports`) and under [`crate::testing`].
//!
//! Invariants: never panics on unknown context ids (answers CONTINUE); a
//! `Respond` action sends the local response and answers PAUSE, as Envoy
//! filters do; a callout answer for a stream first makes that stream the
//! effective context.

use crate::abi::{BufferType, MapType, StreamType, ACTION_CONTINUE, ACTION_PAUSE};
use crate::callout::{self, CalloutId, CalloutResponse};
use crate::filter::{Filter, Root};
use crate::http::{Log, Request, Response};
use crate::{host, Action};
use std::collections::HashMap;
use std::rc::Rc;

/// Object-safe face of [`Runtime`], one method per callback.
#[doc(hidden)]
pub trait Dispatch {
    fn on_context_create(&mut self, context_id: u32, parent_id: u32);
    fn on_vm_start(&mut self, root_id: u32, vm_config_size: usize) -> bool;
    fn on_configure(&mut self, root_id: u32, config_size: usize) -> bool;
    fn on_tick(&mut self, root_id: u32);
    fn on_http_call_response(
        &mut self,
        root_id: u32,
        token: u32,
        num_headers: usize,
        body_size: usize,
        num_trailers: usize,
    );
    fn on_request_headers(&mut self, ctx: u32, num_headers: usize, eos: bool) -> u32;
    fn on_request_body(&mut self, ctx: u32, body_size: usize, eos: bool) -> u32;
    fn on_request_trailers(&mut self, ctx: u32, num_trailers: usize) -> u32;
    fn on_response_headers(&mut self, ctx: u32, num_headers: usize, eos: bool) -> u32;
    fn on_response_body(&mut self, ctx: u32, body_size: usize, eos: bool) -> u32;
    fn on_response_trailers(&mut self, ctx: u32, num_trailers: usize) -> u32;
    fn on_log(&mut self, ctx: u32);
    fn on_done(&mut self, ctx: u32) -> bool;
    fn on_delete(&mut self, ctx: u32);
}

/// Creates the dispatcher for `F` (used by `register!`).
#[doc(hidden)]
pub fn dispatcher<F: Filter>() -> Box<dyn Dispatch> {
    Box::new(Runtime::<F>::new())
}

struct Stream<F> {
    filter: F,
    paused: Option<StreamType>,
}

/// Who sent a callout.
#[derive(Clone, Copy)]
enum Owner {
    Root(u32),
    Stream(u32),
}

pub(crate) struct Runtime<F: Filter> {
    roots: HashMap<u32, Option<Rc<F::State>>>,
    streams: HashMap<u32, Stream<F>>,
    callouts: HashMap<u32, Owner>,
}

impl<F: Filter> Runtime<F> {
    pub(crate) fn new() -> Self {
        Self {
            roots: HashMap::new(),
            streams: HashMap::new(),
            callouts: HashMap::new(),
        }
    }

    fn claim_callouts(&mut self, owner: Owner) {
        for token in callout::take_sent() {
            self.callouts.insert(token, owner);
        }
    }

    fn state(&self, root_id: u32) -> Option<Rc<F::State>> {
        self.roots.get(&root_id).and_then(|s| s.clone())
    }

    /// Runs a stream hook and turns its action into the ABI answer.
    fn stream_hook(&mut self, ctx: u32, side: StreamType, f: impl FnOnce(&mut F) -> Action) -> u32 {
        let Some(stream) = self.streams.get_mut(&ctx) else {
            return ACTION_CONTINUE;
        };
        let action = f(&mut stream.filter);
        let code = apply(action, &mut stream.paused, side);
        self.claim_callouts(Owner::Stream(ctx));
        code
    }

    fn configure(&mut self, root_id: u32, config_size: usize) -> Result<(), String> {
        let raw = if config_size == 0 {
            Vec::new()
        } else {
            host::with(|h| h.buffer(BufferType::PluginConfiguration, 0, config_size))
                .map_err(|s| format!("cannot read the filter config: {s}"))?
        };
        let config = parse_config::<F::Config>(&raw)?;
        let mut root = Root::new(root_id);
        let state = F::configure(config, &mut root).map_err(|e| e.to_string())?;
        self.roots.insert(root_id, Some(Rc::new(state)));
        Ok(())
    }
}

/// Parses the JSON config; empty (or whitespace) means `{}`, then `null`.
pub(crate) fn parse_config<C: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<C, String> {
    if raw.iter().all(|b| b.is_ascii_whitespace()) {
        return match serde_json::from_slice::<C>(b"{}") {
            Ok(c) => Ok(c),
            Err(e) => serde_json::from_slice::<C>(b"null")
                .map_err(|_| format!("the filter needs a config: {e}")),
        };
    }
    serde_json::from_slice::<C>(raw).map_err(|e| format!("invalid filter config: {e}"))
}

fn apply(action: Action, paused: &mut Option<StreamType>, side: StreamType) -> u32 {
    match action {
        Action::Continue => {
            *paused = None;
            ACTION_CONTINUE
        }
        Action::Pause => {
            *paused = Some(side);
            ACTION_PAUSE
        }
        Action::Respond(r) => {
            *paused = None;
            if let Err(e) = r.send() {
                crate::error!("cannot send local response {}: {e}", r.status());
                return ACTION_CONTINUE;
            }
            ACTION_PAUSE
        }
    }
}

impl<F: Filter> Dispatch for Runtime<F> {
    fn on_context_create(&mut self, context_id: u32, parent_id: u32) {
        if parent_id == 0 {
            self.roots.entry(context_id).or_insert(None);
            return;
        }
        let Some(state) = self.state(parent_id) else {
            crate::error!("stream {context_id} created under unconfigured root {parent_id}");
            return;
        };
        let filter = F::new(&state);
        self.streams.insert(
            context_id,
            Stream {
                filter,
                paused: None,
            },
        );
    }

    fn on_vm_start(&mut self, _root_id: u32, _vm_config_size: usize) -> bool {
        true
    }

    fn on_configure(&mut self, root_id: u32, config_size: usize) -> bool {
        match self.configure(root_id, config_size) {
            Ok(()) => {
                self.claim_callouts(Owner::Root(root_id));
                true
            }
            Err(msg) => {
                crate::error!("{msg}");
                false
            }
        }
    }

    fn on_tick(&mut self, root_id: u32) {
        if let Some(state) = self.state(root_id) {
            F::on_tick(&state, &mut Root::new(root_id));
            self.claim_callouts(Owner::Root(root_id));
        }
    }

    fn on_http_call_response(
        &mut self,
        root_id: u32,
        token: u32,
        num_headers: usize,
        body_size: usize,
        num_trailers: usize,
    ) {
        let Some(owner) = self.callouts.remove(&token) else {
            crate::debug!("answer to unknown callout {token}");
            return;
        };
        let resp = read_callout_response(token, num_headers, body_size, num_trailers);
        match owner {
            Owner::Root(root) => {
                if let Some(state) = self.state(root) {
                    F::on_root_callout_response(&state, &mut Root::new(root), &resp);
                    self.claim_callouts(Owner::Root(root));
                }
            }
            Owner::Stream(ctx) => {
                let Some(stream) = self.streams.get_mut(&ctx) else {
                    return; // the stream ended meanwhile
                };
                let _ = host::with(|h| h.set_effective_context(ctx));
                let mut req = Request::new(false, 0);
                let action = stream.filter.on_callout_response(&resp, &mut req);
                let was_paused = stream.paused;
                match action {
                    Action::Continue => {
                        stream.paused = None;
                        if let Some(side) = was_paused {
                            let _ = host::with(|h| h.continue_stream(side));
                        }
                    }
                    Action::Pause => {}
                    Action::Respond(r) => {
                        stream.paused = None;
                        if let Err(e) = r.send() {
                            crate::error!("cannot send local response {}: {e}", r.status());
                        }
                    }
                }
                self.claim_callouts(Owner::Stream(ctx));
                let _ = host::with(|h| h.set_effective_context(root_id));
            }
        }
    }

    fn on_request_headers(&mut self, ctx: u32, _num_headers: usize, eos: bool) -> u32 {
        self.stream_hook(ctx, StreamType::Request, |f| {
            f.on_request_headers(&mut Request::new(eos, 0))
        })
    }

    fn on_request_body(&mut self, ctx: u32, body_size: usize, eos: bool) -> u32 {
        self.stream_hook(ctx, StreamType::Request, |f| {
            f.on_request_body(&mut Request::new(eos, body_size))
        })
    }

    fn on_request_trailers(&mut self, ctx: u32, _num_trailers: usize) -> u32 {
        self.stream_hook(ctx, StreamType::Request, |f| {
            f.on_request_trailers(&mut Request::new(true, 0))
        })
    }

    fn on_response_headers(&mut self, ctx: u32, _num_headers: usize, eos: bool) -> u32 {
        self.stream_hook(ctx, StreamType::Response, |f| {
            f.on_response_headers(&mut Response::new(eos, 0))
        })
    }

    fn on_response_body(&mut self, ctx: u32, body_size: usize, eos: bool) -> u32 {
        self.stream_hook(ctx, StreamType::Response, |f| {
            f.on_response_body(&mut Response::new(eos, body_size))
        })
    }

    fn on_response_trailers(&mut self, ctx: u32, _num_trailers: usize) -> u32 {
        self.stream_hook(ctx, StreamType::Response, |f| {
            f.on_response_trailers(&mut Response::new(true, 0))
        })
    }

    fn on_log(&mut self, ctx: u32) {
        if let Some(stream) = self.streams.get_mut(&ctx) {
            stream.filter.on_log(&Log::new());
        }
        self.claim_callouts(Owner::Stream(ctx));
    }

    fn on_done(&mut self, _ctx: u32) -> bool {
        true
    }

    fn on_delete(&mut self, ctx: u32) {
        if self.streams.remove(&ctx).is_some() {
            self.callouts
                .retain(|_, o| !matches!(o, Owner::Stream(c) if *c == ctx));
        } else {
            self.roots.remove(&ctx);
            self.callouts
                .retain(|_, o| !matches!(o, Owner::Root(c) if *c == ctx));
        }
    }
}

fn read_callout_response(
    token: u32,
    num_headers: usize,
    body_size: usize,
    num_trailers: usize,
) -> CalloutResponse {
    let headers = if num_headers == 0 {
        Vec::new()
    } else {
        host::with(|h| h.map_pairs(MapType::HttpCallResponseHeaders)).unwrap_or_default()
    };
    let body = if body_size == 0 {
        Vec::new()
    } else {
        host::with(|h| h.buffer(BufferType::HttpCallResponseBody, 0, body_size)).unwrap_or_default()
    };
    let trailers = if num_trailers == 0 {
        Vec::new()
    } else {
        host::with(|h| h.map_pairs(MapType::HttpCallResponseTrailers)).unwrap_or_default()
    };
    CalloutResponse {
        id: CalloutId(token),
        headers,
        body,
        trailers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Cfg {
        #[serde(default)]
        n: u32,
    }

    #[test]
    fn empty_config_is_an_empty_object() {
        assert_eq!(parse_config::<Cfg>(b"").unwrap(), Cfg { n: 0 });
        assert_eq!(parse_config::<Cfg>(b"  \n").unwrap(), Cfg { n: 0 });
        parse_config::<()>(b"").unwrap();
        parse_config::<crate::NoConfig>(b"").unwrap();
    }

    #[test]
    fn config_errors_name_the_problem() {
        let e = parse_config::<Cfg>(br#"{"n": "x"}"#).unwrap_err();
        assert!(e.starts_with("invalid filter config:"), "{e}");
        assert!(e.contains("line 1"), "{e}");
    }
}
