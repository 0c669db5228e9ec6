use super::*;

#[derive(Debug, PartialEq, Eq, Clone)]
enum Ev {
    Head {
        method: String,
        target: String,
        host: Option<String>,
        body: BodyKind,
        len: usize,
    },
    /// Body bytes, consecutive steps merged.
    Body(usize),
    Error(HttpError),
}

/// Drives a parser the way the enforcer does: unconsumed bytes accumulate, each step
/// consumes from the front.
fn feed(chunks: &[&[u8]]) -> Vec<Ev> {
    let mut p = RequestStream::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut events = Vec::new();
    for chunk in chunks {
        pending.extend_from_slice(chunk);
        loop {
            let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let consumed = match p.parse(&pending, &mut hdrs) {
                Ok(Step::Head { head, len }) => {
                    events.push(Ev::Head {
                        method: head.method.to_string(),
                        target: head.target.to_string(),
                        host: head.host.map(str::to_string),
                        body: head.body,
                        len,
                    });
                    len
                }
                Ok(Step::Body { len }) => {
                    assert!(len > 0);
                    match events.last_mut() {
                        Some(Ev::Body(n)) => *n += len,
                        _ => events.push(Ev::Body(len)),
                    }
                    len
                }
                Ok(Step::Partial) => break,
                Err(e) => {
                    events.push(Ev::Error(e));
                    // A failed parser stays failed.
                    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    assert_eq!(
                        p.parse(b"GET / HTTP/1.1\r\n\r\n", &mut hdrs).unwrap_err(),
                        e
                    );
                    return events;
                }
            };
            pending.drain(..consumed);
        }
    }
    events
}

fn whole(input: &[u8]) -> Vec<Ev> {
    feed(&[input])
}

fn head(method: &str, target: &str, host: Option<&str>, body: BodyKind, len: usize) -> Ev {
    Ev::Head {
        method: method.into(),
        target: target.into(),
        host: host.map(Into::into),
        body,
        len,
    }
}

const GET: &[u8] = b"GET /api/items?x=1 HTTP/1.1\r\nHost: svc.example:8080\r\nAccept: */*\r\n\r\n";

const CHUNKED: &[u8] = b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
5;name=val;q=\"a\\\"b;c\"\r\nhello\r\n\
6 ; x ; y=z\r\n world\r\n\
A\r\n0123456789\r\n\
0;last\r\nX-Checksum: abc\r\nX-Other:\tu v\r\n\r\n";

#[test]
fn single_get() {
    assert_eq!(
        whole(GET),
        vec![head(
            "GET",
            "/api/items?x=1",
            Some("svc.example:8080"),
            BodyKind::None,
            GET.len()
        )]
    );
}

#[test]
fn head_accessors() {
    let mut p = RequestStream::default();
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let input = b"GET / HTTP/1.1\r\nHost:  a  \r\nX-Tenant: \t blue \r\n\r\n";
    let Ok(Step::Head { head, .. }) = p.parse(input, &mut hdrs) else {
        panic!("no head");
    };
    assert_eq!(head.host, Some("a"));
    assert_eq!(head.header("x-tenant"), Some(&b"blue"[..]));
    assert_eq!(head.header("missing"), None);
    assert_eq!(head.version, Version::Http11);
    assert_eq!(head.headers.len(), 2);
}

#[test]
fn keep_alive_sequence_with_bodies() {
    let mut input = Vec::new();
    input.extend_from_slice(GET);
    let post = b"POST /api/items HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n";
    input.extend_from_slice(post);
    input.extend_from_slice(b"{\"id\": 42}\n");
    input.extend_from_slice(CHUNKED);
    input.extend_from_slice(b"DELETE /api/items/42 HTTP/1.1\r\nHost: a\r\n\r\n");
    let events = whole(&input);
    assert_eq!(
        events,
        vec![
            head(
                "GET",
                "/api/items?x=1",
                Some("svc.example:8080"),
                BodyKind::None,
                GET.len()
            ),
            head(
                "POST",
                "/api/items",
                Some("a"),
                BodyKind::Length(11),
                post.len()
            ),
            Ev::Body(11),
            head("POST", "/upload", Some("a"), BodyKind::Chunked, 62),
            Ev::Body(CHUNKED.len() - 62),
            head("DELETE", "/api/items/42", Some("a"), BodyKind::None, 42),
        ]
    );
}

