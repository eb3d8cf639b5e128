//! Shared data (`proxy_get_shared_data` / `proxy_set_shared_data`): a
//! key/value store per filter name, shared by every VM of that filter on
//! every worker and surviving reloads, with compare-and-swap.
//!
//! Called from worker threads inside host calls; the store is a mutex-guarded
//! map (shared data is a cross-worker rendezvous, not a hot-path cache).
//! CAS values start at 1 and grow by one per write of a key; CAS 0 in a write
//! means "unconditional".

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use wasmtime::Caller;

use super::memory::{self, copy_out, HostResult};
use super::Status;
use crate::filter::host::Host;

/// The store of one filter.
#[derive(Debug, Default)]
pub(crate) struct SharedData {
    map: Mutex<HashMap<String, (Bytes, u32)>>,
}

impl SharedData {
    pub(crate) fn get(&self, key: &str) -> Option<(Bytes, u32)> {
        let g = self.map.lock().unwrap_or_else(|e| e.into_inner());
        g.get(key).cloned()
    }

    /// Writes `value` if `cas` is 0 or matches; `Err(())` on a CAS mismatch.
    pub(crate) fn set(&self, key: &str, value: Bytes, cas: u32) -> Result<(), ()> {
        let mut g = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match g.get_mut(key) {
            Some((v, current)) => {
                if cas != 0 && cas != *current {
                    return Err(());
                }
                *v = value;
                *current = current.wrapping_add(1).max(1);
            }
            None => {
                if cas != 0 {
                    return Err(());
                }
                g.insert(key.to_string(), (value, 1));
            }
        }
        Ok(())
    }
}

pub(crate) fn get(
    c: &mut Caller<'_, Host>,
    kp: i32,
    kl: i32,
    ptr_out: i32,
    len_out: i32,
    cas_out: i32,
) -> HostResult {
    let key = match memory::read_str(c, kp, kl) {
        Ok(k) => k,
        Err(s) => return Ok(s),
    };
    let Some((value, cas)) = c.data().plugin.shared.get(&key) else {
        return Ok(Status::NotFound);
    };
    if let Err(s) = memory::write_u32(c, cas_out, cas) {
        return Ok(s);
    }
    copy_out(c, &value, ptr_out, len_out)
}

pub(crate) fn set(
    c: &mut Caller<'_, Host>,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
    cas: i32,
) -> HostResult {
    let key = match memory::read_str(c, kp, kl) {
        Ok(k) => k,
        Err(s) => return Ok(s),
    };
    let value = match memory::read(c, vp, vl) {
        Ok(v) => Bytes::from(v),
        Err(s) => return Ok(s),
    };
    Ok(match c.data().plugin.shared.set(&key, value, cas as u32) {
        Ok(()) => Status::Ok,
        Err(()) => Status::CasMismatch,
    })
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn cas_semantics() {
        let s = SharedData::default();
        assert!(s.get("k").is_none());
        assert!(s.set("k", Bytes::from_static(b"1"), 7).is_err());
        s.set("k", Bytes::from_static(b"1"), 0).unwrap();
        let (_, cas) = s.get("k").unwrap();
        s.set("k", Bytes::from_static(b"2"), cas).unwrap();
        assert!(s.set("k", Bytes::from_static(b"3"), cas).is_err());
        assert_eq!(s.get("k").unwrap().0, Bytes::from_static(b"2"));
    }
}
