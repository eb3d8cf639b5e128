//! `TestHost`: an in-memory [`Host`] that behaves like wasp for one VM and
//! records everything a filter does, for the harness to drive and assert on.
//!
//! It answers with the statuses a Proxy-Wasm host would (NOT_FOUND for a
//! missing header, BAD_ARGUMENT for a callout to an unknown cluster,
//! CAS_MISMATCH on a stale shared-data write), so filter error paths are
//! exercised too.

use super::{CalloutRecord, LocalReply, LogLine};
use crate::abi::{BufferType, MapType, MetricType, Status, StreamType};
use crate::callout::CalloutId;
use crate::host::{Host, Pairs};
use crate::log::Level;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

pub(crate) struct Metric {
    pub(crate) name: String,
    pub(crate) kind: MetricType,
    pub(crate) value: i64,
    pub(crate) samples: Vec<u64>,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) maps: HashMap<MapType, Pairs>,
    pub(crate) buffers: HashMap<BufferType, Vec<u8>>,
    pub(crate) plugin_props: HashMap<Vec<u8>, Vec<u8>>,
    pub(crate) stream_props: HashMap<Vec<u8>, Vec<u8>>,
    /// (dotted name, value) in the order the filter set them.
    pub(crate) props_set: Vec<(String, Vec<u8>)>,
    pub(crate) logs: Vec<LogLine>,
    pub(crate) metrics: Vec<Metric>,
    pub(crate) shared: HashMap<String, (Vec<u8>, u32)>,
    pub(crate) callouts: Vec<CalloutRecord>,
    pub(crate) next_token: u32,
    pub(crate) local: Option<LocalReply>,
    pub(crate) continued: Vec<StreamType>,
    pub(crate) tick_ms: u32,
    pub(crate) now_ns: u64,
    pub(crate) rng: u64,
    pub(crate) clusters: Option<BTreeSet<String>>,
}

pub(crate) struct TestHost {
    pub(crate) st: RefCell<State>,
}

impl TestHost {
    pub(crate) fn new(seed: u64, clusters: Option<BTreeSet<String>>) -> Self {
        Self {
            st: RefCell::new(State {
                now_ns: 1_750_000_000_000_000_000,
                rng: seed | 1,
                next_token: 1,
                clusters,
                ..State::default()
            }),
        }
    }
}

fn find(pairs: &Pairs, key: &str) -> Option<usize> {
    pairs.iter().position(|(k, _)| k.eq_ignore_ascii_case(key))
}

fn dotted(path: &[u8]) -> String {
    String::from_utf8_lossy(path).replace('\0', ".")
}

impl Host for TestHost {
    fn log(&self, level: Level, message: &str) {
        self.st.borrow_mut().logs.push(LogLine {
            level,
            message: message.to_string(),
        });
    }

    fn now_nanos(&self) -> u64 {
        self.st.borrow().now_ns
    }

