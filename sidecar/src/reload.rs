//! Live reload of the config file and keys directory.
//!
//! kubelet updates a mounted ConfigMap or Secret by writing a new timestamped directory and
//! renaming the `..data` symlink over the old one; editors and `cp` modify files in place. Both
//! show up as events in the watched directories. Events are debounced (a file written in place is
//! read once its writer closes it), the new config is loaded and validated, and swapped in
//! atomically only when valid; otherwise the last good config keeps serving, with the keys
//! directory's keys loaded again around it. A slow poll backs the watcher up in case an event is
//! missed; SIGHUP asks for a reload at once. Sources that could not be read (out of file
//! descriptors, an I/O error) are read again, at a growing interval, until they can be or they
//! change: an edit read then must not wait for the next one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::MetadataExt;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::{self, Snapshot, Sources};
use crate::proxy::Gateway;

/// Wait after the first event for the rest of a burst (kubelet writes several entries).
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Longest wait for the writer of a file written in place to close it.
const WRITE_WAIT: Duration = Duration::from_secs(5);
/// Re-check even without events.
const POLL: Duration = Duration::from_secs(5);
/// First wait before reading sources again that could not be read; doubled up to [`POLL`].
const UNREAD_RETRY: Duration = Duration::from_millis(500);

/// Installs `snap` as the serving config and publishes it.
pub fn install(gw: &Gateway, mut snap: Snapshot) {
    if let Some(old) = gw.snapshot.load_full() {
        snap.routing.keep_counters(&old.routing);
        snap.rate_limiter = old.rate_limiter.carried_over(snap.rate_limit.as_ref());
        // The same Redis: keep its client and connection (a reload is any change of the
        // gateway, a key rotation too).
        match (&snap.shared, &old.shared) {
            (Some(new), Some(kept)) if new.same_as(kept) => snap.shared = Some(kept.clone()),
            // The same Redis under another URL (a rotated password) takes the charges the old
            // client holds.
            (Some(new), Some(kept)) if new.take_over(kept, &gw.metrics) => {}
            // Another Redis, or none: the old client writes its charges to its own, at shutdown
            // too.
            (_, Some(kept)) => gw.former_redis.keep(kept),
            (_, None) => {}
        }
    }
    for w in &snap.warnings {
        tracing::warn!(warning = %w, "config");
    }
    gw.metrics.set_config(snap.hash(), &snap.gateway_label());
    tracing::info!(
        hash = snap.hash(),
        gateway = %snap.gateway_label(),
        keys = snap.keys.len(),
        tokens = snap.keys.token_count(),
        "config loaded"
    );
    let snap = Arc::new(snap);
    gw.snapshot.store(Some(snap.clone()));
    gw.sessions.reloaded(&snap);
}

/// Directories to watch for a set of sources.
fn watch_dirs(src: &Sources) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let parent = src
        .config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    dirs.push(parent.to_owned());
    if let Some(k) = &src.keys_dir
        && !dirs.contains(k)
    {
        dirs.push(k.clone());
    }
    dirs
}

/// What an event says of a source file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Change {
    /// Written in place, its writer not done with it yet.
    Writing,
    /// Changed and done with: closed after writing, created, renamed, removed.
    Settled,
}

/// The change an event makes; `None` for a file only opened or read (the gateway reading its
/// own sources, too: taken as a change, each load would cause the next).
fn change_of(kind: &notify::EventKind) -> Option<Change> {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(Change::Settled),
        EventKind::Access(_) => None,
        EventKind::Modify(ModifyKind::Data(_)) => Some(Change::Writing),
        _ => Some(Change::Settled),
    }
}

