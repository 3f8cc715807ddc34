//! Live reload of the config file and keys directory.
//!
//! kubelet updates a mounted ConfigMap or Secret by writing a new timestamped directory and
//! renaming the `..data` symlink over the old one; editors and `cp` modify files in place. Both
//! show up as events in the watched directories, which follow the sources' paths (a keys
//! directory replaced, or its link re-pointed, is watched again). Events are debounced (a file
//! written in place is read once its writer closes it), the new config is loaded and validated,
//! and swapped in atomically only when valid; otherwise the last good config keeps serving, with
//! the keys directory's keys loaded again around it. A slow poll backs the watcher up in case an
//! event is missed (and stands in for it when there is none, reading a file written in place
//! once it stood still, as it cannot see its writer close it); SIGHUP asks for a reload at once. Sources that could not be read (out
//! of file descriptors, an I/O error) are read again, at a growing interval, until they can be
//! or they change: an edit read then must not wait for the next one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::os::unix::fs::MetadataExt;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::{self, Snapshot, Sources};
use crate::proxy::Gateway;

/// Wait after the first event for the rest of a burst (kubelet writes several entries).
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Longest wait for the writer of a file written in place to close it.
const WRITE_WAIT: Duration = Duration::from_secs(5);
/// Re-check even without events.
const POLL: Duration = Duration::from_secs(5);
/// Polls in a row that must find a file written in place unchanged before the poll alone reads
/// it: it cannot see the writer close it, only that the file stood still (at least 10 s).
const STILL_POLLS: u32 = 2;
/// First wait before reading sources again that could not be read; doubled up to [`POLL`].
const UNREAD_RETRY: Duration = Duration::from_millis(500);

/// Installs `snap` as the serving config and publishes it.
pub fn install(gw: &Gateway, mut snap: Snapshot) {
    if let Some(old) = gw.snapshot.load_full() {
        snap.routing.keep_counters(&old.routing);
        snap.providers.keep_tokens(&old.providers);
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

/// The paths whose events can change the loaded config, as the watcher's callback filters them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SourcePaths {
    config: PathBuf,
    /// The file the config path leads to when it is a link into another directory (watched
    /// too): a write there is a write of the config.
    config_target: Option<PathBuf>,
    keys_dir: Option<PathBuf>,
}

impl SourcePaths {
    fn of(src: &Sources) -> Self {
        Self {
            config: src.config.clone(),
            config_target: None,
            keys_dir: src.keys_dir.clone(),
        }
    }

    /// Whether a changed path can affect the loaded config: the config file (or the file it
    /// links to), kubelet's `..data` bookkeeping, anything in the keys directory, or the keys
    /// directory itself replaced in its parent (renamed over, a link re-pointed).
    fn contains(&self, path: &Path) -> bool {
        let name_is_bookkeeping = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".."));
        path == self.config
            || path.file_name() == self.config.file_name() && path.parent() == self.config.parent()
            || self.config_target.as_deref() == Some(path)
            || name_is_bookkeeping
            || self
                .keys_dir
                .as_deref()
                .is_some_and(|k| path.parent() == Some(k) || path == k)
    }
}

/// The device and inode a path leads to (following links).
type Identity = (u64, u64);

