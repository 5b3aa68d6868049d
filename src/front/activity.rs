//! What counts as activity for the idle timeout ([`super::IdleIo`]).
//!
//! On HTTP/1 every byte read or written does. On HTTP/2 a client can keep
//! a connection busy forever without any request making progress: PINGs,
//! SETTINGS, WINDOW_UPDATEs of a stream that still cannot move, streams
//! with a zero window. So on a connection that starts with the HTTP/2
//! preface, only frames that carry requests or responses count: HEADERS,
//! CONTINUATION and DATA, read or written. A frame read counts once it is
//! complete (a request trickled in a byte at a time is no progress; nor is
//! the preface until it is all there); a frame written counts as its bytes
//! go (a response frame can be as large as a body chunk, and a slow client
//! reading it is making progress). The scanner reads only the
//! 9-byte frame headers and skips payloads by length (it never looks at
//! payload bytes, so mapped file regions are never touched); it keeps no
//! buffer beyond one header.
//!
//! Hand-written because no crate exposes a passive frame-header scanner
//! (h2's codec owns the connection); the frame layout is RFC 9113 §4.1.

/// The HTTP/2 connection preface a client sends first (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types that carry a request or a response.
fn counts(frame_type: u8) -> bool {
    // DATA, HEADERS, CONTINUATION.
    matches!(frame_type, 0x0 | 0x1 | 0x9)
}

/// The activity rule of one connection: undecided until the first bytes
/// read show whether it speaks HTTP/2.
#[derive(Debug)]
pub(crate) enum Activity {
    /// Fewer bytes than the preface read so far, all matching it.
    Detecting(usize),
    /// Not HTTP/2: every byte counts.
    Http1,
    /// HTTP/2: frames are scanned in each direction.
    Http2 {
        /// Frames read (after the preface).
        read: Frames,
        /// Frames written.
        write: Frames,
    },
}

impl Default for Activity {
    fn default() -> Self {
        Activity::Detecting(0)
    }
}

impl Activity {
    /// `data` was read; whether it counts as activity.
    pub(crate) fn read(&mut self, data: &[u8]) -> bool {
        if data.is_empty() {
            return false;
        }
        if let Activity::Detecting(seen) = *self {
            let n = data.len().min(PREFACE.len() - seen);
            if data[..n] != PREFACE[seen..seen + n] {
                *self = Activity::Http1;
                return true;
            }
            if seen + n < PREFACE.len() {
                *self = Activity::Detecting(seen + n);
                return false;
            }
            let mut frames = Frames::whole();
            frames.scan(&data[n..]);
            *self = Activity::Http2 {
                read: frames,
                write: Frames::default(),
            };
            // The preface opens the connection: that is activity.
            return true;
        }
        match self {
            Activity::Http2 { read, .. } => read.scan(data),
            _ => true,
        }
    }

    /// `data` was written; whether it counts as activity. `data` is only
    /// looked at where frame headers are (see the module docs).
    pub(crate) fn written(&mut self, data: &[u8]) -> bool {
        match self {
            Activity::Http2 { write, .. } => write.scan(data),
            _ => !data.is_empty(),
        }
    }
}

/// A frame-header scanner for one direction of an HTTP/2 connection.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    /// Header bytes of the next frame collected so far.
    header: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    payload_left: usize,
    /// Whether the current frame counts.
    current_counts: bool,
    /// Whether a counting frame counts only once complete (else with each
    /// of its bytes).
    whole: bool,
}

impl Frames {
    /// A scanner on which a counting frame counts once complete.
    fn whole() -> Frames {
        Frames {
            whole: true,
            ..Frames::default()
        }
    }

    /// Feeds the next bytes of this direction; true when they are (or, for
    /// a scanner of whole frames, complete) a counting frame.
    fn scan(&mut self, mut data: &[u8]) -> bool {
        let mut active = false;
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(data.len());
                self.payload_left -= n;
                active |= self.current_counts && (!self.whole || self.payload_left == 0);
                data = &data[n..];
                continue;
            }
            let n = (9 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < 9 {
                continue;
            }
            self.have = 0;
            let len = u32::from_be_bytes([0, self.header[0], self.header[1], self.header[2]]);
            self.current_counts = counts(self.header[3]);
            self.payload_left = len as usize;
            active |= self.current_counts && (!self.whole || len == 0);
        }
        active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, 0, 0, 0, 0, 1]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn http1_counts_every_byte() {
        let mut a = Activity::default();
        assert!(a.read(b"GET / HTTP/1.1\r\n"));
        assert!(matches!(a, Activity::Http1));
        assert!(a.read(b"x"));
        assert!(a.written(b"HTTP/1.1 200 OK\r\n"));
        // A prefix of the preface (not activity yet) that turns out to be
        // something else.
        let mut a = Activity::default();
        assert!(!a.read(b"PRI"));
        assert!(a.read(b" nope"));
        assert!(matches!(a, Activity::Http1));
    }

    #[test]
    fn http2_counts_only_request_and_response_frames_in_any_split() {
        let ping = frame(0x6, &[0; 8]);
        let settings = frame(0x4, &[0; 6]);
        let window = frame(0x8, &[0, 0, 0, 1]);
        let headers = frame(0x1, &[0x82; 20]);
        let data = frame(0x0, &[7; 1000]);
        let mut stream = PREFACE.to_vec();
        stream.extend(&settings);
        // Split at every offset: the answers must not depend on how reads
        // cut the bytes.
        for cut in 1..stream.len() {
            let mut a = Activity::default();
            // The preface counts once it is all there.
            assert_eq!(a.read(&stream[..cut]), cut >= PREFACE.len());
            a.read(&stream[cut..]);
            assert!(matches!(a, Activity::Http2 { .. }), "cut {cut}");
            assert!(!a.read(&ping), "PING is not activity");
            assert!(!a.read(&window), "WINDOW_UPDATE is not activity");
            assert!(!a.written(&ping), "PING ACK is not activity");
            assert!(!a.written(&settings));
            assert!(a.read(&headers), "a request is activity");
            assert!(a.written(&data), "response data is activity");
        }
        // A frame arriving byte by byte counts once, with its last byte (a
        // trickle is not progress); the PING after it never does. Nor do
        // the preface's bytes before the last.
        let mut a = Activity::default();
        let preface: Vec<bool> = PREFACE
            .iter()
            .map(|b| a.read(std::slice::from_ref(b)))
            .collect();
        assert_eq!(preface.iter().filter(|&&x| x).count(), 1);
        assert!(preface[PREFACE.len() - 1]);
        let mut all = data.clone();
        all.extend(&ping);
        all.extend(frame(0x1, &[]));
        let active: Vec<usize> = all
            .iter()
            .enumerate()
            .filter(|(_, b)| a.read(std::slice::from_ref(*b)))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(active, vec![data.len() - 1, all.len() - 1]);
        // Written, a response frame counts as its bytes go (a slow reader
        // of a large frame is making progress); the PING after it does not.
        let written: Vec<bool> = all[..data.len() + ping.len()]
            .iter()
            .map(|b| a.written(std::slice::from_ref(b)))
            .collect();
        // (The first 8 header bytes alone say nothing yet.)
        assert!(written[8..data.len()].iter().all(|&x| x));
        assert!(written[data.len()..].iter().all(|&x| !x));
    }
}
