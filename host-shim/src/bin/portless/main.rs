//! `portless`: the host daemon (`portless serve`), the fleet's control plane (`portless
//! control`) and the CLI that talks to either, in one binary. `serve` as the first argument
//! runs the daemon (the `host_shim` library), `control` the control plane
//! (`portless_fleet`); anything else is the CLI ([`cli`]), a client of the daemon's API through `portless-api`.

// A binary exports nothing: `pub` in its modules marks what its siblings and tests use.
#![allow(unreachable_pub)]

mod cli;

use std::ffi::OsStr;
use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new("serve")) {
        return host_shim::daemon::run_from_args(std::env::args_os().skip(2));
    }
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new("control")) {
        return portless_fleet::control::run_from_args(std::env::args_os().skip(2));
    }
    cli::main_cli(std::env::args_os())
}
