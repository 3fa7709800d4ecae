//! The command line: its verbs and options (clap), checked before anything is sent.

use super::*;

/// `portless`: run allow-listed commands in VMs through shared memory.
#[derive(Debug, Parser)]
#[command(
    name = "portless",
    version,
    about = "Run allow-listed commands in VMs through shared memory, without a network.",
    after_help = "The daemon's socket is --socket PATH, else $PORTLESS_SOCKET, else \
                  /run/portless/portless.sock. With --url (or $PORTLESS_URL) the CLI talks \
                  to a daemon's TCP listener or to a control plane instead, presenting the \
                  bearer token in $PORTLESS_TOKEN; an https:// URL's certificate must chain to \
                  a root of the system's store or to --ca FILE (or $PORTLESS_CA)."
)]
pub struct Cli {
    /// The daemon's API socket [default: $PORTLESS_SOCKET, else /run/portless/portless.sock].
    #[arg(long, global = true, value_name = "PATH", conflicts_with = "url")]
    pub socket: Option<PathBuf>,
    /// A daemon's TCP listener or a control plane, as `http://HOST:PORT` or
    /// `https://HOST:PORT` [default: $PORTLESS_URL]; the bearer token comes from
    /// $PORTLESS_TOKEN.
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,
    /// PEM file of the CA that signed an https:// server's certificate (or the
    /// certificate itself, if self-signed), trusted beside the system's roots [default:
    /// $PORTLESS_CA].
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Print JSON for scripts instead of tables for people.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub verb: Verb,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Verb {
    /// List the VMs and the state of their agents.
    Vms,
    /// List the commands a VM allows.
    Commands {
        /// The VM.
        vm: String,
    },
    /// Run a command on a VM, a comma list of VMs, every VM with a label, or all.
    #[command(
        override_usage = "portless exec [OPTIONS] <TARGET> <COMMAND> [ARGS]...\n       \
                                portless exec [OPTIONS] --all <COMMAND> [ARGS]..."
    )]
    Exec(ExecArgs),
    /// Show an execution's record.
    Status {
        /// The execution.
        id: ExecutionId,
    },
    /// Print an execution's output as recorded.
    Output {
        /// The execution.
        id: ExecutionId,
        /// Which stream.
        #[arg(long, value_enum, default_value_t = StreamArg::Stdout)]
        stream: StreamArg,
    },
    /// Cancel a running execution.
    Cancel {
        /// The execution.
        id: ExecutionId,
    },
    /// Copy a program into a VM, and run it with --run.
    Push(PushArgs),
    /// Measure the round trip to a VM's agent.
    Ping {
        /// The VM.
        vm: String,
        /// How many round trips.
        #[arg(long, short = 'c', default_value_t = 1, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
    },
    /// Show a VM's figures (uptime, load, memory, agent counters).
    Metrics {
        /// The VM.
        vm: String,
    },
    /// Show the audit log, newest last.
    Audit(AuditArgs),
    /// Print a link to the web console with a one-time login code (opens the daemon's
    /// loopback listener for it when the daemon has no TCP listener).
    Console,
    /// Run the daemon: `portless serve --config host.toml` (must be the first argument).
    Serve {
        /// The daemon's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// `portless exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Run on every VM (then the first word is the command).
    #[arg(long)]
    pub all: bool,
    /// Wait for the end; exit with the remote exit code (see `portless --help`).
    #[arg(long)]
    pub wait: bool,
    /// Print the output as it arrives (stdout to stdout, stderr to stderr; with several
    /// VMs each line is prefixed with `vm: `), then exit as --wait does.
    #[arg(long)]
    pub follow: bool,
    /// Timeout in milliseconds, instead of the command's own.
    #[arg(long, value_name = "MS")]
    pub timeout: Option<u32>,
    /// Run on at most N VMs at once (a number, or a percentage of the VMs: 10%).
    #[arg(long, value_name = "N", value_parser = concurrency_limit)]
    pub max_concurrency: Option<Limit>,
    /// Stop dispatching once more than N executions have failed (a number, or a
    /// percentage of the VMs: 10%).
    #[arg(long, value_name = "N")]
    pub max_errors: Option<Limit>,
    /// Through a control plane: a key that makes the exec idempotent (the same key again
    /// creates nothing and answers with the first exec's executions).
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// TARGET (`vm1`, `vm1,vm2`, `label=value`), unless --all; then COMMAND and its
    /// arguments (after `--` when one starts with `-`).
    #[arg(value_name = "TARGET COMMAND ARGS", required = true, num_args = 1..,
          allow_negative_numbers = true)]
    pub words: Vec<String>,
}

/// What an `exec` runs, where: the positional words sorted out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecPlan {
    /// The target as the API takes it (`vm1`, `a,b`, `role=web`, `*`).
    pub target: String,
    /// The command name.
    pub command: String,
    /// Its arguments.
    pub args: Vec<String>,
}

