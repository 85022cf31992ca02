//! One generation of the routing config, compiled and ready for the data path. Requests read the
//! current snapshot (an `Arc` behind a watch channel) once; a reload publishes a new one without
//! touching requests in flight, which finish on the snapshot they started with.

use std::{
    cell::RefCell,
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::sync::watch;

use super::{
    cluster::{ClusterSet, Settings},
    config::{Config, ConfigError},
    route::Listener,
};

#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub config: Arc<Config>,
    pub clusters: ClusterSet,
    pub listeners: HashMap<u16, Listener>,
    /// Route timeout of original-destination requests.
    pub outbound_passthrough_timeout: Option<Duration>,
    pub inbound_timeout: Option<Duration>,
}

impl Snapshot {
    pub fn build(
        mut config: Config,
        generation: u64,
        previous: Option<&Snapshot>,
        settings: &Settings,
    ) -> Self {
        config.resolve(settings.connect_timeout);
        let clusters = ClusterSet::build(&config, previous.map(|p| &p.clusters), settings);
        let listeners = config
            .outbound
            .listeners
            .iter()
            .map(|l| (l.port, Listener::compile(&config, l, &clusters.by_name)))
            .collect();
        Self {
            generation,
            outbound_passthrough_timeout: config
                .outbound
                .passthrough
                .timeout
                .and_then(|d| d.nonzero()),
            inbound_timeout: config.inbound.cluster.timeout.and_then(|d| d.nonzero()),
            config: Arc::new(config),
            clusters,
            listeners,
        }
    }
}

/// Where the config comes from and the current snapshot.
#[derive(Clone)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub settings: Settings,
    pub current: watch::Sender<Arc<Snapshot>>,
    /// The current generation, readable without the watch lock: the data path checks it per
    /// request and only takes the lock when it changed.
    generation: Arc<AtomicU64>,
    /// Tells sources apart in the per-thread cache (tests run several proxies per process).
    id: u64,
}

static NEXT_SOURCE: AtomicU64 = AtomicU64::new(1);

/// (source id, generation, snapshot) as one thread caches it.
type LocalSnapshot = (u64, u64, Arc<Arc<Snapshot>>);

thread_local! {
    /// This thread's view of the current snapshot: (source id, generation, snapshot). The
    /// outer `Arc` is only touched by this thread, so taking it per request does not bounce the
    /// shared snapshot's reference count between cores.
    static LOCAL: RefCell<Option<LocalSnapshot>> = const { RefCell::new(None) };
}

/// What `/config_dump` shows about the source.
#[derive(Serialize)]
pub struct SourceInfo {
    pub path: Option<String>,
    pub generation: u64,
}

impl ConfigSource {
    /// Loads the file (or the defaults without one). Errors name the file, line and field.
    pub fn load(path: Option<PathBuf>, settings: Settings) -> Result<Self, ConfigError> {
        let config = match &path {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        let snapshot = Snapshot::build(config, 1, None, &settings);
        let (current, _) = watch::channel(Arc::new(snapshot));
        Ok(Self {
            path,
            settings,
            current,
            generation: Arc::new(AtomicU64::new(1)),
            id: NEXT_SOURCE.fetch_add(1, Ordering::Relaxed),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.borrow().clone()
    }

    /// The current snapshot for the data path, through this thread's cache.
    pub fn local_snapshot(&self) -> Arc<Arc<Snapshot>> {
        let generation = self.generation.load(Ordering::Acquire);
        LOCAL.with(|cell| {
            let mut local = cell.borrow_mut();
            if let Some((id, g, snap)) = local.as_ref()
                && *id == self.id
                && *g == generation
            {
                return snap.clone();
            }
            let snap = Arc::new(self.snapshot());
            let generation = snap.generation;
            *local = Some((self.id, generation, snap.clone()));
            snap
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.current.subscribe()
    }

    /// Re-reads the file and publishes it if valid and different. Returns Ok(true) when a new
    /// generation was published; on error the current one stays.
    pub fn reload(&self) -> Result<bool, ConfigError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let mut config = Config::load(path)?;
        let old = self.snapshot();
        let mut resolved = config.clone();
        resolved.resolve(self.settings.connect_timeout);
        if *old.config == resolved {
            return Ok(false);
        }
        config.resolve(self.settings.connect_timeout);
        let next = Snapshot::build(config, old.generation + 1, Some(&old), &self.settings);
        let generation = next.generation;
        self.current.send_replace(Arc::new(next));
        self.generation.store(generation, Ordering::Release);
        Ok(true)
    }

    pub fn info(&self) -> SourceInfo {
        SourceInfo {
            path: self.path.as_ref().map(|p| p.display().to_string()),
            generation: self.snapshot().generation,
        }
    }
}