    fn random_fill(&self, buf: &mut [u8]) {
        let mut st = self.st.borrow_mut();
        for chunk in buf.chunks_mut(8) {
            // xorshift64*: reproducible for a given seed.
            let mut x = st.rng;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            st.rng = x;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    fn set_tick_period_ms(&self, period: u32) -> Result<(), Status> {
        self.st.borrow_mut().tick_ms = period;
        Ok(())
    }

    fn buffer(&self, which: BufferType, start: usize, max: usize) -> Result<Vec<u8>, Status> {
        let st = self.st.borrow();
        let Some(buf) = st.buffers.get(&which) else {
            return Err(Status::NotFound);
        };
        let start = start.min(buf.len());
        let end = start.saturating_add(max).min(buf.len());
        Ok(buf[start..end].to_vec())
    }

    fn set_buffer(
        &self,
        which: BufferType,
        start: usize,
        size: usize,
        value: &[u8],
    ) -> Result<(), Status> {
        let mut st = self.st.borrow_mut();
        let Some(buf) = st.buffers.get_mut(&which) else {
            return Err(Status::NotFound);
        };
        let start = start.min(buf.len());
        let end = start.saturating_add(size).min(buf.len());
        buf.splice(start..end, value.iter().copied());
        Ok(())
    }

    fn map_pairs(&self, map: MapType) -> Result<Pairs, Status> {
        Ok(self.st.borrow().maps.get(&map).cloned().unwrap_or_default())
    }

    fn set_map_pairs(&self, map: MapType, pairs: &[(&str, &str)]) -> Result<(), Status> {
        let pairs = pairs
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect();
        self.st.borrow_mut().maps.insert(map, pairs);
        Ok(())
    }

    fn map_value(&self, map: MapType, key: &str) -> Result<Option<String>, Status> {
        let st = self.st.borrow();
        let Some(pairs) = st.maps.get(&map) else {
            return Ok(None);
        };
        Ok(find(pairs, key).map(|i| pairs[i].1.clone()))
    }

    fn replace_map_value(&self, map: MapType, key: &str, value: &str) -> Result<(), Status> {
        let mut st = self.st.borrow_mut();
        let pairs = st.maps.entry(map).or_default();
        match find(pairs, key) {
            Some(i) => {
                pairs[i].1 = value.to_string();
                let mut seen = false;
                pairs.retain(|(k, _)| {
                    if !k.eq_ignore_ascii_case(key) {
                        return true;
                    }
                    let keep = !seen;
                    seen = true;
                    keep
                });
            }
            None => pairs.push((key.to_ascii_lowercase(), value.to_string())),
        }
        Ok(())
    }

    fn add_map_value(&self, map: MapType, key: &str, value: &str) -> Result<(), Status> {
        let mut st = self.st.borrow_mut();
        st.maps
            .entry(map)
            .or_default()
            .push((key.to_ascii_lowercase(), value.to_string()));
        Ok(())
    }

    fn remove_map_value(&self, map: MapType, key: &str) -> Result<(), Status> {
        let mut st = self.st.borrow_mut();
        if let Some(pairs) = st.maps.get_mut(&map) {
            pairs.retain(|(k, _)| !k.eq_ignore_ascii_case(key));
        }
        Ok(())
    }

    fn property(&self, path: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        let st = self.st.borrow();
        Ok(st
            .stream_props
            .get(path)
            .or_else(|| st.plugin_props.get(path))
            .cloned())
    }

    fn set_property(&self, path: &[u8], value: &[u8]) -> Result<(), Status> {
        let mut st = self.st.borrow_mut();
        st.stream_props.insert(path.to_vec(), value.to_vec());
        st.props_set.push((dotted(path), value.to_vec()));
        Ok(())
    }

    fn send_local_response(
        &self,
        status: u32,
        details: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(), Status> {
        let mut st = self.st.borrow_mut();
        st.local = Some(LocalReply {
            status: u16::try_from(status).unwrap_or(u16::MAX),
            details: details.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_vec(),
        });
        Ok(())
    }

    fn continue_stream(&self, stream: StreamType) -> Result<(), Status> {
        self.st.borrow_mut().continued.push(stream);
        Ok(())
    }

    fn set_effective_context(&self, _context_id: u32) -> Result<(), Status> {
        Ok(())
    }

    fn http_call(
        &self,
        upstream: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        trailers: &[(&str, &str)],
        timeout_ms: u32,
    ) -> Result<u32, Status> {
        let mut st = self.st.borrow_mut();
        if let Some(known) = &st.clusters {
            if !known.contains(upstream) {
                return Err(Status::BadArgument);
            }
        }
        let has = |name: &str| headers.iter().any(|(k, _)| *k == name);
        if !(has(":method") && has(":path") && has(":authority")) {
            return Err(Status::BadArgument);
        }
        let token = st.next_token;
        st.next_token += 1;
        let own = |p: &[(&str, &str)]| -> Pairs {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        st.callouts.push(CalloutRecord {
            id: CalloutId(token),
            cluster: upstream.to_string(),
            headers: own(headers),
            body: body.to_vec(),
            trailers: own(trailers),
            timeout: Duration::from_millis(u64::from(timeout_ms)),
        });
        Ok(token)
    }

    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status> {
        let mut st = self.st.borrow_mut();
        if let Some(i) = st.metrics.iter().position(|m| m.name == name) {
            if st.metrics[i].kind != kind {
                return Err(Status::BadArgument);
            }
            return Ok(i as u32);
        }
        st.metrics.push(Metric {
            name: name.to_string(),
            kind,
            value: 0,
            samples: Vec::new(),
        });
        Ok((st.metrics.len() - 1) as u32)
    }

    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), Status> {
        let mut st = self.st.borrow_mut();
        let m = st.metrics.get_mut(id as usize).ok_or(Status::NotFound)?;
        match m.kind {
            MetricType::Counter if delta < 0 => Err(Status::BadArgument),
            MetricType::Histogram => Err(Status::BadArgument),
            _ => {
                m.value = m.value.saturating_add(delta);
                Ok(())
            }
        }
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        let mut st = self.st.borrow_mut();
        let m = st.metrics.get_mut(id as usize).ok_or(Status::NotFound)?;
        match m.kind {
            MetricType::Histogram => m.samples.push(value),
            _ => m.value = i64::try_from(value).unwrap_or(i64::MAX),
        }
        Ok(())
    }

    fn metric(&self, id: u32) -> Result<u64, Status> {
        let st = self.st.borrow();
        let m = st.metrics.get(id as usize).ok_or(Status::NotFound)?;
        match m.kind {
            MetricType::Histogram => Ok(m.samples.len() as u64),
            _ => Ok(m.value as u64),
        }
    }

    fn shared_data(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, Status> {
        Ok(self.st.borrow().shared.get(key).cloned())
    }

    fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        let mut st = self.st.borrow_mut();
        let current = st.shared.get(key).map_or(0, |(_, c)| *c);
        if cas != 0 && cas != current {
            return Err(Status::CasMismatch);
        }
        st.shared.insert(
            key.to_string(),
            (value.to_vec(), current.wrapping_add(1).max(1)),
        );
        Ok(())
    }
}
