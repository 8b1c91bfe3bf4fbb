//! The test archive a slice of a spread test run takes from its coordinator
//! (`JobSpec::archive_from`): the tests another agent built once, as `cargo nextest
//! archive`, so that no slice builds them again.
//!
//! Where it comes from is a role, apart from the transport: a coordinator across the
//! network sends it down a tunnel on its bus port ([`TunnelArchives`]); the coordinator's
//! embedded agent reads its coordinator's store directly. Either way the file is checked
//! against its SHA-256 before a job sees it.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use buildpool_core::JobId;
use buildpool_proto::socket::ServerUrl;
use buildpool_proto::tunnel::{Tunnel, parse_archive_header};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::artifacts::MAX_ARTIFACT_BYTES;

/// The longest header line: a size, a space, 64 hex digits.
const MAX_HEADER_BYTES: u64 = 128;

#[derive(Debug, thiserror::Error)]
#[error("cannot fetch the test archive of job {job_id}: {reason}")]
pub struct ArchiveError {
    pub job_id: JobId,
    pub reason: String,
}

/// A boxed future of a fetch: the archive's size once it is in place.
pub type Fetching<'a> = Pin<Box<dyn Future<Output = Result<u64, ArchiveError>> + Send + 'a>>;

/// Where a job's test archive comes from.
pub trait ArchiveSource: Send + Sync + std::fmt::Debug {
    /// Puts job `job_id`'s archive at `dest`, verified, and returns its size.
    fn fetch<'a>(&'a self, job_id: JobId, dest: &'a Path) -> Fetching<'a>;
}

/// Archives from a coordinator across the network, through its tunnel.
#[derive(Debug)]
pub struct TunnelArchives {
    pub server: ServerUrl,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub token: String,
}

impl ArchiveSource for TunnelArchives {
    fn fetch<'a>(&'a self, job_id: JobId, dest: &'a Path) -> Fetching<'a> {
        Box::pin(async move {
            let failed = |reason: String| ArchiveError { job_id, reason };
            let tunnel = Tunnel::open_archive(&self.server, self.tls.as_ref(), &self.token, job_id)
                .await
                .map_err(|error| failed(error.to_string()))?;
            let (mut incoming, tunnel_end) = tokio::io::duplex(256 * 1024);
            // Nothing goes our way out: the empty reader half-closes at once.
            let splice = tunnel.splice(tokio::io::join(tokio::io::empty(), tunnel_end));
            let (spliced, received) = tokio::join!(splice, receive(&mut incoming, dest));
            // The tunnel's error first: a refusal says why nothing came.
            spliced.map_err(|error| failed(error.to_string()))?;
            received.map_err(failed)
        })
    }
}

/// Reads an archive's header and body from `from` into `dest` (through a temporary file
/// beside it), checking its size and SHA-256.
pub async fn receive(from: impl AsyncRead + Unpin, dest: &Path) -> Result<u64, String> {
    let mut from = BufReader::new(from);
    let mut line = String::new();
    (&mut from)
        .take(MAX_HEADER_BYTES)
        .read_line(&mut line)
        .await
        .map_err(|error| error.to_string())?;
    let (bytes, sha256) = parse_archive_header(line.trim_end())
        .ok_or_else(|| format!("the transfer began with {line:?}, not a size and checksum"))?;
    if bytes > MAX_ARTIFACT_BYTES {
        return Err(format!(
            "{bytes} bytes is over the {MAX_ARTIFACT_BYTES}-byte bound"
        ));
    }
    if let Some(dir) = dest.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|error| error.to_string())?;
    }
    let partial = dest.with_extension("partial");
    let written = copy_hashed(&mut from.take(bytes + 1), &partial).await;
    let (written, digest) = match written {
        Ok(done) => done,
        Err(error) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(error.to_string());
        }
    };
    if written != bytes || digest != sha256 {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(format!(
            "{written} bytes with SHA-256 {digest} arrived; {bytes} bytes with {sha256} were sent"
        ));
    }
    tokio::fs::rename(&partial, dest)
        .await
        .map_err(|error| error.to_string())?;
    Ok(bytes)
}

/// Copies `from` to a new file at `to`; returns the bytes written and their SHA-256.
async fn copy_hashed(
    from: &mut (impl AsyncRead + Unpin),
    to: &Path,
) -> std::io::Result<(u64, String)> {
    let mut file = tokio::fs::File::create(to).await?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 256 * 1024];
    let mut written = 0u64;
    loop {
        let read = from.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        file.write_all(&buffer[..read]).await?;
        written += read as u64;
    }
    file.flush().await?;
    file.sync_all().await?;
    Ok((written, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use buildpool_proto::tunnel::archive_header;

    fn sent(body: &[u8], header: &str) -> Vec<u8> {
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    #[tokio::test]
    async fn an_archive_arrives_whole_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("target/buildpool-nextest-archive.tar.zst");
        let body = b"the tests, built once".repeat(1000);
        let sha256 = hex::encode(Sha256::digest(&body));
        let header = archive_header(body.len() as u64, &sha256);
        let size = receive(&sent(&body, &header)[..], &dest)
            .await
            .expect("arrives");
        assert_eq!(size, body.len() as u64);
        assert_eq!(std::fs::read(&dest).expect("read"), body);
    }

    #[tokio::test]
    async fn a_cut_or_altered_archive_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("archive.tar.zst");
        let body = b"0123456789".repeat(100);
        let sha256 = hex::encode(Sha256::digest(&body));
        let header = archive_header(body.len() as u64, &sha256);
        let cut = sent(&body[..500], &header);
        let mut altered = sent(&body, &header);
        *altered.last_mut().expect("a byte") ^= 1;
        let longer = sent(&[&body[..], b"more"].concat(), &header);
        for (transfer, what) in [(cut, "cut"), (altered, "altered"), (longer, "longer")] {
            let error = receive(&transfer[..], &dest).await.expect_err(what);
            assert!(error.contains("were sent"), "{what}: {error}");
            assert!(
                !dest.exists() && !dest.with_extension("partial").exists(),
                "{what}"
            );
        }
        let error = receive(&b"no header here"[..], &dest)
            .await
            .expect_err("header");
        assert!(error.contains("not a size and checksum"), "{error}");
    }
}
