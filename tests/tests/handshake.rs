//! The Erlang library against real OTP 25 / Elixir 1.14 nodes in network namespaces:
//! the silent name probe (long and short names, Erlang and Elixir), TLS detection, rpc from
//! Rust with the cookie from a file, a local node that gets the cookie from a private home
//! (never argv), and the remote-shell argv.
use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use beamredir::erlang::{
    cookie::{Cookie, CookieFile},
    dist::{DistConnection, DistError},
    handshake::{self, Frame, NodeIdentity, PROBE_NAME, ProbeError},
    names::{self, LocalNode},
};
use beamredir_testbed::{COOKIE, Interactive, Pod, PodNames, PodRuntime, TempDir, require_root, unique_pod_ip, wait_until};

const DIST_PORT: u16 = 5555;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A TCP connection to the pod's distribution port, made inside the pod's namespace.
fn connect(pod: &Pod) -> Result<TcpStream> {
    let addr = (pod.ip, pod.dist_port);
    Ok(pod.ns.in_ns(move || TcpStream::connect(addr))??)
}

fn probe(pod: &Pod) -> Result<NodeIdentity, ProbeError> {
    let std = connect(pod).map_err(|e| ProbeError::Io(std::io::Error::other(e.to_string())))?;
    std.set_nonblocking(true)?;
    rt().block_on(async move {
        let s = tokio::net::TcpStream::from_std(std)?;
        handshake::probe_stream(s, handshake::DEFAULT_PROBE_TIMEOUT).await
    })
}

/// A probe held open after the challenge (what a probe looks like to the node mid-flight).
fn held_probe(pod: &Pod) -> Result<TcpStream> {
    let mut s = connect(pod)?;
    s.write_all(&handshake::encode_send_name(PROBE_NAME, handshake::flags::OTP25_HIDDEN_NODE, 1).unwrap())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    let mut frames = 0;
    while frames < 2 {
        let mut chunk = [0u8; 256];
        let n = s.read(&mut chunk)?;
        anyhow::ensure!(n > 0, "node closed the held probe");
        buf.extend_from_slice(&chunk[..n]);
        while let Ok(Frame::Message { consumed, .. }) = handshake::parse_frame(&buf, 1024) {
            buf.drain(..consumed);
            frames += 1;
        }
    }
    Ok(s)
}

fn cookie_file(dir: &TempDir, cookie: &str) -> CookieFile {
    CookieFile::create(&Cookie::new(cookie).unwrap(), dir.path(), None, None).unwrap()
}

