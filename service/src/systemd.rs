//! Life under systemd, for `build-agent` and `buildpool serve` alike: logs to the journal
//! with structured fields, and the `sd_notify` protocol (readiness, status, watchdog).
//!
//! The notify protocol is one datagram per message on the Unix socket named by
//! `NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`), each datagram
//! newline-separated `KEY=VALUE` lines. The `sd-notify` crate names the states and reads
//! the watchdog's settings; the datagrams go out on a socket of our own, because the
//! crate's `notify` reaches no abstract name and blocks the caller while the service
//! manager's queue is full, and a wedged manager must not stall an async runtime.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Logs to journald when systemd connected stderr to the journal (`JOURNAL_STREAM` names
/// stderr's device and inode), with every span and event field as a journal field
/// (`JOB_ID`, `AGENT_ID`, `ATTEMPT`, ...: `journalctl JOB_ID=42`); else to stderr.
pub fn init_logging(default_level: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(journal) => {
                tracing_subscriber::registry()
                    .with(filter)
                    .with(journal.with_field_prefix(None))
                    .init();
                return;
            }
            Err(error) => eprintln!("cannot log to journald ({error}); logging to stderr"),
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Whether stderr is the journal stream systemd set up (and not, say, a redirection in a
/// child that inherited the variable).
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = stream.to_str().and_then(|text| text.split_once(':')) else {
        return false;
    };
    rustix::fs::fstat(std::io::stderr())
        .is_ok_and(|stat| device.parse() == Ok(stat.st_dev) && inode.parse() == Ok(stat.st_ino))
}

/// The service manager's notification socket, when there is one.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    address: SocketAddr,
    /// How often to ping the watchdog: half of `WATCHDOG_USEC`, when it is set for us.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` and `WATCHDOG_USEC` describe (the watchdog only when
    /// `WATCHDOG_PID`, if set, names this process); `None` when not started by a service
    /// manager that listens (or the socket cannot be used, which is logged).
    pub fn from_env() -> Option<Self> {
        let name = std::env::var("NOTIFY_SOCKET").ok()?;
        let watchdog = sd_notify::watchdog_enabled()
            .filter(|timeout| !timeout.is_zero())
            .map(|timeout| timeout / 2);
        match Self::connect(&name, watchdog) {
            Ok(notifier) => Some(notifier),
            Err(error) => {
                tracing::warn!("NOTIFY_SOCKET={name} cannot be used: {error}");
                None
            }
        }
    }

    fn connect(name: &str, watchdog: Option<Duration>) -> std::io::Result<Self> {
        let address = match name.strip_prefix('@') {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(abstract_name.as_bytes())?
            }
            None => SocketAddr::from_pathname(name)?,
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket,
            address,
            watchdog,
        })
    }

    /// Sends `states` in one message, one `KEY=VALUE` line each.
    pub fn notify(&self, states: &[NotifyState<'_>]) -> std::io::Result<()> {
        let message: String = states.iter().map(|state| format!("{state}\n")).collect();
        self.socket
            .send_to_addr(message.as_bytes(), &self.address)
            .map(drop)
    }

    /// Says `READY=1` with a first `status()`, then refreshes the status when it changes
    /// and pings the watchdog (when asked for one) until `shutdown`, then says
    /// `STOPPING=1`. `status` runs on each tick, so a wedged process stops pinging.
    pub async fn run(self, status: impl Fn() -> String, shutdown: CancellationToken) {
        let mut last = status();
        self.send(&[NotifyState::Ready, NotifyState::Status(&last)]);
        let period = self
            .watchdog
            .unwrap_or(STATUS_PERIOD)
            .min(STATUS_PERIOD)
            .max(Duration::from_millis(10));
        let mut ticks = tokio::time::interval(period);
        ticks.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticks.tick() => {}
            }
            let now = status();
            let fresh = (now != last).then_some(now);
            let states: Vec<NotifyState<'_>> = fresh
                .as_deref()
                .map(NotifyState::Status)
                .into_iter()
                .chain(self.watchdog.map(|_| NotifyState::Watchdog))
                .collect();
            if !states.is_empty() {
                self.send(&states);
            }
            if let Some(now) = fresh {
                last = now;
            }
        }
        self.send(&[NotifyState::Stopping]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(error) = self.notify(states) {
            tracing::debug!("sd_notify: {error}");
        }
    }
}

/// How often the status line is refreshed when no watchdog asks for more.
const STATUS_PERIOD: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_abstract_sockets() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("buildpool-notify-test-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let receiver = UnixDatagram::bind_addr(&address).expect("bind");
        let notifier = Notifier::connect(&format!("@{name}"), None).expect("connect");
        notifier
            .notify(&[NotifyState::Ready, NotifyState::Status("ok")])
            .expect("send");
        let mut buffer = [0u8; 64];
        let length = receiver.recv(&mut buffer).expect("receive");
        assert_eq!(&buffer[..length], b"READY=1\nSTATUS=ok\n");
    }
}