#[test]
fn every_split_gives_the_same_result() {
    let mut corpus: Vec<Vec<u8>> = vec![GET.to_vec(), CHUNKED.to_vec()];
    let mut pipelined = Vec::new();
    for _ in 0..3 {
        pipelined.extend_from_slice(GET);
        pipelined.extend_from_slice(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc");
        pipelined.extend_from_slice(CHUNKED);
    }
    corpus.push(pipelined);
    // Inputs that fail must fail the same way wherever they are split.
    corpus.push(
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx".to_vec(),
    );
    corpus.push(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n".to_vec(),
    );
    corpus.push(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n"
            .to_vec(),
    );

    // Body bytes before an error in the body may be reported or not depending on where
    // the input was split (they belong to an allowed request either way): compare heads,
    // bodies of completed requests and the error.
    fn significant(mut events: Vec<Ev>) -> Vec<Ev> {
        if let [.., Ev::Body(_), Ev::Error(_)] = events[..] {
            events.remove(events.len() - 2);
        }
        events
    }
    for input in &corpus {
        let want = significant(whole(input));
        for i in 0..=input.len() {
            assert_eq!(
                significant(feed(&[&input[..i], &input[i..]])),
                want,
                "split at {i}"
            );
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(significant(feed(&bytes)), want, "byte by byte");
    }
}

#[test]
fn chunked_with_extensions_and_trailers() {
    let mut input = CHUNKED.to_vec();
    input.extend_from_slice(GET);
    let events = whole(&input);
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[1], Ev::Body(CHUNKED.len() - 62));
    assert!(matches!(&events[2], Ev::Head { method, .. } if method == "GET"));
}

#[test]
fn large_bodies_are_counted_not_kept() {
    let mut p = RequestStream::default();
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let h = b"PUT /big HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000000\r\n\r\n";
    assert!(matches!(p.parse(h, &mut hdrs), Ok(Step::Head { len, .. }) if len == h.len()));
    let block = vec![0u8; 1 << 20];
    let mut total = 0u64;
    while total < 10_000_000_000 {
        let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let want = (10_000_000_000 - total).min(block.len() as u64) as usize;
        match p.parse(&block, &mut hdrs) {
            Ok(Step::Body { len }) => {
                assert_eq!(len, want);
                total += len as u64;
            }
            other => panic!("{other:?}"),
        }
        if total > 5_000_000 {
            // Skip ahead: the state is just a counter.
            break;
        }
    }
    assert!(!p.at_head());
}

#[test]
fn http10_needs_no_host() {
    assert_eq!(
        whole(b"GET / HTTP/1.0\r\n\r\n"),
        vec![head("GET", "/", None, BodyKind::None, 18)]
    );
}

#[test]
fn leading_empty_lines_are_skipped() {
    let input = b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
    assert_eq!(
        whole(input),
        vec![head("GET", "/", Some("a"), BodyKind::None, input.len())]
    );
}

#[test]
fn absolute_form_must_match_host() {
    let ok = b"GET http://A.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n";
    assert!(matches!(whole(ok)[0], Ev::Head { .. }));
    let bad = b"GET http://admin.internal/x HTTP/1.1\r\nHost: a.example\r\n\r\n";
    assert_eq!(whole(bad), vec![Ev::Error(HttpError::HostMismatch)]);
}

#[test]
fn smuggling_shapes_are_refused() {
    use HttpError::*;
    let cases: &[(&[u8], HttpError)] = &[
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            ContentLengthAndTransferEncoding,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            ContentLengthAndTransferEncoding,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            RepeatedContentLength,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            RepeatedContentLength,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", InvalidContentLength),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", InvalidContentLength),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n", InvalidContentLength),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n", InvalidContentLength),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
            InvalidContentLength,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            UnsupportedTransferCoding,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            UnsupportedTransferCoding,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            UnsupportedTransferCoding,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            UnsupportedTransferCoding,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            UnsupportedTransferCoding,
        ),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", TransferEncodingInHttp10),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\n\r\n",
            AmbiguousHeaderName,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent_Length: 4\r\n\r\n", AmbiguousHeaderName),
        // Bare LF in the head.
        (b"GET / HTTP/1.1\nHost: a\r\n\r\n", BareLf),
        (b"GET / HTTP/1.1\r\nHost: a\n\r\n", BareLf),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\n", BareLf),
        (b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", BareLf),
        // obs-fold in the head (httparse refuses it in requests).
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n Transfer-Encoding: chunked\r\n\r\n",
            Malformed(httparse::Error::HeaderName),
        ),
        // Space before the colon.
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
            Malformed(httparse::Error::HeaderName),
        ),
        // Host rules.
        (b"GET / HTTP/1.1\r\n\r\n", MissingHost),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", RepeatedHost),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", Connect),
        // Chunk sizes.
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\r\n", InvalidChunkSize),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nx\r\n", InvalidChunkSize),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", InvalidChunkSize),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n+1\r\n", InvalidChunkSize),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x1\r\n", InvalidChunkSize),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n 1\r\n", InvalidChunkSize),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1 \r\n", InvalidChunkSize),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\rx", InvalidChunkSize),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000\r\n",
            ChunkSizeTooLarge,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\nx\r\n", BareLf),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1;a\nx\r\n", BareLf),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1;a=\"x\ry\"\r\n",
            InvalidChunkExtension,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1;a@b\r\n",
            InvalidChunkExtension,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxy\r\n", MissingChunkCrlf),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\n", MissingChunkCrlf),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\rx", MissingChunkCrlf),
        // Trailers.
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nA: b\n\r\n", BareLf),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\n", BareLf),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nA: b\r\n c\r\n\r\n", ObsFold),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nnocolon\r\n\r\n", InvalidTrailer),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nA b: c\r\n\r\n", InvalidTrailer),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\rx", InvalidTrailer),
    ];
    for (input, want) in cases {
        let events = whole(input);
        assert_eq!(
            events.last(),
            Some(&Ev::Error(*want)),
            "input {:?}",
            String::from_utf8_lossy(input)
        );
        assert_eq!(want.status(), 400);
    }
}

