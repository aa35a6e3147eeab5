//! `beamredir up`, root part: take the session's name, start the network part (as the invoking
//! user, see [`beamredir::privsep`]), answer its requests until it has found the pods, then
//! start the session with what it found and serve it. Nothing exists in the kernel until the
//! pods are known, so a failure before that leaves nothing behind.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};
use beamredir::{
    privsep::{
        channel::{self, Channel, Link},
        messages::{PeerRule, SessionCommand, ToNet, ToRoot, printable},
        net::RootLink,
        root::{Listeners, check_hosts},
        spawn::spawn_network_part,
    },
    session::{
        ActiveSession, Scope, SessionClaim, SessionOptions, StateDir,
        runas::{self, Identity},
    },
    up::{Limits, NetConfig, PodSource},
};

use super::{
    UpArgs,
    host::{NetPart, Signals, load_options, owner_ids, serve, session_banner},
};

/// kubectl users write pod/NAME (and sts/NAME, svc/NAME) too.
fn strip_kind(s: &str, kinds: &[&str]) -> String {
    kinds
        .iter()
        .find_map(|k| s.strip_prefix(k))
        .unwrap_or(s)
        .to_string()
}

/// What a session with a network part is asked to do: `up`, `remsh`, `observer`.
pub struct SessionRequest {
    pub config: NetConfig,
    pub scope: super::ScopeArgs,
    /// The session's name.
    pub session: String,
    /// `-- CMD` (for `up`; `remsh`/`observer` get theirs from the network part).
    pub command: Vec<String>,
}

/// The pods a command names: `--pod` names, or a StatefulSet, a label selector, a Service.
pub fn pod_source(pods: &[String], statefulset: &Option<String>, selector: &Option<String>, service: &Option<String>) -> PodSource {
    match (statefulset, selector, service) {
        (Some(sts), _, _) => PodSource::StatefulSet(strip_kind(sts, &["statefulset/", "statefulsets/", "sts/"])),
        (_, Some(sel), _) => PodSource::Selector(sel.clone()),
        (_, _, Some(svc)) => PodSource::Service(strip_kind(svc, &["service/", "services/", "svc/"])),
        _ => PodSource::Names(pods.iter().map(|p| strip_kind(p, &["pod/", "pods/", "po/"])).collect()),
    }
}

pub fn limits(args: &super::LimitArgs, scope: &super::ScopeArgs) -> Limits {
    Limits {
        max_connections: args.max_connections as usize,
        connection_wait_ms: args.connection_wait.as_millis() as u64,
        max_redirects: scope.max_redirects as usize,
        max_ports_per_pod: args.max_ports_per_pod as usize,
        upgrade_timeout_ms: args.upgrade_timeout.as_millis() as u64,
        ..Limits::default()
    }
}

/// The command the session runs: the user's own (`up -- CMD`), else the one the network part
/// worked out, which is taken only when the session asked for one (remsh, observer) and within
/// bounds. A plain `up` never runs what the network part names.
fn session_command(
    asked: &[String],
    shell_task: bool,
    offered: Option<SessionCommand>,
) -> Result<Option<SessionCommand>, &'static str> {
    if !asked.is_empty() {
        return Ok(Some(SessionCommand { argv: asked.to_vec(), env: Vec::new() }));
    }
    match offered {
        None => Ok(None),
        Some(_) if !shell_task => Err("a command this session did not ask for"),
        Some(c) if c.argv.is_empty() || c.argv.len() > 1024 || c.env.len() > 64 => {
            Err("a command out of bounds (1-1024 arguments, at most 64 environment entries)")
        }
        Some(c) => Ok(Some(c)),
    }
}

