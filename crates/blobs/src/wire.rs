//! The attachments' file protocol on the wire, `/fieldsync/blobs/2`, without IO: what a
//! native node (`fieldsync-net`) and a browser tab (`fieldsync-wasm`) both encode and
//! decode, so the two never drift apart.
//!
//! Request ([`REQUEST_LEN`] bytes): the file's BLAKE3 hash (32 bytes), the offset to start
//! at (u64 BE: the verified bytes an interrupted transfer already holds) and a flags byte
//! ([`MAY_FORWARD`]). Answer: one [`Status`] byte, then, when OK, a [`Head`] — the file's
//! size and the offset its bytes start at (u64 BE each) — then the bao slice of the bytes
//! from there: 1 KiB chunks with the BLAKE3 tree nodes that prove them.
//!
//! Every decoder here checks lengths and limits before it trusts a number: a size over the
//! receiver's limit is refused before the first byte of the file, and a receiver never
//! takes more than [`max_slice_len`] bytes of slice.

use std::cell::RefCell;
use std::io::Read;
use std::rc::Rc;
use std::time::Duration;

use crate::Hash;

/// The protocol's libp2p name.
pub const PROTOCOL: &str = "/fieldsync/blobs/2";
/// Bytes of a request.
pub const REQUEST_LEN: usize = 41;
/// Bytes of an OK answer's head after the status byte (size, start).
pub const HEAD_LEN: usize = 16;
/// Request flag: the server may fetch the file from its own peers first.
pub const MAY_FORWARD: u8 = 1;
/// How long a peer may take to send the request, or to send the next piece.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an asker waits for the status byte while the server may be fetching the file
/// from its own peers.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// What a peer sent that does not follow the protocol, or a file that did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A fixed-size message of the wrong length.
    #[error("a blob {what} must be {expected} bytes, got {got}")]
    BadLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A status byte this version does not know.
    #[error("unknown blob answer {0}")]
    UnknownStatus(u8),
    /// The peer announced a file over the receiver's limit.
    #[error("the file has {size} bytes, over the limit of {limit} per attachment here; it was not fetched")]
    TooLarge { size: u64, limit: u64 },
    /// The answer starts past the end of the file, or not where it was asked.
    #[error("the answer starts at byte {start} of a {size}-byte file, not at byte {asked}")]
    BadStart { start: u64, size: u64, asked: u64 },
    /// A chunk did not hash to the file's BLAKE3 tree.
    #[error("a chunk after byte {verified} did not hash to the file's BLAKE3 tree: the answer is corrupt and nothing was stored")]
    Corrupt { verified: u64 },
    /// The answer ended before the whole file was proven.
    #[error("the answer ended after {verified} of {size} bytes: the transfer was cut short and nothing was stored")]
    Truncated { verified: u64, size: u64 },
    /// More bytes came than a slice of the file can hold.
    #[error("the answer ran past the end of the file's slice")]
    TooLong,
}

fn exact<const N: usize>(what: &'static str, bytes: &[u8]) -> Result<[u8; N], WireError> {
    bytes.try_into().map_err(|_| WireError::BadLength {
        what,
        expected: N,
        got: bytes.len(),
    })
}

fn be_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(b)
}

/// A request for one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub hash: Hash,
    /// The first byte wanted (what an interrupted transfer already holds).
    pub offset: u64,
    /// The server may fetch the file from its own peers first.
    pub may_forward: bool,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..32].copy_from_slice(self.hash.as_bytes());
        out[32..40].copy_from_slice(&self.offset.to_be_bytes());
        out[40] = if self.may_forward { MAY_FORWARD } else { 0 };
        out
    }

    /// Exactly [`REQUEST_LEN`] bytes; flags this version does not know are ignored.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let b: [u8; REQUEST_LEN] = exact("request", bytes)?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[..32]);
        Ok(Request {
            hash: Hash::from_bytes(hash),
            offset: be_u64(&b[32..40]),
            may_forward: b[40] & MAY_FORWARD != 0,
        })
    }
}

/// The first byte of an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// A [`Head`] and the file's slice follow.
    Ok,
    /// The server does not hold the file (nor could fetch it, when asked to).
    NotHere,
    /// The asker may not have it: not admitted, or no entity its member may see
    /// references the file.
    Refused,
}