fn identity(path: &Path) -> Option<Identity> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The directories to watch for `src` now, each with the directory it leads to, and the paths
/// their events are filtered by: the config file's directory; the keys directory, and its
/// parent (where it is replaced); and the directory of the file the config links to, when
/// that is another one than kubelet's `..data` of the config's own directory. A directory two
/// paths lead to is watched once; one that is not there is not watched (its parent's events
/// say when it comes).
fn wanted(src: &Sources) -> (SourcePaths, Vec<(PathBuf, Identity)>) {
    let parent_of = |p: &Path| {
        p.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned()
    };
    let mut paths = SourcePaths::of(src);
    let config_dir = parent_of(&src.config);
    let mut candidates = vec![config_dir.clone()];
    if let Some(k) = &src.keys_dir {
        candidates.push(k.clone());
        candidates.push(parent_of(k));
    }
    if let (Ok(target), Ok(dir)) = (
        std::fs::canonicalize(&src.config),
        std::fs::canonicalize(&config_dir),
    ) && let Some(target_dir) = target.parent()
        && target_dir != dir
        && !(target_dir.parent() == Some(&dir)
            && target_dir
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("..")))
    {
        candidates.push(target_dir.to_owned());
        paths.config_target = Some(target);
    }
    let mut dirs: Vec<(PathBuf, Identity)> = Vec::new();
    for path in candidates {
        if let Some(id) = identity(&path)
            && !dirs.iter().any(|(p, i)| *p == path || *i == id)
        {
            dirs.push((path, id));
        }
    }
    (paths, dirs)
}

/// The watched directories, kept to what the sources' paths lead to: a keys directory replaced
/// (renamed over, or its link re-pointed as git-sync and secret agents do) is watched again,
/// as the old one was.
struct Watches {
    watcher: notify::RecommendedWatcher,
    /// Each watched path and the directory it led to when its watch was added.
    dirs: Vec<(PathBuf, Identity)>,
    /// What the callback filters events by.
    filter: Arc<ArcSwap<SourcePaths>>,
    /// Paths whose watch failed, said once.
    failed: Vec<PathBuf>,
}

impl Watches {
    /// Drops the watches of directories an event says were replaced, removed or renamed (the
    /// keys directory's own name in its parent): [`Watches::refresh`] watches what their paths
    /// lead to now, though a new directory may reuse the old one's inode.
    fn forget(&mut self, changed: &[PathBuf]) {
        let watcher = &mut self.watcher;
        self.dirs.retain(|(path, _)| {
            let keep = !changed.contains(path);
            if !keep {
                let _ = watcher.unwatch(path);
            }
            keep
        });
    }

    /// Watches what `src` needs now; a path that leads elsewhere than when it was watched is
    /// watched again.
    fn refresh(&mut self, src: &Sources) {
        let (paths, wanted) = wanted(src);
        if **self.filter.load() != paths {
            self.filter.store(Arc::new(paths));
        }
        let watcher = &mut self.watcher;
        self.dirs.retain(|kept| {
            let keep = wanted.contains(kept);
            if !keep {
                // Gone already when its directory was removed.
                let _ = watcher.unwatch(&kept.0);
            }
            keep
        });
        for (path, id) in wanted {
            if self.dirs.iter().any(|(p, _)| *p == path) {
                continue;
            }
            match self.watcher.watch(&path, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.failed.retain(|p| *p != path);
                    self.dirs.push((path, id));
                }
                Err(e) => {
                    if !self.failed.contains(&path) {
                        tracing::warn!(dir = %path.display(), error = %e, "cannot watch directory; polling it");
                        self.failed.push(path);
                    }
                }
            }
        }
    }
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

/// A change of the sources as the watcher reports it.
struct Seen {
    change: Change,
    /// The source paths it is about (none: the watcher's own error, worth a reload).
    paths: Vec<PathBuf>,
}

/// A burst of events being waited out: kubelet writes several entries, and a file written in
/// place is read once its writer closes it.
struct Burst {
    first: Instant,
    last: Instant,
    /// Files written in place whose writers have not closed them yet.
    writing: Vec<PathBuf>,
}

impl Burst {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            first: now,
            last: now,
            writing: Vec::new(),
        }
    }

    fn add(&mut self, seen: Seen) {
        self.last = Instant::now();
        for path in seen.paths {
            self.writing.retain(|p| *p != path);
            if seen.change == Change::Writing {
                self.writing.push(path);
            }
        }
    }

    /// When the burst is over: once every writer closed its file and no event came for
    /// [`DEBOUNCE`], at most [`WRITE_WAIT`] after it began.
    fn end(&self) -> Instant {
        let cap = self.first + WRITE_WAIT;
        if self.writing.is_empty() {
            (self.last + DEBOUNCE).min(cap)
        } else {
            cap
        }
    }
}