pub fn up(state: StateDir, args: UpArgs, verbose: u8, quiet: bool) -> Result<i32> {
    let session = args.scope.name(|| beamredir::session::DEFAULT_SESSION.to_string());
    let source = pod_source(&args.pods, &args.statefulset, &args.selector, &args.service);
    let config = args.cluster.net_config(source, limits(&args.limits, &args.scope), None);
    let request = SessionRequest { config, scope: args.scope, session, command: args.command };
    run_session(state, request, verbose, quiet)
}

/// Claims the name, starts the network part, and serves the session it sets up.
pub fn run_session(state: StateDir, request: SessionRequest, verbose: u8, quiet: bool) -> Result<i32> {
    beamredir::session::validate_name(&request.session)?;
    if let Some(program) = request.command.first() {
        runas::check_program(program)?;
    }
    let owner = owner_ids()?;
    // Listeners are capped by this part's descriptor limit (see `privsep::root::Listeners`);
    // the commands it runs get the original limit back.
    runas::raise_fd_limit();
    let claim = SessionClaim::take(state, &request.session)?;
    // On the main thread, before any other thread exists: the network part's parent-death
    // signal follows the thread that started it.
    let identity = Identity::invoking_user()?;
    let (ours, theirs) = channel::pair()?;
    let child = spawn_network_part(theirs, identity.as_ref(), verbose)
        .map_err(|e| anyhow!("starting the network part: {e}"))?;
    let runtime = super::runtime()?;
    let result = runtime.block_on(root_part(claim, ours, child, request, owner, verbose, quiet));
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

#[allow(clippy::too_many_arguments)]
async fn root_part(
    claim: SessionClaim,
    fd: std::os::fd::OwnedFd,
    child: std::process::Child,
    request: SessionRequest,
    owner: (u32, u32),
    verbose: u8,
    quiet: bool,
) -> Result<i32> {
    let signals = Signals::take()?;
    let (link, incoming) = Link::<ToNet<NetConfig>, ToRoot>::start(Channel::new(fd)?);
    let max_redirects = request.scope.max_redirects as usize;
    let mut net = NetPart {
        link,
        incoming,
        listeners: Listeners::new(max_redirects),
        locals: Arc::new(Mutex::new(BTreeMap::new())),
        child,
        max_redirects,
    };
    if let Err(e) = net.link.notify(ToNet::Config(Box::new(request.config.clone()))).await {
        net.stop().await;
        bail!("starting the network part: {e}");
    }
    let mut signals = signals;
    let started = Instant::now();
    // Until the network part has found the pods: listeners on request, progress when slow.
    let (start_id, redirects, hosts, head, hints, command) = loop {
        let msg = tokio::select! {
            m = net.incoming.recv() => m,
            _ = signals.int.recv() => { net.stop().await; return Ok(130) }
            _ = signals.term.recv() => { net.stop().await; return Ok(143) }
            _ = signals.hup.recv() => { net.stop().await; return Ok(129) }
        };
        let msg = match msg {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                net.stop().await;
                bail!("the network part failed before the session started: {e}");
            }
            None => {
                net.stop().await;
                bail!("the network part ended before the session started");
            }
        };
        match msg.body {
            ToRoot::Start {
                redirects,
                hosts,
                banner,
                hints,
                command,
            } => break (msg.id, redirects, hosts, banner, hints, command),
            ToRoot::Fatal { message } => {
                net.stop().await;
                bail!("{}", printable(&message, 1024));
            }
            ToRoot::Progress { ref text } => {
                // Quiet start-ups stay quiet; a slow one says what it is doing.
                if !quiet && started.elapsed() > Duration::from_secs(1) {
                    eprintln!("beamredir: {}", printable(text, 512));
                }
            }
            _ => {
                if let Err(e) = net.answer_common(&msg, None).await {
                    net.stop().await;
                    bail!("the network part: {e}");
                }
            }
        }
    };
    // A command the network part works out runs as the invoking user, and only when this
    // session was asked for one. When root itself runs beamredir (no sudo), the user is root
    // and so is the command; the network part is uid 0 then too (without capabilities), see
    // docs/security.md.
    let command = match session_command(&request.command, request.config.shell.is_some(), command) {
        Ok(c) => c,
        Err(e) => {
            let _ = net.refuse(start_id, e.to_string()).await;
            net.stop().await;
            bail!("the network part named {e}; nothing was run");
        }
    };
    let checked = net
        .listeners
        .resolve(&redirects, max_redirects)
        .map_err(|e| e.to_string())
        .and_then(|m| {
            if let Some(h) = &hosts {
                check_hosts(h).map_err(|e| e.to_string())?;
            }
            Ok(m)
        });
    let mappings = match checked {
        Ok(m) => m,
        Err(e) => {
            let _ = net.refuse(start_id, e.clone()).await;
            net.stop().await;
            bail!("refusing what the network part found: {e}");
        }
    };
    let session = match claim.start(SessionOptions {
        scope: request.scope.request(),
        mappings,
        load: load_options(verbose, request.scope.max_redirects),
        hosts,
        owner,
    }) {
        Ok(s) => s,
        Err(e) => {
            let _ = net.refuse(start_id, e.to_string()).await;
            net.stop().await;
            return Err(e.into());
        }
    };
    let peers = peer_rule(&session, owner.0);
    let inetrc = session.record().inetrc.clone();
    if let Err(e) = net
        .link
        .reply(start_id, ToNet::SessionUp { peers, inetrc }, None)
        .await
    {
        drop(session);
        net.stop().await;
        bail!("the network part: {e}");
    }
    let banner = session_banner(
        &session,
        &printable(&head, 64 * 1024),
        &printable(&hints, 16 * 1024),
    );
    serve(
        Arc::new(Mutex::new(session)),
        command,
        banner,
        Some(net),
        signals,
        verbose > 0,
        quiet,
    )
    .await
}