impl Status {
    pub fn to_byte(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::NotHere => 1,
            Status::Refused => 2,
        }
    }

    pub fn from_byte(b: u8) -> Result<Self, WireError> {
        match b {
            0 => Ok(Status::Ok),
            1 => Ok(Status::NotHere),
            2 => Ok(Status::Refused),
            other => Err(WireError::UnknownStatus(other)),
        }
    }
}

/// What follows an OK status: the file's size and where its slice starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub size: u64,
    pub start: u64,
}

impl Head {
    /// The head a server sends for a file of `size` bytes asked from `offset`: from there,
    /// or from 0 when the offset is past the end.
    pub fn answering(size: u64, offset: u64) -> Self {
        Head {
            size,
            start: if offset <= size { offset } else { 0 },
        }
    }

    /// The whole OK answer before the slice: the status byte and the head.
    pub fn encode_ok(&self) -> [u8; 1 + HEAD_LEN] {
        let mut out = [0u8; 1 + HEAD_LEN];
        out[0] = Status::Ok.to_byte();
        out[1..9].copy_from_slice(&self.size.to_be_bytes());
        out[9..].copy_from_slice(&self.start.to_be_bytes());
        out
    }

    /// Exactly [`HEAD_LEN`] bytes, for a request from `asked`: refused when the file is over
    /// `max_size`, or when the slice starts neither at `asked` nor at 0 (a server starts
    /// over from 0 when it cannot resume), or past the end.
    pub fn decode(bytes: &[u8], asked: u64, max_size: u64) -> Result<Self, WireError> {
        let b: [u8; HEAD_LEN] = exact("answer head", bytes)?;
        let head = Head {
            size: be_u64(&b[..8]),
            start: be_u64(&b[8..]),
        };
        if head.size > max_size {
            return Err(WireError::TooLarge {
                size: head.size,
                limit: max_size,
            });
        }
        if head.start > head.size || (head.start != 0 && head.start != asked) {
            return Err(WireError::BadStart {
                start: head.start,
                size: head.size,
                asked,
            });
        }
        Ok(head)
    }
}

/// The most bytes the slice of a `size`-byte file can take on the wire (its whole bao
/// encoding: no slice of it is longer).
pub fn max_slice_len(size: u64) -> u64 {
    u64::try_from(bao::encode::encoded_size(size)).unwrap_or(u64::MAX)
}

/// The slice of `content` from `start` (to its end), as a server sends it, made from bytes
/// held in memory (a browser tab's): the BLAKE3 tree is computed first (about 6 % of the
/// size), then the slice reads out in pieces. `None` if `content` does not hash to `hash`
/// (a damaged copy is never served).
pub fn slice_from_memory<'a>(content: &'a [u8], hash: &Hash, start: u64) -> Option<impl Read + 'a> {
    let (outboard, root) = bao::encode::outboard(content);
    if root.as_bytes() != hash.as_bytes() {
        return None;
    }
    let size = content.len() as u64;
    Some(bao::encode::SliceExtractor::new_outboard(
        std::io::Cursor::new(content),
        std::io::Cursor::new(outboard),
        start,
        size.saturating_sub(start),
    ))
}

/// Verifies a whole file's slice (asked from offset 0) as its bytes arrive, in whatever
/// pieces the transport delivers: each 1 KiB chunk is checked against the hash's BLAKE3
/// tree as soon as it and the tree nodes above it are in, and only checked bytes come out.
/// Holds at most one unverified chunk and its tree nodes beyond what was pushed last.
#[derive(Debug)]
pub struct Verifier {
    decoder: bao::decode::Decoder<Pending>,
    input: Rc<RefCell<Buffered>>,
    size: u64,
    verified: u64,
    taken: u64,
    done: bool,
}

impl Verifier {
    /// For the file `hash` of `size` bytes (a [`Head`] with `start` 0).
    pub fn new(hash: &Hash, size: u64) -> Self {
        let input = Rc::new(RefCell::new(Buffered::default()));
        let root = bao::Hash::from(*hash.as_bytes());
        Verifier {
            decoder: bao::decode::Decoder::new(
                Pending {
                    input: input.clone(),
                    at: 0,
                },
                &root,
            ),
            input,
            size,
            verified: 0,
            taken: 0,
            done: false,
        }
    }

