use super::*;

/// (type, flags, stream, payload)
type Frame = (u8, u8, u32, Vec<u8>);
/// Decoded header list.
type Block = Vec<(Vec<u8>, Vec<u8>)>;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    frame_header(&mut f, payload.len(), kind, flags, stream);
    f.extend_from_slice(payload);
    f
}

/// Parse frames out of `bytes` (after the preface).
fn frames(bytes: &[u8]) -> Vec<Frame> {
    assert_eq!(&bytes[..PREFACE.len()], PREFACE);
    let mut b = &bytes[PREFACE.len()..];
    let mut out = Vec::new();
    while !b.is_empty() {
        let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
        let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
        out.push((b[3], b[4], stream, b[9..9 + len].to_vec()));
        b = &b[9 + len..];
    }
    out
}

fn request(authority: &str) -> Vec<(&'static [u8], Vec<u8>)> {
    vec![
        (b":method", b"POST".to_vec()),
        (b":scheme", b"http".to_vec()),
        (b":path", b"/runtime.v1.RuntimeService/Version".to_vec()),
        (b":authority", authority.as_bytes().to_vec()),
        (b"content-type", b"application/grpc".to_vec()),
        (b"te", b"trailers".to_vec()),
    ]
}

/// Feed `bytes` in chunks of `chunk` and decode every header block the
/// server would see with a fresh server-side decoder.
fn run(bytes: &[u8], chunk: usize) -> (Vec<Block>, Vec<Frame>, u64) {
    let mut rw = Rewriter::default();
    let mut out = Vec::new();
    for c in bytes.chunks(chunk) {
        rw.feed(c, &mut out);
    }
    let fs = frames(&out);
    let mut dec = loona_hpack::Decoder::new();
    let mut blocks = Vec::new();
    let mut cur = Vec::new();
    for (kind, flags, _, payload) in &fs {
        if *kind == HEADERS || *kind == CONTINUATION {
            let (_, frag) = if *kind == HEADERS {
                split_headers_payload(*flags, payload).unwrap()
            } else {
                (None, &payload[..])
            };
            cur.extend_from_slice(frag);
            if flags & END_HEADERS != 0 {
                blocks.push(dec.decode(&cur).unwrap());
                cur.clear();
            }
        }
    }
    (blocks, fs, rw.rewritten())
}

fn authority(block: &[(Vec<u8>, Vec<u8>)]) -> String {
    let v = &block.iter().find(|(n, _)| n == b":authority").unwrap().1;
    String::from_utf8(v.clone()).unwrap()
}

#[test]
fn socket_path_authority_becomes_localhost_across_indexed_requests() {
    // The client's encoder indexes headers: the second request refers to
    // the dynamic table entry holding the socket path.
    let mut enc = loona_hpack::Encoder::new();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    for stream in [1u32, 3] {
        let hs = request("/run/vmpod/vmpod.sock");
        let block = enc.encode(hs.iter().map(|(n, v)| (*n, &v[..])));
        bytes.extend(frame(HEADERS, END_HEADERS, stream, &block));
        bytes.extend(frame(0x0, END_STREAM, stream, &[0, 0, 0, 0, 0])); // DATA
    }
    for chunk in [1, 7, 4096] {
        let (blocks, fs, n) = run(&bytes, chunk);
        assert_eq!(blocks.len(), 2);
        for b in &blocks {
            assert_eq!(authority(b), "localhost");
            assert_eq!(b.len(), 6, "other headers kept");
            assert!(b.contains(&(
                b":path".to_vec(),
                b"/runtime.v1.RuntimeService/Version".to_vec()
            )));
        }
        assert_eq!(n, 2);
        // SETTINGS and DATA untouched, in order.
        let kinds: Vec<u8> = fs.iter().map(|f| f.0).collect();
        assert_eq!(kinds, [0x4, HEADERS, 0x0, HEADERS, 0x0]);
        assert_eq!(fs[2].3, [0, 0, 0, 0, 0]);
        assert_eq!(fs[2].1, END_STREAM);
    }
}

