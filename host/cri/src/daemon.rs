//! The daemon: state dir, socket, gRPC server, shutdown.
//!
//! Plain options → [`Daemon::start`] (prepares everything, binds the socket)
//! → [`Daemon::serve`] (runs until the shutdown future resolves, then removes
//! the socket).

use std::fs::File;
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use vmpod_images::ImageStore;

use crate::config::Config;
use crate::image_service::ImageSvc;
use crate::runtime_service::RuntimeSvc;
use crate::uds_authority::AuthorityFix;

pub const DEFAULT_SOCKET: &str = "/run/vmpod/vmpod.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmpod";
/// In-flight RPCs (e.g. a long pull) get this long after SIGTERM/SIGINT.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages up to this size (large ListImages answers on busy nodes).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another vmpod daemon is listening on {0}; stop it first or use --socket")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("state dir {0} is in use by another vmpod daemon (lock file {0}/vmpod.lock)")]
    StateDirLocked(PathBuf),
    #[error("opening the image store: {0}")]
    Images(#[from] vmpod_images::ImageError),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DaemonError + 'a {
    move |source| DaemonError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config: Config,
}

/// A daemon whose socket is bound and whose state is open, not yet serving.
pub struct Daemon {
    socket: PathBuf,
    /// (dev, ino) of the socket we bound: removed on exit only if unchanged.
    socket_id: (u64, u64),
    listener: UnixListener,
    runtime: RuntimeSvc,
    images: ImageSvc,
    _lock: Flock<File>,
}

impl Daemon {
    /// Create the state dir, take its lock, open the image store, bind the
    /// socket (0660). Needs a tokio runtime.
    pub async fn start(opts: Options) -> Result<Daemon, DaemonError> {
        let state = &opts.state_dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(state)
            .map_err(io("creating state dir", state))?;
        let lock = lock_state_dir(state)?;
        let images_root = state.join("images");
        let containers_dir = state.join("containers");
        for d in [&images_root, &containers_dir] {
            private_dir(d)?;
        }
        let registries = opts.config.registry_config();
        for host in &registries.skip_verify {
            tracing::warn!(registry = %host, "skip_verify: certificates of this registry are not checked");
        }
        for (host, mirrors) in &registries.mirrors {
            for m in mirrors.iter().filter(|m| m.skip_verify) {
                tracing::warn!(registry = %host, mirror = %m.endpoint, "skip_verify: certificates of this mirror are not checked");
            }
        }
        let root = images_root.clone();
        let store = tokio::task::spawn_blocking(move || ImageStore::open(&root, registries))
            .await
            .map_err(|e| DaemonError::Io {
                op: "opening image store",
                path: images_root.clone(),
                source: std::io::Error::other(e.to_string()),
            })??;
        let (listener, socket_id) = bind_socket(&opts.socket)?;
        let config = Arc::new(opts.config);
        tracing::info!(
            socket = %opts.socket.display(),
            state_dir = %state.display(),
            handlers = ?config.runtimes.keys().collect::<Vec<_>>(),
            "vmpod CRI daemon listening"
        );
        Ok(Daemon {
            socket: opts.socket,
            socket_id,
            listener,
            runtime: RuntimeSvc::new(config),
            images: ImageSvc::new(Arc::new(store), containers_dir),
            _lock: lock,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Serve until `shutdown` resolves; then give in-flight RPCs
    /// [`DRAIN_TIMEOUT`] and remove the socket.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), DaemonError> {
        let Daemon {
            socket,
            socket_id,
            listener,
            runtime,
            images,
            _lock,
        } = self;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .trace_fn(rpc_span)
            .add_service(
                RuntimeServiceServer::new(runtime)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            )
            .add_service(
                ImageServiceServer::new(images)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            )
            .serve_with_incoming_shutdown(incoming(listener), async {
                let _ = stop_rx.await;
            });
        tokio::pin!(server);
        let result = tokio::select! {
            r = &mut server => r,
            _ = shutdown => {
                tracing::info!("shutting down: no new connections, draining in-flight requests");
                let _ = stop_tx.send(());
                match tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(timeout = ?DRAIN_TIMEOUT, "requests still running; stopping anyway");
                        Ok(())
                    }
                }
            }
        };
        remove_our_socket(&socket, socket_id);
        tracing::info!("vmpod CRI daemon stopped");
        result.map_err(DaemonError::from)
    }
}

