//! A minimal blocking HTTP/1.1 keep-alive client for the daemon's OpenAI-compatible API,
//! measured like the NDJSON [`Client`](crate::Client): one streamed chat completion per
//! exchange, its content events counted as tokens.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use crate::Exchange;

/// A persistent connection to the HTTP API.
#[derive(Debug)]
pub struct HttpClient {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    line: Vec<u8>,
    chunk: Vec<u8>,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

impl HttpClient {
    /// Connects to `addr` (`ip:port`).
    pub fn connect(addr: &str) -> io::Result<HttpClient> {
        let writer = TcpStream::connect(addr)?;
        writer.set_nodelay(true)?;
        let reader = BufReader::with_capacity(64 * 1024, writer.try_clone()?);
        Ok(HttpClient { writer, reader, line: Vec::new(), chunk: Vec::new() })
    }

    fn read_line(&mut self) -> io::Result<&[u8]> {
        self.line.clear();
        if self.reader.read_until(b'\n', &mut self.line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        Ok(self.line.trim_ascii_end())
    }

    /// Posts one streamed chat completion whose JSON body is `body` and reads the whole
    /// answer. `first` is the first content event; a non-200 answer or a stream without
    /// `[DONE]` is not `ok`.
    pub fn exchange(&mut self, body: &[u8]) -> io::Result<Exchange> {
        let start = Instant::now();
        let mut req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.writer.write_all(&req)?;
        let status_ok = self.read_line()?.starts_with(b"HTTP/1.1 200");
        let mut length = None;
        let mut chunked = false;
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix(b"content-length:") {
                let v = std::str::from_utf8(v).map_err(|_| bad("content-length"))?;
                length = Some(v.trim().parse::<usize>().map_err(|_| bad("content-length"))?);
            } else if lower.starts_with(b"transfer-encoding: chunked") {
                chunked = true;
            }
        }
        if !chunked {
            // A whole (error) answer.
            let mut body = vec![0; length.unwrap_or(0)];
            self.reader.read_exact(&mut body)?;
            let now = start.elapsed();
            return Ok(Exchange { first: now, terminal: now, tokens: 0, ok: false });
        }
        let mut first = None;
        let mut tokens = 0;
        let mut events = 0;
        let mut done = false;
        loop {
            let size = std::str::from_utf8(self.read_line()?).map_err(|_| bad("chunk size"))?;
            let size = usize::from_str_radix(size, 16).map_err(|_| bad("chunk size"))?;
            self.chunk.resize(size + 2, 0);
            self.reader.read_exact(&mut self.chunk)?;
            if size == 0 {
                break;
            }
            // The daemon writes one event per chunk: first the role delta, then content
            // deltas (the only other events still open, `finish_reason` null), then the
            // finish, `[DONE]`. Judged by the event's end, so the client does not scan
            // every event for a key: the NDJSON client finds its `type` at the start of
            // each line, and the two should cost their clients alike.
            let event = &self.chunk[..size];
            const OPEN: &[u8] = b"\"finish_reason\":null}]}\n\n";
            if event.ends_with(OPEN) {
                if events > 0 {
                    tokens += 1;
                    first.get_or_insert(start.elapsed());
                }
            } else if event.starts_with(b"data: [DONE]") {
                done = true;
            }
            events += 1;
        }
        let now = start.elapsed();
        Ok(Exchange { first: first.unwrap_or(now), terminal: now, tokens, ok: status_ok && done })
    }
}
