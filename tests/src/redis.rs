//! A real Redis server owned by a test: Debian's `redis-server` on a free loopback port,
//! in memory only, killed with its owner. The store for the fleet's shared compilation
//! cache (`[cache] shared`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::{Owned, wait_until};

/// A running `redis-server`.
#[derive(Debug)]
pub struct Redis {
    pub port: u16,
    _server: Owned,
}

impl Redis {
    /// Starts `redis-server` on a port that was free a moment ago, its log in `scratch`.
    pub fn start(scratch: &Path) -> anyhow::Result<Self> {
        // redis-server cannot be told to pick a port itself.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .current_dir(scratch);
        let server = Owned::spawn(command, scratch.join(format!("redis-{port}.log")))
            .context("starting redis-server (apt-get install redis-server)")?;
        let redis = Self {
            port,
            _server: server,
        };
        if !wait_until(Duration::from_secs(10), || redis.command("PING").is_ok()) {
            bail!("redis-server did not answer on port {port}");
        }
        Ok(redis)
    }

    /// The store's URL, as `[cache] shared` takes it.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends one inline command and returns its reply: a status, an integer or a bulk
    /// string's text.
    pub fn command(&self, command: &str) -> anyhow::Result<String> {
        let stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        (&stream).write_all(format!("{command}\r\n").as_bytes())?;
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        match line.split_at_checked(1) {
            Some(("+" | ":", value)) => Ok(value.to_owned()),
            Some(("$", length)) => {
                let mut body = vec![0; length.parse::<usize>()? + 2];
                reader.read_exact(&mut body)?;
                body.truncate(body.len() - 2);
                Ok(String::from_utf8(body)?)
            }
            _ => bail!("redis answered {command:?} with {line:?}"),
        }
    }

    /// The number of keys stored.
    pub fn keys(&self) -> anyhow::Result<u64> {
        Ok(self.command("DBSIZE")?.parse()?)
    }

    /// How many reads found their key, since the server started.
    pub fn hits(&self) -> anyhow::Result<u64> {
        let stats = self.command("INFO stats")?;
        stats
            .lines()
            .find_map(|line| line.strip_prefix("keyspace_hits:"))
            .context("no keyspace_hits in INFO stats")?
            .trim()
            .parse()
            .context("keyspace_hits")
    }
}