/// Watches the sources and reloads on change (or when `hangup` says so), forever.
pub async fn watch(gw: Arc<Gateway>, src: Sources, mut hangup: mpsc::UnboundedReceiver<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Seen>();
    let filter = Arc::new(ArcSwap::from_pointee(SourcePaths::of(&src)));
    let relevant = filter.clone();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let seen = match res {
            Ok(ev) => {
                let Some(change) = change_of(&ev.kind) else {
                    return;
                };
                let relevant = relevant.load();
                // Other files in the watched directories (a log file, say) must not cause
                // reloads.
                if !ev.paths.is_empty() && !ev.paths.iter().any(|p| relevant.contains(p)) {
                    return;
                }
                let paths = ev.paths.into_iter().filter(|p| relevant.contains(p));
                Seen {
                    change,
                    paths: paths.collect(),
                }
            }
            Err(_) => Seen {
                change: Change::Settled,
                paths: Vec::new(),
            },
        };
        let _ = tx.send(seen);
    });
    let mut watches = match watcher {
        Ok(watcher) => Some(Watches {
            watcher,
            dirs: Vec::new(),
            filter,
            failed: Vec::new(),
        }),
        Err(e) => {
            tracing::warn!(error = %e, poll_secs = POLL.as_secs(), "file watching unavailable; polling only");
            None
        }
    };
    if let Some(w) = watches.as_mut() {
        w.refresh(&src);
    }
    let mut last_error: Option<String> = None;
    let mut loaded = Stats::of(&src);
    // The wait before reading the sources again, while they could not be read.
    let mut unread: Option<Duration> = None;
    // Without a watcher (or once it is gone) the channel is closed: the poll alone goes on.
    let mut events = watches.is_some();
    let mut hangups = true;
    let mut burst: Option<Burst> = None;
    let mut next_poll = Instant::now() + POLL;
    // A change written in place that the poll saw, and how many polls since found it unchanged.
    let mut settling: Option<(Stats, u32)> = None;
    loop {
        let wake = burst.as_ref().map_or(next_poll, Burst::end);
        // Whether the poll woke the loop (rather than events or SIGHUP, which load at once).
        let polled = tokio::select! {
            ev = rx.recv(), if events => {
                match ev {
                    Some(seen) => {
                        if let Some(w) = watches.as_mut() && seen.change == Change::Settled {
                            w.forget(&seen.paths);
                        }
                        burst.get_or_insert_with(Burst::new).add(seen);
                    }
                    None => events = false,
                }
                continue;
            }
            signal = hangup.recv(), if hangups => {
                if signal.is_none() {
                    hangups = false;
                    continue;
                }
                tracing::info!("SIGHUP: reloading the config and keys");
                false
            }
            () = tokio::time::sleep_until(wake) => burst.is_none(),
        };
        if let Some(w) = watches.as_mut() {
            w.refresh(&src);
        }
        let now = Stats::of(&src);
        if polled && unread.is_none() {
            // The poll only stats the files; it loads them when something changed (a file
            // written in place once it stood still: its writer may not be done), or when the
            // last load could not read them.
            next_poll = Instant::now() + POLL;
            if now == loaded {
                settling = None;
                continue;
            }
            if now.written_in_place_since(&loaded) {
                let still = match settling.take() {
                    Some((seen, polls)) if seen == now => polls + 1,
                    _ => 0,
                };
                if still < STILL_POLLS {
                    settling = Some((now, still));
                    continue;
                }
            }
        }
        burst = None;
        settling = None;
        loaded = now;
        unread = match reload_once(&gw, &src, &mut last_error).await {
            Reloaded::Unread => Some(unread.map_or(UNREAD_RETRY, |wait| (wait * 2).min(POLL))),
            Reloaded::Done | Reloaded::Rejected => None,
        };
        next_poll = Instant::now() + unread.unwrap_or(POLL);
    }
}

