use super::*;

fn reader() -> RequestReader {
    RequestReader::new(Limits::with_max_body(1024))
}

fn head(ev: Option<Event>) -> Head {
    match ev {
        Some(Event::Head(h)) => h,
        other => panic!("expected a head, got {other:?}"),
    }
}

fn body(ev: Option<Event>) -> Vec<u8> {
    match ev {
        Some(Event::Body(b)) => b,
        other => panic!("expected a body, got {other:?}"),
    }
}

fn error(r: &mut RequestReader, bytes: &[u8]) -> RequestError {
    r.push(bytes);
    loop {
        match r.poll() {
            Some(Event::Error(e)) => return e,
            Some(_) => continue,
            None => panic!("no error for {:?}", String::from_utf8_lossy(bytes)),
        }
    }
}

const POST: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer sk-1\r\nContent-Length: 5\r\n\r\nhello";

#[test]
fn whole_request_in_one_read() {
    let mut r = reader();
    r.push(POST);
    let h = head(r.poll());
    assert_eq!(h.method, "POST");
    assert_eq!(h.route(), "/v1/chat/completions");
    assert_eq!(h.version, Version::Http11);
    assert_eq!(h.content_length, 5);
    assert!(h.keep_alive);
    assert_eq!(h.content_type.as_deref(), Some("application/json"));
    assert_eq!(h.bearer_token(), Some(&b"sk-1"[..]));
    assert!(!h.expect_continue);
    assert_eq!(body(r.poll()), b"hello");
    assert_eq!(r.poll(), None);
    assert!(!r.wants_bytes());
    assert!(!r.has_partial());
}

#[test]
fn any_split_gives_the_same_events() {
    let two: Vec<u8> = [POST, b"GET /v1/models?x HTTP/1.1\r\n\r\n"].concat();
    let mut want = Vec::new();
    let mut r = reader();
    r.push(&two);
    for _ in 0..2 {
        want.push(r.poll());
        want.push(r.poll());
        r.next_request();
    }
    assert!(matches!(&want[3], Some(Event::Body(b)) if b.is_empty()));
    for cut in 0..two.len() {
        for step in [1, 3, 7] {
            let mut r = reader();
            let mut got = Vec::new();
            let feed = |r: &mut RequestReader, chunk: &[u8], got: &mut Vec<Option<Event>>| {
                r.push(chunk);
                while let Some(ev) = r.poll() {
                    let done = matches!(ev, Event::Body(_));
                    got.push(Some(ev));
                    if done {
                        r.next_request();
                    }
                }
            };
            feed(&mut r, &two[..cut], &mut got);
            for c in two[cut..].chunks(step) {
                feed(&mut r, c, &mut got);
            }
            assert_eq!(got, want, "cut {cut}, step {step}");
        }
    }
}

