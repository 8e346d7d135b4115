//! A `redis-server` of a test's own, for faults that must not touch the shared server.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use idem_runtime::store::redis::redis;

/// A `redis-server` on a free loopback port, with an append-only file fsynced on every
/// write, so acknowledged records survive a crash. Killed on drop.
pub struct PrivateRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// More `redis-server` arguments (they override the defaults above them).
    extra: Vec<String>,
}

impl PrivateRedis {
    /// Starts one.
    pub fn start() -> std::io::Result<Self> {
        Self::start_with(&[])
    }

    /// Starts one with more `redis-server` arguments, e.g. `["--maxmemory-policy",
    /// "allkeys-lru"]`.
    pub fn start_with(extra: &[&str]) -> std::io::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut server = PrivateRedis {
            port,
            dir: tempfile::tempdir()?,
            child: None,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
        };
        server.spawn()?;
        Ok(server)
    }

    /// (Re)starts the process on the same port and directory.
    pub fn spawn(&mut self) -> std::io::Result<()> {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--maxmemory-policy", "noeviction"])
            .args(&self.extra)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL (`graceful == false`: a crash) or SIGTERM (Redis shuts down cleanly,
    /// flushing its append-only file; SIGKILL after 5 s), then reaps the process.
    pub fn stop(&mut self, graceful: bool) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if graceful {
            // SAFETY: a plain kill(2) of our own child, which has not been reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A plain admin connection, once the server answers `PING` (within 5 s; loading the
    /// append-only file answers `LOADING` until done).
    pub async fn admin(&self) -> Option<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url()).ok()?;
        for _ in 0..100 {
            if let Ok(Ok(mut con)) = tokio::time::timeout(
                Duration::from_secs(1),
                client.get_multiplexed_async_connection(),
            )
            .await
            {
                if redis::cmd("PING")
                    .query_async::<String>(&mut con)
                    .await
                    .is_ok()
                {
                    return Some(con);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop(false);
    }
}

impl PrivateRedis {
    /// Starts one and waits until it answers, or `None` after [`crate::unavailable`] (no
    /// `redis-server` on this machine, or it did not come up).
    pub async fn started() -> Option<PrivateRedis> {
        Self::started_with(&[]).await
    }

    /// [`started`](Self::started) with more `redis-server` arguments.
    pub async fn started_with(extra: &[&str]) -> Option<PrivateRedis> {
        let server = match PrivateRedis::start_with(extra) {
            Ok(server) => server,
            Err(e) => {
                crate::unavailable("redis-server (to start a private Redis)", e);
                return None;
            }
        };
        if server.admin().await.is_none() {
            crate::unavailable("a private redis-server", "it did not answer within 5 s");
            return None;
        }
        Some(server)
    }
}