/// One source file's metadata as the poll compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStat {
    path: PathBuf,
    /// What the path leads to, when it leads somewhere.
    meta: Option<Meta>,
    /// Where the path links to, when it is a link (kubelet's `..data`, its key entries).
    link: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    is_file: bool,
    len: u64,
    mtime: (i64, i64),
    id: Identity,
}

/// The sources' file metadata (every entry of the keys directory, and kubelet's `..data` link).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stats(Vec<FileStat>);

impl Stats {
    fn of(src: &Sources) -> Self {
        let stat = |path: PathBuf| {
            let meta = std::fs::metadata(&path).ok().map(|m| Meta {
                is_file: m.is_file(),
                len: m.len(),
                mtime: (m.mtime(), m.mtime_nsec()),
                id: (m.dev(), m.ino()),
            });
            let link = std::fs::read_link(&path).ok();
            FileStat { path, meta, link }
        };
        let mut files = vec![stat(src.config.clone())];
        if let Some(dir) = &src.keys_dir {
            files.push(stat(dir.join("..data")));
            if let Ok(entries) = std::fs::read_dir(dir) {
                let mut paths: Vec<PathBuf> =
                    entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
                paths.sort();
                files.extend(paths.into_iter().map(stat));
            }
        }
        Self(files)
    }

