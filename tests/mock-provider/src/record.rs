//! Recording of received requests, served back by `GET /__mock/requests`.
//!
//! The hot path only moves the already-parsed request parts (and a reference-counted
//! body) into a ring buffer; turning them into JSON happens when a test asks.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use http::{HeaderMap, Method, Uri};
use serde::ser::{Serialize, SerializeMap, SerializeStruct, Serializer};

/// How many requests are kept; older ones are dropped first.
pub const CAPACITY: usize = 1000;

/// One received request, as seen on the wire.
pub struct Record {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Ring buffer of the last [`CAPACITY`] requests.
pub struct Recorder {
    records: Mutex<VecDeque<Record>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            records: Mutex::new(VecDeque::with_capacity(64)),
        }
    }

    pub fn push(&self, record: Record) {
        let evicted = {
            let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
            let evicted = if records.len() >= CAPACITY {
                records.pop_front()
            } else {
                None
            };
            records.push_back(record);
            evicted
        };
        // Freed outside the lock.
        drop(evicted);
    }

    /// JSON array of the records, oldest first.
    pub fn to_json(&self) -> Vec<u8> {
        let records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let mut buf = Vec::with_capacity(256 * records.len() + 2);
        crate::body::write_json(&mut buf, &*records);
        buf
    }

    /// Forgets every record; returns how many there were.
    pub fn clear(&self) -> usize {
        let old = {
            let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
            std::mem::take(&mut *records)
        };
        old.len()
    }
}

impl Serialize for Record {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Record", 5)?;
        s.serialize_field("method", self.method.as_str())?;
        s.serialize_field("path", self.uri.path())?;
        s.serialize_field("query", &self.uri.query())?;
        s.serialize_field("headers", &Headers(&self.headers))?;
        s.serialize_field("body", &String::from_utf8_lossy(&self.body))?;
        s.end()
    }
}

/// Headers as an object: lowercase name → value, repeated values joined with ", ".
struct Headers<'a>(&'a HeaderMap);

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.keys_len()))?;
        for name in self.0.keys() {
            let mut joined = String::new();
            for (i, value) in self.0.get_all(name).iter().enumerate() {
                if i > 0 {
                    joined.push_str(", ");
                }
                joined.push_str(&String::from_utf8_lossy(value.as_bytes()));
            }
            map.serialize_entry(name.as_str(), &joined)?;
        }
        map.end()
    }
}
