//! Subcommands and their flags (clap), and the glue from them to the library.
use std::{
    io::Write,
    os::unix::process::CommandExt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use beamredir::{
    cgroup::Hierarchy,
    control::{self, Request},
    doctor,
    mapping::{self, Mapping},
    redirect::LoadOptions,
    runas::{self, Identity},
    session::{
        ActiveSession, DEFAULT_SESSION, DEFAULT_STATE_DIR, Scope, ScopeRequest, SessionOptions, SessionRecord,
        SessionStatus, StateDir,
    },
};
use clap::{Args, Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(
    name = "beamredir",
    version,
    about = "Reach Erlang/Elixir pods in Kubernetes from a local BEAM node: eBPF connect() redirection to port-forwards, per shell",
    long_about = None,
    after_help = "Examples:\n  sudo beamredir map 10.244.0.5:4369=14369 10.244.0.5:5555=15555 -- erl -name debug@127.0.0.1 -hidden\n  sudo beamredir status\n  sudo beamredir doctor"
)]
pub struct Cli {
    /// More logging: -v logs each redirected connect() from the eBPF program, -vv traces.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Where session records and control sockets live.
    #[arg(long, global = true, env = "BEAMREDIR_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Redirect pod IP:port to local forwards you already run (e.g. kubectl port-forward).
    #[command(after_help = "Examples:\n  \
        kubectl port-forward pod/app-0 14369:4369 15555:5555 &\n  \
        sudo beamredir map 10.244.0.5:4369=14369 10.244.0.5:5555=15555 -- \\\n      \
        erl -name debug@127.0.0.1 -setcookie secret -hidden -remsh app@10.244.0.5\n\n  \
        # or keep the session in the foreground and join it from other shells:\n  \
        sudo beamredir map --session work 10.244.0.5:4369=14369 10.244.0.5:5555=15555\n  \
        sudo beamredir shell --session work")]
    Map(MapArgs),
    /// Port-forward a pod's Erlang ports through the API server and redirect the pod IP to them.
    #[command(after_help = "Examples:\n  \
        sudo beamredir up --pod app-0 -- iex --name debug@127.0.0.1 --cookie secret --hidden --remsh app@10.244.0.5\n  \
        sudo beamredir up -n prod --context staging --pod app-0 --pod app-1\n  \
        sudo beamredir up --kubeconfig ~/.kube/kind.yaml --pod app-0 --dist-port 9000\n\n\
        Under sudo, the kubeconfig is $KUBECONFIG if set (sudo drops it unless -E), else ~/.kube/config of the user who ran sudo.")]
    Up(UpArgs),
    /// Run a command inside a running session (as the user who invoked sudo).
    #[command(after_help = "Example:\n  sudo beamredir exec --session work -- iex --name debug@127.0.0.1 --cookie secret --remsh app@10.244.0.5")]
    Exec(ExecArgs),
    /// Start your shell inside a running session (as the user who invoked sudo).
    #[command(after_help = "Example:\n  sudo beamredir shell --session work")]
    Shell(SessionArg),
    /// List sessions, their redirects and how many connects each redirected.
    #[command(after_help = "Examples:\n  sudo beamredir status\n  sudo beamredir status --json | jq '.[].redirects'")]
    Status(StatusArgs),
    /// End a session (or all of them) and clean up what crashed sessions left.
    #[command(after_help = "Examples:\n  sudo beamredir down --session work\n  sudo beamredir down --all")]
    Down(DownArgs),
    /// Check this host can run beamredir, and say what to fix if not.
    #[command(after_help = "Example:\n  sudo beamredir doctor")]
    Doctor,
    /// (internal) Run a kubeconfig credential plugin as the user who invoked sudo.
    #[command(name = "__run-as-invoking-user", hide = true)]
    RunAsInvokingUser {
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Args, Debug, Clone)]
pub struct ScopeArgs {
    /// Session name (also the name of its cgroup, /beamredir/NAME).
    #[arg(long, short = 's', default_value = DEFAULT_SESSION)]
    pub session: String,
    /// Redirect every process on the machine (attach at the root cgroup).
    #[arg(long, conflicts_with = "cgroup")]
    pub global: bool,
    /// Attach to this existing cgroup instead of creating one.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
}

impl ScopeArgs {
    pub fn request(&self) -> ScopeRequest {
        match (&self.cgroup, self.global) {
            (Some(path), _) => ScopeRequest::Existing(path.clone()),
            (None, true) => ScopeRequest::Global,
            (None, false) => ScopeRequest::NewCgroup,
        }
    }
}

#[derive(Args, Debug)]
pub struct MapArgs {
    /// POD_IP:PORT=LOCAL_PORT (or =LOCAL_IP:LOCAL_PORT): connect() to POD_IP:PORT goes to the local forward.
    #[arg(required = true, value_name = "POD_IP:PORT=LOCAL_PORT")]
    pub mappings: Vec<Mapping>,
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// Command to run in the session; beamredir ends the session when it exits and exits with its code.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["pods", "statefulset", "selector", "service"])))]
pub struct UpArgs {
    /// Pod to reach (repeatable).
    #[arg(long = "pod", short = 'p', value_name = "NAME")]
    pub pods: Vec<String>,
    /// Every pod of this StatefulSet, followed as it scales and restarts.
    #[arg(long, value_name = "NAME")]
    pub statefulset: Option<String>,
    /// Every pod matching this label selector (kubectl's -l).
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// Every pod behind this Service (e.g. the headless Service of a StatefulSet).
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    /// The pods' Erlang distribution port (default: a container port named `erlang`/`dist`, else ERL_PORT, else what the pod's epmd says).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub dist_port: Option<u16>,
    /// The cluster's DNS domain, for names like app-0.app.default.svc.cluster.local.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    #[command(flatten)]
    pub kube: beamredir::k8s::KubeArgs,
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// Command to run in the session; beamredir ends the session when it exits and exits with its code.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct SessionArg {
    /// Session to join (default: the only running one).
    #[arg(long, short = 's')]
    pub session: Option<String>,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    pub session: SessionArg,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print JSON (an array of sessions) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// Session to end (default: the only running one).
    #[arg(long, short = 's', conflicts_with = "all")]
    pub session: Option<String>,
    /// End every session.
    #[arg(long)]
    pub all: bool,
}

pub fn init_logging(cli: &Cli) {
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => log::LevelFilter::Warn,
        (false, 0) => log::LevelFilter::Info,
        (false, 1) => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Warn)
        .filter_module("beamredir", level)
        .filter_module("beamredir_ebpf", level)
        // kube logs the failures beamredir reports itself (one line each): only with -v.
        .filter_module("kube_client", if cli.verbose > 0 { level } else { log::LevelFilter::Off })
        .filter_module("kube_runtime", if cli.verbose > 0 { level } else { log::LevelFilter::Off })
        .format(|buf, record| writeln!(buf, "beamredir: {}: {}", record.level().as_str().to_lowercase(), record.args()))
        .init();
}

fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`beamredir {what}` needs root (eBPF programs and cgroup writes need CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run it with sudo");
    }
    Ok(())
}

