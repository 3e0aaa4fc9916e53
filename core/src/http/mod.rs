//! The OpenAI-compatible HTTP API's sans-IO parts: the HTTP/1.1 request reader, the
//! response encoders, and the mapping between OpenAI's chat-completions shapes and the
//! core's own request and result types.
//!
//! Like the NDJSON framing, none of it does IO or reads a clock: bytes, ids and times
//! come in as arguments and bytes go out into caller-owned buffers.

pub mod openai;
pub mod request;
pub mod response;
