//! Fitting into the user's tools: the completion scripts loaded by real bash, zsh and fish; the
//! man pages rendered by groff and man; `kubectl beamredir` through the real kubectl's plugin
//! mechanism; `status -o json` (once and `--watch`) from live `map` and `up` sessions validated
//! against docs/status.schema.json by Python's jsonschema; the watch ending cleanly.
use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use beamredir::session::{
    ForwardStats, PodInfo, RedirectStatus, Scope, SessionStatus, status::ConnectionStats,
};
use beamredir_testbed::{
    Graceful, TempDir, TestBed, beamredir_bin,
    cluster::{EXAMPLE_MANIFEST, SimCluster},
    run, text, unique,
};

const SCHEMA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/status.schema.json");
const SCHEMA_DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/status-schema.md");
const VALIDATOR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/validate_status.py");

fn stdout_of(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8(run(cmd)?.stdout)?)
}

/// The public subcommands, from `beamredir --help` (the lines under "Commands:").
fn subcommands() -> Result<Vec<String>> {
    let help = stdout_of(Command::new(beamredir_bin()).arg("--help"))?;
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|n| n != "help")
        .collect();
    ensure!(
        names.len() >= 8 && names.contains(&"status".to_string()),
        "{help}"
    );
    Ok(names)
}

/// `beamredir completions SHELL` written to a file in `dir`.
fn completion_script(dir: &Path, shell: &str) -> Result<PathBuf> {
    let script = run(Command::new(beamredir_bin()).args(["completions", shell]))?.stdout;
    ensure!(!script.is_empty(), "empty {shell} script");
    let text = String::from_utf8(script.clone())?;
    ensure!(
        !text.contains("__network-part"),
        "hidden subcommand in the {shell} script"
    );
    let path = dir.join(format!("beamredir.{shell}"));
    std::fs::write(&path, script)?;
    Ok(path)
}

