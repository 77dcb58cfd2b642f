//! Drive a real `vmpod serve` process over its real unix socket.
//!
//! [`Daemon`] runs `target/*/vmpod serve` with a temp socket, state dir and
//! config file, waits until the socket answers, and stops it with SIGTERM
//! on drop. [`CriClient`] is a tonic client for both CRI services over UDS.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use vmpod_tests::cri_client::{cri, Daemon};
//! let d = Daemon::start("")?;
//! let mut c = d.client().await?;
//! let v = c.runtime.version(cri::VersionRequest::default()).await?.into_inner();
//! assert_eq!(v.runtime_name, "vmpod");
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

pub use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;

/// How long a daemon may take to start answering on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Both CRI services on one connection.
#[derive(Clone)]
pub struct CriClient {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

impl CriClient {
    /// Connect to the CRI socket at `path`.
    pub async fn connect(path: &Path) -> Result<CriClient> {
        let path = path.to_path_buf();
        // The URI is ignored; every connection goes to the socket.
        let channel = Endpoint::try_from("http://[::]:50051")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(s))
                }
            }))
            .await
            .context("connecting to the CRI socket")?;
        Ok(CriClient {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// `PullImage` of `image` with optional basic credentials; the image ref.
    pub async fn pull(
        &mut self,
        image: &str,
        auth: Option<cri::AuthConfig>,
    ) -> Result<String, tonic::Status> {
        let r = self
            .images
            .pull_image(cri::PullImageRequest {
                image: Some(spec(image)),
                auth,
                sandbox_config: None,
            })
            .await?;
        Ok(r.into_inner().image_ref)
    }

    /// `ListImages`, optionally filtered by `image`.
    pub async fn list(&mut self, filter: Option<&str>) -> Result<Vec<cri::Image>, tonic::Status> {
        let r = self
            .images
            .list_images(cri::ListImagesRequest {
                filter: filter.map(|f| cri::ImageFilter {
                    image: Some(spec(f)),
                }),
            })
            .await?;
        Ok(r.into_inner().images)
    }

    /// `ImageStatus`.
    pub async fn image_status(
        &mut self,
        image: &str,
        verbose: bool,
    ) -> Result<cri::ImageStatusResponse, tonic::Status> {
        let r = self
            .images
            .image_status(cri::ImageStatusRequest {
                image: Some(spec(image)),
                verbose,
            })
            .await?;
        Ok(r.into_inner())
    }

    /// `RemoveImage`.
    pub async fn remove(&mut self, image: &str) -> Result<(), tonic::Status> {
        self.images
            .remove_image(cri::RemoveImageRequest {
                image: Some(spec(image)),
            })
            .await?;
        Ok(())
    }
}

/// An `ImageSpec` naming `image`.
pub fn spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

/// Basic credentials as kubelet sends them.
pub fn basic_auth(user: &str, password: &str) -> cri::AuthConfig {
    cri::AuthConfig {
        username: user.to_string(),
        password: password.to_string(),
        ..Default::default()
    }
}

/// A running `vmpod serve`. Its files live in `dir`: `vmpod.sock`,
/// `state/`, `config.toml`, `daemon.log` (stderr).
pub struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Start with `config` (TOML text) in a fresh temp dir.
    pub fn start(config: &str) -> Result<Daemon> {
        let tmp = tempfile::Builder::new().prefix("vmpod-cri-").tempdir()?;
        let mut d = Daemon::start_in(tmp.path(), config)?;
        d._tmp = Some(tmp);
        Ok(d)
    }

    /// Start in `dir` (kept afterwards: restart tests reuse the state dir).
    pub fn start_in(dir: &Path, config: &str) -> Result<Daemon> {
        std::fs::write(dir.join("config.toml"), config)?;
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))?;
        let child = serve_command(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning vmpod serve")?;
        let mut d = Daemon {
            child: Some(child),
            dir: dir.to_path_buf(),
            _tmp: None,
        };
        d.wait_ready()?;
        Ok(d)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        let sock = self.socket();
        while start.elapsed() < START_TIMEOUT {
            if let Some(child) = self.child.as_mut() {
                if let Some(st) = child.try_wait()? {
                    self.child = None;
                    bail!("vmpod serve exited with {st}: {}", self.log());
                }
            }
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "vmpod serve did not listen on {} within {START_TIMEOUT:?}: {}",
            sock.display(),
            self.log()
        )
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("vmpod.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub async fn client(&self) -> Result<CriClient> {
        CriClient::connect(&self.socket()).await
    }

    /// SIGTERM, then wait (SIGKILL after 20 s). Returns the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("daemon already stopped");
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let st = child.wait()?;
                bail!(
                    "vmpod serve ignored SIGTERM for 20 s (killed: {st}): {}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// `vmpod serve` with the socket, state dir and config under `dir`.
pub fn serve_command(dir: &Path) -> Command {
    serve_command_with(
        &dir.join("vmpod.sock"),
        &dir.join("state"),
        &dir.join("config.toml"),
    )
}

/// `vmpod serve --socket socket --state-dir state_dir --config config`.
pub fn serve_command_with(socket: &Path, state_dir: &Path, config: &Path) -> Command {
    let mut c = Command::new(crate::vmpod_bin());
    c.arg("serve")
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--config")
        .arg(config)
        .env_remove("VMPOD_LOG")
        .env("RUST_LOG", "info");
    c
}

/// Run `vmpod serve` in `dir` with `config` expecting it to fail fast;
/// returns its output (kills it after 20 s if it keeps running).
pub fn serve_expect_exit(dir: &Path, config: &str) -> Result<Output> {
    std::fs::write(dir.join("config.toml"), config)?;
    let mut child = serve_command(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}
