//! The CLI's side of the control socket: one connection, calls in order.
use std::{io, path::Path, time::Duration};

use serde_json::{json, Value};
use tokio::{
    io::BufReader,
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixStream,
    },
    time::timeout,
};

use super::varlink::{self, Reply};

/// How long a call may take before the CLI gives up (Watch has none).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there: the daemon is not running (or uses another socket).
    #[error("natbinder is not running: nothing answers on {path} ({source}); start it with `systemctl start natbinder` or `natbinder daemon`, or give --socket")]
    NotRunning { path: String, source: io::Error },
    #[error("{method}: {name}{}", detail(.parameters))]
    Failed { method: String, name: String, parameters: serde_json::Map<String, Value> },
    #[error("talking to natbinder: {0}")]
    Io(#[from] io::Error),
    #[error("natbinder answered something that is not a Varlink reply: {0}")]
    BadReply(String),
    #[error("natbinder did not answer {0} within {CALL_TIMEOUT:?}")]
    Timeout(String),
}

fn detail(parameters: &serde_json::Map<String, Value>) -> String {
    if parameters.is_empty() {
        String::new()
    } else {
        format!(" {}", Value::Object(parameters.clone()))
    }
}

pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    buffer: Vec<u8>,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::NotRunning { path: path.display().to_string(), source })?;
        let (read, writer) = stream.into_split();
        Ok(Self { reader: BufReader::new(read), writer, buffer: Vec::new() })
    }

    /// Calls `method` and returns its reply's parameters, or its error.
    pub async fn call(&mut self, method: &str, parameters: Value) -> Result<Value, ClientError> {
        let request = json!({ "method": method, "parameters": parameters });
        timeout(CALL_TIMEOUT, async {
            varlink::write_message(&mut self.writer, &request).await?;
            self.reply(method).await
        })
        .await
        .map_err(|_| ClientError::Timeout(method.to_string()))?
        .map(|reply| Value::Object(reply.parameters))
    }

    /// Calls `method` with "more" and hands each reply's parameters to `each` until the stream ends,
    /// `each` returns false, or an error comes.
    pub async fn call_more(
        &mut self,
        method: &str,
        parameters: Value,
        mut each: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        let request = json!({ "method": method, "parameters": parameters, "more": true });
        varlink::write_message(&mut self.writer, &request).await?;
        loop {
            let reply = self.reply(method).await?;
            let continues = reply.continues;
            if !each(Value::Object(reply.parameters)) || !continues {
                return Ok(());
            }
        }
    }

    async fn reply(&mut self, method: &str) -> Result<Reply, ClientError> {
        match varlink::read_message(&mut self.reader, &mut self.buffer).await {
            Ok(Some(())) => {}
            Ok(None) => return Err(ClientError::BadReply("the connection closed".into())),
            Err(e) => return Err(ClientError::BadReply(e.to_string())),
        }
        let reply: Reply = serde_json::from_slice(&self.buffer).map_err(|e| ClientError::BadReply(e.to_string()))?;
        match reply.error {
            Some(name) => Err(ClientError::Failed { method: method.to_string(), name, parameters: reply.parameters }),
            None => Ok(reply),
        }
    }
}
