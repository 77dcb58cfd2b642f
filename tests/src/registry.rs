//! A real OCI registry for tests: Debian's `docker-registry` (distribution
//! v2) on a random loopback port, storage and config in a temp dir, killed
//! on drop. Optional htpasswd (bcrypt) basic auth. [`BearerProxy`] puts a
//! tiny bearer-token realm in front of a registry for the token flow.
//! [`Registry::tls_view`] serves a registry's content over HTTPS with a
//! certificate from a [`TestCa`].
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use vmpod_tests::registry::Registry;
//! let reg = Registry::start()?;              // anonymous
//! let authed = Registry::start_with_htpasswd("alice", "s3cret")?;
//! println!("{}", reg.addr());               // 127.0.0.1:PORT
//! # Ok(()) }
//! ```

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// True if the registry binary exists; tests call [`skip_reason`] to print why
/// they skip otherwise.
pub fn available() -> bool {
    Path::new(REGISTRY_BIN).exists()
}

/// `Some(reason)` when registry tests cannot run on this host.
pub fn skip_reason() -> Option<String> {
    (!available()).then(|| {
        format!("{REGISTRY_BIN} not installed (Debian package docker-registry; scripts/install-deps.sh)")
    })
}

/// A free loopback TCP port (bound then released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    /// Where the content lives (another registry's, for a TLS view).
    data: PathBuf,
    port: u16,
    /// `(user, password)` when started with htpasswd auth.
    pub credentials: Option<(String, String)>,
}

impl Registry {
    /// Anonymous registry.
    pub fn start() -> Result<Registry> {
        Self::spawn(None, None, None)
    }

    /// Registry requiring HTTP basic auth (htpasswd, bcrypt hash).
    pub fn start_with_htpasswd(user: &str, password: &str) -> Result<Registry> {
        Self::spawn(Some((user.to_string(), password.to_string())), None, None)
    }

    /// A second registry serving this one's content (same storage
    /// directory, read-only use) over HTTPS with `ca`'s server certificate
    /// for 127.0.0.1. Push to `self` over HTTP, pull from the view.
    pub fn tls_view(&self, ca: &TestCa) -> Result<Registry> {
        Self::spawn(None, Some(self.data.clone()), Some(ca))
    }