/// Watches the sources and reloads on change (or when `hangup` says so), forever.
pub async fn watch(gw: Arc<Gateway>, src: Sources, mut hangup: mpsc::UnboundedReceiver<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Change>();
    let relevant = src.clone();
    let mut watcher = match notify::recommended_watcher(
        move |res: notify::Result<notify::Event>| {
            let change = match &res {
                // Other files in the config's directory (a log file, say) must not cause reloads.
                Ok(ev)
                    if ev.paths.is_empty()
                        || ev.paths.iter().any(|p| is_source_path(&relevant, p)) =>
                {
                    change_of(&ev.kind)
                }
                Ok(_) => None,
                Err(_) => Some(Change::Settled),
            };
            if let Some(change) = change {
                let _ = tx.send(change);
            }
        },
    ) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, poll_secs = POLL.as_secs(), "file watching unavailable; polling only");
            None
        }
    };
    if let Some(w) = watcher.as_mut() {
        for dir in watch_dirs(&src) {
            if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; polling it");
            }
        }
    }
    let mut last_error: Option<String> = None;
    let mut last_signature = signature(&src);
    // The wait before reading the sources again, while they could not be read.
    let mut unread: Option<Duration> = None;
    // Without a watcher (or once it is gone) the channel is closed: the poll alone goes on.
    let mut events = watcher.is_some();
    let mut hangups = true;
    loop {
        tokio::select! {
            ev = rx.recv(), if events => {
                let Some(mut change) = ev else {
                    events = false;
                    continue;
                };
                // The rest of the burst; a file written in place, to its writer's close.
                let first = tokio::time::Instant::now();
                loop {
                    let left = WRITE_WAIT.saturating_sub(first.elapsed());
                    let quiet = if change == Change::Writing { left } else { DEBOUNCE.min(left) };
                    match tokio::time::timeout(quiet, rx.recv()).await {
                        Ok(Some(next)) => change = next,
                        Ok(None) => {
                            events = false;
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
            signal = hangup.recv(), if hangups => {
                if signal.is_none() {
                    hangups = false;
                    continue;
                }
                tracing::info!("SIGHUP: reloading the config and keys");
            }
            () = tokio::time::sleep(unread.unwrap_or(POLL)) => {
                // The poll only stats the files; it loads them when something changed, or when
                // the last load could not read them.
                if unread.is_none() && signature(&src) == last_signature {
                    continue;
                }
            }
        }
        last_signature = signature(&src);
        unread = match reload_once(&gw, &src, &mut last_error).await {
            Reloaded::Unread => Some(unread.map_or(UNREAD_RETRY, |wait| (wait * 2).min(POLL))),
            Reloaded::Done | Reloaded::Rejected => None,
        };
    }
}

/// Whether a changed path can affect the loaded config: the config file itself, kubelet's
/// `..data` bookkeeping, or anything in the keys directory.
fn is_source_path(src: &Sources, path: &Path) -> bool {
    let name_is_bookkeeping = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(".."));
    path == src.config
        || path.file_name() == src.config.file_name() && path.parent() == src.config.parent()
        || name_is_bookkeeping
        || src
            .keys_dir
            .as_deref()
            .is_some_and(|k| path.parent() == Some(k))
}

/// A cheap fingerprint of the sources' file metadata (size, mtime, inode of every file, and
/// kubelet's `..data` link target).
fn signature(src: &Sources) -> u64 {
    let mut h = DefaultHasher::new();
    let mut add = |path: &Path| {
        path.hash(&mut h);
        if let Ok(m) = std::fs::metadata(path) {
            (m.len(), m.mtime(), m.mtime_nsec(), m.ino()).hash(&mut h);
        }
        if let Ok(target) = std::fs::read_link(path) {
            target.hash(&mut h);
        }
    };
    add(&src.config);
    if let Some(dir) = &src.keys_dir {
        add(&dir.join("..data"));
        if let Ok(entries) = std::fs::read_dir(dir) {
            let mut paths: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            for p in paths {
                add(&p);
            }
        }
    }
    h.finish()
}

/// What a reload came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// Loaded (installed, or the same as what serves), or the sources are gone.
    Done,
    /// Refused: the sources are invalid, and stay so until they change.
    Rejected,
    /// The sources could not be read for a passing reason (out of file descriptors, an I/O
    /// error): worth reading again though they did not change.
    Unread,
}

/// Loads the sources once; installs them if valid and different from what serves.
pub async fn reload_once(gw: &Gateway, src: &Sources, last_error: &mut Option<String>) -> Reloaded {
    let src2 = src.clone();
    let loaded = match tokio::task::spawn_blocking(move || config::load(&src2)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "config loader crashed");
            return Reloaded::Rejected;
        }
    };
    match loaded {
        Ok(snap) => {
            *last_error = None;
            let current = gw.snapshot.load();
            if current
                .as_ref()
                .is_some_and(|c| c.fingerprint == snap.fingerprint)
            {
                tracing::debug!("config and keys read again: unchanged");
                // Valid again (a rejected edit undone, say): the gauges say so.
                gw.metrics.set_load_outcome(true);
                return Reloaded::Done;
            }
            gw.metrics.count_reload(true);
            install(gw, snap);
            Reloaded::Done
        }
        Err(e) => {
            let msg = e.to_string();
            let unread = e.is_passing();
            if removed(src) {
                // Not a bad edit but the gateway taken away: its keys must not serve on.
                if gw.snapshot.load().is_some() {
                    gw.snapshot.store(None);
                    gw.metrics.clear_config();
                    // Open WebSocket sessions hold the provider's credentials too.
                    gw.sessions.end_all();
                    gw.metrics.count_reload(false);
                    tracing::error!(
                        config = %src.config.display(),
                        "the config file is gone (and the keys directory, if any, is empty: the AIGateway was deleted?): the stored keys are dropped and requests are refused (503, code 2105) until a config comes back"
                    );
                }
                *last_error = Some(msg);
                return Reloaded::Done;
            }
            let kept = keys_around_last_good(gw, src).await;
            // The poll (or the retries of sources that could not be read) would repeat the
            // same failure every few seconds: say it once.
            if last_error.as_deref() != Some(msg.as_str()) || kept {
                gw.metrics.count_reload(false);
                match gw.snapshot.load().as_ref().map(|s| s.hash().to_owned()) {
                    Some(serving) if unread => {
                        tracing::error!(error = %msg, serving, "config reload rejected: the files could not be read; keeping the last good config, and reading them again until they can be");
                    }
                    Some(serving) => {
                        tracing::error!(error = %msg, serving, "config reload rejected; keeping the last good config");
                    }
                    None if unread => {
                        tracing::error!(error = %msg, serving = "nothing", "config reload rejected: the files could not be read; no config serves (503) until they can be, read again meanwhile");
                    }
                    None => {
                        tracing::error!(error = %msg, serving = "nothing", "config reload rejected; no config serves (503) until a valid one is read");
                    }
                }
                *last_error = Some(msg);
            }
            if unread {
                Reloaded::Unread
            } else {
                Reloaded::Rejected
            }
        }
    }
}