/// A local hidden node (dynamic name, cookie from its private home) in the pod's namespace
/// that connects to the pod's node and evaluates `body`; returns its stdout.
fn local_node_eval(pod: &Pod, cookie: &CookieFile, body: &str) -> Result<String> {
    let otp = rt().block_on(names::local_otp_version(None, Duration::from_secs(5)))?;
    let node = &pod.node;
    let eval = format!("true = net_kernel:connect_node('{node}'), {body}, halt().");
    let inetrc = pod.inetrc();
    let env = cookie.env();
    let n = LocalNode { target: node, mode: names::mode_of(node)?, cookie_env: &env, inetrc: Some(&inetrc), extra: &[], otp };
    let c = names::eval_node(&n, &eval);
    let out = pod.ns.command(&c.program).args(&c.args).envs(c.env).stdin(Stdio::null()).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(out.status.success(), "local node failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

/// Connects with a wrong cookie (a positive control: the node logs this), returns our name.
fn wrong_cookie(pod: &Pod) -> Result<String> {
    let std = connect(pod)?;
    std.set_nonblocking(true)?;
    rt().block_on(async move {
        let s = tokio::net::TcpStream::from_std(std)?;
        match DistConnection::connect(s, &Cookie::new("not-the-cookie").unwrap(), Duration::from_secs(5)).await {
            Err(DistError::WrongCookie { local }) => Ok(local),
            Err(e) => Err(anyhow::anyhow!("expected a wrong-cookie error, got: {e}")),
            Ok(_) => Err(anyhow::anyhow!("a wrong cookie was accepted")),
        }
    })
}

/// (a) the probe returns the exact name; (c) it never shows in `nodes(connected)`, even while
/// held open; (b) the node logs nothing for it: the first thing in its log is the report of a
/// later wrong-cookie attempt, with its exact text.
fn probe_is_exact_and_silent(runtime: PodRuntime, names: PodNames) -> Result<()> {
    require_root()?;
    let pod = Pod::start_named(unique_pod_ip(), DIST_PORT, runtime, names, &[])?;
    let id = probe(&pod)?;
    assert_eq!(id.name, pod.node, "the probe must return the node's own name");
    assert_eq!(id.protocol_version, 6);
    assert!(id.creation.is_some_and(|c| c != 0));
    assert_eq!(names::mode_of(&id.name)?, if names == PodNames::Long { names::NameMode::Long } else { names::NameMode::Short });
    // A second probe right after works the same (the first one left nothing pending).
    assert_eq!(probe(&pod)?.name, pod.node);

    let dir = TempDir::new("brcookie")?;
    let file = cookie_file(&dir, COOKIE);
    let nodes = format!("io:format(\"~p~n\", [rpc:call('{}', erlang, nodes, [connected])])", pod.node);
    let held = held_probe(&pod)?;
    let during = local_node_eval(&pod, &file, &nodes)?;
    drop(held);
    assert!(during.contains('['), "{during}");
    assert!(!during.contains(PROBE_NAME), "probe in nodes(connected) while held: {during}");
    let after = local_node_eval(&pod, &file, &nodes)?;
    assert!(!after.contains(PROBE_NAME), "probe in nodes(connected) afterwards: {after}");

    let local = wrong_cookie(&pod)?;
    // error_logger's exact text; Elixir's logger prints the same with the atom Elixir-style
    // (`:NAME` or `:"NAME"`).
    let is_report = |line: &str| match runtime {
        PodRuntime::Erlang => line == format!("** Connection attempt from node '{local}' rejected. Invalid challenge reply. **"),
        PodRuntime::Elixir => {
            line.contains("[error] ** Connection attempt from node :")
                && line.contains(&local)
                && line.ends_with(" rejected. Invalid challenge reply. **")
        }
    };
    wait_until("the wrong-cookie report in the node's log", Duration::from_secs(10), || pod.log().lines().any(is_report))
        .with_context(|| format!("log:\n{}", pod.log()))?;
    let log = pod.log();
    let other: Vec<&str> =
        log.lines().filter(|l| !l.trim().is_empty() && !is_report(l) && !l.starts_with("=ERROR REPORT====")).collect();
    assert!(other.is_empty(), "the node logged more than the wrong-cookie report:\n{log}");
    assert_eq!(log.lines().filter(|l| is_report(l)).count(), 1, "{log}");
    assert!(!log.contains(PROBE_NAME), "{log}");
    Ok(())
}

#[test]
fn probe_erlang_long_names() -> Result<()> {
    probe_is_exact_and_silent(PodRuntime::Erlang, PodNames::Long)
}

#[test]
fn probe_erlang_short_names() -> Result<()> {
    probe_is_exact_and_silent(PodRuntime::Erlang, PodNames::Short)
}

#[test]
fn probe_elixir_long_names() -> Result<()> {
    probe_is_exact_and_silent(PodRuntime::Elixir, PodNames::Long)
}

#[test]
fn probe_elixir_short_names() -> Result<()> {
    probe_is_exact_and_silent(PodRuntime::Elixir, PodNames::Short)
}

/// A node running TLS distribution answers the plain send_name with a TLS alert; the probe
/// says so and names the flags. (The node logs one NOTICE about the alert: the cost of probing
/// a TLS node with plain bytes, recorded here.)
#[test]
fn probe_detects_tls_distribution() -> Result<()> {
    require_root()?;
    let dir = TempDir::new("brtls")?;
    let key = rcgen::generate_simple_self_signed(vec!["app".to_string()])?;
    let (cert, keyfile, opts) = (dir.path().join("cert.pem"), dir.path().join("key.pem"), dir.path().join("ssl_dist.conf"));
    std::fs::write(&cert, key.cert.pem())?;
    std::fs::write(&keyfile, key.signing_key.serialize_pem())?;
    std::fs::write(
        &opts,
        format!(
            "[{{server, [{{certfile, \"{}\"}}, {{keyfile, \"{}\"}}]}}, {{client, [{{verify, verify_none}}]}}].\n",
            cert.display(),
            keyfile.display()
        ),
    )?;
    let opts = opts.display().to_string();
    let pod = Pod::start_named(unique_pod_ip(), DIST_PORT, PodRuntime::Erlang, PodNames::Long, &["-proto_dist", "inet_tls", "-ssl_dist_optfile", &opts])?;
    let e = probe(&pod).unwrap_err();
    assert!(matches!(e, ProbeError::Tls), "{e}");
    assert!(e.to_string().contains("-proto_dist inet_tls -ssl_dist_optfile FILE"), "{e}");
    wait_until("the TLS notice", Duration::from_secs(10), || pod.log().contains("TLS server"))?;
    Ok(())
}

fn rpc_proto(pod: &Pod, cookie_file: &Path, args: &[&str]) -> Result<(i32, String, String)> {
    let out = pod
        .ns
        .command(env!("CARGO_BIN_EXE_beamredir-rpc-proto"))
        .arg(format!("{}:{}", pod.ip, pod.dist_port))
        .arg("--cookie-file")
        .arg(cookie_file)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn rpc_evaluates_erlang_on_the_node_from_rust() -> Result<()> {
    require_root()?;
    let pod = Pod::start_named(unique_pod_ip(), DIST_PORT, PodRuntime::Erlang, PodNames::Long, &[])?;
    let dir = TempDir::new("brrpc")?;
    let good = dir.path().join("cookie");
    std::fs::write(&good, format!("{COOKIE}\n"))?;
    let (code, out, err) = rpc_proto(&pod, &good, &["node()."])?;
    assert_eq!((code, out.as_str()), (0, format!("'{}'\n", pod.node).as_str()), "{err}");
    let (code, out, _) = rpc_proto(&pod, &good, &["lists:seq(1,3)"])?;
    assert_eq!((code, out.as_str()), (0, "[1,2,3]\n"));
    let (code, out, _) = rpc_proto(&pod, &good, &["io:format(\"hi ~s~n\", [\"there\"]), {ok, #{a => <<\"b\">>}}"])?;
    assert_eq!((code, out.as_str()), (0, "hi there\n{ok,#{a => <<\"b\">>}}\n"));
    let (code, out, err) = rpc_proto(&pod, &good, &["1/0"])?;
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.starts_with("** exception error: an error occurred when evaluating an arithmetic expression"), "{err}");
    let (code, _, err) = rpc_proto(&pod, &good, &["lists:seq(1,"])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("syntax error"), "{err}");
    let (code, out, _) = rpc_proto(&pod, &good, &["--runtime"])?;
    assert_eq!((code, out.as_str()), (0, "elixir=false iex=false\n"));
    // A node that prints more than beamredir keeps: the first 16 MiB, the value, and a line.
    let (code, out, err) = rpc_proto(&pod, &good, &["[io:put_chars(binary:copy(<<\"x\">>, 1000000)) || _ <- lists:seq(1, 17)], done"])?;
    assert_eq!((code, out.len()), (0, 16 * 1024 * 1024 + "done\n".len()), "{err}");
    assert!(out.ends_with("xdone\n"));
    assert!(err.contains("the node printed more than 16 MiB; the rest was dropped"), "{err}");

    let bad = dir.path().join("bad");
    std::fs::write(&bad, "wrong-cookie\n")?;
    let (code, _, err) = rpc_proto(&pod, &bad, &["node()"])?;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("rejected the cookie") && err.lines().count() == 1, "{err}");
    wait_until("the node's wrong-cookie report", Duration::from_secs(10), || pod.log().contains("Invalid challenge reply"))?;
    // Only the wrong cookie was logged: the successful rpc connections left nothing.
    assert_eq!(pod.log().matches("REPORT").count(), 1, "{}", pod.log());
    Ok(())
}

