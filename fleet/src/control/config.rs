//! `control.toml`: where the control plane listens, its database, its timings and its
//! principals.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The control plane's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// The API's TCP address.
    pub listen: SocketAddr,
    /// The listener's TLS certificate chain and key (PEM files); `None`: plain HTTP, which
    /// only a loopback address or `insecure_plaintext` allows.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Plain HTTP on an address that is not loopback: only when this says so.
    pub insecure_plaintext: bool,
    /// The database (a libpq connection string or a `postgresql://` URL).
    pub database: String,
    /// Connections to the database, at most.
    pub pool_size: usize,
    /// How long an invocation waits for its host to claim it before it ends
    /// `delivery_timed_out` (a request's `timeout_ms` does not change it).
    pub delivery_timeout: Duration,
    /// How long without a heartbeat before a host is offline (its new invocations are
    /// `delayed`, its VMs `host_offline`).
    pub host_offline_after: Duration,
    /// How long past its lease an invocation stays claimed before it ends `host_lost`.
    pub host_lost_after: Duration,
    /// Period of the sweeper.
    pub sweep_interval: Duration,
    /// Who may do what.
    pub principals: Vec<ControlPrincipal>,
    /// The base URL of the console's login links, when browsers reach the control plane
    /// by another name than a request's `Host` (`[console] url`).
    pub console_url: Option<String>,
    /// The console's sessions and codes (`[console]`; kept in the database).
    pub console: portless_console::Settings,
}

/// A `[[principal]]` of `control.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPrincipal {
    /// Its name.
    pub name: String,
    /// SHA-256 (hex) of its bearer token.
    pub token_sha256: [u8; 32],
    /// The VMs it may see and use: `*`, `host/*`, `host/vm`, `key=value`.
    pub vms: Vec<String>,
    /// The commands it may run: `*` or names.
    pub commands: Vec<String>,
    /// Whether it may upload and push programs.
    pub push: bool,
    /// Whether it may read the audit log.
    pub audit: bool,
    /// Whether it may read the executions of others.
    pub read_all: bool,
    /// Whether it may cancel the executions of others.
    pub cancel_all: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    control: ControlTable,
    #[serde(default)]
    principal: Vec<PrincipalTable>,
    #[serde(default)]
    console: ConsoleTable,
}

/// `[console]`: as in `host.toml`, without `listen` (the console is served on the control
/// plane's own listener).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConsoleTable {
    url: Option<String>,
    session_idle_s: Option<u64>,
    session_max_s: Option<u64>,
    login_code_s: Option<u64>,
    max_sessions: Option<usize>,
}

