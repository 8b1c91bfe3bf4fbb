//! `[cache] shared`: one sccache store for the whole fleet, through sccache's own backends.
//!
//! A new agent's first build then hits what any agent compiled, registry dependencies
//! included, because the sandbox gives every agent the same paths (sccache hashes the
//! compile's working directory and every `CARGO_*` variable): the workspace at
//! `/build/<repository>`, cargo's home at `/build/.cargo`.
//!
//! sccache refuses to start its server when its store fails the startup check, and then
//! every rustc call fails. A store that is down must cost a job one line, never the job,
//! so each job first dials the store (a short deadline); when that fails the job compiles
//! with the agent's own per-repository cache and says so.

use std::ffi::OsString;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How long a job waits to reach the store before it compiles without it.
const PROBE_DEADLINE: Duration = Duration::from_secs(2);

/// Variables an S3 store may need from the agent's own environment (credentials, region,
/// an endpoint for S3-compatible stores); passed into the job only for `s3://`.
const S3_ENVIRONMENT: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "SCCACHE_REGION",
    "SCCACHE_ENDPOINT",
    "SCCACHE_S3_USE_SSL",
    "SCCACHE_S3_NO_CREDENTIALS",
];

/// A store URL the agent cannot use.
#[derive(Debug, thiserror::Error)]
#[error(
    "[cache] shared = {url:?}: {reason} (expected redis://, rediss://, memcached://, \
     s3://BUCKET[/PREFIX], webdav+http:// or webdav+https://)"
)]
pub struct SharedCacheError {
    url: String,
    reason: &'static str,
}

/// Which of sccache's backends the store is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Backend {
    Redis,
    Memcached,
    S3 { bucket: String, prefix: String },
    Webdav { endpoint: String },
}

/// The fleet's shared compilation cache, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedCache {
    url: String,
    backend: Backend,
    /// Where the store listens, for the probe; `None` when only sccache knows (S3 without
    /// an explicit endpoint).
    address: Option<(String, u16)>,
}

impl FromStr for SharedCache {
    type Err = SharedCacheError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let error = |reason| SharedCacheError {
            url: redact(url),
            reason,
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| error("not a URL"))?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host_port = authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host);
        if host_port.is_empty() {
            return Err(error("no host"));
        }
        let (backend, default_port) = match scheme {
            "redis" | "rediss" => (Backend::Redis, Some(6379)),
            "memcached" => (Backend::Memcached, Some(11211)),
            "s3" => (
                Backend::S3 {
                    bucket: host_port.to_owned(),
                    prefix: path.trim_matches('/').to_owned(),
                },
                None,
            ),
            "webdav+http" | "webdav+https" => (
                Backend::Webdav {
                    endpoint: url.trim_start_matches("webdav+").to_owned(),
                },
                Some(if scheme == "webdav+https" { 443 } else { 80 }),
            ),
            _ => return Err(error("unknown scheme")),
        };
        let address = match default_port {
            Some(default) => {
                Some(host_and_port(host_port, default).ok_or_else(|| error("bad port"))?)
            }
            None => None,
        };
        Ok(Self {
            url: url.to_owned(),
            backend,
            address,
        })
    }
}

/// Splits `host[:port]` (`[v6]:port` too), with `default` when no port is given.
fn host_and_port(text: &str, default: u16) -> Option<(String, u16)> {
    let (host, port) = match text.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed.split_once(']')?;
            (host, after.strip_prefix(':'))
        }
        None => match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        },
    };
    let port = match port {
        Some(port) => port.parse().ok().filter(|port| *port != 0)?,
        None => default,
    };
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// The URL without its password, for logs and job output.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, None), |(a, p)| (a, Some(p)));
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_owned(),
    };
    match path {
        Some(path) => format!("{scheme}://{authority}/{path}"),
        None => format!("{scheme}://{authority}"),
    }
}

impl fmt::Display for SharedCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.url))
    }
}