#[test]
fn non_http_bytes_are_refused() {
    let tls_client_hello = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    for input in [
        &tls_client_hello[..],
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x00\x00\x00\x00",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\n",
    ] {
        let events = whole(input);
        assert!(
            matches!(events.last(), Some(Ev::Error(HttpError::Malformed(_)))),
            "{input:?}: {events:?}"
        );
    }
}

#[test]
fn size_limits_are_431() {
    let limits = Limits {
        max_head: 64,
        ..Limits::default()
    };
    let mut p = RequestStream::new(limits);
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let input = b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: 0123456789012345678901234567890123456789";
    let err = p.parse(input, &mut hdrs).unwrap_err();
    assert_eq!(err, HttpError::HeadTooLarge);
    assert_eq!(err.status(), 431);

    // Complete but too large.
    let mut p = RequestStream::new(limits);
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let input =
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: 0123456789012345678901234567890123456789\r\n\r\n";
    assert_eq!(
        p.parse(input, &mut hdrs).unwrap_err(),
        HttpError::HeadTooLarge
    );

    let mut many = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..MAX_HEADERS {
        many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let events = whole(&many);
    assert_eq!(events, vec![Ev::Error(HttpError::TooManyHeaders)]);
    assert_eq!(HttpError::TooManyHeaders.status(), 431);

    let long_ext = [
        &b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1;"[..],
        &[b'a'; 5000][..],
    ]
    .concat();
    assert_eq!(
        whole(&long_ext).last(),
        Some(&Ev::Error(HttpError::ChunkLineTooLong))
    );
    let long_trailer = [
        &b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nA: "[..],
        &[b'a'; 9000][..],
    ]
    .concat();
    assert_eq!(
        whole(&long_trailer).last(),
        Some(&Ev::Error(HttpError::TrailersTooLarge))
    );
}

#[test]
fn partial_head_consumes_nothing() {
    let mut p = RequestStream::default();
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    assert!(matches!(p.parse(b"GET / HT", &mut hdrs), Ok(Step::Partial)));
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    assert!(matches!(p.parse(b"", &mut hdrs), Ok(Step::Partial)));
    assert!(p.at_head());
    assert_eq!(p.requests(), 0);
}

mod arbitrary {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes, split anywhere: no panic, and the same heads and error as unsplit.
        #[test]
        fn any_bytes_any_split(
            prefix in proptest::sample::select(vec![
                &b""[..],
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n",
            ]),
            tail in proptest::collection::vec(
                prop_oneof![
                    Just(b'\r'), Just(b'\n'), Just(b' '), Just(b':'), Just(b';'),
                    Just(b'0'), Just(b'a'), Just(b'G'), any::<u8>(),
                ],
                0..200,
            ),
            split in 0usize..300,
        ) {
            let input = [prefix, &tail[..]].concat();
            let split = split.min(input.len());
            fn significant(mut events: Vec<Ev>) -> Vec<Ev> {
                events.retain(|e| !matches!(e, Ev::Body(_)));
                events
            }
            let want = significant(whole(&input));
            prop_assert_eq!(significant(feed(&[&input[..split], &input[split..]])), want);
        }
    }
}

