//! Serving a running session in the root part until its command exits, or (without one) until
//! SIGINT/SIGTERM/SIGHUP or `beamredir down`: the control socket, the command, and — for `up` —
//! the network part's requests. Everything is torn down when the session drops, on every path.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::AsFd,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use beamredir::{
    kernel::redirect::LoadOptions,
    mapping::Mapping,
    privsep::{
        channel::{Incoming, Link, LinkError},
        messages::{ListenerId, NetStatus, SessionCommand, ToNet, ToRoot, printable, printable_line},
        root::{Listeners, Refusal, check_hosts},
    },
    session::{
        ActiveSession, DEFAULT_SESSION, Scope, SessionClaim, SessionOptions, SessionRecord, SessionStatus, StateDir,
        control::{self, Request},
        runas::{self, Identity},
    },
    up::NetConfig,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use super::MapArgs;

/// SIGINT/SIGTERM/SIGHUP, taken over before anything is set up: a signal that arrives during
/// start-up is seen by the session loop right after, which then tears down cleanly.
pub struct Signals {
    pub int: tokio::signal::unix::Signal,
    pub term: tokio::signal::unix::Signal,
    pub hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn take() -> Result<Self> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

pub type NetLink = Link<ToNet<NetConfig>, ToRoot>;
pub type NetIncoming = mpsc::Receiver<Result<Incoming<ToRoot>, LinkError>>;

/// The network part as the root part holds it: the channel, the listeners root created for
/// it, and the process.
pub struct NetPart {
    pub link: Arc<NetLink>,
    pub incoming: NetIncoming,
    pub listeners: Listeners,
    /// Listener id → local address, for attaching forward counters to redirects in `status`.
    pub locals: Arc<Mutex<BTreeMap<ListenerId, SocketAddr>>>,
    pub child: std::process::Child,
    pub max_redirects: usize,
}

impl NetPart {
    /// Answers one request that may come at any time (before and after the start).
    pub async fn answer_common(
        &mut self,
        msg: &Incoming<ToRoot>,
        session: Option<&Arc<Mutex<ActiveSession>>>,
    ) -> Result<(), LinkError> {
        match &msg.body {
            ToRoot::OpenListener { family } => match self.listeners.open(*family) {
                Ok((id, local, socket)) => {
                    self.locals.lock().unwrap().insert(id, local);
                    let fd = socket.as_fd();
                    self.link
                        .reply(msg.id, ToNet::Listener { id, local }, Some(fd))
                        .await
                }
                Err(e) => self.refuse(msg.id, e.to_string()).await,
            },
            ToRoot::CloseListener { id } => {
                if let (Some(local), Some(session)) = (self.listeners.local(*id), session) {
                    // Its redirects go first: never a redirect to a port nobody listens on.
                    let mut s = session.lock().unwrap();
                    let keep: Vec<Mapping> = s
                        .record()
                        .redirects
                        .iter()
                        .filter(|m| m.local != local)
                        .copied()
                        .collect();
                    if let Err(e) = s.set_redirects(keep) {
                        log::warn!("removing the redirects to {local}: {e}");
                    }
                }
                self.listeners.close(*id);
                self.locals.lock().unwrap().remove(id);
                self.link.reply(msg.id, ToNet::Ok, None).await
            }
            ToRoot::Progress { text } => {
                log::info!("{}", printable(text, 512));
                Ok(())
            }
            _ => self.refuse(msg.id, "not expected now".into()).await,
        }
    }

    pub async fn refuse(&self, to: u64, message: String) -> Result<(), LinkError> {
        self.link.reply(to, ToNet::Refused { message }, None).await
    }

