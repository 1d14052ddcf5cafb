//! Private TLS servers for tests/tls.rs: a test CA and server certificate made with rcgen, a
//! PostgreSQL cluster (`ssl=on`, `hostssl`-only `pg_hba`) and a Redis with `--tls-port`, each
//! on a free 127.0.0.1 port in its own temporary directory, stopped by `Drop` even when the
//! test fails.

#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// How long a server may take to accept connections.
const START_LIMIT: Duration = Duration::from_secs(20);

/// A CA, a server certificate it signed (valid for `localhost` only), and an unrelated CA.
pub struct Pki {
    pub ca_pem: String,
    pub other_ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().expect("CA key");
    CertifiedIssuer::self_signed(params, key).expect("CA certificate")
}

impl Pki {
    pub fn new() -> Self {
        let ca_a = ca("atproto-ingest test CA");
        let ca_b = ca("some other CA");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &ca_a).expect("server certificate");
        Self {
            ca_pem: ca_a.pem(),
            other_ca_pem: ca_b.pem(),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
        }
    }

    /// Writes `ca.pem`, `other-ca.pem`, `server.crt`, `server.key` (0600) into `dir`.
    pub fn write(&self, dir: &Path) {
        fs::write(dir.join("ca.pem"), &self.ca_pem).unwrap();
        fs::write(dir.join("other-ca.pem"), &self.other_ca_pem).unwrap();
        fs::write(dir.join("server.crt"), &self.server_cert_pem).unwrap();
        fs::write(dir.join("server.key"), &self.server_key_pem).unwrap();
        fs::set_permissions(dir.join("server.key"), fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A running server process; killed (and reaped) on drop.
struct Guard {
    child: Child,
    name: &'static str,
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SIGQUIT: PostgreSQL's immediate shutdown (its children exit too); Redis exits.
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop on SIGQUIT; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The PostgreSQL server binaries (`initdb`, `postgres`, `pg_isready`), newest version.
fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort();
    match versions
        .into_iter()
        .rev()
        .map(|v| v.join("bin").join(name))
        .find(|p| p.exists())
    {
        Some(p) => p,
        None => panic!(
            "PostgreSQL server binary {name:?} not found under /usr/lib/postgresql/*/bin: \
             install Debian's postgresql package (.ci/run does)"
        ),
    }
}

/// uid and gid of the `postgres` user (PostgreSQL refuses to run as root).
fn postgres_ids() -> (u32, u32) {
    // SAFETY: getpwnam with a NUL-terminated name; the record is copied out at once.
    let pw = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
    assert!(
        !pw.is_null(),
        "no `postgres` user: install Debian's postgresql package"
    );
    // SAFETY: non-null record from getpwnam.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for e in fs::read_dir(path).unwrap() {
            chown_tree(&e.unwrap().path(), uid, gid);
        }
    }
}

fn as_postgres(cmd: &mut Command) -> &mut Command {
    let (uid, gid) = postgres_ids();
    cmd.uid(uid).gid(gid).env_remove("PGDATA")
}

/// A private PostgreSQL cluster: `ssl=on` with [`Pki`]'s certificate, and a `pg_hba.conf` that
/// only has `hostssl` lines (trust), so a plain-text connection is refused by the server.
pub struct PgTls {
    pub port: u16,
    pub dir: PathBuf,
    _guard: Guard,
    _tmp: tempfile::TempDir,
}

impl PgTls {
    pub fn start(pki: &Pki) -> Self {
        let tmp = tempfile::Builder::new().prefix("pgtls").tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let (uid, gid) = postgres_ids();
        pki.write(&dir);
        chown_tree(&dir, uid, gid);
        let data = dir.join("data");
        let out = as_postgres(&mut Command::new(pg_bin("initdb")))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data)
            .current_dir(&dir)
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::write(
            data.join("pg_hba.conf"),
            "# TLS only: no `host` or `local` lines.\n\
             hostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        chown_tree(&data.join("pg_hba.conf"), uid, gid);
        let port = free_port();
        let child = as_postgres(&mut Command::new(pg_bin("postgres")))
            .arg("-D")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1", "-p", &port.to_string()])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .args([
                "-c",
                "ssl=on",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=20",
            ])
            .arg("-c")
            .arg(format!(
                "ssl_cert_file={}",
                dir.join("server.crt").display()
            ))
            .arg("-c")
            .arg(format!("ssl_key_file={}", dir.join("server.key").display()))
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting postgres");
        let guard = Guard {
            child,
            name: "postgres",
        };
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let ready = Command::new(pg_bin("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "private PostgreSQL did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            port,
            dir,
            _guard: guard,
            _tmp: tmp,
        }
    }

    /// `postgres://postgres@{host}:{port}/{db}?{query}`.
    pub fn url(&self, host: &str, db: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/{db}?{query}", self.port)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }
}

/// A private Redis serving TLS only (`--port 0 --tls-port N`), clients not authenticated.
pub struct RedisTls {
    pub port: u16,
    pub dir: PathBuf,
    _guard: Guard,
    _tmp: tempfile::TempDir,
}

impl RedisTls {
    pub fn start(pki: &Pki) -> Self {
        let bin = which("redis-server").unwrap_or_else(|| {
            panic!("redis-server not found on PATH: install Debian's redis-server (.ci/run does)")
        });
        let tmp = tempfile::Builder::new()
            .prefix("redistls")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_owned();
        pki.write(&dir);
        let port = free_port();
        let p = |f: &str| dir.join(f).display().to_string();
        let child = Command::new(bin)
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--tls-port",
                &port.to_string(),
            ])
            .args([
                "--tls-cert-file",
                &p("server.crt"),
                "--tls-key-file",
                &p("server.key"),
            ])
            .args([
                "--tls-ca-cert-file",
                &p("ca.pem"),
                "--tls-auth-clients",
                "no",
            ])
            .args(["--save", "", "--appendonly", "no", "--dir", &p(".")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        let guard = Guard {
            child,
            name: "redis-server",
        };
        let deadline = Instant::now() + START_LIMIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "private Redis did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            port,
            dir,
            _guard: guard,
            _tmp: tmp,
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