pub fn run(cli: Cli) -> Result<i32> {
    let state = StateDir::new(&cli.state_dir);
    match cli.command {
        Command::Map(args) => {
            mapping::check_unique(&args.mappings)?;
            require_root("map")?;
            if let Some(program) = args.command.first() {
                runas::check_program(program)?;
            }
            let opts = SessionOptions {
                name: args.scope.session.clone(),
                scope: args.scope.request(),
                mappings: args.mappings,
                load: LoadOptions { log_rewrites: cli.verbose > 0, ..Default::default() },
                inetrc: None,
            };
            let runtime = runtime()?;
            let result = runtime.block_on(async {
                let signals = Signals::take()?;
                let session = ActiveSession::start(state, opts)?;
                let banner = session_banner(&session, None);
                serve_session(session, args.command, Extras { banner, ..Default::default() }, signals, cli.verbose > 0).await
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
            result
        }
        Command::Up(args) => {
            require_root("up")?;
            beamredir::session::validate_name(&args.scope.session)?;
            if let Some(program) = args.command.first() {
                runas::check_program(program)?;
            }
            let runtime = runtime()?;
            let result = runtime.block_on(up(state, args, cli.verbose > 0));
            runtime.shutdown_timeout(Duration::from_secs(1));
            result
        }
        Command::Exec(args) => {
            require_root("exec")?;
            exec_in_session(&state, args.session.session.as_deref(), args.command)
        }
        Command::Shell(args) => {
            require_root("shell")?;
            let shell = match Identity::invoking_user()? {
                Some(id) => id.shell,
                None => Identity::current_shell(),
            };
            exec_in_session(&state, args.session.as_deref(), vec![shell])
        }
        Command::Status(args) => status(&state, args.json),
        Command::Down(args) => {
            require_root("down")?;
            down(&state, args.session.as_deref(), args.all)
        }
        Command::RunAsInvokingUser { command } => {
            let identity = Identity::invoking_user()?;
            let err = runas::command(&command, None, identity.as_ref(), &[])?.exec();
            bail!("starting {:?}: {err}", command[0])
        }
        Command::Doctor => {
            let checks = doctor::run(&state.private_cgroup_mount());
            let mut failed = 0;
            for c in &checks {
                if c.ok {
                    println!("ok    {:<26} {}", c.name, c.detail);
                } else {
                    failed += 1;
                    println!("FAIL  {:<26} {}\n      fix: {}", c.name, c.detail, c.fix);
                }
            }
            if failed == 0 {
                println!("beamredir can run here.");
                Ok(0)
            } else {
                println!("{failed} check(s) failed.");
                Ok(1)
            }
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// SIGINT/SIGTERM/SIGHUP, taken over before anything is set up: a signal that arrives during
/// start-up is seen by the session loop right after, which then tears down cleanly.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn take() -> Result<Self> {
        Ok(Signals { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())?, hup: signal(SignalKind::hangup())? })
    }
}

/// What a kind of session adds to the common loop.
#[derive(Default)]
struct Extras {
    /// Runs before the session is torn down (e.g. stop following pods).
    on_teardown: Option<Box<dyn FnOnce() + Send>>,
    /// Printed (to stderr) once the session is up.
    banner: String,
    /// Fills in what only this kind of session knows (forward counters, pods).
    decorate: Option<Arc<dyn Fn(&mut SessionStatus) + Send + Sync>>,
    /// Background tasks (e.g. pod watches), aborted at teardown.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn up(state: StateDir, args: UpArgs, verbose: bool) -> Result<i32> {
    use beamredir::{
        dns::DnsFiles,
        k8s::Cluster,
        up::{PodSource, Pods, UpConfig},
    };
    let signals = Signals::take()?;
    // kubectl users write pod/NAME (and sts/NAME, svc/NAME) too.
    let strip = |s: &str, kinds: &[&str]| kinds.iter().find_map(|k| s.strip_prefix(k)).unwrap_or(s).to_string();
    let source = match (&args.statefulset, &args.selector, &args.service) {
        (Some(sts), _, _) => PodSource::StatefulSet(strip(sts, &["statefulset/", "statefulsets/", "sts/"])),
        (_, Some(sel), _) => PodSource::Selector(sel.clone()),
        (_, _, Some(svc)) => PodSource::Service(strip(svc, &["service/", "services/", "svc/"])),
        _ => PodSource::Names(args.pods.iter().map(|p| strip(p, &["pod/", "pods/", "po/"])).collect()),
    };
    let cluster = Cluster::connect(&args.kube).await?;
    log::debug!("kubeconfig {}, API server {}, namespace {}", cluster.source, cluster.url, cluster.namespace);
    let config = UpConfig { source, dist_port: args.dist_port, cluster_domain: args.cluster_domain.clone() };
    let pods = Pods::resolve(cluster, config).await?;
    let dns = DnsFiles::new(state.root(), &args.scope.session);
    let opts = SessionOptions {
        name: args.scope.session.clone(),
        scope: args.scope.request(),
        mappings: pods.mappings(),
        load: LoadOptions { log_rewrites: verbose, ..Default::default() },
        inetrc: Some(dns.inetrc.clone()),
    };
    let session = ActiveSession::start(state, opts)?;
    pods.write_dns(dns).context("writing the session's inetrc")?;
    let banner = session_banner(&session, Some(&pods));
    let session = Arc::new(Mutex::new(session));
    let tasks = pods.follow(&session);
    let (decorate_pods, closing_pods) = (pods.clone(), pods.clone());
    let extras = Extras {
        banner,
        decorate: Some(Arc::new(move |s: &mut SessionStatus| decorate_pods.decorate(s))),
        tasks,
        on_teardown: Some(Box::new(move || closing_pods.close())),
    };
    serve_shared_session(session, args.command, extras, signals, verbose).await
}

/// Serves a session until CMD exits, or (without CMD) until SIGINT/SIGTERM or `beamredir down`.
/// Everything is torn down when the session drops, on every path.
async fn serve_session(session: ActiveSession, command: Vec<String>, extras: Extras, signals: Signals, verbose: bool) -> Result<i32> {
    serve_shared_session(Arc::new(Mutex::new(session)), command, extras, signals, verbose).await
}

async fn serve_shared_session(session: Arc<Mutex<ActiveSession>>, command: Vec<String>, mut extras: Extras, signals: Signals, verbose: bool) -> Result<i32> {
    let result = serve_until_done(&session, command, &extras, signals, verbose).await;
    if let Some(on_teardown) = extras.on_teardown.take() {
        on_teardown();
    }
    for task in &extras.tasks {
        task.abort();
    }
    for task in extras.tasks {
        let _ = task.await;
    }
    // The watches held the last other references; this drop is the teardown.
    match Arc::try_unwrap(session) {
        Ok(session) => drop(session),
        Err(_) => log::warn!("session still referenced at teardown; it ends with the process"),
    }
    result
}

async fn serve_until_done(session: &Arc<Mutex<ActiveSession>>, command: Vec<String>, extras: &Extras, signals: Signals, verbose: bool) -> Result<i32> {
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
        (record.name.clone(), s.state().socket_path(&record.name), join, record.scope.clone(), session_env(record))
    };
    let (down_tx, mut down_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let handler_session = Arc::downgrade(session);
    let decorate = extras.decorate.clone();
    let control = control::serve(
        &socket_path,
        Arc::new(move |req| match req {
            Request::Status => {
                let Some(session) = handler_session.upgrade() else { return r#"{"error":"ending"}"#.into() };
                let mut status = session.lock().unwrap().status();
                if let Some(decorate) = &decorate {
                    decorate(&mut status);
                }
                serde_json::to_string(&status).expect("serializes")
            }
            Request::Down => {
                let _ = down_tx.send(());
                r#"{"ok":true}"#.to_string()
            }
        }),
    )
    .with_context(|| format!("binding control socket {}", socket_path.display()))?;

    let Signals { int: mut sigint, term: mut sigterm, hup: mut sighup } = signals;
    eprintln!("{}", extras.banner);

    let code = if command.is_empty() {
        eprintln!("Press Ctrl-C (or run `sudo beamredir down --session {name}`) to end the session.");
        tokio::select! {
            _ = sigint.recv() => log::info!("interrupted; ending session {name}"),
            _ = sigterm.recv() => log::info!("terminated; ending session {name}"),
            _ = sighup.recv() => log::info!("hangup; ending session {name}"),
            _ = down_rx.recv() => log::info!("`beamredir down` asked to end session {name}"),
        }
        0
    } else {
        let cmd = runas::command(&command, cgroup_join, identity.as_ref(), &env)?;
        let mut child = tokio::process::Command::from(cmd)
            .spawn()
            .with_context(|| format!("starting {:?}", command[0]))?;
        log::info!("session {name}: running {:?} in {}", command[0], describe_scope(&scope));
        let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
        let forward = |sig: nix::sys::signal::Signal| {
            if let Some(pid) = pid {
                let _ = nix::sys::signal::kill(pid, sig);
            }
        };
        loop {
            tokio::select! {
                status = child.wait() => break runas::exit_code(status?),
                // Ctrl-C reaches the command through the terminal already; beamredir stays up
                // until it exits (as sudo does).
                _ = sigint.recv() => {}
                _ = sigterm.recv() => forward(nix::sys::signal::Signal::SIGTERM),
                _ = sighup.recv() => forward(nix::sys::signal::Signal::SIGHUP),
                _ = down_rx.recv() => forward(nix::sys::signal::Signal::SIGTERM),
            }
        }
    };
    control.abort();
    let _ = control.await;
    Ok(code)
}

/// Forwards the eBPF program's aya-log records (one per rewrite) to our logger.
fn start_ebpf_logger(session: &ActiveSession) {
    let handle = session.redirector();
    let mut guard = handle.lock().unwrap();
    let Some(redirector) = guard.as_mut() else { return };
    match aya_log::EbpfLogger::init(redirector.ebpf_mut()) {
        Err(e) => log::warn!("eBPF logging unavailable: {e}"),
        // SAFETY: the logger owns its ring buffer fd and moves into the AsyncFd, which keeps it
        // open for as long as it is registered.
        Ok(logger) => match unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
            Err(e) => log::warn!("eBPF logging unavailable: {e}"),
            Ok(mut logger) => {
                tokio::spawn(async move {
                    loop {
                        let Ok(mut ready) = logger.readable_mut().await else { break };
                        ready.get_inner_mut().flush();
                        ready.clear_ready();
                    }
                });
            }
        },
    }
}

/// The environment of commands run in a session: its name, and the inetrc with the pods'
/// cluster DNS names for Erlang nodes.
fn session_env(record: &SessionRecord) -> Vec<(String, String)> {
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

/// The block printed when a session is up: what is redirected where, and how to connect.
fn session_banner(session: &ActiveSession, pods: Option<&beamredir::up::Pods>) -> String {
    let record = session.record();
    let mut out = format!("beamredir session {:?} is up (pid {}).\n", record.name, record.pid);
    if let Some(pods) = pods {
        let cluster = pods.cluster();
        out.push_str(&format!("  cluster   {} (from {}), namespace {}\n", cluster.url, cluster.source, cluster.namespace));
        for t in pods.targets() {
            out.push_str(&format!("  pod       {}  {}  epmd {}  dist {}\n", t.name, t.ip, t.epmd_port, t.dist_port.map(|p| p.to_string()).unwrap_or("?".into())));
        }
    }
    for m in &record.redirects {
        out.push_str(&format!("  redirect  {m}\n"));
    }
    match &record.scope {
        Scope::Global => out.push_str("  scope     every process on this machine (--global)\n"),
        _ => out.push_str(&format!("  cgroup    {}\n", session.cgroup_path().display())),
    }
    if let Some(pods) = pods {
        let targets = pods.targets();
        let fqdn = |t: &beamredir::k8s::pod::PodTarget| {
            beamredir::dns::pod_names(t.hostname.as_deref(), t.subdomain.as_deref(), &t.namespace, "", t.ip).map(|n| n.names[1].clone())
        };
        if let Some(inetrc) = &record.inetrc {
            if targets.iter().any(|t| fqdn(t).is_some()) {
                out.push_str(&format!("  dns       cluster names of the pods (e.g. {}.<domain>) in {}\n", fqdn(&targets[0]).unwrap_or_default(), inetrc.display()));
            }
        }
        if let Some(t) = targets.first() {
            let node = t.node_name.clone().unwrap_or_else(|| format!("NAME@{}", t.ip));
            out.push_str("Connect (in the session: the command after `--`, `beamredir shell` or `beamredir exec`):\n");
            out.push_str(&format!("  iex --name debug@127.0.0.1 --cookie \"$COOKIE\" --hidden --remsh {node}\n"));
            out.push_str(&format!("  erl -name debug@127.0.0.1 -setcookie \"$COOKIE\" -hidden -remsh {node}\n"));
            out.push_str("  -hidden: your node does not become part of the cluster (global would mesh it with every pod);\n");
            out.push_str("  $COOKIE: the cluster's cookie (e.g. from its Secret); beamredir never prints one.\n");
            if let Some(inetrc) = &record.inetrc {
                out.push_str(&format!("  Outside the session's commands, add: -kernel inetrc '\"{}\"'\n", inetrc.display()));
            }
        }
    }
    if !matches!(record.scope, Scope::Global) {
        out.push_str(&format!("Join from another terminal:  sudo beamredir shell --session {}", record.name));
    }
    out.trim_end().to_string()
}

/// Replaces this process with `argv` inside a running session's cgroup, as the invoking user.
fn exec_in_session(state: &StateDir, name: Option<&str>, argv: Vec<String>) -> Result<i32> {
    let record = state.find_live(name)?;
    let hierarchy = Hierarchy::open(&state.private_cgroup_mount())?;
    let join = match &record.scope {
        Scope::Global => None,
        scope => Some(hierarchy.open_procs(scope.cgroup())?),
    };
    let identity = Identity::invoking_user()?;
    let mut cmd = runas::command(&argv, join, identity.as_ref(), &session_env(&record))?;
    let err = cmd.exec();
    bail!("starting {:?}: {err}", argv[0])
}

fn session_statuses(state: &StateDir) -> Vec<SessionStatus> {
    let mount = beamredir::cgroup::find_cgroup2_mount().ok().flatten();
    let path_of = |r: &SessionRecord| match &mount {
        Some(m) => m.join(r.scope.cgroup().trim_start_matches('/')).display().to_string(),
        None => r.scope.cgroup().to_string(),
    };
    state
        .list()
        .iter()
        .map(|r| {
            if !r.is_alive() {
                return SessionStatus::from_record(r, "stale", path_of(r));
            }
            control::query(&state.socket_path(&r.name), Request::Status)
                .ok()
                .and_then(|answer| serde_json::from_str::<SessionStatus>(&answer).ok())
                .unwrap_or_else(|| SessionStatus::from_record(r, "not answering", path_of(r)))
        })
        .collect()
}

fn status(state: &StateDir, json: bool) -> Result<i32> {
    let statuses = session_statuses(state);
    let mut out = String::new();
    if json {
        out = serde_json::to_string_pretty(&statuses)? + "\n";
    } else if statuses.is_empty() {
        out.push_str("No beamredir sessions.\n");
    } else {
        status_table(&statuses, &mut out);
    }
    if !nix::unistd::geteuid().is_root() && statuses.iter().any(|s| s.state == "not answering") {
        eprintln!("beamredir: live sessions only answer root: run `sudo beamredir status` for their counters");
    }
    // `status | head` closes the pipe early: that is not an error.
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(0),
    }
}

fn status_table(statuses: &[SessionStatus], out: &mut String) {
    use std::fmt::Write as _;
    for s in statuses {
        let scope = match &s.scope {
            Scope::Global => "global".to_string(),
            _ => s.cgroup_path.clone(),
        };
        let _ = writeln!(out, "{}  {}  pid {}  {}  {} process(es)", s.name, s.state, s.pid, scope, s.processes.len());
        if s.state == "stale" {
            let _ = writeln!(out, "  (beamredir died; `sudo beamredir down --session {}` or the next `map`/`up` cleans it up)", s.name);
        }
        for r in &s.redirects {
            let _ = write!(out, "  {:<21} -> {:<21} connects {}", r.pod.to_string(), r.local.to_string(), r.connects);
            if let Some(f) = &r.forward {
                let _ = write!(
                    out,
                    "  conns {} active / {} total  bytes {} out / {} in  errors {}",
                    f.active, f.total, f.bytes_to_pod, f.bytes_from_pod, f.errors
                );
            }
            let _ = writeln!(out);
        }
        for p in &s.pods {
            let _ = writeln!(out, "  pod {}/{}  {}  {}  {}", p.namespace, p.name, p.ip.as_deref().unwrap_or("-"), p.state, p.node.as_deref().unwrap_or(""));
        }
    }
}

fn down(state: &StateDir, name: Option<&str>, all: bool) -> Result<i32> {
    let hierarchy = Hierarchy::open(&state.private_cgroup_mount())?;
    let targets: Vec<SessionRecord> = if all {
        state.list()
    } else if let Some(name) = name {
        beamredir::session::validate_name(name)?;
        match state.load(name) {
            Some(r) => vec![r],
            None => return Err(beamredir::session::SessionError::Unknown(name.into()).into()),
        }
    } else {
        vec![state.find_live(None)?]
    };
    for record in targets.iter().filter(|r| r.is_alive()) {
        if control::query(&state.socket_path(&record.name), Request::Down).is_err() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(record.pid as i32), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while record.is_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if record.is_alive() {
            bail!("session {:?} (pid {}) did not end within 10 s; its command may be ignoring SIGTERM", record.name, record.pid);
        }
        println!("session {} ended", record.name);
    }
    for cleaned in state.clean_stale(&hierarchy) {
        println!("stale session {cleaned} cleaned up");
    }
    Ok(0)
}
