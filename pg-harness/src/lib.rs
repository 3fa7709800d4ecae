//! A throwaway PostgreSQL server for tests and benchmarks: Debian's `postgresql-15` binaries
//! (`initdb`, `pg_ctl`, from `/usr/lib/postgresql/15/bin` or `PG_BIN`), a data directory of
//! its own and a unix socket in it; no TCP port is opened.
//!
//! PostgreSQL refuses to run as root, so when the caller is root the server's files belong
//! to the `postgres` system user (which the Debian package creates) and its commands run
//! through `runuser -u postgres`. The data directory is removed when the [`Server`] is
//! dropped (after an immediate stop).
#![forbid(unsafe_code)]

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The Debian package's binaries.
const DEFAULT_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The system user a root caller runs the server as.
const SERVER_USER: &str = "postgres";
/// The superuser `initdb` creates (trust authentication over the unix socket only).
pub const SUPERUSER: &str = "portless";

/// A running PostgreSQL server.
#[derive(Debug)]
pub struct Server {
    bin: PathBuf,
    dir: PathBuf,
    as_root: bool,
    running: bool,
}

/// Why a server could not be set up or driven.
#[derive(Debug)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn io_err(what: &str, e: &io::Error) -> Error {
    Error(format!("{what}: {e}"))
}

impl Server {
    /// Creates a cluster in `dir` (which must not exist; its parents must be traversable by
    /// the `postgres` user when running as root) and starts it.
    pub fn start(dir: &Path) -> Result<Self, Error> {
        let bin =
            std::env::var_os("PG_BIN").map_or_else(|| PathBuf::from(DEFAULT_BIN), PathBuf::from);
        if !bin.join("initdb").exists() {
            return Err(Error(format!(
                "no initdb in {} (apt-get install postgresql-15, or set PG_BIN)",
                bin.display()
            )));
        }
        let as_root = is_root()?;
        std::fs::create_dir(dir).map_err(|e| io_err(&format!("creating {}", dir.display()), &e))?;
        let mut s = Self {
            bin,
            dir: dir.to_owned(),
            as_root,
            running: false,
        };
        if as_root {
            let status = Command::new("chown")
                .arg(format!("{SERVER_USER}:"))
                .arg(dir)
                .status()
                .map_err(|e| io_err("chown", &e))?;
            if !status.success() {
                return Err(Error(format!(
                    "chown {SERVER_USER}: {} failed (is postgresql-15 installed?)",
                    dir.display()
                )));
            }
        }
        let data = s.data();
        s.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-U".as_ref(),
                SUPERUSER.as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        s.pg_ctl("start", None)?;
        s.running = true;
        Ok(s)
    }

    /// The directory of the unix socket (the `host` of a connection string).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// A connection string for database `db` as the superuser, over the unix socket.
    pub fn url(&self, db: &str) -> String {
        format!("host={} user={SUPERUSER} dbname={db}", self.dir.display())
    }

    /// Stops the server at once (`-m immediate`: as a crash would, no checkpoint) and starts
    /// it again.
    pub fn restart_immediate(&mut self) -> Result<(), Error> {
        self.pg_ctl("restart", Some("immediate"))
    }

    /// Stops the server (`fast`: clients are disconnected, a checkpoint is written).
    pub fn stop(&mut self) -> Result<(), Error> {
        if self.running {
            self.pg_ctl("stop", Some("fast"))?;
            self.running = false;
        }
        Ok(())
    }

    /// Starts a stopped server again.
    pub fn start_again(&mut self) -> Result<(), Error> {
        if !self.running {
            self.pg_ctl("start", None)?;
            self.running = true;
        }
        Ok(())
    }

    /// Runs `psql -tAc sql` against database `db`: its output, trimmed.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, Error> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-tA", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args(["-U", SUPERUSER, "-d", db, "-c", sql])
            .output()
            .map_err(|e| io_err("psql", &e))?;
        checked("psql", &out).map(|s| s.trim().to_owned())
    }

    /// The postmaster's process id, while it runs (the first line of `postmaster.pid`).
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg_ctl(&self, action: &str, mode: Option<&str>) -> Result<(), Error> {
        // fsync off: a process crash (what `-m immediate` is) loses nothing the kernel holds,
        // only a machine crash would. `synchronous_commit` stays on: with it off, a commit
        // acknowledged just before an immediate stop can be lost, which the restart tests
        // must not see.
        let options = format!(
            "-k {} -c listen_addresses= -c fsync=off",
            self.dir.display()
        );
        let data = self.data();
        let log = self.dir.join("server.log");
        let mut args: Vec<&std::ffi::OsStr> = vec![
            action.as_ref(),
            "-D".as_ref(),
            data.as_os_str(),
            "-w".as_ref(),
            "-l".as_ref(),
            log.as_os_str(),
            "-o".as_ref(),
            options.as_ref(),
        ];
        if let Some(m) = mode {
            args.push("-m".as_ref());
            args.push(m.as_ref());
        }
        self.run("pg_ctl", &args).map(|_| ())
    }

    /// Runs one of the server's commands, as the `postgres` user when we are root.
    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<String, Error> {
        let path = self.bin.join(tool);
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", SERVER_USER, "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = cmd.args(args).output().map_err(|e| io_err(tool, &e))?;
        checked(tool, &out).map_err(|e| Error(format!("{e}\n{}", self.log())))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl("stop", Some("immediate"));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn checked(what: &str, out: &Output) -> Result<String, Error> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether this process runs as root (from `/proc/self/status`, to stay free of `libc`).
fn is_root() -> Result<bool, Error> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| io_err("reading /proc/self/status", &e))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pg-harness-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_server_starts_keeps_data_over_an_immediate_restart_and_is_removed() {
        let dir = scratch("restart");
        let mut s = Server::start(&dir).expect("server");
        s.psql(
            "postgres",
            "CREATE TABLE t (x int); INSERT INTO t VALUES (42);",
        )
        .expect("create");
        s.restart_immediate().expect("restart");
        assert_eq!(s.psql("postgres", "SELECT x FROM t").expect("select"), "42");
        s.stop().expect("stop");
        assert!(s.psql("postgres", "SELECT 1").is_err(), "stopped");
        s.start_again().expect("start");
        assert_eq!(
            s.psql("postgres", "SELECT count(*) FROM t").expect("count"),
            "1"
        );
        assert!(s.url("fleet").contains(&format!("host={}", dir.display())));
        drop(s);
        assert!(!dir.exists(), "the data directory is removed");
    }

    #[test]
    fn no_tcp_port_is_opened() {
        let dir = scratch("notcp");
        let s = Server::start(&dir).expect("server");
        assert_eq!(
            s.psql("postgres", "SHOW listen_addresses").expect("show"),
            ""
        );
    }
}