/// Runs the bash completion function as bash would for the command line `words` (the last
/// one being completed) and returns the candidates.
fn bash_complete(script: &Path, words: &[&str]) -> Result<Vec<String>> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prog = format!(
        "source '{}' || exit 9\n\
         COMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_LINE=\"${{COMP_WORDS[*]}}\"\nCOMP_POINT=${{#COMP_LINE}}\n\
         _beamredir beamredir \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" "),
        words.len() - 1
    );
    let out = stdout_of(Command::new("bash").args(["--norc", "--noprofile", "-c", &prog]))?;
    Ok(out
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

#[test]
fn bash_accepts_the_completion_script_and_completes_subcommands_flags_and_values() -> Result<()> {
    let dir = TempDir::new("brcomp")?;
    let script = completion_script(dir.path(), "bash")?;
    run(Command::new("bash").arg("-n").arg(&script))?;
    // Sourced into a non-interactive bash, it registers itself for `beamredir`.
    let registered = stdout_of(
        Command::new("bash")
            .args(["--norc", "--noprofile", "-c"])
            .arg(format!(
                "source '{}' && complete -p beamredir",
                script.display()
            )),
    )?;
    ensure!(
        registered.starts_with("complete ")
            && registered.contains(" -F _beamredir ")
            && registered.trim_end().ends_with(" beamredir"),
        "{registered}"
    );

    // Every public subcommand, and nothing hidden.
    let mut all = bash_complete(&script, &["beamredir", ""])?;
    all.sort();
    for name in subcommands()? {
        ensure!(all.contains(&name), "{name} not offered: {all:?}");
    }
    ensure!(!all.iter().any(|c| c.starts_with("__")), "{all:?}");
    assert_eq!(bash_complete(&script, &["beamredir", "st"])?, ["status"]);
    assert_eq!(
        bash_complete(&script, &["beamredir", "__"])?,
        Vec::<String>::new()
    );
    // A subcommand's flags, and a flag's values.
    let flags = bash_complete(&script, &["beamredir", "up", "--st"])?;
    ensure!(
        flags.contains(&"--statefulset".into()) && flags.contains(&"--state-dir".into()),
        "{flags:?}"
    );
    let mut values = bash_complete(&script, &["beamredir", "status", "-o", ""])?;
    values.sort();
    assert_eq!(values, ["json", "table", "wide"]);
    assert_eq!(
        bash_complete(&script, &["beamredir", "completions", "z"])?,
        ["zsh"]
    );
    Ok(())
}

#[test]
fn zsh_and_fish_accept_their_completion_scripts() -> Result<()> {
    let dir = TempDir::new("brcomp")?;
    // zsh: syntax, then loaded under compinit it registers _beamredir for beamredir.
    let zsh = completion_script(dir.path(), "zsh")?;
    run(Command::new("zsh").arg("-n").arg(&zsh))?;
    let comps = stdout_of(Command::new("zsh").args(["-f", "-c"]).arg(format!(
        "autoload -U compinit && compinit -u -D && source '{}' && print -r -- $_comps[beamredir]",
        zsh.display()
    )))?;
    assert_eq!(comps.trim(), "_beamredir");

    // fish: syntax, then fish's own completion engine on a few command lines.
    let fish = completion_script(dir.path(), "fish")?;
    run(Command::new("fish").arg("--no-execute").arg(&fish))?;
    let complete = |line: &str| -> Result<Vec<String>> {
        let out = stdout_of(
            Command::new("fish")
                .args(["--no-config", "-c"])
                .arg(format!(
                    "source '{}'; complete --do-complete '{line}'",
                    fish.display()
                )),
        )?;
        Ok(out
            .lines()
            .map(|l| l.split('\t').next().unwrap_or("").to_owned())
            .collect())
    };
    let subs = complete("beamredir ")?;
    for name in subcommands()? {
        ensure!(subs.contains(&name), "fish does not offer {name}: {subs:?}");
    }
    ensure!(!subs.iter().any(|c| c.starts_with("__")), "{subs:?}");
    let mut values = complete("beamredir status -o ")?;
    values.sort();
    assert_eq!(values, ["json", "table", "wide"]);
    let flags = complete("beamredir up --stat")?;
    ensure!(flags.contains(&"--statefulset".into()), "{flags:?}");
    Ok(())
}

#[test]
fn man_pages_render_without_warnings_one_per_subcommand() -> Result<()> {
    let dir = TempDir::new("brman")?;
    let listed = stdout_of(
        Command::new(beamredir_bin())
            .args(["man", "--out"])
            .arg(dir.path()),
    )?;
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    pages.sort();
    ensure!(listed.lines().count() == pages.len(), "{listed}");
    let subs = subcommands()?;
    let mut expected: Vec<String> = subs.iter().map(|s| format!("beamredir-{s}.1")).collect();
    expected.push("beamredir.1".into());
    expected.sort();
    assert_eq!(pages, expected);

    for page in &pages {
        let path = dir.path().join(page);
        // groff with every warning on: nothing on stderr.
        let out = run(Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(&path))?;
        ensure!(out.stderr.is_empty(), "{page}: {}", text(&out));
        // man-db renders it (as `man -l` does for a user).
        let out = run(Command::new("man")
            .args(["-l", "-P", "cat"])
            .arg(&path)
            .env("MANWIDTH", "100"))?;
        let shown = String::from_utf8_lossy(&out.stdout);
        let name = page.trim_end_matches(".1");
        ensure!(
            shown.contains("NAME") && shown.contains("SYNOPSIS") && shown.contains(name),
            "{page}:\n{shown}"
        );
        ensure!(
            !shown.contains("__network-part"),
            "{page} documents the hidden subcommand"
        );
    }
    // The main page lists each subcommand's page, and only pages that exist.
    let main = stdout_of(
        Command::new("man")
            .args(["-l", "-P", "cat"])
            .arg(dir.path().join("beamredir.1")),
    )?;
    for s in &subs {
        ensure!(
            main.contains(&format!("beamredir-{s}(1)")),
            "beamredir.1 lacks beamredir-{s}(1):\n{main}"
        );
    }
    ensure!(!main.contains("beamredir-help(1)"), "{main}");
    // `beamredir man` alone prints beamredir.1.
    let printed = run(Command::new(beamredir_bin()).arg("man"))?.stdout;
    let written = std::fs::read(dir.path().join("beamredir.1"))?;
    assert_eq!(String::from_utf8(printed)?, String::from_utf8(written)?);
    Ok(())
}

/// A directory with `kubectl-beamredir` linked to the binary under test, for PATH.
fn plugin_dir() -> Result<TempDir> {
    let dir = TempDir::new("brplugin")?;
    std::os::unix::fs::symlink(beamredir_bin(), dir.path().join("kubectl-beamredir"))?;
    Ok(dir)
}

fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[test]
fn kubectl_beamredir_runs_beamredir_through_the_real_kubectl() -> Result<()> {
    let bed = TestBed::start()?;
    let session = unique("kp");
    let _map = bed.start_session(&session, &[])?;
    let plugins = plugin_dir()?;
    let kubectl = |args: &[&str]| -> Result<std::process::Output> {
        let mut cmd = bed.ws.command("/usr/bin/kubectl");
        cmd.args(args)
            .env("PATH", path_with(plugins.path()))
            .env("BEAMREDIR_STATE_DIR", bed.state_dir.path());
        Ok(cmd.output()?)
    };
    // kubectl finds the plugin on PATH.
    let list = kubectl(&["plugin", "list"])?;
    ensure!(
        text(&list).contains(
            &plugins
                .path()
                .join("kubectl-beamredir")
                .display()
                .to_string()
        ),
        "{}",
        text(&list)
    );
    // The same output as beamredir itself, in every format.
    for format in [
        &["status"][..],
        &["status", "-o", "wide"],
        &["status", "-o", "json"],
    ] {
        let direct = run(bed.beamredir().args(format))?;
        let via = kubectl(&[&["beamredir"][..], format].concat())?;
        ensure!(
            via.status.success(),
            "kubectl beamredir {format:?}: {}",
            text(&via)
        );
        let via = String::from_utf8(via.stdout)?;
        assert_eq!(via, String::from_utf8(direct.stdout)?, "{format:?}");
        ensure!(via.contains(&session), "{via}");
    }
    // kubectl passes none of its own flags on and refuses them before the plugin name (the
    // README says to give beamredir's flags after `beamredir`).
    let before = kubectl(&["-n", "shop", "beamredir", "status"])?;
    ensure!(
        !before.status.success()
            && text(&before).contains("flags cannot be placed before plugin name: -n"),
        "{}",
        text(&before)
    );
    // Its usage names it as the user typed it; its version is beamredir's.
    let help = kubectl(&["beamredir", "status", "--help"])?;
    ensure!(
        text(&help).contains("Usage: kubectl beamredir status"),
        "{}",
        text(&help)
    );
    let bad = kubectl(&["beamredir", "no-such-command"])?;
    ensure!(bad.status.code() == Some(2), "{}", text(&bad));
    ensure!(
        text(&bad).contains("Usage: kubectl beamredir [OPTIONS] <COMMAND>"),
        "{}",
        text(&bad)
    );
    let version = kubectl(&["beamredir", "--version"])?;
    assert_eq!(
        String::from_utf8(version.stdout)?,
        stdout_of(Command::new(beamredir_bin()).arg("--version"))?
    );
    Ok(())
}

#[test]
fn kubectl_completes_kubectl_beamredir_through_kubectl_complete_beamredir() -> Result<()> {
    let plugins = plugin_dir()?;
    std::os::unix::fs::symlink(
        beamredir_bin(),
        plugins.path().join("kubectl_complete-beamredir"),
    )?;
    // What kubectl's shell completion scripts run: `kubectl __complete WORDS…`.
    let complete = |words: &[&str]| -> Result<(Vec<String>, String)> {
        let out = stdout_of(
            Command::new("/usr/bin/kubectl")
                .arg("__complete")
                .arg("beamredir")
                .args(words)
                .env("PATH", path_with(plugins.path())),
        )?;
        let mut lines: Vec<String> = out.lines().map(str::to_owned).collect();
        let directive = lines.pop().context("no directive")?;
        let names = lines
            .iter()
            .map(|l| l.split('\t').next().unwrap().to_owned())
            .collect();
        Ok((names, directive))
    };
    let (subs, directive) = complete(&[""])?;
    assert_eq!(directive, ":4", "no file names among subcommands");
    for name in subcommands()? {
        ensure!(subs.contains(&name), "{name} not offered: {subs:?}");
    }
    ensure!(!subs.iter().any(|s| s.starts_with("__")), "{subs:?}");
    assert_eq!(complete(&["st"])?.0, ["status"]);
    assert_eq!(
        complete(&["status", "-o", ""])?.0,
        ["table", "wide", "json"]
    );
    let (flags, _) = complete(&["up", "--sta"])?;
    ensure!(
        flags.contains(&"--statefulset".into()) && flags.contains(&"--state-dir".into()),
        "{flags:?}"
    );
    // A path-valued flag leaves file names to the shell.
    assert_eq!(complete(&["up", "--kubeconfig", ""])?.1, ":0");
    Ok(())
}

/// Validates documents (one per line, or one pretty one) against docs/status.schema.json with
/// Python's jsonschema; the error messages if invalid.
fn validate(docs: &str) -> Result<std::result::Result<(), String>> {
    let mut child = Command::new("python3")
        .arg(VALIDATOR)
        .arg(SCHEMA)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("python3")?;
    child.stdin.take().unwrap().write_all(docs.as_bytes())?;
    let out = child.wait_with_output()?;
    match out.status.code() {
        Some(0) => Ok(Ok(())),
        Some(1) => Ok(Err(text(&out))),
        _ => anyhow::bail!("the validator failed: {}", text(&out)),
    }
}

fn ensure_valid(what: &str, docs: &str) -> Result<()> {
    validate(docs)?.map_err(|e| anyhow::anyhow!("{what} does not match the schema:\n{e}\n{docs}"))
}

#[test]
fn the_schema_is_strict_and_covers_every_shape_of_the_rust_types() -> Result<()> {
    // Every variant and optional field, through the real types' serialisation.
    let fwd = ForwardStats {
        active: 1,
        total: 7,
        bytes_to_pod: 10,
        bytes_from_pod: u64::MAX,
        errors: 2,
        refused: 3,
    };
    let v4 = |a, b, c, d, port| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), port);
    let base = SessionStatus {
        name: "work".into(),
        state: "running".into(),
        pid: 4242,
        owner_uid: 1000,
        started_unix: 1_767_225_600,
        scope: Scope::Session {
            cgroup: "/beamredir/work".into(),
        },
        cgroup_path: "/sys/fs/cgroup/beamredir/work".into(),
        processes: vec![1, u32::MAX],
        redirects: vec![
            RedirectStatus {
                pod: v4(10, 244, 0, 5, 4369),
                local: v4(127, 0, 0, 1, 14369),
                connects: 3,
                forward: None,
            },
            RedirectStatus {
                pod: SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5)), 9000),
                local: SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 65535),
                connects: 0,
                forward: Some(fwd.clone()),
            },
        ],
        pods: vec![
            PodInfo {
                name: "app-0".into(),
                namespace: "shop".into(),
                ip: Some("10.244.0.5".into()),
                ips: vec!["10.244.0.5".into(), "fd00::5".into()],
                ready: Some(false),
                state: "Running".into(),
                nodes: vec!["app@app-0.app.shop.svc.cluster.local".into()],
                aliases: vec![beamredir::session::status::AliasInfo { ip: "10.244.0.4".into(), expires_in_secs: 12 }],
            },
            PodInfo {
                name: "app-1".into(),
                namespace: "shop".into(),
                ip: None,
                ips: vec![],
                ready: None,
                state: "deleted".into(),
                nodes: vec![],
                aliases: vec![],
            },
        ],
        connections: Some(ConnectionStats {
            active: 1,
            limit: 1024,
            waited: 2,
            over_limit: 3,
            refused: 4,
        }),
    };
    let mut all = vec![base.clone()];
    for (state, scope) in [
        (
            "stale",
            Scope::Cgroup {
                cgroup: "/user.slice/dev".into(),
            },
        ),
        ("not answering", Scope::Global),
    ] {
        let mut s = base.clone();
        s.state = state.into();
        s.scope = scope;
        s.pods.clear();
        s.connections = None;
        s.redirects.iter_mut().for_each(|r| r.forward = None);
        all.push(s);
    }
    let json = serde_json::to_string(&all)?;
    // The optional fields really are left out, and the schema still accepts it.
    ensure!(
        json.matches("\"connections\"").count() == 1 && json.matches("\"pods\"").count() == 1,
        "{json}"
    );
    ensure_valid("every shape", &json)?;
    ensure_valid("no sessions", "[]")?;
    // The example in docs/status-schema.md.
    let doc = std::fs::read_to_string(SCHEMA_DOC)?;
    let example = doc
        .split("```json\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .context("no json example in the doc")?;
    ensure_valid("the doc's example", example)?;

    // Strict: the schema refuses what the types would not produce.
    let one: serde_json::Value = serde_json::from_str(&json)?;
    type Mutation = (&'static str, fn(&mut serde_json::Value));
    let mutations: [Mutation; 8] = [
        ("an unknown field", |v| v[0]["extra"] = 1.into()),
        ("a missing field", |v| {
            drop(v[0].as_object_mut().unwrap().remove("pid"))
        }),
        ("an unknown state", |v| v[0]["state"] = "sleeping".into()),
        ("a negative counter", |v| {
            v[0]["redirects"][0]["connects"] = (-1).into()
        }),
        ("a pid over u32", |v| v[0]["pid"] = 4_294_967_296u64.into()),
        ("an address without port", |v| {
            v[0]["redirects"][0]["pod"] = "10.244.0.5".into()
        }),
        ("a global scope with a cgroup", |v| {
            v[2]["scope"]["cgroup"] = "/".into()
        }),
        ("forward stats missing bytes", |v| {
            drop(
                v[0]["redirects"][1]["forward"]
                    .as_object_mut()
                    .unwrap()
                    .remove("bytes_to_pod"),
            )
        }),
    ];
    for (what, mutate) in mutations {
        let mut bad = one.clone();
        mutate(&mut bad);
        ensure!(
            validate(&bad.to_string())?.is_err(),
            "the schema accepts {what}"
        );
    }
    Ok(())
}

/// One connection from the session to the pod's epmd at `ip`, through its redirect.
fn connect_to_epmd(
    mut beamredir: Command,
    session: &str,
    ip: impl std::fmt::Display,
) -> Result<()> {
    run(beamredir
        .args(["exec", "--session", session, "--", "python3", "-c"])
        .arg(format!(
            "import socket; socket.create_connection(('{ip}', 4369), timeout=5).close()"
        )))?;
    Ok(())
}

/// `beamredir status -o json`, checked against the schema (`what` names the check): the whole
/// document and the entry of `session`.
fn valid_status_json(
    what: &str,
    mut beamredir: Command,
    session: &str,
) -> Result<(serde_json::Value, serde_json::Value)> {
    let out = stdout_of(beamredir.args(["status", "-o", "json"]))?;
    ensure_valid(what, &out)?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let s = v
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == session)
        .context("listed")?
        .clone();
    Ok((v, s))
}