impl ExecArgs {
    /// Sorts out the positional words: `TARGET COMMAND ARGS...`, or `COMMAND ARGS...` with
    /// `--all`; a daemon's target is checked and written in its canonical form. A target
    /// with a `/` names VMs of a control plane (`host/vm`, `host/*`): the control plane
    /// checks it.
    pub fn plan(&self) -> Result<ExecPlan, String> {
        let (target, rest) = if self.all {
            (Target::All.to_string(), self.words.as_slice())
        } else {
            match self.words.as_slice() {
                [target, rest @ ..] if !rest.is_empty() && target.contains('/') => {
                    (target.clone(), rest)
                }
                [target, rest @ ..] if !rest.is_empty() => (
                    Target::parse(target)
                        .map_err(|e| e.to_string())?
                        .to_string(),
                    rest,
                ),
                _ => {
                    return Err("a TARGET and a COMMAND are needed (or --all and a COMMAND)".into());
                }
            }
        };
        let (command, args) = rest
            .split_first()
            .ok_or_else(|| "a COMMAND is needed".to_owned())?;
        Ok(ExecPlan {
            target,
            command: command.clone(),
            args: args.to_vec(),
        })
    }
}

/// `portless push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The VM.
    pub vm: String,
    /// The program to copy.
    pub file: PathBuf,
    /// Run it once stored.
    #[arg(long)]
    pub run: bool,
    /// Its name in the guest [default: the file's name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Timeout of the run, in milliseconds.
    #[arg(long, value_name = "MS")]
    pub timeout: Option<u32>,
}

/// `portless audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only calls of this principal.
    #[arg(long, value_name = "P")]
    pub principal: Option<String>,
    /// Only calls of this action (`exec`, `push`, ...).
    #[arg(long, value_name = "A")]
    pub action: Option<String>,
    /// Only denied calls.
    #[arg(long)]
    pub denied: bool,
    /// The newest N entries.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_AUDIT_LIMIT)]
    pub limit: usize,
}

/// An output stream on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StreamArg {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl From<StreamArg> for Stream {
    fn from(s: StreamArg) -> Self {
        match s {
            StreamArg::Stdout => Stream::Stdout,
            StreamArg::Stderr => Stream::Stderr,
        }
    }
}

/// Parses the command line (with the program name first), including the checks clap cannot
/// express (the words of `exec`); a usage error is a clap error, exit code 2.
pub fn parse_args<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args)?;
    if let Verb::Exec(exec) = &cli.verb
        && let Err(message) = exec.plan()
    {
        let mut command = Cli::command();
        command.build();
        let error = match command.find_subcommand_mut("exec") {
            Some(exec) => exec.error(ErrorKind::InvalidValue, message),
            None => Cli::command().error(ErrorKind::InvalidValue, message),
        };
        return Err(error);
    }
    Ok(cli)
}

/// A `--max-concurrency`: a limit that lets at least one run.
fn concurrency_limit(s: &str) -> Result<Limit, String> {
    match s.parse::<Limit>().map_err(|e| e.to_string())? {
        Limit::Count(0) | Limit::Percent(0) => Err("must let at least one run (1 or more)".into()),
        limit => Ok(limit),
    }
}

/// Where the CLI sends its requests: `--url`, else `$PORTLESS_URL` (when set and not
/// empty), as a TCP endpoint with the token of `$PORTLESS_TOKEN`; else the unix socket of
/// [`resolve_socket`].
pub fn resolve_endpoint(
    socket: Option<&Path>,
    url: Option<&str>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<(Endpoint, Option<String>), String> {
    let text = |name: &str| {
        env(name)
            .filter(|v| !v.is_empty())
            .map(|v| v.to_string_lossy().into_owned())
    };
    let url = match (socket, url) {
        (Some(_), _) => None,
        (None, Some(url)) => Some(url.to_owned()),
        (None, None) => text(URL_ENV),
    };
    let Some(url) = url else {
        return Ok((
            Endpoint::Unix(resolve_socket(socket, env(SOCKET_ENV))),
            None,
        ));
    };
    let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (None, Some(rest)) => (true, rest),
        (None, None) => (false, url.as_str()),
    };
    let addr = rest.trim_end_matches('/');
    if addr.is_empty() || addr.contains('/') || !addr.contains(':') {
        return Err(format!(
            "{url}: expected http://HOST:PORT or https://HOST:PORT"
        ));
    }
    let endpoint = if tls {
        Endpoint::Https(addr.to_owned())
    } else {
        Endpoint::Tcp(addr.to_owned())
    };
    Ok((endpoint, text(TOKEN_ENV)))
}

/// The daemon's socket: `--socket`, else `$PORTLESS_SOCKET` (when set and not empty), else
/// the default of `portless serve`.
pub fn resolve_socket(flag: Option<&Path>, env: Option<OsString>) -> PathBuf {
    match (flag, env) {
        (Some(path), _) => path.to_owned(),
        (None, Some(env)) if !env.is_empty() => PathBuf::from(env),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}
