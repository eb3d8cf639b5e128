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
use super::{note_limit, Status};
use crate::filter::host::Host;
use crate::filter::metrics::Limit;
use crate::filter::HostLimits;

/// The store of one filter.
#[derive(Debug, Default)]
pub(crate) struct SharedData {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, (Bytes, u32)>,
    /// Keys plus values, in bytes.
    bytes: usize,
}

/// Why a write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SetError {
    CasMismatch,
    Limit(Limit),
}

impl SharedData {
    pub(crate) fn get(&self, key: &str) -> Option<(Bytes, u32)> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.map.get(key).cloned()
    }

    /// Writes `value` if `cas` is 0 or matches, within `limits.shared_data`
    /// (bytes) and `limits.shared_data_keys`. A write that does not grow
    /// the store is always allowed (so a store over lowered limits can
    /// still shrink).
    pub(crate) fn set(
        &self,
        key: &str,
        value: Bytes,
        cas: u32,
        limits: &HostLimits,
    ) -> Result<(), SetError> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Inner { map, bytes } = &mut *g;
        match map.get_mut(key) {
            Some((v, current)) => {
                if cas != 0 && cas != *current {
                    return Err(SetError::CasMismatch);
                }
                let after = bytes.saturating_sub(v.len()).saturating_add(value.len());
                if after > limits.shared_data && value.len() > v.len() {
                    return Err(SetError::Limit(Limit::SharedData));
                }
                *bytes = after;
                *v = value;
                *current = current.wrapping_add(1).max(1);
            }
            None => {
                if cas != 0 {
                    return Err(SetError::CasMismatch);
                }
                if map.len() >= limits.shared_data_keys {
                    return Err(SetError::Limit(Limit::SharedDataKeys));
                }
                let after = bytes.saturating_add(key.len()).saturating_add(value.len());
                if after > limits.shared_data {
                    return Err(SetError::Limit(Limit::SharedData));
                }
                *bytes = after;
                map.insert(key.to_string(), (value, 1));
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
    let max = c.data().plugin.limits.shared_data;
    let key = match memory::read_at_most(c, kp, kl, max) {
        Ok(Some(k)) => String::from_utf8_lossy(&k).into_owned(),
        Ok(None) => return Ok(Status::NotFound),
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

/// `proxy_set_shared_data`. Over a limit the guest gets CAS_MISMATCH (the
/// only refusal the Rust SDK accepts here); nothing past the limit is
/// copied out of guest memory.
pub(crate) fn set(
    c: &mut Caller<'_, Host>,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
    cas: i32,
) -> HostResult {
    let limits = c.data().plugin.limits.clone();
    let read = (|| {
        Ok::<_, Status>((
            memory::read_at_most(c, kp, kl, limits.shared_data)?,
            memory::read_at_most(c, vp, vl, limits.shared_data)?,
        ))
    })();
    let (key, value) = match read {
        Ok((Some(k), Some(v))) => (String::from_utf8_lossy(&k).into_owned(), Bytes::from(v)),
        Ok(_) => {
            let detail = format!(
                "a shared data entry of {} bytes (limit {} bytes)",
                (kl as u32 as u64).saturating_add(u64::from(vl as u32)),
                limits.shared_data
            );
            note_limit(c, Limit::SharedData, &detail);
            return Ok(Status::CasMismatch);
        }
        Err(s) => return Ok(s),
    };
    let plugin = c.data().plugin.clone();
    Ok(match plugin.shared.set(&key, value, cas as u32, &limits) {
        Ok(()) => Status::Ok,
        Err(SetError::CasMismatch) => Status::CasMismatch,
        Err(SetError::Limit(limit)) => {
            let detail = match limit {
                Limit::SharedDataKeys => {
                    format!("more than {} shared data keys", limits.shared_data_keys)
                }
                _ => format!("shared data past {} bytes", limits.shared_data),
            };
            note_limit(c, limit, &detail);
            Status::CasMismatch
        }
    })
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn cas_semantics() {
        let s = SharedData::default();
        let l = HostLimits::default();
        assert!(s.get("k").is_none());
        assert!(s.set("k", Bytes::from_static(b"1"), 7, &l).is_err());
        s.set("k", Bytes::from_static(b"1"), 0, &l).unwrap();
        let (_, cas) = s.get("k").unwrap();
        s.set("k", Bytes::from_static(b"2"), cas, &l).unwrap();
        assert!(s.set("k", Bytes::from_static(b"3"), cas, &l).is_err());
        assert_eq!(s.get("k").unwrap().0, Bytes::from_static(b"2"));
    }

    #[test]
    fn bytes_and_keys_are_capped_and_a_full_store_can_shrink() {
        let s = SharedData::default();
        let l = HostLimits {
            shared_data: 10,
            shared_data_keys: 2,
            ..HostLimits::default()
        };
        let v = |n: usize| Bytes::from(vec![b'x'; n]);
        s.set("a", v(4), 0, &l).unwrap();
        assert_eq!(
            s.set("b", v(6), 0, &l),
            Err(SetError::Limit(Limit::SharedData))
        );
        s.set("b", v(2), 0, &l).unwrap();
        assert_eq!(
            s.set("c", v(0), 0, &l),
            Err(SetError::Limit(Limit::SharedDataKeys))
        );
        assert_eq!(
            s.set("a", v(7), 0, &l),
            Err(SetError::Limit(Limit::SharedData))
        );
        s.set("a", v(5), 0, &l).unwrap();
        let tight = HostLimits {
            shared_data: 1,
            ..l
        };
        s.set("a", v(1), 0, &tight).unwrap();
    }
}