    /// Takes the next bytes of the slice; appends those of the file they prove to `out`.
    /// A chunk that does not verify is [`WireError::Corrupt`]; bytes beyond the slice are
    /// [`WireError::TooLong`].
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
        self.taken += bytes.len() as u64;
        if self.taken > max_slice_len(self.size) || (self.done && !bytes.is_empty()) {
            return Err(WireError::TooLong);
        }
        self.input.borrow_mut().bytes.extend_from_slice(bytes);
        let mut piece = [0u8; 1024];
        while !self.done {
            // A read that runs out of input leaves the decoder half-way through a chunk:
            // it goes back to the copy from before, and tries again with more bytes.
            let before = self.decoder.clone();
            match self.decoder.read(&mut piece) {
                Ok(0) => self.done = true,
                Ok(n) => {
                    out.extend_from_slice(&piece[..n]);
                    self.verified += n as u64;
                    self.input.borrow_mut().consumed();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.decoder = before;
                    break;
                }
                Err(_) => {
                    return Err(WireError::Corrupt {
                        verified: self.verified,
                    })
                }
            }
        }
        Ok(())
    }

    /// Bytes of the file verified so far.
    pub fn verified(&self) -> u64 {
        self.verified
    }

    /// After the last byte: whether the whole file came and was proven.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.done && self.verified == self.size {
            Ok(())
        } else {
            Err(WireError::Truncated {
                verified: self.verified,
                size: self.size,
            })
        }
    }
}

/// The slice bytes received and not yet verified; `base` is the slice offset of the first.
#[derive(Debug, Default)]
struct Buffered {
    bytes: Vec<u8>,
    base: u64,
    /// Where the decoder's reader stood after its last read.
    last_read: u64,
}

impl Buffered {
    /// Drops the bytes the decoder has read for good (it only goes back within a read).
    fn consumed(&mut self) {
        let n = (self.last_read - self.base) as usize;
        self.bytes.drain(..n);
        self.base = self.last_read;
    }
}

/// The decoder's reader: the buffered bytes from `at`, and `WouldBlock` when they run out.
#[derive(Debug, Clone)]
struct Pending {
    input: Rc<RefCell<Buffered>>,
    at: u64,
}