impl SharedCache {
    /// The variables that point sccache at the store, in place of the local disk cache.
    pub fn sccache_env(&self) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = match &self.backend {
            Backend::Redis => vec![("SCCACHE_REDIS_ENDPOINT".into(), self.url.clone().into())],
            Backend::Memcached => {
                let endpoint = self.url.replacen("memcached://", "tcp://", 1);
                vec![("SCCACHE_MEMCACHED_ENDPOINT".into(), endpoint.into())]
            }
            Backend::S3 { bucket, prefix } => {
                let mut env = vec![("SCCACHE_BUCKET".into(), bucket.clone().into())];
                if !prefix.is_empty() {
                    env.push(("SCCACHE_S3_KEY_PREFIX".into(), prefix.clone().into()));
                }
                env.extend(S3_ENVIRONMENT.iter().filter_map(|name| {
                    std::env::var_os(name).map(|value| (OsString::from(*name), value))
                }));
                env
            }
            Backend::Webdav { endpoint } => {
                vec![("SCCACHE_WEBDAV_ENDPOINT".into(), endpoint.clone().into())]
            }
        };
        // Should the store fail mid-job, rustc runs without the cache rather than fail.
        env.push(("SCCACHE_IGNORE_SERVER_IO_ERROR".into(), "1".into()));
        env
    }

    /// Whether the store answers a connection now. `Err` says why not, for the job's
    /// output.
    pub async fn probe(&self) -> Result<(), String> {
        let Some((host, port)) = &self.address else {
            return Ok(());
        };
        match tokio::time::timeout(
            PROBE_DEADLINE,
            tokio::net::TcpStream::connect((host.as_str(), *port)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {} s", PROBE_DEADLINE.as_secs())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(url: &str) -> Vec<(String, String)> {
        let cache: SharedCache = url.parse().expect("valid");
        cache
            .sccache_env()
            .into_iter()
            .map(|(name, value)| {
                (
                    name.into_string().expect("utf-8"),
                    value.into_string().expect("utf-8"),
                )
            })
            .filter(|(name, _)| name != "SCCACHE_IGNORE_SERVER_IO_ERROR")
            .collect()
    }

    fn pair(name: &str, value: &str) -> (String, String) {
        (name.to_owned(), value.to_owned())
    }

    #[test]
    fn each_scheme_selects_its_sccache_backend() {
        assert_eq!(
            env_of("redis://:secret@cache.lan:6380/2"),
            [pair(
                "SCCACHE_REDIS_ENDPOINT",
                "redis://:secret@cache.lan:6380/2"
            )]
        );
        assert_eq!(
            env_of("memcached://cache.lan:11211"),
            [pair("SCCACHE_MEMCACHED_ENDPOINT", "tcp://cache.lan:11211")]
        );
        assert_eq!(
            env_of("webdav+https://dav.lan/sccache"),
            [pair("SCCACHE_WEBDAV_ENDPOINT", "https://dav.lan/sccache")]
        );
        let s3 = env_of("s3://builds/sccache/");
        assert_eq!(
            s3[..2],
            [
                pair("SCCACHE_BUCKET", "builds"),
                pair("SCCACHE_S3_KEY_PREFIX", "sccache")
            ]
        );
    }

    #[test]
    fn the_probe_dials_the_stores_host_and_port() {
        let address = |url: &str| url.parse::<SharedCache>().expect("valid").address;
        assert_eq!(
            address("redis://cache.lan"),
            Some(("cache.lan".into(), 6379))
        );
        assert_eq!(
            address("rediss://user:pw@[::1]:7000/0"),
            Some(("::1".into(), 7000))
        );
        assert_eq!(address("memcached://m:1"), Some(("m".into(), 1)));
        assert_eq!(address("webdav+http://dav"), Some(("dav".into(), 80)));
        assert_eq!(address("s3://bucket"), None);
    }

    #[test]
    fn a_url_sccache_cannot_use_is_refused_without_showing_its_password() {
        for url in [
            "redis.lan:6379",
            "http://cache.lan",
            "redis://",
            "redis://:pw@cache:notaport",
            "memcached://cache:0",
        ] {
            let error = url.parse::<SharedCache>().expect_err(url).to_string();
            assert!(error.contains("expected redis://"), "{error}");
            assert!(!error.contains("pw@"), "{error}");
        }
        let shown = "redis://:pw@cache.lan:6379"
            .parse::<SharedCache>()
            .expect("valid");
        assert_eq!(shown.to_string(), "redis://***@cache.lan:6379");
    }

    #[tokio::test]
    async fn a_store_that_is_down_fails_the_probe_with_the_reason() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cache: SharedCache = format!("redis://127.0.0.1:{port}").parse().expect("valid");
        cache.probe().await.expect("a listening store answers");
        drop(listener);
        let error = cache.probe().await.expect_err("nothing listens");
        assert!(error.contains("refused"), "{error}");
    }
}