    /// Ends the network part: asks, then kills what does not listen.
    pub async fn stop(mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.link.request(ToNet::Shutdown, Duration::from_secs(2)),
        )
        .await;
        for _ in 0..20 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `beamredir map`: the user runs the forwards; beamredir only redirects.
pub fn map(state: StateDir, args: MapArgs, verbose: u8, quiet: bool) -> Result<i32> {
    if let Some(program) = args.command.first() {
        runas::check_program(program)?;
    }
    let owner = owner_ids()?;
    let runtime = super::runtime()?;
    let result = runtime.block_on(async {
        let signals = Signals::take()?;
        let claim = SessionClaim::take(state, &args.scope.name(|| DEFAULT_SESSION.to_string()))?;
        let session = claim.start(SessionOptions {
            scope: args.scope.request(),
            mappings: args.mappings,
            load: load_options(verbose, args.scope.max_redirects),
            hosts: None,
            owner,
        })?;
        let mut banner = session_banner(&session, "", "");
        banner.push_str(
            "\nNote: in map mode the forwards are your own listeners, so beamredir cannot check who connects to them\n\
             (`beamredir up` runs its own forwards and admits only the session's processes).",
        );
        let command = (!args.command.is_empty()).then(|| SessionCommand { argv: args.command, env: Vec::new() });
        serve(Arc::new(Mutex::new(session)), command, banner, None, signals, verbose > 0, quiet).await
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

pub fn load_options(verbose: u8, max_redirects: u32) -> LoadOptions {
    LoadOptions {
        log_rewrites: verbose > 0,
        max_redirects,
        // Only the session's network namespace is translated (0 where the kernel cannot say).
        netns_cookie: beamredir::kernel::redirect::netns_cookie().unwrap_or_else(|| {
            log::warn!(
                "this kernel cannot name network namespaces (SO_NETNS_COOKIE, Linux 5.14): a session process \
                 that enters another network namespace is redirected there too"
            );
            0
        }),
    }
}

/// The (uid, gid) a session belongs to: the user behind sudo, else the current one.
pub fn owner_ids() -> Result<(u32, u32)> {
    Ok(match Identity::invoking_user()? {
        Some(id) => (id.uid.as_raw(), id.gid.as_raw()),
        None => (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        ),
    })
}

/// The environment of commands run in a session: its name, and the inetrc with the pods'
/// cluster DNS names for Erlang nodes.
pub fn session_env(record: &SessionRecord) -> Vec<(String, String)> {
    let mut env = vec![("BEAMREDIR_SESSION".to_string(), record.name.clone())];
    if let Some(inetrc) = &record.inetrc {
        env.push(("ERL_INETRC".to_string(), inetrc.display().to_string()));
    }
    env
}

fn describe_scope(scope: &Scope) -> String {
    match scope {
        Scope::Session { cgroup } => format!("cgroup {cgroup}"),
        Scope::Cgroup { cgroup } => format!("existing cgroup {cgroup}"),
        Scope::Global => "every process (--global)".into(),
    }
}

/// The block printed when a session is up: the network part's view of the cluster (`head`),
/// what is redirected where, how to connect (`hints`).
pub fn session_banner(session: &ActiveSession, head: &str, hints: &str) -> String {
    use std::fmt::Write as _;
    let record = session.record();
    let mut out = format!(
        "beamredir session {:?} is up (pid {}).\n",
        record.name, record.pid
    );
    if !head.is_empty() {
        let _ = writeln!(out, "{head}");
    }
    for m in &record.redirects {
        let _ = writeln!(out, "  redirect  {m}");
    }
    match &record.scope {
        Scope::Global => out.push_str("  scope     every process on this machine (--global); the forwards admit your uid only\n"),
        _ => {
            let _ = writeln!(out, "  cgroup    {}", session.cgroup_path().display());
        }
    }
    if !hints.is_empty() {
        let _ = writeln!(out, "{hints}");
        if let Some(inetrc) = &record.inetrc {
            let _ = writeln!(
                out,
                "  Outside the session's commands, add: -kernel inetrc '\"{}\"'",
                inetrc.display()
            );
        }
    }
    if !matches!(record.scope, Scope::Global) {
        let _ = write!(
            out,
            "Join from another terminal:  sudo beamredir shell --session {}",
            record.name
        );
    }
    out.trim_end().to_string()
}

/// Forwards the eBPF program's aya-log records (one per rewrite) to our logger.
fn start_ebpf_logger(session: &ActiveSession) {
    let handle = session.redirector();
    let mut guard = handle.lock().unwrap();
    let Some(redirector) = guard.as_mut() else {
        return;
    };
    match aya_log::EbpfLogger::init(redirector.ebpf_mut()) {
        Err(e) => log::warn!("eBPF logging unavailable: {e}"),
        // SAFETY: the logger owns its ring buffer fd and moves into the AsyncFd, which keeps it
        // open for as long as it is registered.
        Ok(logger) => match unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        } {
            Err(e) => log::warn!("eBPF logging unavailable: {e}"),
            Ok(mut logger) => {
                tokio::spawn(async move {
                    loop {
                        let Ok(mut ready) = logger.readable_mut().await else {
                            break;
                        };
                        ready.get_inner_mut().flush();
                        ready.clear_ready();
                    }
                });
            }
        },
    }
}

/// Bounds on what the network part may report for `status`.
const MAX_STATUS_PODS: usize = 10_000;
const MAX_TEXT: usize = 256;

/// Adds the network part's counters and pods to a session status, checked and bounded.
fn merge_net_status(
    status: &mut SessionStatus,
    net: NetStatus,
    locals: &BTreeMap<ListenerId, SocketAddr>,
) {
    for (id, stats) in net.forwards.into_iter().take(locals.len()) {
        let Some(local) = locals.get(&id) else {
            continue;
        };
        for r in status.redirects.iter_mut().filter(|r| r.local == *local) {
            r.forward = Some(stats.clone());
        }
    }
    status.pods = net
        .pods
        .into_iter()
        .take(MAX_STATUS_PODS)
        .map(|mut p| {
            p.name = printable_line(&p.name, MAX_TEXT);
            p.namespace = printable_line(&p.namespace, MAX_TEXT);
            p.state = printable_line(&p.state, MAX_TEXT);
            p.ip = p.ip.map(|i| printable_line(&i, 64));
            p.ips = p
                .ips
                .into_iter()
                .take(4)
                .map(|i| printable_line(&i, 64))
                .collect();
            p.nodes = p
                .nodes
                .into_iter()
                .take(16)
                .map(|n| printable_line(&n, MAX_TEXT))
                .collect();
            p
        })
        .collect();
    status.connections = Some(net.connections);
}

/// Serves the session; see the module docs.
pub async fn serve(
    session: Arc<Mutex<ActiveSession>>,
    command: Option<SessionCommand>,
    banner: String,
    mut net: Option<NetPart>,
    signals: Signals,
    verbose: bool,
    quiet: bool,
) -> Result<i32> {
    let result =
        serve_until_done(&session, command, banner, &mut net, signals, verbose, quiet).await;
    if let Some(net) = net {
        net.stop().await;
    }
    // This drop is the teardown (detach, cgroup, files).
    match Arc::try_unwrap(session) {
        Ok(session) => drop(session.into_inner().unwrap()),
        Err(_) => log::warn!("session still referenced at teardown; it ends with the process"),
    }
    result
}

async fn serve_until_done(
    session: &Arc<Mutex<ActiveSession>>,
    command: Option<SessionCommand>,
    banner: String,
    net: &mut Option<NetPart>,
    signals: Signals,
    verbose: bool,
    quiet: bool,
) -> Result<i32> {
    let identity = Identity::invoking_user()?;
    if verbose {
        start_ebpf_logger(&session.lock().unwrap());
    }
    let (name, socket_path, cgroup_join, scope, env) = {
        let s = session.lock().unwrap();
        let record = s.record();
        let join = match &record.scope {
            Scope::Global => None,
            scope => Some(s.hierarchy().open_procs(scope.cgroup())?),
        };
        (
            record.name.clone(),
            s.state().socket_path(&record.name),
            join,
            record.scope.clone(),
            session_env(record),
        )
    };
    let (down_tx, mut down_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let handler_session = Arc::downgrade(session);
    let net_view = net.as_ref().map(|n| (n.link.clone(), n.locals.clone()));
    let handler: control::Handler = Arc::new(move |req| {
        let (session, net_view, down_tx) =
            (handler_session.clone(), net_view.clone(), down_tx.clone());
        Box::pin(async move {
            match req {
                Request::Status => {
                    let Some(session) = session.upgrade() else {
                        return r#"{"error":"ending"}"#.into();
                    };
                    let mut status = session.lock().unwrap().status();
                    if let Some((link, locals)) = net_view {
                        if let Ok((ToRoot::Status(net), _)) = link
                            .request(ToNet::StatusQuery, Duration::from_secs(3))
                            .await
                        {
                            let locals = locals.lock().unwrap().clone();
                            merge_net_status(&mut status, net, &locals);
                        }
                    }
                    serde_json::to_string(&status).expect("serializes")
                }
                Request::Down => {
                    let _ = down_tx.send(());
                    r#"{"ok":true}"#.to_string()
                }
            }
        })
    });
    let control = control::serve(&socket_path, handler)
        .with_context(|| format!("binding control socket {}", socket_path.display()))?;

    let Signals {
        int: mut sigint,
        term: mut sigterm,
        hup: mut sighup,
    } = signals;
    if !quiet {
        eprintln!("{banner}");
    }
    let mut child = match &command {
        Some(cmd) => {
            let mut env = env.clone();
            env.extend(cmd.env.iter().cloned());
            let built = runas::command(&cmd.argv, cgroup_join, identity.as_ref(), &env)?;
            let child = tokio::process::Command::from(built)
                .spawn()
                .with_context(|| format!("starting {:?}", cmd.argv[0]))?;
            log::info!(
                "session {name}: running {:?} in {}",
                cmd.argv[0],
                describe_scope(&scope)
            );
            Some(child)
        }
        None => {
            if !quiet {
                eprintln!(
                    "Press Ctrl-C (or run `sudo beamredir down --session {name}`) to end the session."
                );
            }
            None
        }
    };
    let pid = child
        .as_ref()
        .and_then(|c| c.id())
        .map(|p| nix::unistd::Pid::from_raw(p as i32));
    let forward = |sig: nix::sys::signal::Signal| {
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(pid, sig);
        }
    };
    let code = loop {
        let net_msg = async {
            match net.as_mut() {
                Some(n) => n.incoming.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = async { child.as_mut().expect("guarded").wait().await }, if child.is_some() => break runas::exit_code(status?),
            // Ctrl-C reaches the command through the terminal already; beamredir stays up
            // until it exits (as sudo does).
            _ = sigint.recv() => if child.is_none() { log::info!("interrupted; ending session {name}"); break 0 },
            _ = sigterm.recv() => if child.is_some() { forward(nix::sys::signal::Signal::SIGTERM) } else { log::info!("terminated; ending session {name}"); break 0 },
            _ = sighup.recv() => if child.is_some() { forward(nix::sys::signal::Signal::SIGHUP) } else { log::info!("hangup; ending session {name}"); break 0 },
            _ = down_rx.recv() => if child.is_some() { forward(nix::sys::signal::Signal::SIGTERM) } else { log::info!("`beamredir down` asked to end session {name}"); break 0 },
            msg = net_msg => {
                let n = net.as_mut().expect("only polled with a network part");
                match msg {
                    Some(Ok(msg)) => {
                        if let Some(code) = answer(n, session, msg).await {
                            forward(nix::sys::signal::Signal::SIGTERM);
                            break code;
                        }
                    }
                    Some(Err(e)) => {
                        log::error!("the network part of session {name} ended ({e}); ending the session");
                        forward(nix::sys::signal::Signal::SIGTERM);
                        break 1;
                    }
                    None => {
                        log::error!("the network part of session {name} is gone; ending the session");
                        forward(nix::sys::signal::Signal::SIGTERM);
                        break 1;
                    }
                }
            }
        }
    };
    control.abort();
    let _ = control.await;
    Ok(code)
}

/// One request from the network part of a running session. Some(code) ends the session.
async fn answer(
    net: &mut NetPart,
    session: &Arc<Mutex<ActiveSession>>,
    msg: Incoming<ToRoot>,
) -> Option<i32> {
    let reply = match &msg.body {
        ToRoot::SetRedirects { redirects } => {
            let result = net
                .listeners
                .resolve(redirects, net.max_redirects)
                .map_err(|e| e.to_string())
                .and_then(|mappings| {
                    session
                        .lock()
                        .unwrap()
                        .set_redirects(mappings)
                        .map_err(|e| e.to_string())
                });
            Some(result)
        }
        ToRoot::SetHosts { hosts } => {
            let result = check_hosts(hosts)
                .map_err(|e: Refusal| e.to_string())
                .and_then(|()| {
                    session
                        .lock()
                        .unwrap()
                        .set_hosts(hosts)
                        .map_err(|e| e.to_string())
                });
            Some(result)
        }
        ToRoot::Fatal { message } => {
            log::error!("{}", printable(message, 1024));
            return Some(1);
        }
        ToRoot::Start { .. } => Some(Err("the session has started already".into())),
        _ => None,
    };
    let sent = match reply {
        Some(Ok(())) => net.link.reply(msg.id, ToNet::Ok, None).await,
        Some(Err(e)) => net.refuse(msg.id, e).await,
        None => net.answer_common(&msg, Some(session)).await,
    };
    sent.err().map(|e| {
        log::error!("answering the network part: {e}");
        1
    })
}
