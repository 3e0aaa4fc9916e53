//! The OpenAI-compatible HTTP API's sans-IO parts: the HTTP/1.1 request reader, the
//! routing table, the response encoders, and the mapping between OpenAI's
//! chat-completions shapes and the core's own request and result types.
//!
//! Like the NDJSON framing, none of it does IO or reads a clock: bytes, ids and times
//! come in as arguments and bytes go out into caller-owned buffers. One streamed
//! request from bytes in to bytes out:
//!
//! ```
//! use inferd_core::http::{openai, request, response, route};
//! use inferd_core::stop::TokenText;
//! use inferd_core::wire::StopReason;
//!
//! let mut reader = request::RequestReader::new(request::Limits::with_max_body(1 << 20));
//! let body = br#"{"messages":[{"role":"user","content":"hi"}],"stream":true,"stop":"fox"}"#;
//! reader.push(format!("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
//! reader.push(body);
//!
//! let Some(request::Event::Head(head)) = reader.poll() else { panic!() };
//! assert_eq!(route::route(&head), Ok(route::Endpoint::ChatCompletions));
//! let Some(request::Event::Body(body)) = reader.poll() else { panic!() };
//! let chat = openai::parse_chat_request(&body).unwrap();
//! assert!(chat.stream);
//!
//! // Engine tokens arrive as bytes; the stop sequence ends the text before "fox".
//! let meta = openai::CompletionMeta { id: "1", created: 1_700_000_000, model: "tiny" };
//! let mut out = Vec::new();
//! let head = response::ResponseHead::new(response::Status::Ok, response::EVENT_STREAM);
//! response::write_chunked_head(&mut out, &head);
//! openai::write_role_chunk(&mut out, &meta);
//! let mut text = TokenText::new(chat.stop);
//! let mut stopped = false;
//! for token in [&b" the"[..], b" quick", b" brown", b" fox", b" jumps"] {
//!     let mut delta = String::new();
//!     stopped = text.push(token, &mut delta);
//!     openai::write_content_chunk(&mut out, &meta, &delta);
//!     if stopped {
//!         break; // the daemon cancels the generation here
//!     }
//! }
//! let finish = openai::FinishReason::from_stop_reason(StopReason::Cancelled, stopped);
//! openai::write_finish_chunk(&mut out, &meta, finish.unwrap());
//! openai::write_stream_end(&mut out);
//! reader.next_request();
//!
//! let wire = String::from_utf8(out).unwrap();
//! assert!(wire.contains(r#""delta":{"content":" brown"}"#));
//! assert!(!wire.contains("fox"));
//! assert!(wire.contains(r#""finish_reason":"stop""#));
//! assert!(wire.ends_with("data: [DONE]\n\n\r\n0\r\n\r\n"));
//! ```

pub mod openai;
pub mod request;
pub mod response;
pub mod route;