#[test]
fn rpc_evaluates_elixir_on_the_node_from_rust() -> Result<()> {
    require_root()?;
    let pod = Pod::start_named(unique_pod_ip(), DIST_PORT, PodRuntime::Elixir, PodNames::Long, &[])?;
    let dir = TempDir::new("brrpc")?;
    let good = dir.path().join("cookie");
    std::fs::write(&good, COOKIE)?;
    let (code, out, err) = rpc_proto(&pod, &good, &["--elixir", "Enum.sum([1,2,3])"])?;
    assert_eq!((code, out.as_str()), (0, "6\n"), "{err}");
    let (code, out, _) = rpc_proto(&pod, &good, &["--elixir", "IO.puts(\"hey\"); %{a: [1, 2], b: \"x\"}"])?;
    assert_eq!((code, out.as_str()), (0, "hey\n%{a: [1, 2], b: \"x\"}\n"));
    let (code, _, err) = rpc_proto(&pod, &good, &["--elixir", "raise \"boom\""])?;
    assert_eq!((code, err.trim()), (1, "** (RuntimeError) boom"));
    let (code, _, err) = rpc_proto(&pod, &good, &["--elixir", "Enum.sum([1,2"])?;
    assert_eq!(code, 2, "{err}");
    // Elixir 1.14 (Debian bookworm's, what setup.sh installs) reports an unclosed call so.
    assert!(err.starts_with("** (TokenMissingError)"), "{err}");
    // Erlang text on an Elixir node works too.
    let (code, out, _) = rpc_proto(&pod, &good, &["lists:seq(1,3)"])?;
    assert_eq!((code, out.as_str()), (0, "[1,2,3]\n"));
    let (code, out, _) = rpc_proto(&pod, &good, &["--runtime"])?;
    assert_eq!((code, out.as_str()), (0, "elixir=true iex=true\n"));
    Ok(())
}

