//! The Varlink wire protocol (varlink.org, as systemd speaks it): JSON objects over a stream socket,
//! each ended by a NUL byte. A call is `{"method": "io.natbinder.List", "parameters": {...}}`, with
//! `"more": true` for a stream of replies and `"oneway": true` for none; a reply is
//! `{"parameters": {...}}`, with `"continues": true` on all but the last of a stream, or
//! `{"error": "io.natbinder.NotPermitted", "parameters": {...}}`.
//!
//! This module is only the framing and the message shapes, with the limits that keep one bad client
//! from costing anyone else anything: a message longer than [`MAX_MESSAGE`] is an error, and so is
//! anything that is not a call. What the methods do is in [`super::service`].
use std::io;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// The longest call accepted, NUL included. natbinder's calls are a few hundred bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// A call as received.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Call {
    pub method: String,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    #[serde(default)]
    pub oneway: bool,
    #[serde(default)]
    pub more: bool,
    #[serde(default)]
    pub upgrade: bool,
}

impl Call {
    pub fn parameters(&self) -> Map<String, Value> {
        self.parameters.clone().unwrap_or_default()
    }
}

/// A reply, or one of a stream of replies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continues: bool,
}

impl Reply {
    pub fn ok(parameters: Value) -> Self {
        Self { error: None, parameters: object(parameters), continues: false }
    }

    pub fn error(name: &str, parameters: Value) -> Self {
        Self { error: Some(name.to_string()), parameters: object(parameters), continues: false }
    }
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        Value::Null => Map::new(),
        other => Map::from_iter([("value".to_string(), other)]),
    }
}

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the message is longer than {MAX_MESSAGE} bytes")]
    TooLong,
    #[error("the message is not a Varlink call: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads one NUL-ended message. Ok(None): the peer closed the connection between messages.
pub async fn read_message<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buffer: &mut Vec<u8>,
) -> Result<Option<()>, ReadError> {
    buffer.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return if buffer.is_empty() {
                Ok(None)
            } else {
                Err(ReadError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed mid-message")))
            };
        }
        let (take, done) = match available.iter().position(|b| *b == 0) {
            Some(nul) => (nul + 1, true),
            None => (available.len(), false),
        };
        if buffer.len() + take > MAX_MESSAGE {
            return Err(ReadError::TooLong);
        }
        buffer.extend_from_slice(&available[..take]);
        reader.consume(take);
        if done {
            buffer.pop();
            return Ok(Some(()));
        }
    }
}

/// Parses a message as a call.
pub fn parse_call(message: &[u8]) -> Result<Call, ReadError> {
    let call: Call = serde_json::from_slice(message).map_err(|e| ReadError::Malformed(e.to_string()))?;
    if call.method.is_empty() || !call.method.contains('.') {
        return Err(ReadError::Malformed(format!("\"{}\" is not an interface-qualified method name", call.method)));
    }
    Ok(call)
}

/// Writes one message, NUL-ended.
pub async fn write_message<W: AsyncWrite + Unpin, T: Serialize>(writer: &mut W, message: &T) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
    bytes.push(0);
    writer.write_all(&bytes).await?;
    writer.flush().await
}

/// The standard errors (org.varlink.service), by name.
pub mod errors {
    pub const INTERFACE_NOT_FOUND: &str = "org.varlink.service.InterfaceNotFound";
    pub const METHOD_NOT_FOUND: &str = "org.varlink.service.MethodNotFound";
    pub const METHOD_NOT_IMPLEMENTED: &str = "org.varlink.service.MethodNotImplemented";
    pub const INVALID_PARAMETER: &str = "org.varlink.service.InvalidParameter";
    pub const PERMISSION_DENIED: &str = "org.varlink.service.PermissionDenied";
    pub const EXPECTED_MORE: &str = "org.varlink.service.ExpectedMore";
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn messages_are_split_at_nul_and_the_peer_may_close_between_them() {
        let bytes =
            b"{\"method\":\"io.natbinder.Status\"}\0{\"method\":\"io.natbinder.List\",\"more\":true}\0".to_vec();
        let mut reader = BufReader::with_capacity(7, &bytes[..]);
        let mut buffer = Vec::new();
        read_message(&mut reader, &mut buffer).await.unwrap().unwrap();
        assert_eq!(parse_call(&buffer).unwrap().method, "io.natbinder.Status");
        read_message(&mut reader, &mut buffer).await.unwrap().unwrap();
        let call = parse_call(&buffer).unwrap();
        assert!(call.more && call.method == "io.natbinder.List");
        assert!(read_message(&mut reader, &mut buffer).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_oversized_or_cut_message_is_an_error_not_a_wait() {
        let huge = vec![b'x'; MAX_MESSAGE + 10];
        let mut buffer = Vec::new();
        let err = read_message(&mut BufReader::new(&huge[..]), &mut buffer).await.unwrap_err();
        assert!(matches!(err, ReadError::TooLong), "{err}");
        let cut = b"{\"method\":";
        let err = read_message(&mut BufReader::new(&cut[..]), &mut buffer).await.unwrap_err();
        assert!(err.to_string().contains("mid-message"), "{err}");
    }

    #[test]
    fn garbage_and_non_calls_are_malformed() {
        for bad in [
            &b"\xff\xfe"[..],
            b"[]",
            b"{}",
            b"{\"method\":\"Status\"}",
            b"{\"method\":1}",
            b"{\"method\":\"a.b\",\"x\":1}",
        ] {
            assert!(matches!(parse_call(bad), Err(ReadError::Malformed(_))), "{}", String::from_utf8_lossy(bad));
        }
        let call = parse_call(br#"{"method":"io.natbinder.Get","parameters":{"protocol":"tcp","port":8080}}"#).unwrap();
        assert_eq!(call.parameters()["port"], json!(8080));
    }

    #[tokio::test]
    async fn replies_are_written_as_varlink_has_them() {
        let mut out = Vec::new();
        write_message(&mut out, &Reply::ok(json!({"address": "203.0.113.7"}))).await.unwrap();
        write_message(&mut out, &Reply { continues: true, ..Reply::ok(json!({})) }).await.unwrap();
        write_message(&mut out, &Reply::error(errors::PERMISSION_DENIED, Value::Null)).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        let parts: Vec<&str> = text.split('\0').collect();
        assert_eq!(parts[0], r#"{"parameters":{"address":"203.0.113.7"}}"#);
        assert_eq!(parts[1], r#"{"parameters":{},"continues":true}"#);
        assert_eq!(parts[2], r#"{"error":"org.varlink.service.PermissionDenied","parameters":{}}"#);
        assert_eq!(parts[3], "");
    }
}