/// While the config file is refused, its keys directory still changes what is served: a rotated
/// key is sent, a revoked token refused. The keys are loaded again around the config that
/// serves (as the operator renders them around the policy it keeps) and installed when they
/// changed; true then.
async fn keys_around_last_good(gw: &Gateway, src: &Sources) -> bool {
    let Some(current) = gw.snapshot.load_full() else {
        return false;
    };
    let (src2, raw) = (src.clone(), current.raw.clone());
    let Ok(Ok(snap)) = tokio::task::spawn_blocking(move || config::load_with(&src2, raw)).await
    else {
        return false;
    };
    if snap.fingerprint == current.fingerprint {
        return false;
    }
    tracing::warn!(
        config = %src.config.display(),
        "the config file is refused (below); the keys directory's keys are applied around the last good config"
    );
    // No valid read for the metrics: the reload is counted once, as the refusal it is, and the
    // time of the last valid read stays.
    install(gw, snap);
    true
}

/// Whether the sources are gone rather than bad: no config file, and no key file in the keys
/// directory (kubelet empties both volumes when the AIGateway's ConfigMap and Secret are
/// deleted; its own `..` entries do not count).
fn removed(src: &Sources) -> bool {
    if src.config.try_exists().unwrap_or(true) {
        return false;
    }
    let Some(dir) = &src.keys_dir else {
        return true;
    };
    match std::fs::read_dir(dir) {
        Ok(entries) => !entries
            .flatten()
            .any(|e| !e.file_name().to_string_lossy().starts_with('.')),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_config_keys_and_kubelet_paths_trigger_reloads() {
        let src = Sources {
            config: PathBuf::from("/etc/sg/gateway.yaml"),
            keys_dir: Some(PathBuf::from("/etc/sg-keys")),
        };
        assert!(is_source_path(&src, Path::new("/etc/sg/gateway.yaml")));
        assert!(is_source_path(&src, Path::new("/etc/sg/..data")));
        assert!(is_source_path(
            &src,
            Path::new("/etc/sg/..2026_01_01_00_00_00.123")
        ));
        assert!(is_source_path(
            &src,
            Path::new("/etc/sg-keys/openai.default")
        ));
        assert!(!is_source_path(&src, Path::new("/etc/sg/sidegate.log")));
        assert!(!is_source_path(&src, Path::new("/etc/sg/gateway.yaml.swp")));
    }

    #[test]
    fn sources_are_removed_only_when_the_config_and_every_key_file_are_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).expect("keys dir");
        let src = Sources {
            config: dir.path().join("gateway.yaml"),
            keys_dir: Some(keys.clone()),
        };
        std::fs::write(&src.config, "schemaVersion: 1\n").expect("config");
        std::fs::write(keys.join("openai.default"), "sk-1").expect("key");
        assert!(!removed(&src), "both there");
        std::fs::remove_file(&src.config).expect("rm config");
        assert!(!removed(&src), "a key is still there");
        std::fs::remove_file(keys.join("openai.default")).expect("rm key");
        // kubelet's own entries of an emptied volume do not count.
        std::fs::create_dir(keys.join("..2026_11_27_04_00_00.1")).expect("stamp dir");
        std::fs::write(keys.join("..data"), "").expect("data entry");
        assert!(removed(&src), "config and keys gone");
        std::fs::remove_dir_all(&keys).expect("rm keys dir");
        assert!(removed(&src), "keys dir gone too");
        assert!(removed(&Sources {
            config: src.config.clone(),
            keys_dir: None
        }));
        std::fs::write(&src.config, "schemaVersion: 1\n").expect("config back");
        assert!(!removed(&src), "the config is back");
    }
}