    fn spawn(
        creds: Option<(String, String)>,
        data: Option<PathBuf>,
        tls: Option<&TestCa>,
    ) -> Result<Registry> {
        if let Some(r) = skip_reason() {
            bail!(r);
        }
        let dir = tempfile::Builder::new()
            .prefix("vmpod-registry-")
            .tempdir()?;
        let data = data.unwrap_or_else(|| dir.path().join("data"));
        std::fs::create_dir_all(&data)?;
        let tls = tls
            .map(|ca| {
                format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    ca.server_cert.display(),
                    ca.server_key.display()
                )
            })
            .unwrap_or_default();
        let mut auth = String::new();
        if let Some((u, p)) = &creds {
            let hash = bcrypt::hash_with_result(p, 4)
                .context("bcrypt")?
                .format_for_version(bcrypt::Version::TwoY);
            let ht = dir.path().join("htpasswd");
            std::fs::write(&ht, format!("{u}:{hash}\n"))?;
            auth = format!(
                "auth:\n  htpasswd:\n    realm: vmpod-test\n    path: {}\n",
                ht.display()
            );
        }
        // Retry on the (unlikely) race for the port.
        for _ in 0..5 {
            let port = free_port()?;
            let cfg = dir.path().join("config.yml");
            let mut f = std::fs::File::create(&cfg)?;
            write!(
                f,
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: vmpod-test-secret\n{tls}{auth}",
                data.display()
            )?;
            drop(f);
            let log = std::fs::File::create(dir.path().join("registry.log"))?;
            let child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("spawn {REGISTRY_BIN}"))?;
            let mut child = child;
            if wait_ready(
                &mut child,
                port,
                &dir.path().join("registry.log"),
                Duration::from_secs(15),
            )? {
                return Ok(Registry {
                    child,
                    dir,
                    data,
                    port,
                    credentials: creds,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // The temp dir (and the log in it) goes with us: show the log.
        let log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
        bail!("docker-registry did not start; its log:\n{log}")
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Requests the registry served so far, as `(method, path)` from its
    /// access log (path without the query string).
    pub fn requests(&self) -> Vec<(String, String)> {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let mut out = Vec::new();
        for line in log.lines() {
            // Combined log format: ... "GET /v2/... HTTP/1.1" 200 ...
            let Some(start) = line.find('"') else {
                continue;
            };
            let mut parts = line[start + 1..].split_whitespace();
            let (Some(m), Some(p)) = (parts.next(), parts.next()) else {
                continue;
            };
            if !m.chars().all(|c| c.is_ascii_uppercase()) || !p.starts_with('/') {
                continue;
            }
            let path = p.split('?').next().unwrap_or(p);
            out.push((m.to_string(), path.to_string()));
        }
        out
    }

    /// `GET .../blobs/<digest>` requests served so far for `digest`.
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.requests()
            .iter()
            .filter(|(m, p)| m == "GET" && p.contains("/blobs/") && p.ends_with(digest))
            .count()
    }

    /// Overwrite a stored blob with different bytes of the same length, so the
    /// registry serves content that no longer matches its digest.
    pub fn corrupt_blob(&self, digest: &str) -> Result<()> {
        let p = self.blob_path(digest)?;
        let mut data = std::fs::read(&p).with_context(|| format!("read {}", p.display()))?;
        if data.is_empty() {
            bail!("cannot corrupt an empty blob");
        }
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
        std::fs::write(&p, &data)?;
        Ok(())
    }

    /// Append `extra` bytes to a stored blob: the registry then serves more
    /// than the manifest's descriptor declares.
    pub fn grow_blob(&self, digest: &str, extra: usize) -> Result<()> {
        use std::io::Write;
        let p = self.blob_path(digest)?;
        let mut f = std::fs::OpenOptions::new().append(true).open(&p)?;
        f.write_all(&vec![0x5a; extra])?;
        Ok(())
    }

    /// Make `repo` stop serving blob `digest` (its link in the repository
    /// goes; the registry then answers 404 BLOB_UNKNOWN), as a mirror that
    /// synced a manifest but not every layer would.
    pub fn unlink_blob(&self, repo: &str, digest: &str) -> Result<()> {
        let hex = digest.strip_prefix("sha256:").context("sha256 digest")?;
        let link = self
            .data
            .join("docker/registry/v2/repositories")
            .join(repo)
            .join("_layers/sha256")
            .join(hex);
        std::fs::remove_dir_all(&link).with_context(|| format!("remove {}", link.display()))
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest.strip_prefix("sha256:").context("sha256 digest")?;
        Ok(self
            .data
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data"))
    }

    /// `(user, password)` if the registry was started with htpasswd auth.
    pub fn basic_auth(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }
}

fn wait_ready(child: &mut Child, port: u16, log: &Path, timeout: Duration) -> Result<bool> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(st) = child.try_wait()? {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            if log.contains("address already in use") {
                return Ok(false);
            }
            bail!("docker-registry exited with {st}: {log}");
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(false)
}

/// A throw-away certificate authority and a server certificate it signed
/// for `127.0.0.1` (made with the `openssl` command), in a temp dir.
pub struct TestCa {
    _dir: tempfile::TempDir,
    /// The CA certificate (PEM): what a client must trust.
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestCa {
    pub fn new() -> Result<TestCa> {
        let dir = tempfile::Builder::new().prefix("vmpod-ca-").tempdir()?;
        std::fs::write(dir.path().join("san.ext"), "subjectAltName=IP:127.0.0.1\n")?;
        // Run in the temp dir, so every file is named relative to it.
        const EC_KEY: &[&str] = &[
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let steps: [&[&[&str]]; 3] = [
            &[
                &["req", "-x509", "-days", "2", "-subj", "/CN=vmpod test CA"],
                EC_KEY,
                &["-keyout", "ca.key", "-out", "ca.pem"],
            ],
            &[
                &["req", "-subj", "/CN=127.0.0.1"],
                EC_KEY,
                &["-keyout", "server.key", "-out", "server.csr"],
            ],
            &[&[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-extfile",
                "san.ext",
                "-out",
                "server.pem",
            ]],
        ];
        for step in steps {
            let args = step.concat();
            let out = Command::new("openssl")
                .args(&args)
                .current_dir(dir.path())
                .output()
                .context("running openssl (Debian package openssl; scripts/install-deps.sh)")?;
            if !out.status.success() {
                bail!(
                    "openssl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(TestCa {
            ca_cert: dir.path().join("ca.pem"),
            server_cert: dir.path().join("server.pem"),
            server_key: dir.path().join("server.key"),
            _dir: dir,
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bearer-token realm in front of a registry: every `/v2/` request needs
/// `Authorization: Bearer <token>`; tokens come from `GET /token` with HTTP
/// basic credentials `user:password`, or from `POST /token` with an OAuth2
/// refresh token (`grant_type=refresh_token&refresh_token=…`, the flow a
/// CRI `identity_token` uses). Otherwise it forwards requests (GET and
/// HEAD, which is all a pull needs) to the backend unchanged.
pub struct BearerProxy {
    port: u16,
    state: Arc<ProxyState>,
    refresh_token: String,
    task: tokio::task::JoinHandle<()>,
    /// Token requests seen (`(scope, service)` query strings).
    pub token_requests: Arc<Mutex<Vec<String>>>,
    /// Every non-empty `Authorization` header received, on any request
    /// (to prove which credentials reached this endpoint).
    pub authorizations: Arc<Mutex<Vec<String>>>,
}

impl BearerProxy {
    /// Start on a random loopback port (inside a tokio runtime).
    pub async fn start(backend: &str, user: &str, password: &str) -> Result<BearerProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let token = format!("tok-{}-{}", std::process::id(), port);
        let refresh_token = format!("refresh-{}-{}", std::process::id(), port);
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let token_requests = Arc::new(Mutex::new(Vec::new()));
        let authorizations = Arc::new(Mutex::new(Vec::new()));
        let st = Arc::new(ProxyState {
            backend: backend.to_string(),
            realm: format!("http://127.0.0.1:{port}/token"),
            token: Mutex::new(token),
            revoke_after: std::sync::atomic::AtomicI64::new(-1),
            revocations: std::sync::atomic::AtomicU64::new(0),
            refresh_token: refresh_token.clone(),
            basic,
            token_requests: token_requests.clone(),
            authorizations: authorizations.clone(),
        });
        let state = st.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    break;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = st.serve(sock).await;
                });
            }
        });
        Ok(BearerProxy {
            port,
            state,
            refresh_token,
            task,
            token_requests,
            authorizations,
        })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The token the realm hands out now (to test ready-made registry tokens).
    pub fn token(&self) -> String {
        self.state.token.lock().unwrap().clone()
    }

    /// After `n` more requests accepted with the current token, revoke it
    /// (it stops working; the realm hands out a new one), as a registry
    /// whose short-lived token expires in the middle of a pull.
    pub fn revoke_token_after(&self, n: i64) {
        self.state
            .revoke_after
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many tokens were revoked so far.
    pub fn revocations(&self) -> u64 {
        self.state
            .revocations
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The OAuth2 refresh token `POST /token` accepts (an `identity_token`).
    pub fn refresh_token(&self) -> &str {
        &self.refresh_token
    }
}

impl Drop for BearerProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct ProxyState {
    backend: String,
    realm: String,
    token: Mutex<String>,
    /// Accepted requests left before the token is revoked (-1: never).
    revoke_after: std::sync::atomic::AtomicI64,
    revocations: std::sync::atomic::AtomicU64,
    refresh_token: String,
    basic: String,
    token_requests: Arc<Mutex<Vec<String>>>,
    authorizations: Arc<Mutex<Vec<String>>>,
}

impl ProxyState {
    fn current_token(&self) -> String {
        self.token.lock().unwrap().clone()
    }

    /// One more request accepted with the current token: revoke it when
    /// that was the last one [`BearerProxy::revoke_token_after`] allowed.
    fn count_towards_revocation(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        // One atomic step, so concurrent requests neither lose a count nor
        // revoke twice.
        let before = self.revoke_after.fetch_update(SeqCst, SeqCst, |left| {
            (left >= 0).then_some(if left <= 1 { -1 } else { left - 1 })
        });
        if let Ok(0..=1) = before {
            let n = self.revocations.fetch_add(1, SeqCst) + 1;
            let mut t = self.token.lock().unwrap();
            *t = format!("{}-r{n}", t.split("-r").next().unwrap_or(&t));
        }
    }

    /// One request per connection (`Connection: close`).
    async fn serve(&self, mut sock: tokio::net::TcpStream) -> Result<()> {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sock.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
            if head.len() > 64 * 1024 {
                bail!("request head too large");
            }
        }
        let head_end = head
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 4)
            .unwrap_or(head.len());
        let mut body = head.split_off(head_end);
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut lines = text.split("\r\n");
        let request_line = lines.next().unwrap_or_default().to_string();
        let mut rl = request_line.split_whitespace();
        let method = rl.next().unwrap_or_default().to_string();
        let target = rl.next().unwrap_or_default().to_string();
        let authz = lines
            .clone()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("authorization")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        if !authz.is_empty() {
            self.authorizations.lock().unwrap().push(authz.clone());
        }

        if target.starts_with("/token") && method == "POST" {
            // OAuth2 refresh-token grant, form-encoded.
            let len: usize = header(&text, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while body.len() < len.min(64 * 1024) {
                let n = sock.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&buf[..n]);
            }
            let form = form_decode(&String::from_utf8_lossy(&body));
            let field = |k: &str| {
                form.iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.as_str())
                    .unwrap_or("")
            };
            self.token_requests.lock().unwrap().push(format!(
                "POST grant_type={} service={} scope={} client_id={}",
                field("grant_type"),
                field("service"),
                field("scope"),
                field("client_id")
            ));
            if field("grant_type") != "refresh_token"
                || field("refresh_token") != self.refresh_token
            {
                return respond(
                    &mut sock,
                    "401 Unauthorized",
                    "application/json",
                    b"{\"error\":\"invalid_grant\"}",
                )
                .await;
            }
            let body = format!(
                "{{\"access_token\":\"{}\",\"expires_in\":300,\"scope\":\"{}\"}}",
                self.current_token(),
                field("scope")
            );
            return respond(&mut sock, "200 OK", "application/json", body.as_bytes()).await;
        }
        if target.starts_with("/token") {
            let query = target
                .split_once('?')
                .map(|x| x.1)
                .unwrap_or("")
                .to_string();
            self.token_requests.lock().unwrap().push(query);
            if authz != self.basic {
                return respond(
                    &mut sock,
                    "401 Unauthorized",
                    "application/json",
                    b"{\"details\":\"bad credentials\"}",
                )
                .await;
            }
            let body = format!(
                "{{\"token\":\"{}\",\"expires_in\":300}}",
                self.current_token()
            );
            return respond(&mut sock, "200 OK", "application/json", body.as_bytes()).await;
        }
        if authz != format!("Bearer {}", self.current_token()) {
            let hdr = format!(
                "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n\
                 WWW-Authenticate: Bearer realm=\"{}\",service=\"vmpod-test\"\r\n\
                 Docker-Distribution-API-Version: registry/2.0\r\n\
                 Content-Length: 2\r\nConnection: close\r\n\r\n{{}}",
                self.realm
            );
            sock.write_all(hdr.as_bytes()).await?;
            return Ok(());
        }
        self.count_towards_revocation();
        if method != "GET" && method != "HEAD" {
            return respond(
                &mut sock,
                "405 Method Not Allowed",
                "text/plain",
                b"read-only proxy",
            )
            .await;
        }
        // Forward, then pass the response through with Connection: close.
        let mut up = tokio::net::TcpStream::connect(&self.backend).await?;
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nAccept: {}\r\nConnection: close\r\n\r\n",
            self.backend,
            header(&text, "accept").unwrap_or_else(|| "*/*".into())
        );
        up.write_all(req.as_bytes()).await?;
        let mut resp_head = Vec::new();
        let body_start;
        loop {
            let n = up.read(&mut buf).await?;
            if n == 0 {
                bail!("backend closed early");
            }
            resp_head.extend_from_slice(&buf[..n]);
            if let Some(i) = resp_head.windows(4).position(|w| w == b"\r\n\r\n") {
                body_start = i + 4;
                break;
            }
        }
        let head_text = String::from_utf8_lossy(&resp_head[..body_start - 4]).into_owned();
        let mut out = String::new();
        for l in head_text.split("\r\n") {
            if !l.to_ascii_lowercase().starts_with("connection:") {
                out.push_str(l);
                out.push_str("\r\n");
            }
        }
        out.push_str("Connection: close\r\n\r\n");
        sock.write_all(out.as_bytes()).await?;
        sock.write_all(&resp_head[body_start..]).await?;
        tokio::io::copy(&mut up, &mut sock).await?;
        sock.shutdown().await?;
        Ok(())
    }
}

/// `a=1&b=x%2By` → [("a", "1"), ("b", "x+y")] (`+` is a space).
fn form_decode(s: &str) -> Vec<(String, String)> {
    let dec = |v: &str| {
        let b = v.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                    match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        Some(x) => {
                            out.push(x);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (dec(k), dec(v))
        })
        .collect()
}

fn header(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

async fn respond(
    sock: &mut tokio::net::TcpStream,
    status: &str,
    ctype: &str,
    body: &[u8],
) -> Result<()> {
    let hdr = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(hdr.as_bytes()).await?;
    sock.write_all(body).await?;
    sock.shutdown().await?;
    Ok(())
}