/// Who may use the forwards: the session's cgroup (and below), or with --global the invoking
/// user.
fn peer_rule(session: &ActiveSession, owner_uid: u32) -> PeerRule {
    match &session.record().scope {
        Scope::Global => PeerRule::Uid { uid: owner_uid },
        _ => PeerRule::Cgroup {
            path: session.cgroup_path(),
        },
    }
}

/// `beamredir __network-part`: the unprivileged part (see [`beamredir::up::run`]).
pub fn network_part() -> Result<i32> {
    // Two descriptors per forwarded connection (local and API server).
    runas::raise_fd_limit();
    let runtime = super::runtime()?;
    let code = runtime.block_on(async {
        let (root, from_root) = RootLink::<NetConfig>::from_inherited_fd()?;
        Ok::<_, anyhow::Error>(beamredir::up::run(root, from_root).await)
    });
    runtime.shutdown_timeout(Duration::from_millis(200));
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(argv: &[&str]) -> SessionCommand {
        SessionCommand {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
        }
    }

    #[test]
    fn the_network_part_names_a_command_only_for_a_session_that_asked_for_one() {
        // `up` without a command: nothing runs, and an offered command ends the session.
        assert_eq!(session_command(&[], false, None).unwrap(), None);
        assert!(session_command(&[], false, Some(cmd(&["/bin/sh"]))).is_err());
        // remsh/observer: the network part's command, within bounds.
        let remsh = cmd(&["erl", "-remsh", "app@10.0.0.1"]);
        assert_eq!(session_command(&[], true, Some(remsh.clone())).unwrap(), Some(remsh));
        assert!(session_command(&[], true, Some(cmd(&[]))).is_err());
        let long = vec!["x"; 1025];
        assert!(session_command(&[], true, Some(cmd(&long))).is_err());
        // `up -- CMD`: the user's own command, whatever the network part says.
        let asked = vec!["erl".to_string()];
        let got = session_command(&asked, false, Some(cmd(&["/bin/sh"]))).unwrap().unwrap();
        assert_eq!(got.argv, asked);
    }
}
