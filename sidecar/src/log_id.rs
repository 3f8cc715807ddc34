//! Request ids for `cf-aig-log-id` and the request log: ULIDs (26 characters, Crockford base32,
//! time-ordered), so they sort by time like Cloudflare's log ids.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

static SEED: OnceLock<u64> = OnceLock::new();
static COUNTER: AtomicU64 = AtomicU64::new(0);

tokio::task_local! {
    /// The log id of the request being served: its access line, its `cf-aig-log-id` and every
    /// process line about it (a guardrail's flag, a retry) name the same one.
    static REQUEST: Arc<str>;
}

/// `serve` run as the request with log id `id`: [`for_request`] and [`current`] return it.
/// Not an `async fn`: a request's future is large, and one more layer around it would copy it
/// whole when first polled.
pub fn scope<F: Future>(id: Arc<str>, serve: F) -> impl Future<Output = F::Output> {
    REQUEST.scope(id, serve)
}

/// The log id of the request being served, for a process line about it; `None` outside one.
pub fn current() -> Option<Arc<str>> {
    REQUEST.try_with(Arc::clone).ok()
}

/// The log id of the request being served, or a new one outside a request's [`scope`].
pub fn for_request() -> String {
    current().map_or_else(next, |id| id.to_string())
}

/// A new id, unique within the process and very likely across processes.
pub fn next() -> String {
    as_str(&new_id()).to_owned()
}

/// [`next`], shared: the request's own, which its lines and its record name.
pub fn next_shared() -> Arc<str> {
    Arc::from(as_str(&new_id()))
}

fn new_id() -> [u8; 26] {
    let seed = *SEED.get_or_init(|| {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    });
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        & ((1 << 48) - 1);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // 80 random-looking bits: 16 from the seed, 64 from the seed-mixed counter.
    let mixed = (n ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let value: u128 = (u128::from(ms) << 80) | (u128::from(seed as u16) << 64) | u128::from(mixed);
    encode(value)
}

fn encode(mut v: u128) -> [u8; 26] {
    let mut out = [0u8; 26];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(v & 31) as usize];
        v >>= 5;
    }
    out
}

/// The alphabet is ASCII, so this never falls back.
fn as_str(id: &[u8; 26]) -> &str {
    std::str::from_utf8(id).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_26_crockford_chars_and_distinct() {
        let a = next();
        let b = next();
        assert_eq!(a.len(), 26);
        assert!(a.bytes().all(|c| ALPHABET.contains(&c)));
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn a_request_scope_names_one_id_for_all_its_lines() {
        assert_eq!(current(), None);
        let id: Arc<str> = Arc::from(next());
        let (seen, minted) = scope(id.clone(), async { (current(), for_request()) }).await;
        assert_eq!(seen.as_deref(), Some(&*id));
        assert_eq!(minted, *id);
        // Outside a request, each asks for a new one.
        assert_ne!(for_request(), *id);
    }

    #[test]
    fn encoding_is_big_endian_base32() {
        assert_eq!(as_str(&encode(0)), "00000000000000000000000000");
        assert_eq!(as_str(&encode(31)), "0000000000000000000000000Z");
        assert_eq!(as_str(&encode(32)), "00000000000000000000000010");
    }
}
