//! `portless serve`: loads `host.toml`, opens the records, starts one driver per VM (creating
//! plain regions and ivshmem servers), and serves the API on the unix socket (and the TCP
//! listener if configured) until SIGTERM or SIGINT.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::broadcast;

use crate::config::{ChannelConfig, HostConfig, UnixUser, VmConfig};
use crate::http::callers::Callers;
use crate::http::policy::Policy;
use crate::http::{self, App, Peer};
use crate::records::{Op, Records, StoreLimits, Writer};
use crate::vm::memory::GuestRegion;
use crate::vm::{self, ChannelKind, VmSettings};

/// The default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/portless/host.toml";

/// `portless serve [--config PATH]`.
pub fn run_from_args(args: impl Iterator<Item = OsString>) -> ExitCode {
    let mut config = PathBuf::from(DEFAULT_CONFIG);
    let mut args = args;
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--config") => match args.next() {
                Some(p) => config = p.into(),
                None => return usage("--config needs a path"),
            },
            Some("--help" | "-h") => {
                println!("usage: portless serve [--config PATH]   (default {DEFAULT_CONFIG})");
                return ExitCode::SUCCESS;
            }
            _ => return usage(&format!("unexpected argument {a:?}")),
        }
    }
    let config = match HostConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("portless: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portless: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portless: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("portless serve: {msg}\nusage: portless serve [--config PATH]");
    ExitCode::from(2)
}

/// Maps (creating it if needed) a plain VM's memory-backend file.
fn plain_region(path: &Path, size: usize) -> Result<GuestRegion> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = GuestRegion::open_file(path, size)?;
    Ok(GuestRegion::from_file(file, size)?)
}