#[test]
fn status_json_from_a_live_map_session_matches_the_schema() -> Result<()> {
    let bed = TestBed::start()?;
    let session = unique("js");
    let _map = bed.start_session(&session, &[])?;
    // A redirected connect, so a counter is non-zero.
    connect_to_epmd(bed.beamredir(), &session, bed.pod.ip)?;
    let (v, s) = valid_status_json("status -o json (map)", bed.beamredir(), &session)?;
    assert_eq!(s["scope"]["kind"], "session");
    ensure!(s["redirects"][0]["connects"].as_u64() >= Some(1), "{s:#}");
    // `--json` is the same document.
    let same = stdout_of(bed.beamredir().args(["status", "--json"]))?;
    assert_eq!(serde_json::from_str::<serde_json::Value>(&same)?, v);
    Ok(())
}

#[test]
fn status_json_from_a_live_up_session_matches_the_schema() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let session = unique("jsup");
    let log = state.path().join("up.log");
    let _up = cluster.start_up_session(state.path(), &session, &["--pod", "app-0"], &log)?;
    let ip = cluster.pod_ip("app-0").context("pod IP")?;
    // Traffic through the epmd forward, so its counters move.
    connect_to_epmd(cluster.beamredir(state.path()), &session, ip)?;
    // The optional parts are there, so the schema was checked against them.
    let (_, s) =
        valid_status_json("status -o json (up)", cluster.beamredir(state.path()), &session)?;
    ensure!(
        s["pods"][0]["name"] == "app-0" && s["pods"][0]["ready"] == true,
        "{s:#}"
    );
    ensure!(s["connections"]["limit"] == 1024, "{s:#}");
    ensure!(
        s["redirects"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["forward"].is_object()),
        "{s:#}"
    );
    Ok(())
}

