//! Unit tests of the agent client: handshake, retry, reconnect.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use ttrpc::r#async::TtrpcContext;
use vmpod_proto::health::{CheckResponse, VersionResponse};

async fn fake_vsock(
    reply: &'static [u8],
) -> (tempfile::TempDir, PathBuf, tokio::task::JoinHandle<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vsock");
    let l = UnixListener::bind(&path).unwrap();
    let h = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; 13];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(reply).await.unwrap();
        buf
    });
    (dir, path, h)
}

#[tokio::test]
async fn handshake_ok_leaves_stream_untouched() {
    let (_d, path, h) = fake_vsock(b"OK 1073741824\nTTRPC").await;
    let mut s = connect_stream(&path, 1024).await.unwrap();
    assert_eq!(h.await.unwrap(), b"CONNECT 1024\n");
    let mut rest = [0u8; 5];
    s.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"TTRPC");
}

#[tokio::test]
async fn handshake_refused_is_clear() {
    let (_d, path, _h) = fake_vsock(b"").await;
    let e = connect_stream(&path, 1024).await.unwrap_err().to_string();
    assert!(e.contains("handshake") && e.contains("closed"), "{e}");
}

#[tokio::test]
async fn handshake_garbage_rejected() {
    let (_d, path, _h) = fake_vsock(b"NOPE\n").await;
    let e = connect_stream(&path, 1024).await.unwrap_err().to_string();
    assert!(e.contains("unexpected reply"), "{e}");
}

#[tokio::test]
async fn retry_gives_up_with_reason() {
    let dir = tempfile::tempdir().unwrap();
    let e = AgentClient::connect_retry(
        &dir.path().join("missing"),
        1024,
        Duration::from_millis(200),
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(e, AgentClientError::NotReady { .. }), "{e}");
    assert!(e.to_string().contains("missing"), "{e}");
}

#[test]
fn wait_response_maps() {
    let r = WaitProcessResponse {
        exit_code: 137,
        signal: 9,
        oom_killed: true,
        ..Default::default()
    };
    let e: ExitStatus = r.into();
    assert!(e.oom_killed && e.signal == 9 && e.exit_code == 137);
}

/// A health service that counts the checks it answers; `version` takes
/// a second (a slow agent, not a broken connection).
struct Health(Arc<AtomicUsize>);

#[async_trait::async_trait]
impl vmpod_proto::health_ttrpc::Health for Health {
    async fn check(&self, _: &TtrpcContext, _: CheckRequest) -> ttrpc::Result<CheckResponse> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(CheckResponse {
            status: ServingStatus::SERVING.into(),
            ..Default::default()
        })
    }
    async fn version(&self, _: &TtrpcContext, _: VersionRequest) -> ttrpc::Result<VersionResponse> {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(VersionResponse {
            agent_version: "test".into(),
            ..Default::default()
        })
    }
}

/// A real ttrpc server (health only) behind a hybrid-vsock front socket
/// whose spliced connections the test can cut, as a VMM does when the
/// guest resets a vsock connection.
struct CuttableAgent {
    _dir: tempfile::TempDir,
    front: PathBuf,
    accepted: Arc<AtomicUsize>,
    checks: Arc<AtomicUsize>,
    splices: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    _server: ttrpc::r#async::Server,
}

impl CuttableAgent {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let back = dir.path().join("agent.sock");
        let front = dir.path().join("vsock.sock");
        let checks = Arc::new(AtomicUsize::new(0));
        let svc = vmpod_proto::health_ttrpc::create_health(Arc::new(Health(checks.clone())));
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", back.display()))
            .unwrap()
            .register_service(svc);
        server.start().await.unwrap();
        let l = UnixListener::bind(&front).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let splices: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (acc, sp) = (accepted.clone(), splices.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                let back = back.clone();
                let h = tokio::spawn(async move {
                    let mut line = [0u8; 13];
                    s.read_exact(&mut line).await.unwrap();
                    assert_eq!(&line, b"CONNECT 1024\n");
                    s.write_all(b"OK 7\n").await.unwrap();
                    let mut b = UnixStream::connect(&back).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut b).await;
                });
                sp.lock().unwrap().push(h);
            }
        });
        CuttableAgent {
            _dir: dir,
            front,
            accepted,
            checks,
            splices,
            _server: server,
        }
    }

    /// Reset every connection made so far.
    async fn cut(&self) {
        let hs: Vec<_> = self.splices.lock().unwrap().drain(..).collect();
        for h in hs {
            h.abort();
            let _ = h.await;
        }
    }
}

#[tokio::test]
async fn broken_connection_is_redialled_and_idempotent_calls_retried() {
    let agent = CuttableAgent::start().await;
    let c = AgentClient::connect(&agent.front, 1024, Duration::from_secs(5))
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    let clone = c.with_timeout(Duration::from_secs(5));
    c.check().await.unwrap();
    assert_eq!(agent.accepted.load(Ordering::SeqCst), 1);

    agent.cut().await;
    // A read-only call survives the reset: re-dialled and retried once.
    c.check().await.unwrap();
    assert_eq!(agent.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(agent.checks.load(Ordering::SeqCst), 2);
    // Clones share the new connection: no further dial.
    assert_eq!(clone.version().await.unwrap().agent_version, "test");
    assert_eq!(agent.accepted.load(Ordering::SeqCst), 2);

    agent.cut().await;
    // A call that may not run twice fails with the transport error (it
    // may have reached the agent)...
    let e = c.sync_time().await.unwrap_err();
    assert!(matches!(e, AgentClientError::Transport { .. }), "{e}");
    // ...and the next call finds a fresh connection: the agent answers
    // (here: it has no Agent service, so with an RPC error, not transport).
    assert_eq!(agent.accepted.load(Ordering::SeqCst), 3);
    let e = c.sync_time().await.unwrap_err();
    assert!(e.code().is_some(), "expected the agent's answer, got {e}");
}

#[tokio::test]
async fn redial_failure_keeps_the_original_error() {
    let agent = CuttableAgent::start().await;
    let c = AgentClient::connect(&agent.front, 1024, Duration::from_secs(5))
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    c.check().await.unwrap();
    std::fs::remove_file(&agent.front).unwrap();
    agent.cut().await;
    let e = c.check().await.unwrap_err();
    assert!(matches!(e, AgentClientError::Transport { .. }), "{e}");
    assert_eq!(agent.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_slow_answer_is_a_timeout_not_a_broken_connection() {
    let agent = CuttableAgent::start().await;
    let c = AgentClient::connect(&agent.front, 1024, Duration::from_secs(5))
        .await
        .unwrap();
    let e = c
        .with_timeout(Duration::from_millis(200))
        .version()
        .await
        .unwrap_err();
    assert!(matches!(e, AgentClientError::Timeout { .. }), "{e}");
    // Neither re-dialled nor retried: the connection still serves.
    c.check().await.unwrap();
    assert_eq!(agent.accepted.load(Ordering::SeqCst), 1);
}
