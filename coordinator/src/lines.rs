//! A job's output cut at line ends. Its streams arrive in chunks that end anywhere; whoever
//! interleaves them with other output (the other stream in one file, another part of a
//! spread run) must hand on whole lines, or two lines splice into one.

use buildpool_core::OutputStream;

/// The longest unfinished line held back before it is handed on anyway: a job that writes
/// without line ends must not grow the holder without bound.
pub const HELD_BYTES: usize = 64 * 1024;

/// Each stream's unfinished last line.
#[derive(Debug, Default)]
pub struct WholeLines {
    held: [Vec<u8>; 2],
}

impl WholeLines {
    fn held(&mut self, stream: OutputStream) -> &mut Vec<u8> {
        &mut self.held[usize::from(stream == OutputStream::Stderr)]
    }

    /// Takes a chunk of `stream`; returns the lines it completed, or, once an unfinished
    /// line outgrew [`HELD_BYTES`], all that is held of it.
    pub fn push(&mut self, stream: OutputStream, data: &[u8]) -> Option<Vec<u8>> {
        let held = self.held(stream);
        held.extend_from_slice(data);
        let whole = match held.iter().rposition(|byte| *byte == b'\n') {
            Some(end) => end + 1,
            None if held.len() > HELD_BYTES => held.len(),
            None => return None,
        };
        let rest = held.split_off(whole);
        Some(std::mem::replace(held, rest))
    }

    /// What is held of each stream's unfinished last line, taken: the output ended.
    pub fn rest(&mut self) -> impl Iterator<Item = (OutputStream, Vec<u8>)> + '_ {
        [OutputStream::Stdout, OutputStream::Stderr]
            .into_iter()
            .map(|stream| (stream, std::mem::take(self.held(stream))))
            .filter(|(_, held)| !held.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_whole_per_stream_and_an_endless_line_comes_at_the_bound() {
        let mut lines = WholeLines::default();
        assert_eq!(
            lines.push(OutputStream::Stdout, b"one\ntw"),
            Some(b"one\n".to_vec())
        );
        assert_eq!(lines.push(OutputStream::Stderr, b"err"), None);
        assert_eq!(
            lines.push(OutputStream::Stdout, b"o\nthr"),
            Some(b"two\n".to_vec())
        );
        let endless = vec![b'x'; HELD_BYTES];
        assert_eq!(
            lines.push(OutputStream::Stderr, &endless).map(|l| l.len()),
            Some(HELD_BYTES + 3)
        );
        let rest: Vec<_> = lines.rest().collect();
        assert_eq!(rest, [(OutputStream::Stdout, b"thr".to_vec())]);
        assert_eq!(lines.rest().count(), 0);
    }
}