#[test]
fn pipelined_request_waits_for_the_answer() {
    let mut r = reader();
    r.push(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n");
    assert_eq!(head(r.poll()).path, "/a");
    assert_eq!(body(r.poll()), b"");
    assert_eq!(r.poll(), None, "the second request waits");
    assert_eq!(r.buffered(), 19);
    assert!(!r.has_partial(), "a whole buffered request is not a slow one");
    r.next_request();
    assert_eq!(head(r.poll()).path, "/b");
    assert_eq!(body(r.poll()), b"");
}

#[test]
fn keep_alive_rules() {
    let ka = |req: &[u8]| {
        let mut r = reader();
        r.push(req);
        head(r.poll()).keep_alive
    };
    assert!(ka(b"GET / HTTP/1.1\r\n\r\n"));
    assert!(!ka(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
    assert!(!ka(b"GET / HTTP/1.1\r\nConnection: Upgrade, CLOSE\r\n\r\n"));
    assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
    assert!(ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    assert!(!ka(b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n"));
}

#[test]
fn blank_lines_before_a_request_are_skipped() {
    let mut r = reader();
    r.push(b"\r\n\r\n\n");
    assert_eq!(r.poll(), None);
    assert!(!r.has_partial());
    r.push(b"GET / HTTP/1.1\n\n");
    assert_eq!(head(r.poll()).path, "/");
}

#[test]
fn slow_head_is_partial_until_complete() {
    let mut r = reader();
    let req = b"GET /slow HTTP/1.1\r\nX: y\r\n\r\n";
    for (i, b) in req.iter().enumerate() {
        r.push(&[*b]);
        if i + 1 < req.len() {
            assert_eq!(r.poll(), None);
            assert!(r.has_partial());
        }
    }
    assert_eq!(head(r.poll()).path, "/slow");
    assert!(r.has_partial(), "the body of a head with no length is due at once");
    assert_eq!(body(r.poll()), b"");
}

#[test]
fn slow_body_is_partial() {
    let mut r = reader();
    r.push(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab");
    head(r.poll());
    assert_eq!(r.poll(), None);
    assert!(r.has_partial() && r.wants_bytes());
    r.push(b"cGET");
    assert_eq!(body(r.poll()), b"abc");
    assert_eq!(r.buffered(), 3);
}

#[test]
fn head_size_limit_holds_as_bytes_arrive() {
    let mut r = reader();
    r.push(b"GET / HTTP/1.1\r\n");
    let line = [b"X-Pad: ".as_slice(), &[b'a'; 1000], b"\r\n"].concat();
    let mut err = None;
    for _ in 0..20 {
        r.push(&line);
        if let Some(ev) = r.poll() {
            err = Some(ev);
            break;
        }
        assert!(r.buffered() <= DEFAULT_MAX_HEAD_BYTES + line.len());
    }
    assert_eq!(err, Some(Event::Error(RequestError::HeadTooLarge(DEFAULT_MAX_HEAD_BYTES))));
    assert_eq!(RequestError::HeadTooLarge(0).status(), Status::HeaderFieldsTooLarge);
    assert_eq!(r.buffered(), 0, "a failed reader keeps nothing");
    r.push(b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(r.poll(), None, "nothing after a failure");
    assert!(!r.wants_bytes());
}

#[test]
fn complete_head_over_the_limit_is_refused() {
    let limits = Limits { max_head_bytes: 30, max_headers: 8, max_body_bytes: 10 };
    let mut r = RequestReader::new(limits);
    r.push(b"GET / HTTP/1.1\r\nA: b\r\n\r\n");
    head(r.poll());
    let mut r = RequestReader::new(limits);
    assert_eq!(
        error(&mut r, b"GET / HTTP/1.1\r\nA: bcdefghijk\r\n\r\n"),
        RequestError::HeadTooLarge(30)
    );
}

#[test]
fn header_count_limit() {
    let limits = Limits { max_head_bytes: 4096, max_headers: 3, max_body_bytes: 10 };
    let mut r = RequestReader::new(limits);
    r.push(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n");
    head(r.poll());
    let mut r = RequestReader::new(limits);
    let e = error(&mut r, b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n");
    assert_eq!(e, RequestError::TooManyHeaders(3));
    assert_eq!(e.status(), Status::HeaderFieldsTooLarge);
}

#[test]
fn body_limit_is_checked_on_the_head() {
    let mut r = reader();
    r.push(b"POST / HTTP/1.1\r\nContent-Length: 1024\r\n\r\n");
    head(r.poll());
    let mut r = reader();
    let e = error(&mut r, b"POST / HTTP/1.1\r\nContent-Length: 1025\r\n\r\n");
    assert_eq!(e, RequestError::BodyTooLarge { length: 1025, limit: 1024 });
    assert_eq!(e.status(), Status::PayloadTooLarge);
    let mut r = reader();
    let e = error(&mut r, b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n");
    assert_eq!(e.status(), Status::PayloadTooLarge);
}

#[test]
fn chunked_bodies_need_a_length() {
    for req in [
        &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: gzip\r\n\r\n",
    ] {
        let e = error(&mut reader(), req);
        assert_eq!(e, RequestError::LengthRequired);
        assert_eq!(e.status(), Status::LengthRequired);
    }
}

#[test]
fn content_length_must_be_one_number() {
    for v in ["abc", "-1", "+5", "5 5", "0x10", "", "1,2", "99999999999999999999999"] {
        let req = format!("POST / HTTP/1.1\r\nContent-Length: {v}\r\n\r\n");
        let e = error(&mut reader(), req.as_bytes());
        assert_eq!(e, RequestError::BadContentLength, "{v:?}");
        assert_eq!(e.status(), Status::BadRequest);
    }
    let e =
        error(&mut reader(), b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
    assert_eq!(e, RequestError::BadContentLength);
    for agreeing in ["Content-Length: 2\r\nContent-Length: 2", "Content-Length: 2, 2"] {
        let mut r = reader();
        r.push(format!("POST / HTTP/1.1\r\n{agreeing}\r\n\r\nok").as_bytes());
        assert_eq!(head(r.poll()).content_length, 2);
        assert_eq!(body(r.poll()), b"ok");
    }
}

#[test]
fn malformed_heads_are_bad_requests() {
    for req in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/2.0\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n folded: x\r\n\r\n",
        b"GET\x00 / HTTP/1.1\r\n\r\n",
    ] {
        let e = error(&mut reader(), req);
        assert!(matches!(e, RequestError::Malformed(_)), "{e:?}");
        assert_eq!(e.status(), Status::BadRequest);
    }
}

#[test]
fn expect_continue() {
    let mut r = reader();
    r.push(b"POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\n");
    assert!(head(r.poll()).expect_continue);
    r.push(b"{}");
    assert_eq!(body(r.poll()), b"{}");
    let e = error(&mut reader(), b"POST / HTTP/1.1\r\nExpect: teapot\r\n\r\n");
    assert_eq!(e.status(), Status::ExpectationFailed);
}

#[test]
fn bearer_token_and_redacted_debug() {
    let tok = |v: &str| {
        let mut r = reader();
        r.push(format!("GET / HTTP/1.1\r\nAuthorization: {v}\r\n\r\n").as_bytes());
        let h = head(r.poll());
        assert!(!format!("{h:?}").contains("secret"), "the key must not be in Debug output");
        h.bearer_token().map(<[u8]>::to_vec)
    };
    assert_eq!(tok("Bearer secret"), Some(b"secret".to_vec()));
    assert_eq!(tok("bearer   secret "), Some(b"secret".to_vec()));
    assert_eq!(tok("Basic secret"), None);
    assert_eq!(tok("Bear"), None);
}

#[test]
fn buffer_does_not_grow_across_many_keep_alive_requests() {
    let mut r = reader();
    let req = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
    for _ in 0..1000 {
        for c in req.chunks(10) {
            r.push(c);
        }
        head(r.poll());
        assert_eq!(body(r.poll()), b"abc");
        r.next_request();
    }
    assert!(r.buf.capacity() <= 4 * req.len(), "capacity {}", r.buf.capacity());
}

#[test]
fn a_trickled_head_is_scanned_once() {
    // Each poll looks at the new bytes only: the scan position always ends at the end
    // of the buffer, and the next scan starts there.
    let mut r = reader();
    let req = [b"GET / HTTP/1.1\r\n".as_slice(), &b"X-Slow: 1\r\n".repeat(50), b"\r\n"].concat();
    for (i, b) in req.iter().enumerate() {
        r.push(&[*b]);
        let ev = r.poll();
        if i + 1 < req.len() {
            assert_eq!(ev, None);
            assert_eq!(r.scanned, r.buf.len(), "after byte {i}");
        } else {
            assert_eq!(head(ev).path, "/");
        }
    }
}
