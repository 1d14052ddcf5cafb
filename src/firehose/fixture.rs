//! Fixture files: WebSocket binary messages, each preceded by its length as an unsigned
//! LEB128 varint (as in CAR). Read as a stream, never loaded whole; written by `record`.

use std::io::{self, BufRead, Read, Write};

/// Largest varint accepted for a frame length (a u64 needs at most 10 bytes).
const MAX_VARINT_BYTES: usize = 10;

/// One message read from a fixture file.
#[derive(Debug)]
pub enum RawFrame {
    /// The message bytes.
    Message(Vec<u8>),
    /// A message longer than the frame limit: its bytes were skipped unread.
    Oversized { len: u64 },
}

/// Errors reading a fixture file. Any of them ends the file: the framing is lost.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("reading fixture: {0}")]
    Io(#[from] io::Error),
    #[error("fixture ends inside a frame (declared {declared} bytes, {got} present)")]
    Truncated { declared: u64, got: u64 },
    #[error("bad length varint in fixture")]
    BadVarint,
}

/// Reads an unsigned LEB128 varint; `Ok(None)` at a clean end of input.
pub fn read_varint<R: BufRead>(r: &mut R) -> Result<Option<u64>, FixtureError> {
    let mut value = 0u64;
    for i in 0..MAX_VARINT_BYTES {
        let mut b = [0u8; 1];
        match r.read(&mut b)? {
            0 if i == 0 => return Ok(None),
            0 => return Err(FixtureError::BadVarint),
            _ => {}
        }
        let part = u64::from(b[0] & 0x7f);
        value |= part
            .checked_shl(7 * i as u32)
            .ok_or(FixtureError::BadVarint)?;
        if b[0] & 0x80 == 0 {
            return Ok(Some(value));
        }
    }
    Err(FixtureError::BadVarint)
}

/// Decodes an unsigned LEB128 varint from the front of a slice: (value, bytes used).
pub fn decode_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &b) in buf.iter().enumerate().take(MAX_VARINT_BYTES) {
        value |= u64::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Appends `v` as an unsigned LEB128 varint.
pub fn encode_varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Streams the frames of a fixture file.
pub struct FrameReader<R> {
    inner: R,
    max_frame_bytes: u64,
    done: bool,
}

impl<R: BufRead> FrameReader<R> {
    pub fn new(inner: R, max_frame_bytes: usize) -> Self {
        Self {
            inner,
            max_frame_bytes: max_frame_bytes as u64,
            done: false,
        }
    }

    fn read_one(&mut self) -> Result<Option<RawFrame>, FixtureError> {
        let Some(len) = read_varint(&mut self.inner)? else {
            return Ok(None);
        };
        if len > self.max_frame_bytes {
            let skipped = io::copy(&mut (&mut self.inner).take(len), &mut io::sink())?;
            if skipped < len {
                return Err(FixtureError::Truncated {
                    declared: len,
                    got: skipped,
                });
            }
            return Ok(Some(RawFrame::Oversized { len }));
        }
        // `len` is bounded by max_frame_bytes, so this allocation is bounded too.
        let mut buf = Vec::with_capacity(len as usize);
        let got = (&mut self.inner).take(len).read_to_end(&mut buf)? as u64;
        if got < len {
            return Err(FixtureError::Truncated { declared: len, got });
        }
        Ok(Some(RawFrame::Message(buf)))
    }
}

impl<R: BufRead> Iterator for FrameReader<R> {
    type Item = Result<RawFrame, FixtureError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.read_one() {
            Ok(Some(f)) => Some(Ok(f)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Writes frames in the fixture format.
pub struct FrameWriter<W> {
    inner: W,
    scratch: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            scratch: Vec::with_capacity(MAX_VARINT_BYTES),
        }
    }

    pub fn write_frame(&mut self, msg: &[u8]) -> io::Result<()> {
        self.scratch.clear();
        encode_varint(msg.len() as u64, &mut self.scratch);
        self.inner.write_all(&self.scratch)?;
        self.inner.write_all(msg)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Opens a fixture file; `.zst` files are decompressed on the fly.
pub fn open(path: &std::path::Path) -> io::Result<Box<dyn BufRead + Send>> {
    let file = std::fs::File::open(path)?;
    if path.extension().is_some_and(|e| e == "zst") {
        let dec = zstd::stream::read::Decoder::new(file)?;
        Ok(Box::new(io::BufReader::with_capacity(1 << 20, dec)))
    } else {
        Ok(Box::new(io::BufReader::with_capacity(1 << 20, file)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip() {
        for v in [0u64, 1, 127, 128, 300, 16_384, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            encode_varint(v, &mut b);
            assert_eq!(decode_varint(&b), Some((v, b.len())));
            assert_eq!(read_varint(&mut &b[..]).ok().flatten(), Some(v));
        }
        assert_eq!(decode_varint(&[0x80, 0x80]), None);
    }

    #[test]
    fn reads_written_frames_and_skips_oversized() {
        let mut w = FrameWriter::new(Vec::new());
        w.write_frame(b"abc").unwrap();
        w.write_frame(&[7u8; 100]).unwrap();
        w.write_frame(b"").unwrap();
        let bytes = w.into_inner();
        let frames: Vec<_> = FrameReader::new(&bytes[..], 50).collect();
        assert_eq!(frames.len(), 3);
        assert!(matches!(&frames[0], Ok(RawFrame::Message(m)) if m == b"abc"));
        assert!(matches!(&frames[1], Ok(RawFrame::Oversized { len: 100 })));
        assert!(matches!(&frames[2], Ok(RawFrame::Message(m)) if m.is_empty()));
    }

    #[test]
    fn truncated_file_is_an_error_not_a_panic() {
        let mut w = FrameWriter::new(Vec::new());
        w.write_frame(b"abcdef").unwrap();
        let mut bytes = w.into_inner();
        bytes.truncate(4);
        let frames: Vec<_> = FrameReader::new(&bytes[..], 50).collect();
        assert!(matches!(
            frames[0],
            Err(FixtureError::Truncated {
                declared: 6,
                got: 3
            })
        ));
    }
}