/// `beamredir status ARGS` with stdout piped.
fn start_status(
    state_dir: &Path,
    args: &[&str],
) -> Result<(Graceful, BufReader<std::process::ChildStdout>)> {
    let mut child = Command::new(beamredir_bin())
        .arg("status")
        .args(args)
        .env("BEAMREDIR_STATE_DIR", state_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = BufReader::new(child.stdout.take().unwrap());
    Ok((Graceful(child), stdout))
}

/// Reads the lines of `stdout` on a thread, until EOF.
fn lines_of(stdout: BufReader<std::process::ChildStdout>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_line(lines: &mpsc::Receiver<String>) -> Result<String> {
    lines
        .recv_timeout(Duration::from_secs(10))
        .context("no line from status --watch within 10 s")
}

fn signal(child: &Graceful, signal: nix::sys::signal::Signal) -> Result<()> {
    Ok(nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        signal,
    )?)
}

/// Waits for the exit: its code and how long it took.
fn exit_of(child: &mut Child, within: Duration) -> Result<(Option<i32>, Duration)> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((status.code(), start.elapsed()));
        }
        ensure!(
            start.elapsed() < within,
            "status --watch still running after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn status_watch_json_prints_one_document_per_line_and_ends_cleanly() -> Result<()> {
    use nix::sys::signal::Signal;
    let bed = TestBed::start()?;
    let session = unique("w");
    let _map = bed.start_session(&session, &[])?;

    // One compact document per refresh (2 s apart), each valid on its own.
    let (mut child, stdout) = start_status(bed.state_dir.path(), &["--watch", "-o", "json"])?;
    let lines = lines_of(stdout);
    let (first, second) = (next_line(&lines)?, next_line(&lines)?);
    for doc in [&first, &second] {
        let v: serde_json::Value = serde_json::from_str(doc)
            .with_context(|| format!("not one document per line: {doc}"))?;
        ensure!(
            v.as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == session.as_str()),
            "{doc}"
        );
    }
    ensure_valid("status --watch -o json", &format!("{first}\n{second}\n"))?;

    // SIGINT (Ctrl-C) ends it at once with 0, rather than killing it.
    signal(&child, Signal::SIGINT)?;
    let (code, took) = exit_of(&mut child.0, Duration::from_secs(5))?;
    assert_eq!(code, Some(0), "exit after SIGINT");
    ensure!(took < Duration::from_secs(1), "SIGINT took {took:?}");
    // Nothing half-written: whatever else it printed is whole documents, up to EOF.
    while let Ok(rest) = lines.recv_timeout(Duration::from_secs(2)) {
        serde_json::from_str::<serde_json::Value>(&rest)
            .with_context(|| format!("partial line: {rest}"))?;
    }

    // The reader goes away (`| head -n 1`): it ends with 0 at once, not at its next write
    // 2 s later.
    let (mut child, mut stdout) = start_status(bed.state_dir.path(), &["-w", "-o", "json"])?;
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    serde_json::from_str::<serde_json::Value>(&line)?;
    drop(stdout);
    let (code, took) = exit_of(&mut child.0, Duration::from_secs(5))?;
    assert_eq!(code, Some(0), "exit after the reader went away");
    ensure!(
        took < Duration::from_secs(1),
        "noticed the closed pipe only after {took:?}"
    );

    // The table watch redraws the screen, and ends with 0 on SIGTERM and SIGHUP too.
    for sig in [Signal::SIGTERM, Signal::SIGHUP] {
        let (mut child, stdout) = start_status(bed.state_dir.path(), &["--watch"])?;
        let lines = lines_of(stdout);
        let screen = next_line(&lines)?;
        ensure!(
            screen.starts_with("\x1b[H\x1b[2J") && screen.contains(&session),
            "{screen:?}"
        );
        signal(&child, sig)?;
        let (code, _) = exit_of(&mut child.0, Duration::from_secs(5))?;
        assert_eq!(code, Some(0), "exit after {sig}");
    }
    Ok(())
}
