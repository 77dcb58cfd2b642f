//! A minimal QMP (QEMU Machine Protocol) client: handshake, fire-and-forget
//! commands, and events. One JSON object per line in both directions.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP: {0}")]
    Protocol(String),
    #[error("QMP: timed out waiting for {0}")]
    Timeout(&'static str),
}

/// A message QEMU sent us after the handshake.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    /// `{"event": NAME, "data": {...}}`
    Event { name: String, data: Value },
    /// A command's `return` or `error`.
    Reply(Value),
}

pub struct Qmp {
    lines: Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connect and negotiate capabilities.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).await?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            lines: BufReader::new(r).lines(),
            writer: w,
        };
        let greeting = tokio::time::timeout(Duration::from_secs(5), qmp.read_value())
            .await
            .map_err(|_| QmpError::Timeout("greeting"))??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        qmp.send("qmp_capabilities").await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let v = tokio::time::timeout_at(deadline, qmp.read_value())
                .await
                .map_err(|_| QmpError::Timeout("qmp_capabilities"))??;
            if v.get("return").is_some() {
                return Ok(qmp);
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Protocol(format!("qmp_capabilities: {e}")));
            }
        }
    }

    /// Send a command without waiting for its reply.
    pub async fn send(&mut self, command: &str) -> Result<(), QmpError> {
        let mut line = json!({ "execute": command }).to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        Ok(())
    }

    /// Next message; `None` when QEMU closed the connection. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<QmpMessage>, QmpError> {
        let Some(line) = self.lines.next_line().await? else {
            return Ok(None);
        };
        Ok(Some(parse_message(&line)?))
    }

    async fn read_value(&mut self) -> Result<Value, QmpError> {
        match self.lines.next_line().await? {
            Some(line) => serde_json::from_str(&line)
                .map_err(|e| QmpError::Protocol(format!("bad JSON {line:?}: {e}"))),
            None => Err(QmpError::Protocol("connection closed".into())),
        }
    }
}

pub(crate) fn parse_message(line: &str) -> Result<QmpMessage, QmpError> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| QmpError::Protocol(format!("bad JSON {line:?}: {e}")))?;
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        return Ok(QmpMessage::Event {
            name: name.to_string(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
        });
    }
    Ok(QmpMessage::Reply(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_and_replies() {
        let m = parse_message(
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-reset"}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            QmpMessage::Event {
                name: "SHUTDOWN".into(),
                data: json!({"guest": true, "reason": "guest-reset"})
            }
        );
        assert_eq!(
            parse_message(r#"{"return": {}}"#).unwrap(),
            QmpMessage::Reply(json!({"return": {}}))
        );
        assert!(parse_message("not json").is_err());
    }

    #[tokio::test]
    async fn handshake_against_a_fake_server() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).contains("qmp_capabilities"));
            s.write_all(b"{\"return\": {}}\n{\"event\": \"STOP\"}\n")
                .await
                .unwrap();
        });
        let mut qmp = Qmp::connect(&path).await.unwrap();
        match qmp.next().await.unwrap() {
            Some(QmpMessage::Event { name, .. }) => assert_eq!(name, "STOP"),
            other => panic!("unexpected {other:?}"),
        }
        server.await.unwrap();
        assert_eq!(qmp.next().await.unwrap(), None);
    }
}