/// Accepted connections, each wrapped so grpc-go clients that send the
/// socket path as `:authority` are understood (see `uds_authority`).
fn incoming(
    listener: UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<AuthorityFix<tokio::net::UnixStream>>> {
    use tokio_stream::StreamExt;
    UnixListenerStream::new(listener).map(|conn| conn.map(AuthorityFix::new))
}

/// One span per RPC: method path plus a process-unique request id.
fn rpc_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let rpc = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or("?")
        .to_string();
    tracing::info_span!("rpc", %rpc, id)
}

/// Create `dir` (or take an existing one) with mode 0700: unpacked images
/// and container filesystems hold setuid binaries and secrets that no
/// other local user may reach (containerd keeps its snapshotter dir 0700
/// for the same reason). An existing directory is chmodded too.
fn private_dir(dir: &Path) -> Result<(), DaemonError> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("creating", dir)(e)),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("chmod 0700", dir))
}

fn lock_state_dir(state: &Path) -> Result<Flock<File>, DaemonError> {
    let path = state.join("vmpod.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io("opening", &path))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|_| DaemonError::StateDirLocked(state.to_path_buf()))
}

/// Bind `path`, replacing a stale socket only when nothing listens on it.
/// Returns the listener and the socket file's (dev, ino); if it cannot be
/// set up completely, the file is removed again.
fn bind_socket(path: &Path) -> Result<(UnixListener, (u64, u64)), DaemonError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io("creating socket dir", parent))?;
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("stat", path)(e)),
        Ok(md) if !md.file_type().is_socket() => {
            return Err(DaemonError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(DaemonError::SocketInUse(path.to_path_buf())),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::warn!(socket = %path.display(), "removing stale socket (nothing listens on it)");
                std::fs::remove_file(path).map_err(io("removing stale socket", path))?;
            }
            Err(e) => return Err(io("probing existing socket", path)(e)),
        },
    }
    let listener = UnixListener::bind(path).map_err(io("binding", path))?;
    let finish = || -> Result<(u64, u64), DaemonError> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(io("chmod 0660", path))?;
        let md = std::fs::symlink_metadata(path).map_err(io("stat", path))?;
        Ok((md.dev(), md.ino()))
    };
    match finish() {
        Ok(id) => Ok((listener, id)),
        Err(e) => {
            drop(listener);
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

/// Remove the socket if it is still the one we bound (a newer daemon may
/// have replaced it).
fn remove_our_socket(path: &Path, id: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(md) if (md.dev(), md.ino()) == id => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(socket = %path.display(), error = %e, "could not remove socket");
            }
        }
        _ => {}
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_is_not_and_files_are_kept() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("run/x.sock");
        let (first, _) = bind_socket(&sock).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // Live listener: refused.
        assert!(matches!(
            bind_socket(&sock),
            Err(DaemonError::SocketInUse(_))
        ));
        drop(first);
        // Stale socket (listener gone, file left): replaced.
        assert!(sock.exists());
        let _second = bind_socket(&sock).unwrap();
        // A regular file is never deleted.
        let file = d.path().join("file");
        std::fs::write(&file, "keep").unwrap();
        assert!(matches!(
            bind_socket(&file),
            Err(DaemonError::NotASocket(_))
        ));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    }

    #[test]
    fn image_and_container_dirs_are_private_even_if_they_existed() {
        let d = tempfile::tempdir().unwrap();
        let old = d.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
        let new = d.path().join("new");
        for dir in [&old, &new] {
            private_dir(dir).unwrap();
            let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o700, "{}", dir.display());
        }
    }

    #[tokio::test]
    async fn daemon_start_makes_the_store_dirs_private() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        // As an older vmpod left it: everything 0755.
        for sub in [
            "",
            "images",
            "images/blobs",
            "images/blobs/sha256",
            "images/layers",
        ] {
            let p = state.join(sub);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let daemon = Daemon::start(Options {
            socket: d.path().join("s.sock"),
            state_dir: state.clone(),
            config: Config::default(),
        })
        .await
        .unwrap();
        for sub in [
            "images",
            "images/blobs",
            "images/blobs/sha256",
            "images/layers",
            "images/tmp",
            "containers",
        ] {
            let mode = std::fs::metadata(state.join(sub))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777;
            assert_eq!(mode, 0o700, "{sub}");
        }
        drop(daemon);
    }

    #[test]
    fn state_dir_lock_is_exclusive() {
        let d = tempfile::tempdir().unwrap();
        let _l = lock_state_dir(d.path()).unwrap();
        assert!(matches!(
            lock_state_dir(d.path()),
            Err(DaemonError::StateDirLocked(_))
        ));
    }
}
