//! Choosing the epoch store by URL: `file:DIR` or
//! `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`.

use super::{EpochError, EpochStore, EtcdEpochStore, FileEpochStore};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// The default key prefix of an etcd store.
pub const DEFAULT_ETCD_PREFIX: &str = "/blkshim";

/// A parsed `--epoch-store` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `file:DIR` (also `file://DIR` with an absolute DIR): a
    /// [`FileEpochStore`] in DIR, created if missing.
    File(PathBuf),
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`: an [`EtcdEpochStore`].
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

impl StoreUrl {
    /// Parses `file:DIR` or `etcd://HOST:PORT[,...][/PREFIX]`.
    ///
    /// ```
    /// use blkshim::epoch::StoreUrl;
    /// assert_eq!(
    ///     StoreUrl::parse("etcd://10.0.0.1:2379,10.0.0.2:2379/pool1").unwrap(),
    ///     StoreUrl::Etcd {
    ///         endpoints: vec!["10.0.0.1:2379".into(), "10.0.0.2:2379".into()],
    ///         prefix: "/pool1".into(),
    ///     }
    /// );
    /// assert_eq!(StoreUrl::parse("file:/var/lib/blkshim").unwrap(),
    ///            StoreUrl::File("/var/lib/blkshim".into()));
    /// assert!(StoreUrl::parse("/var/lib/blkshim").is_err());
    /// ```
    pub fn parse(url: &str) -> Result<StoreUrl, String> {
        if let Some(rest) = url.strip_prefix("etcd://") {
            let (hosts, prefix) = match rest.find('/') {
                Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
                None => (rest, DEFAULT_ETCD_PREFIX),
            };
            let prefix = if prefix.is_empty() {
                DEFAULT_ETCD_PREFIX
            } else {
                prefix
            };
            let mut endpoints = Vec::new();
            for h in hosts.split(',') {
                let ok = h
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if !ok {
                    return Err(format!(
                        "epoch store {url:?}: endpoint {h:?} is not HOST:PORT"
                    ));
                }
                endpoints.push(h.to_string());
            }
            if prefix.contains("//") || prefix.chars().any(|c| c.is_whitespace()) {
                return Err(format!("epoch store {url:?}: bad prefix {prefix:?}"));
            }
            return Ok(StoreUrl::Etcd {
                endpoints,
                prefix: prefix.to_string(),
            });
        }
        if let Some(rest) = url.strip_prefix("file:") {
            let dir = rest.strip_prefix("//").unwrap_or(rest);
            if dir.is_empty() {
                return Err(format!("epoch store {url:?}: no directory"));
            }
            return Ok(StoreUrl::File(PathBuf::from(dir)));
        }
        Err(format!(
            "epoch store {url:?}: expected file:DIR or etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"
        ))
    }

    /// Opens the store (creating a file store's directory).
    pub fn open(&self) -> Result<Arc<dyn EpochStore>, EpochError> {
        match self {
            StoreUrl::File(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    EpochError::Io(io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
                })?;
                Ok(Arc::new(FileEpochStore::open(dir)?))
            }
            StoreUrl::Etcd { endpoints, prefix } => {
                Ok(Arc::new(EtcdEpochStore::new(endpoints, prefix)?))
            }
        }
    }
}

impl StoreUrl {
    /// With an etcd store, registers `host`'s liveness (a lease of `ttl`
    /// seconds, renewed until the registration is dropped) and gives the
    /// view of every host's; a file store has none (`None`).
    pub fn register_host(
        &self,
        host: &str,
        ttl: u64,
    ) -> io::Result<Option<super::etcd::lease::HostRegistration>> {
        match self {
            StoreUrl::File(_) => Ok(None),
            StoreUrl::Etcd { endpoints, prefix } => {
                super::etcd::lease::register_host(endpoints, prefix, host, ttl).map(Some)
            }
        }
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::File(d) => write!(f, "file:{}", d.display()),
            StoreUrl::Etcd { endpoints, prefix } => {
                write!(f, "etcd://{}{prefix}", endpoints.join(","))
            }
        }
    }
}

/// Opens the epoch store a URL names (see [`StoreUrl::parse`]).
pub fn open_store(url: &str) -> Result<Arc<dyn EpochStore>, EpochError> {
    StoreUrl::parse(url)
        .map_err(|e| EpochError::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?
        .open()
}