#[test]
fn opaque_body_bytes_can_be_skipped_unseen() {
    // Content-Length: the whole body, then the next head.
    let mut p = RequestStream::default();
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let post = b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n";
    assert!(matches!(p.parse(post, &mut hdrs), Ok(Step::Head { .. })));
    assert_eq!(p.opaque(), 10);
    assert_eq!(p.opaque_run(), Some((0, 10)));
    assert_eq!(p.body(b"abc"), Ok(3));
    assert_eq!(p.opaque(), 7);
    assert_eq!(p.opaque_run(), Some((3, 7)));
    p.skip_opaque(100);
    assert_eq!(p.opaque(), 0);
    assert_eq!(p.opaque_run(), None);
    assert!(p.at_head());
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    assert!(matches!(
        p.parse(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", &mut hdrs),
        Ok(Step::Head { .. })
    ));
    // Chunked: only chunk data is opaque; the framing after it is still parsed.
    let mut p = RequestStream::default();
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let post = b"POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert!(matches!(p.parse(post, &mut hdrs), Ok(Step::Head { .. })));
    assert_eq!(p.opaque(), 0, "a chunk size line is framing");
    assert_eq!(p.body(b"5\r\nab"), Ok(5));
    assert_eq!(p.opaque(), 3);
    assert_eq!(
        p.opaque_run(),
        Some((2, 3)),
        "the chunk's data, not the body's"
    );
    p.skip_opaque(2);
    assert_eq!(p.opaque(), 1);
    p.skip_opaque(1);
    assert_eq!(p.opaque(), 0);
    assert_eq!(
        p.body(b"x"),
        Err(HttpError::MissingChunkCrlf),
        "CRLF must follow"
    );
    let mut p2 = RequestStream::default();
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    assert!(matches!(p2.parse(post, &mut hdrs), Ok(Step::Head { .. })));
    assert_eq!(p2.body(b"2\r\n"), Ok(3));
    p2.skip_opaque(2);
    assert_eq!(p2.body(b"\r\n0\r\n\r\n"), Ok(7));
    assert!(p2.at_head());
    // Between requests nothing is opaque.
    p2.skip_opaque(5);
    assert!(p2.at_head());
}

/// Inside a chunked body the framing after a chunk's data is read before the data: jump
/// over it ([`RequestStream::chunk_data`], `skip_opaque`), then `framing` consumes the
/// CRLF, the next size line, and after the last chunk the trailers — not a chunk's
/// data, not the next head — checked as `body` checks them.
#[test]
fn chunk_framing_is_read_ahead_of_the_data() {
    let post = b"POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";
    let start = || {
        let mut p = RequestStream::default();
        let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        assert!(matches!(p.parse(post, &mut hdrs), Ok(Step::Head { .. })));
        p
    };
    let mut p = start();
    assert_eq!(p.chunk_data(), None, "a size line is not data");
    assert_eq!(p.framing(b"10;a=\"b\"\r\nxyz"), Ok(10), "up to the data");
    assert_eq!(p.chunk_data(), Some(16));
    assert_eq!(p.framing(b"xyz"), Ok(0), "data is not framing");
    p.skip_opaque(16);
    assert_eq!(p.chunk_data(), None);
    // In pieces, as segments cut it.
    assert_eq!(p.framing(b"\r"), Ok(1));
    assert_eq!(p.framing(b"\n2"), Ok(2));
    assert_eq!(p.framing(b"\r\nab\r\n"), Ok(2));
    assert_eq!(p.chunk_data(), Some(2));
    p.skip_opaque(2);
    // The last chunk and its trailers are framing; the next head is not.
    assert_eq!(p.framing(b"\r\n0\r\nT: 1\r\n"), Ok(11));
    assert_eq!((p.opaque(), p.at_head()), (0, false));
    assert_eq!(p.framing(b"\r\nGET / HTTP/1.1\r\n"), Ok(2));
    assert!(p.at_head());
    assert_eq!(p.framing(b"GET / HTTP/1.1\r\n"), Ok(0));
    // Wrong framing is refused, and the parser stays failed.
    let mut p = start();
    assert_eq!(p.framing(b"3\r\n"), Ok(3));
    p.skip_opaque(3);
    assert_eq!(p.framing(b"\r\nzz\r\n"), Err(HttpError::InvalidChunkSize));
    assert_eq!(p.body(b"\r\n0\r\n"), Err(HttpError::InvalidChunkSize));
    let mut p = start();
    assert_eq!(p.framing(b"3\r\n"), Ok(3));
    p.skip_opaque(3);
    assert_eq!(p.framing(b"x\r\n"), Err(HttpError::MissingChunkCrlf));
    let mut p = start();
    assert_eq!(p.framing(&[b'1'; 16]), Err(HttpError::ChunkSizeTooLarge));
    let mut p = start();
    assert_eq!(p.framing(b"0\r\n T: 1\r\n"), Err(HttpError::ObsFold));
    // Content-Length data has no framing after it to read ahead: the next head.
    let mut p = RequestStream::default();
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let put = b"PUT /u HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\n";
    assert!(matches!(p.parse(put, &mut hdrs), Ok(Step::Head { .. })));
    assert_eq!((p.opaque(), p.chunk_data()), (4, None));
    assert_eq!(p.framing(b"abcd"), Ok(0));
}