#[test]
fn valid_authority_is_kept_and_padding_priority_continuation_handled() {
    let mut enc = loona_hpack::Encoder::new();
    let hs = request("localhost:1234");
    let block = enc.encode(hs.iter().map(|(n, v)| (*n, &v[..])));
    let (a, b) = block.split_at(block.len() / 2);
    // HEADERS with PADDED|PRIORITY carrying half the block, then CONTINUATION.
    let mut payload = vec![3u8]; // pad length
    payload.extend_from_slice(&[0, 0, 0, 0, 16]); // dependency + weight
    payload.extend_from_slice(a);
    payload.extend_from_slice(&[0, 0, 0]);
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &payload));
    bytes.extend(frame(CONTINUATION, END_HEADERS, 1, b));
    let (blocks, fs, n) = run(&bytes, 5);
    assert_eq!(n, 0);
    assert_eq!(authority(&blocks[0]), "localhost:1234");
    assert_eq!(fs.len(), 1, "re-emitted as one HEADERS frame");
    assert_eq!(fs[0].1, PRIORITY | END_STREAM | END_HEADERS);
    assert_eq!(&fs[0].3[..5], &[0, 0, 0, 0, 16]);
}

#[test]
fn huge_header_block_is_split_into_continuations() {
    let mut enc = loona_hpack::Encoder::new();
    let mut hs = request("/tmp/x.sock");
    hs.push((b"x-big", vec![b'a'; 40_000]));
    let block = enc.encode(hs.iter().map(|(n, v)| (*n, &v[..])));
    let mut bytes = PREFACE.to_vec();
    for (i, c) in block.chunks(MAX_FRAME).enumerate() {
        let last = (i + 1) * MAX_FRAME >= block.len();
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        bytes.extend(frame(kind, if last { END_HEADERS } else { 0 }, 1, c));
    }
    let (blocks, fs, _) = run(&bytes, 1000);
    assert_eq!(authority(&blocks[0]), "localhost");
    assert!(fs.iter().all(|f| f.3.len() <= MAX_FRAME));
    assert!(fs.len() >= 3);
}

#[test]
fn non_http2_and_garbage_pass_through_unchanged() {
    let mut rw = Rewriter::default();
    let mut out = Vec::new();
    rw.feed(b"GET / HTTP/1.1\r\n\r\n", &mut out);
    assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");

    // A header block that does not decode: original bytes go through.
    let mut bytes = PREFACE.to_vec();
    let bad = frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]);
    bytes.extend(&bad);
    bytes.extend(frame(0x0, 0, 1, b"after"));
    let mut rw = Rewriter::default();
    let mut out = Vec::new();
    rw.feed(&bytes, &mut out);
    assert_eq!(out, bytes);
}

#[test]
fn header_block_that_decodes_huge_passes_through_unexpanded() {
    // One ~4 KB header added to the dynamic table (literal with incremental
    // indexing, new name), then referenced by index 62 a thousand times:
    // a ~5 KB block that decodes to ~4 MB. We must not build that.
    let value = vec![b'v'; 4000];
    let mut block = vec![0x40];
    encode_integer_into(5, 7, 0, &mut block).unwrap();
    block.extend_from_slice(b"x-big");
    encode_integer_into(value.len(), 7, 0, &mut block).unwrap();
    block.extend_from_slice(&value);
    block.extend(std::iter::repeat_n(0x80 | 62, 1000));
    let mut bytes = PREFACE.to_vec();
    for (i, c) in block.chunks(MAX_FRAME).enumerate() {
        let last = (i + 1) * MAX_FRAME >= block.len();
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        bytes.extend(frame(kind, if last { END_HEADERS } else { 0 }, 1, c));
    }
    let mut rw = Rewriter::default();
    let mut out = Vec::new();
    rw.feed(&bytes, &mut out);
    assert_eq!(out, bytes, "original bytes, for h2 to judge");
    assert_eq!(rw.rewritten(), 0);
}