    /// Whether a file changed since `before` may have been written in place, its writer
    /// perhaps not done: the same file (inode) with another size or mtime, or a new file named
    /// directly (no link). Files replaced whole (renamed over, kubelet's `..data` swap, whose
    /// entries are links) and removed ones are done with.
    fn written_in_place_since(&self, before: &Self) -> bool {
        self.0.iter().any(|now| {
            let Some(meta) = now.meta.filter(|m| m.is_file) else {
                return false;
            };
            match before.0.iter().find(|b| b.path == now.path) {
                Some(old) => old.meta.is_some_and(|m| m.id == meta.id && m != meta),
                None => now.link.is_none(),
            }
        })
    }
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
        let paths = SourcePaths::of(&src);
        assert!(paths.contains(Path::new("/etc/sg/gateway.yaml")));
        assert!(paths.contains(Path::new("/etc/sg/..data")));
        assert!(paths.contains(Path::new("/etc/sg/..2026_01_01_00_00_00.123")));
        assert!(paths.contains(Path::new("/etc/sg-keys/openai.default")));
        // The keys directory itself, replaced in its parent.
        assert!(paths.contains(Path::new("/etc/sg-keys")));
        assert!(!paths.contains(Path::new("/etc/sg/sidegate.log")));
        assert!(!paths.contains(Path::new("/etc/sg/gateway.yaml.swp")));
        assert!(!paths.contains(Path::new("/etc/other")));
    }

    /// Sources in `dir`: a config file and a keys directory (returned too) with one key.
    fn config_and_a_key(dir: &Path) -> (Sources, PathBuf) {
        let keys = dir.join("keys");
        std::fs::create_dir(&keys).expect("keys dir");
        let src = Sources {
            config: dir.join("gateway.yaml"),
            keys_dir: Some(keys.clone()),
        };
        std::fs::write(&src.config, "schemaVersion: 1\n").expect("config");
        std::fs::write(keys.join("openai.default"), "sk-1").expect("key");
        (src, keys)
    }

    #[test]
    fn a_burst_waits_for_every_writer_not_only_for_the_last_event() {
        let (config, key) = (
            PathBuf::from("/c/gateway.yaml"),
            PathBuf::from("/k/openai.a"),
        );
        let seen = |change, path: &PathBuf| Seen {
            change,
            paths: vec![path.clone()],
        };
        let mut burst = Burst::new();
        burst.add(seen(Change::Writing, &config));
        // Another file written whole meanwhile: the config's writer is still not done.
        burst.add(seen(Change::Writing, &key));
        burst.add(seen(Change::Settled, &key));
        assert_eq!(burst.end(), burst.first + WRITE_WAIT);
        burst.add(seen(Change::Settled, &config));
        assert_eq!(burst.end(), burst.last + DEBOUNCE);
    }

    #[test]
    fn files_written_in_place_are_told_from_files_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, keys) = config_and_a_key(dir.path());
        let before = Stats::of(&src);
        std::fs::write(keys.join("openai.default"), "sk-22").expect("in place");
        assert!(Stats::of(&src).written_in_place_since(&before));
        let before = Stats::of(&src);
        std::fs::write(dir.path().join("staged"), "sk-333").expect("staged");
        std::fs::rename(dir.path().join("staged"), keys.join("openai.default")).expect("mv");
        std::os::unix::fs::symlink(keys.join("openai.default"), keys.join("openai.link"))
            .expect("link");
        std::fs::create_dir(keys.join("..2026_01_01")).expect("stamp dir");
        let now = Stats::of(&src);
        assert_ne!(now, before);
        assert!(
            !now.written_in_place_since(&before),
            "renamed over, a new link"
        );
        std::fs::write(keys.join("openai.new"), "sk-4").expect("created");
        assert!(
            Stats::of(&src).written_in_place_since(&now),
            "created in place"
        );
    }

    #[test]
    fn the_watched_directories_follow_the_paths_of_the_sources() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        for d in [
            "keys-v1",
            "keys-v2",
            "elsewhere",
            "conf",
            "conf/..2026_01_01",
        ] {
            std::fs::create_dir(root.join(d)).expect("dir");
        }
        std::os::unix::fs::symlink("keys-v1", root.join("keys")).expect("keys link");
        std::fs::write(root.join("elsewhere/real.yaml"), "").expect("real");
        std::os::unix::fs::symlink(root.join("elsewhere/real.yaml"), root.join("gateway.yaml"))
            .expect("config link");
        let src = Sources {
            config: root.join("gateway.yaml"),
            keys_dir: Some(root.join("keys")),
        };
        let (paths, dirs) = wanted(&src);
        let watched: Vec<&Path> = dirs.iter().map(|(p, _)| p.as_path()).collect();
        // The config's directory is the keys directory's parent too: watched once.
        assert_eq!(
            watched,
            [root.as_path(), &root.join("keys"), &root.join("elsewhere")]
        );
        assert_eq!(paths.config_target, Some(root.join("elsewhere/real.yaml")));
        assert!(paths.contains(&root.join("elsewhere/real.yaml")));
        assert!(!paths.contains(&root.join("elsewhere/other.yaml")));
        // The keys link re-pointed: the same path, another directory.
        std::fs::remove_file(root.join("keys")).expect("unlink");
        std::os::unix::fs::symlink("keys-v2", root.join("keys")).expect("keys link");
        let (_, again) = wanted(&src);
        assert_eq!(again[1].0, root.join("keys"));
        assert_ne!(again[1].1, dirs[1].1);
        // kubelet's config volume: the link leads into the volume's own `..` directory, whose
        // `..data` swaps the watch of the volume already sees.
        std::fs::write(root.join("conf/..2026_01_01/gateway.yaml"), "").expect("file");
        std::os::unix::fs::symlink("..2026_01_01", root.join("conf/..data")).expect("data");
        std::os::unix::fs::symlink("..data/gateway.yaml", root.join("conf/gateway.yaml"))
            .expect("entry");
        let (paths, dirs) = wanted(&Sources {
            config: root.join("conf/gateway.yaml"),
            keys_dir: None,
        });
        assert_eq!(paths.config_target, None);
        assert_eq!(dirs.len(), 1);
    }

    #[test]
    fn sources_are_removed_only_when_the_config_and_every_key_file_are_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, keys) = config_and_a_key(dir.path());
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