/// Takes the state directory's lock, so that a second `portless serve` on the same records
/// (and socket) refuses to start instead of taking the first one's socket away. Held for
/// the daemon's life (the kernel drops it when the process ends, however it ends).
fn lock_state_dir(dir: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(LOCK_FILE_NAME);
    let mut file =
        crate::sys::open_private(&path).with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            bail!(
                "another `portless serve` (pid {}) uses the state directory {}: stop it \
                 first, or give this daemon a state_dir (and socket) of its own",
                pid.trim(),
                dir.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Makes the state directory's spool directory (private), empty: a program spooled there
/// is unlinked as soon as it is created, so a file found there was left by a daemon that
/// died in between.
fn prepare_spool(state_dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = state_dir.join(http::SPOOL_DIR);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let _ = std::fs::remove_file(entry?.path());
    }
    Ok(())
}

/// The lock file in the state directory.
pub const LOCK_FILE_NAME: &str = "portless.lock";

fn channel(vm: &VmConfig, state_dir: &Path) -> Result<ChannelKind> {
    Ok(match &vm.channel {
        ChannelConfig::Plain { path, size } => ChannelKind::Plain(plain_region(path, *size)?),
        ChannelConfig::Doorbell {
            socket,
            size,
            qemu_user,
        } => {
            if let Some(dir) = socket.parent() {
                std::fs::create_dir_all(dir)?;
            }
            // The memory is a file in the state directory, so that a restarted daemon
            // finds it again under a QEMU that kept running.
            let regions = state_dir.join("regions");
            std::fs::create_dir_all(&regions)?;
            let region = regions.join(format!("{}.region", vm.name));
            let mut server = crate::vm::ivshmem::Server::with_file(socket, &region, *size, 1)?;
            if let Some(user) = qemu_user {
                let uid = match user {
                    UnixUser::Id(uid) => *uid,
                    UnixUser::Name(name) => crate::sys::uid_of(name)
                        .with_context(|| format!("vm {}: qemu_user {name:?}", vm.name))?,
                };
                server
                    .allow_uid(uid)
                    .with_context(|| format!("vm {}", vm.name))?;
            }
            ChannelKind::Doorbell(server)
        }
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes the counts of denied calls whose interval has ended (all of them with `all`).
async fn write_counted_denials(app: &App, all: bool) {
    let entries = app.callers.flush(now_ms(), all);
    if entries.is_empty() {
        return;
    }
    let ops = entries.into_iter().map(Op::Audit).collect();
    if let Err(e) = app.writer.run(ops).await {
        eprintln!("portless: counted denied calls not written to the audit log: {e}");
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn serve(config: HostConfig) -> Result<()> {
    let d = config.daemon.clone();
    let _lock = lock_state_dir(&d.state_dir)?;
    prepare_spool(&d.state_dir)?;
    let r = config.records;
    let limits = StoreLimits {
        output_cap: d.output_cap as u64,
        vm_quota: r.vm_quota,
        min_free: r.min_free,
    };
    let records = Arc::new(
        Records::open_with(&d.state_dir, limits)
            .with_context(|| format!("records in {}", d.state_dir.display()))?,
    );
    let (writer, writer_thread) = Writer::start(records.clone(), r.retention(), r.prune_interval)?;
    let (events, _) = broadcast::channel(4096);
    let mut vms = BTreeMap::new();
    let mut threads = Vec::new();
    for vm in &config.vms {
        let settings = VmSettings {
            name: vm.name.clone(),
            heartbeat_timeout: d.heartbeat_timeout,
            lost_after: d.heartbeat_timeout * 6,
            delivery_timeout: d.delivery_timeout,
            command_refresh: d.command_refresh,
            poll_max: Duration::from_millis(1),
            reset_timeout: d.heartbeat_timeout,
            budget: config.budget,
            merge_bytes: usize::try_from(r.output_merge_bytes).unwrap_or(usize::MAX),
            merge_wait: r.output_merge_wait,
        };
        let ch = channel(vm, &d.state_dir).with_context(|| format!("vm \"{}\"", vm.name))?;
        let (handle, thread) = vm::spawn(settings, ch, writer.clone(), events.clone())?;
        vms.insert(vm.name.clone(), handle);
        threads.push(thread);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let console = portless_console::Console::new(config.console.sessions, d.tls.is_some());
    let app = Arc::new(App {
        policy: Policy::new(&config.principals),
        callers: Callers::new(config.callers),
        config,
        records,
        writer: writer.clone(),
        vms,
        events,
        tickets: std::sync::atomic::AtomicU64::new(1),
        stopping: stop_rx.clone(),
        started_ms: now_ms(),
        console: Arc::new(console),
        console_listener: tokio::sync::OnceCell::new(),
        background: std::sync::Mutex::new(Vec::new()),
    });
    // Denied calls counted past their peer's budget are written as the intervals end.
    let flusher = {
        let app = app.clone();
        let every = (app.config.callers.denied_interval / 4)
            .clamp(Duration::from_millis(250), Duration::from_secs(5));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                write_counted_denials(&app, false).await;
            }
        })
    };

    // The fleet's membership: the daemon serves its local callers whether or not the
    // database answers.
    let membership = match &app.config.fleet {
        Some(f) => {
            eprintln!("portless: joining the fleet as host {:?}", f.host);
            Some(crate::fleet::start(app.clone(), f, stop_rx.clone())?)
        }
        None => None,
    };

    if let Some(dir) = d.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&d.socket);
    let unix = tokio::net::UnixListener::bind(&d.socket)
        .with_context(|| format!("binding {}", d.socket.display()))?;
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(d.socket_mode))?;
    // Remember which file is ours: at shutdown, remove it only if it is still ours (a new
    // daemon may have taken the path meanwhile).
    let ours = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&d.socket)
            .map(|m| (m.dev(), m.ino()))
            .ok()
    };
    eprintln!(
        "portless: serving {} vms on {}",
        app.vms.len(),
        d.socket.display()
    );

    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let t = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, () = t => {} }
    };
    let unix_server = {
        let mut rx = stop_rx.clone();
        let svc = http::router(app.clone()).into_make_service_with_connect_info::<Peer>();
        tokio::spawn(async move {
            axum::serve(unix, svc)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
        })
    };
    let tcp_server = match d.tcp {
        Some(addr) => {
            // The certificate is read before the port is taken: a bad file stops the start.
            let tls = d
                .tls
                .as_ref()
                .map(|f| portless_tls::server_config(&f.cert, &f.key))
                .transpose()?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            let router = http::router(app.clone());
            let mut rx = stop_rx.clone();
            Some(match tls {
                Some(config) => {
                    eprintln!("portless: also serving on {addr} (TLS, bearer tokens)");
                    tokio::spawn(async move {
                        portless_tls::serve(listener, config, router, rx, Peer::Tcp).await;
                        Ok(())
                    })
                }
                None => {
                    if !addr.ip().is_loopback() {
                        eprintln!(
                            "portless: WARNING: serving {addr} in plain HTTP \
                             (insecure_plaintext): bearer tokens cross the network in clear text"
                        );
                    }
                    eprintln!("portless: also serving on {addr} (plain HTTP, bearer tokens)");
                    let svc = router.into_make_service_with_connect_info::<Peer>();
                    tokio::spawn(async move {
                        axum::serve(crate::http::NoDelay(listener), svc)
                            .with_graceful_shutdown(async move {
                                let _ = rx.wait_for(|s| *s).await;
                            })
                            .await
                    })
                }
            })
        }
        None => None,
    };
    shutdown.await;
    eprintln!("portless: stopping");
    let _ = stop_tx.send(true);
    let _ = unix_server.await;
    if let Some(t) = tcp_server {
        let _ = t.await;
    }
    if let Some(m) = membership {
        let _ = tokio::time::timeout(Duration::from_secs(5), m).await;
    }
    let background = std::mem::take(
        &mut *app
            .background
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for t in background {
        let _ = t.await;
    }
    let still_ours = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&d.socket)
            .map(|m| (m.dev(), m.ino()))
            .ok()
            == ours
    };
    if still_ours {
        let _ = std::fs::remove_file(&d.socket);
    }
    flusher.abort();
    write_counted_denials(&app, true).await;
    // The drivers stop once every handle is gone; executions in the guests carry on and are
    // found again by the next daemon.
    drop(app);
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    // The drivers wrote what they had; the writer finishes its queue and stops.
    writer.stop();
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    Ok(())
}