impl ConsoleTable {
    fn check(self) -> Result<(Option<String>, portless_console::Settings), String> {
        let url = match self.url {
            None => None,
            Some(u) => Some(portless_console::base_url(&u).ok_or_else(|| {
                format!("[console] url = {u:?} is not an http:// or https:// URL")
            })?),
        };
        let d = portless_console::Settings::default();
        let secs = |v: Option<u64>, key: &str, default: Duration| match v {
            None => Ok(default),
            Some(0) => Err(format!("[console] {key} must be at least 1")),
            Some(s) => Ok(Duration::from_secs(s)),
        };
        let max_sessions = match self.max_sessions {
            None => d.max_sessions,
            Some(0) => return Err("[console] max_sessions must be at least 1".into()),
            Some(n) => n,
        };
        Ok((
            url,
            portless_console::Settings {
                idle: secs(self.session_idle_s, "session_idle_s", d.idle)?,
                max: secs(self.session_max_s, "session_max_s", d.max)?,
                code_lifetime: secs(self.login_code_s, "login_code_s", d.code_lifetime)?,
                max_sessions,
                max_codes: d.max_codes,
            },
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlTable {
    listen: SocketAddr,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    insecure_plaintext: bool,
    database: String,
    #[serde(default = "default_pool")]
    pool_size: usize,
    #[serde(default = "default_delivery_s")]
    delivery_timeout_s: u64,
    #[serde(default = "default_offline_ms")]
    host_offline_after_ms: u64,
    #[serde(default = "default_lost_ms")]
    host_lost_after_ms: u64,
    #[serde(default = "default_sweep_ms")]
    sweep_interval_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalTable {
    name: String,
    token_sha256: String,
    #[serde(default)]
    vms: Vec<String>,
    #[serde(default)]
    commands: Vec<String>,
    #[serde(default)]
    push: bool,
    #[serde(default)]
    audit: bool,
    #[serde(default)]
    read_all: bool,
    #[serde(default)]
    cancel_all: bool,
}

fn default_pool() -> usize {
    16
}
fn default_delivery_s() -> u64 {
    600
}
fn default_offline_ms() -> u64 {
    10_000
}
fn default_lost_ms() -> u64 {
    300_000
}
fn default_sweep_ms() -> u64 {
    1000
}

impl ControlConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks a `control.toml`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let c = file.control;
        let (console_url, console) = file.console.check()?;
        let tls = match (c.tls_cert, c.tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(
                    "[control] tls_cert and tls_key go together: set both or neither".into(),
                );
            }
        };
        if tls.is_none() && !c.listen.ip().is_loopback() && !c.insecure_plaintext {
            return Err(format!(
                "[control] listen = \"{}\" is not a loopback address: set tls_cert and \
                 tls_key, or set insecure_plaintext = true (bearer tokens would cross the \
                 network in clear text)",
                c.listen
            ));
        }
        if c.pool_size == 0 || c.pool_size > 1024 {
            return Err("[control] pool_size must be 1 to 1024".into());
        }
        for (key, ms) in [
            ("host_offline_after_ms", c.host_offline_after_ms),
            ("host_lost_after_ms", c.host_lost_after_ms),
            ("sweep_interval_ms", c.sweep_interval_ms),
        ] {
            if ms == 0 {
                return Err(format!("[control] {key} must be more than 0"));
            }
        }
        if c.delivery_timeout_s == 0 {
            return Err("[control] delivery_timeout_s must be more than 0".into());
        }
        let mut principals: Vec<ControlPrincipal> = Vec::new();
        for p in file.principal {
            if p.name.is_empty()
                || p.name.len() > 63
                || !p
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
            {
                return Err(format!(
                    "principal {:?}: a name is 1 to 63 of a-z 0-9 _ . -",
                    p.name
                ));
            }
            if principals.iter().any(|q| q.name == p.name) {
                return Err(format!("principal {:?} is declared twice", p.name));
            }
            let mut hash = [0u8; 32];
            hex::decode_to_slice(&p.token_sha256, &mut hash).map_err(|_| {
                format!(
                    "principal {:?}: token_sha256 must be 64 hex digits (sha256sum of the token)",
                    p.name
                )
            })?;
            for v in &p.vms {
                super::target::Selector::parse(v)
                    .map_err(|e| format!("principal {:?}: vms: {e}", p.name))?;
            }
            principals.push(ControlPrincipal {
                name: p.name,
                token_sha256: hash,
                vms: p.vms,
                commands: p.commands,
                push: p.push,
                audit: p.audit,
                read_all: p.read_all,
                cancel_all: p.cancel_all,
            });
        }
        Ok(Self {
            listen: c.listen,
            tls,
            insecure_plaintext: c.insecure_plaintext,
            database: c.database,
            pool_size: c.pool_size,
            delivery_timeout: Duration::from_secs(c.delivery_timeout_s),
            host_offline_after: Duration::from_millis(c.host_offline_after_ms),
            host_lost_after: Duration::from_millis(c.host_lost_after_ms),
            sweep_interval: Duration::from_millis(c.sweep_interval_ms),
            principals,
            console_url,
            console,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_parses() {
        let text = include_str!("../../../examples/control.toml");
        let c = ControlConfig::parse(text).expect("examples/control.toml");
        assert_eq!(c.principals.len(), 2);
        assert_eq!(c.delivery_timeout, Duration::from_secs(600));
        assert_eq!(c.principals[1].vms, ["role=web"]);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let base = "[control]\nlisten = \"127.0.0.1:1\"\ndatabase = \"host=/x\"\n";
        let err = |extra: &str| ControlConfig::parse(&format!("{base}{extra}")).unwrap_err();
        assert!(err("pool_size = 0\n").contains("pool_size"));
        assert!(err("[[principal]]\nname = \"a\"\ntoken_sha256 = \"zz\"\n").contains("64 hex"));
        assert!(
            err("[[principal]]\nname = \"a\"\ntoken_sha256 = \"00\"\nvms = [\"web1\"]\n")
                .contains("64 hex")
        );
        let hash = "00".repeat(32);
        assert!(
            err(&format!(
                "[[principal]]\nname = \"a\"\ntoken_sha256 = \"{hash}\"\nvms = [\"web1\"]\n"
            ))
            .contains("not a fleet target")
        );
        assert!(err("nmae = 1\n").contains("unknown field"));
        assert!(err("[console]\nurl = \"ftp://x\"\n").contains("http://"));
        assert!(err("[console]\nsession_idle_s = 0\n").contains("session_idle_s"));
        let c = ControlConfig::parse(&format!(
            "{base}[console]\nurl = \"https://ops.example/\"\nsession_idle_s = 60\n"
        ))
        .expect("console");
        assert_eq!(c.console_url.as_deref(), Some("https://ops.example"));
        assert_eq!(c.console.idle, Duration::from_secs(60));
        let open = ControlConfig::parse("[control]\nlisten = \"0.0.0.0:1\"\ndatabase = \"x\"\n");
        assert!(open.unwrap_err().contains("insecure_plaintext"));
        let half = "[control]\nlisten = \"0.0.0.0:1\"\ndatabase = \"x\"\ntls_cert = \"/c.pem\"\n";
        assert!(
            ControlConfig::parse(half)
                .unwrap_err()
                .contains("go together")
        );
    }
}