impl Read for Pending {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut input = self.input.borrow_mut();
        let from = (self.at - input.base) as usize;
        let available = &input.bytes[from..];
        if available.is_empty() && !buf.is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(available.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.at += n as u64;
        input.last_read = self.at;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            hash: Hash::of(b"photo"),
            offset: 0x0102_0304_0506_0708,
            may_forward: true,
        }
    }

    #[test]
    fn a_request_round_trips_and_a_wrong_length_is_refused() {
        let r = request();
        let bytes = r.encode();
        assert_eq!(
            &bytes[32..40],
            &[1, 2, 3, 4, 5, 6, 7, 8],
            "offset is big-endian"
        );
        assert_eq!(bytes[40], MAY_FORWARD);
        assert_eq!(Request::decode(&bytes), Ok(r));
        for len in [0, 40, 42] {
            let mut b = bytes.to_vec();
            b.resize(len, 0);
            assert_eq!(
                Request::decode(&b),
                Err(WireError::BadLength {
                    what: "request",
                    expected: 41,
                    got: len
                })
            );
        }
        let mut unknown_flags = bytes;
        unknown_flags[40] = 0b1111_1110;
        assert!(
            !Request::decode(&unknown_flags)
                .expect("request")
                .may_forward
        );
    }

    #[test]
    fn statuses_are_the_native_bytes_and_unknown_ones_are_refused() {
        for (s, b) in [(Status::Ok, 0), (Status::NotHere, 1), (Status::Refused, 2)] {
            assert_eq!(s.to_byte(), b);
            assert_eq!(Status::from_byte(b), Ok(s));
        }
        assert_eq!(Status::from_byte(3), Err(WireError::UnknownStatus(3)));
    }

    #[test]
    fn a_head_is_checked_against_the_limit_and_the_offset_asked() {
        let ok = Head::answering(5000, 1024).encode_ok();
        assert_eq!(ok[0], 0);
        assert_eq!(
            Head::decode(&ok[1..], 1024, 10_000),
            Ok(Head {
                size: 5000,
                start: 1024
            })
        );
        assert_eq!(Head::answering(5000, 6000).start, 0, "past the end: from 0");
        assert!(matches!(
            Head::decode(&ok[1..], 1024, 4999),
            Err(WireError::TooLarge {
                size: 5000,
                limit: 4999
            })
        ));
        assert!(matches!(
            Head::decode(&ok[1..], 0, 10_000),
            Err(WireError::BadStart { .. })
        ));
        let past = Head {
            size: 10,
            start: 11,
        }
        .encode_ok();
        assert!(matches!(
            Head::decode(&past[1..], 11, 100),
            Err(WireError::BadStart { .. })
        ));
        assert!(matches!(
            Head::decode(&ok[1..16], 1024, 10_000),
            Err(WireError::BadLength { got: 15, .. })
        ));
        assert!(matches!(
            Head::decode(&[0; 17], 0, 10_000),
            Err(WireError::BadLength { got: 17, .. })
        ));
    }

    fn content(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 1024) as u8).collect()
    }

    fn slice(content: &[u8], start: u64) -> Vec<u8> {
        let mut out = Vec::new();
        slice_from_memory(content, &Hash::of(content), start)
            .expect("the content's own hash")
            .read_to_end(&mut out)
            .expect("in memory");
        out
    }

    /// Pushes `slice` in pieces of `piece` bytes; the file's bytes, or the first error.
    fn receive(hash: &Hash, size: u64, slice: &[u8], piece: usize) -> Result<Vec<u8>, WireError> {
        let mut v = Verifier::new(hash, size);
        let mut out = Vec::new();
        for p in slice.chunks(piece.max(1)) {
            v.push(p, &mut out)?;
        }
        v.finish()?;
        assert_eq!(v.verified(), out.len() as u64);
        Ok(out)
    }

    #[test]
    fn a_slice_verifies_in_any_pieces() {
        for n in [0, 1, 1023, 1024, 1025, 5000, 70_000] {
            let bytes = content(n);
            let s = slice(&bytes, 0);
            assert!(s.len() as u64 <= max_slice_len(n as u64));
            for piece in [1, 7, 64, 1024, 1100, 64 << 10] {
                assert_eq!(
                    receive(&Hash::of(&bytes), n as u64, &s, piece).as_deref(),
                    Ok(&bytes[..]),
                    "{n} bytes in pieces of {piece}"
                );
            }
        }
    }

    #[test]
    fn the_in_memory_slice_is_what_the_native_server_sends() {
        let bytes = content(9000);
        let (outboard, _) = bao::encode::outboard(&bytes);
        for start in [0u64, 1024, 4096] {
            let mut native = Vec::new();
            bao::encode::SliceExtractor::new_outboard(
                std::io::Cursor::new(&bytes),
                std::io::Cursor::new(&outboard),
                start,
                9000 - start,
            )
            .read_to_end(&mut native)
            .expect("in memory");
            assert_eq!(slice(&bytes, start), native);
        }
        assert!(slice_from_memory(&bytes, &Hash::of(b"other"), 0).is_none());
    }

    #[test]
    fn a_tampered_truncated_or_overlong_slice_is_an_error() {
        let bytes = content(5000);
        let hash = Hash::of(&bytes);
        let s = slice(&bytes, 0);
        let mut tampered = s.clone();
        let last = tampered.len() - 10;
        tampered[last] ^= 1;
        assert!(matches!(
            receive(&hash, 5000, &tampered, 512),
            Err(WireError::Corrupt { verified: 4096 })
        ));
        assert!(matches!(
            receive(&Hash::of(b"not it"), 5000, &s, 512),
            Err(WireError::Corrupt { verified: 0 })
        ));
        assert!(matches!(
            receive(&hash, 5000, &s[..s.len() - 1], 512),
            Err(WireError::Truncated { size: 5000, .. })
        ));
        let mut longer = s.clone();
        longer.push(0);
        assert_eq!(receive(&hash, 5000, &longer, 512), Err(WireError::TooLong));
        // A size that is not the file's: the tree does not match.
        assert!(receive(&hash, 4999, &s, 512).is_err());
    }
}