/// A local node whose cookie comes from [`CookieFile`] (a private `HOME` with `.erlang.cookie`)
/// connects to the pod's node, and while it is connected no process but the pod's own node
/// has the cookie in its argv.
#[test]
fn local_node_gets_the_cookie_from_a_private_home_not_argv() -> Result<()> {
    require_root()?;
    let pod = Pod::start_named(unique_pod_ip(), DIST_PORT, PodRuntime::Erlang, PodNames::Short, &[])?;
    let dir = TempDir::new("brcookie")?;
    let file = cookie_file(&dir, COOKIE);
    let otp = rt().block_on(names::local_otp_version(None, Duration::from_secs(5)))?;
    let inetrc = pod.inetrc();
    let env = file.env();
    let n = LocalNode { target: &pod.node, mode: names::mode_of(&pod.node)?, cookie_env: &env, inetrc: Some(&inetrc), extra: &[], otp };
    let eval = format!(
        "true = net_kernel:connect_node('{}'), io:format(\"connected as ~p~n\", [node()]), receive after infinity -> ok end.",
        pod.node
    );
    let c = names::eval_node(&n, &eval);
    let local = Interactive::spawn(pod.ns.command(&c.program).args(&c.args).envs(c.env))?;
    local.expect("connected as", Duration::from_secs(30))?;
    let mut leaks = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == pod.pid() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline_text = String::from_utf8_lossy(&cmdline);
            // Pods of tests running alongside are started with -setcookie (they stand for the
            // remote side). Their HOME is a brpod-home directory, which their children
            // (erlexec, beam) inherit; argv alone does not show it for elixir's erlexec.
            if runs_as_a_test_pod(&entry.path()) {
                continue;
            }
            if cmdline_text.contains(COOKIE) {
                leaks.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
            }
        }
    }
    assert!(leaks.is_empty(), "the cookie is in argv of: {leaks:?}");
    // The private home holds it, readable by its owner only.
    assert_eq!(std::fs::read_to_string(file.path())?, format!("{COOKIE}\n"));
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(file.path())?.permissions()) & 0o777, 0o400);
    Ok(())
}

/// Whether the process at `proc_dir` (`/proc/PID`) is a test pod's node: its `HOME` is a
/// brpod-home directory.
fn runs_as_a_test_pod(proc_dir: &std::path::Path) -> bool {
    std::fs::read(proc_dir.join("environ"))
        .map(|env| env.split(|b| *b == 0).any(|var| var.starts_with(b"HOME=") && String::from_utf8_lossy(var).contains("/brpod-home")))
        .unwrap_or(false)
}

/// `erl -remsh` with a dynamic hidden name and `iex --remsh` with a unique hidden name (argv
/// from [`names`]) reach the pod's node and leave it running.
#[test]
fn remote_shells_from_the_built_argv() -> Result<()> {
    require_root()?;
    let pod = Pod::start_named(unique_pod_ip(), DIST_PORT, PodRuntime::Elixir, PodNames::Long, &[])?;
    let dir = TempDir::new("brcookie")?;
    let file = cookie_file(&dir, COOKIE);
    let otp = rt().block_on(names::local_otp_version(None, Duration::from_secs(5)))?;
    let env = file.env();
    let n = LocalNode { target: &pod.node, mode: names::mode_of(&pod.node)?, cookie_env: &env, inetrc: None, extra: &[], otp };
    for (c, prompt, command) in [
        (names::erl_remsh(&n), format!("({})1>", pod.node), "io:format(\"REMOTE=~s~n\", [node()]).\n"),
        (names::iex_remsh(&n), format!("iex({})1>", pod.node), "IO.puts(\"REMOTE=#{node()}\")\n"),
    ] {
        // Remote shells want a terminal: `script` gives them one.
        let line = std::iter::once(c.program.clone()).chain(c.args.iter().map(|a| shell_quote(a))).collect::<Vec<_>>().join(" ");
        let mut shell = Interactive::spawn(pod.ns.command("script").args(["-qec", &line, "/dev/null"]).envs(c.env.clone()))?;
        shell.expect(&prompt, Duration::from_secs(60))?;
        shell.send(command)?;
        shell.expect(&format!("REMOTE={}", pod.node), Duration::from_secs(20))?;
        shell.send("\x07")?;
        shell.expect("-->", Duration::from_secs(10))?;
        shell.send("q\n")?;
        assert_eq!(shell.wait(Duration::from_secs(20))?, 0);
    }
    let names_out = Command::new("ip").args(["netns", "exec", pod.ns.name(), "epmd", "-names"]).output()?;
    assert!(String::from_utf8_lossy(&names_out.stdout).contains("name app at port"));
    Ok(())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
