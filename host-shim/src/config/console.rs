//! The `[console]` table of `host.toml`: where `portless console` opens the web console
//! when the daemon has no TCP listener, the address printed in its links, and how long
//! sessions and login codes live. Defaults are `portless-console`'s, written once there.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Failure;
use super::limits::{at_least, table_error};

/// Default `[console] listen`: a loopback port the system picks.
pub const DEFAULT_CONSOLE_LISTEN: &str = "127.0.0.1:0";

/// The `[console]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// Where the daemon opens a loopback listener for the console on the first
    /// `portless console`, when `[daemon] tcp` is not set. Loopback only.
    pub listen: SocketAddr,
    /// The base URL printed in login links (`https://ops.example:7433`), when the browser
    /// reaches the daemon by another name than its listener's address.
    pub url: Option<String>,
    /// Sessions and codes.
    pub sessions: portless_console::Settings,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_CONSOLE_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0))),
            url: None,
            sessions: portless_console::Settings::default(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsole {
    listen: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    session_idle_s: Option<Spanned<u64>>,
    session_max_s: Option<Spanned<u64>>,
    login_code_s: Option<Spanned<u64>>,
    max_sessions: Option<Spanned<u32>>,
}

impl RawConsole {
    pub(super) fn check(self) -> Result<ConsoleConfig, Failure> {
        const T: &str = "console";
        let d = ConsoleConfig::default();
        let listen = match self.listen {
            None => d.listen,
            Some(v) => {
                let addr: SocketAddr = v.get_ref().parse().map_err(|_| {
                    table_error(
                        T,
                        v.span(),
                        "listen",
                        "is not an address like 127.0.0.1:7434",
                    )
                })?;
                if !addr.ip().is_loopback() {
                    return Err(table_error(
                        T,
                        v.span(),
                        "listen",
                        "must be a loopback address (serve other addresses with [daemon] tcp and TLS)",
                    ));
                }
                addr
            }
        };
        let url = match self.url {
            None => None,
            Some(v) => Some(portless_console::base_url(v.get_ref()).ok_or_else(|| {
                table_error(T, v.span(), "url", "is not an http:// or https:// URL")
            })?),
        };
        let s = d.sessions;
        let secs = |v: Option<Spanned<u64>>, field, default: Duration| {
            at_least(T, field, v, 1, default.as_secs()).map(Duration::from_secs)
        };
        Ok(ConsoleConfig {
            listen,
            url,
            sessions: portless_console::Settings {
                idle: secs(self.session_idle_s, "session_idle_s", s.idle)?,
                max: secs(self.session_max_s, "session_max_s", s.max)?,
                code_lifetime: secs(self.login_code_s, "login_code_s", s.code_lifetime)?,
                max_sessions: at_least(
                    T,
                    "max_sessions",
                    self.max_sessions,
                    1,
                    u32::try_from(s.max_sessions).unwrap_or(u32::MAX),
                )? as usize,
                max_codes: s.max_codes,
            },
        })
    }
}
