//! Who the caller is (`GET /v1/whoami`) and the console's login codes
//! (`POST /v1/console/codes`).

use serde::{Deserialize, Serialize};

/// What a principal may do beyond its VMs and commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rights {
    /// It may push programs.
    pub push: bool,
    /// It may read the audit log.
    pub audit: bool,
    /// It may read other principals' executions.
    pub read_all: bool,
    /// It may cancel other principals' executions.
    pub cancel_all: bool,
}

/// `GET /v1/whoami`: the caller's principal and rights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whoami {
    /// The principal's name.
    pub principal: String,
    /// How the caller was identified, as the audit log names it (`uid=0 gid=0`, `token`,
    /// `console session 1a2b3c4d`).
    #[serde(default)]
    pub caller: String,
    /// Its rights.
    #[serde(default)]
    pub rights: Rights,
    /// The server is a fleet's control plane: VMs are named `host/vm`, and a VM's ping
    /// and metrics are its host daemon's.
    #[serde(default)]
    pub fleet: bool,
}

/// `POST /v1/console/codes`: a one-time login code for the web console, for the calling
/// principal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleCode {
    /// The URL to open: the console's login page with the code.
    pub url: String,
    /// The code alone (it can also be typed on the login page).
    pub code: String,
    /// When the code stops working, if unused (ms since the epoch).
    pub expires_at_ms: u64,
}
