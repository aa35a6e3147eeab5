//! Prototype of `beamredir rpc`: evaluates an expression on a node reached over plain TCP, the
//! way the CLI will over a port-forward stream. Not the CLI: it exists so the tests exercise the
//! library end to end as a process (output, error text, exit code).
//!
//! `beamredir-rpc-proto ADDR:PORT --cookie-file FILE [--elixir] [--runtime] EXPR`
use std::{path::PathBuf, process::ExitCode, time::Duration};

use beamredir::{
    erlang::rpc::{Language, RpcClient},
    k8s::cookie,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("beamredir: {e}");
            ExitCode::from(3)
        }
    }
}

async fn run() -> Result<u8, Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut addr, mut cookie_file, mut language, mut expr, mut runtime) = (None, None, Language::Erlang, None, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cookie-file" => cookie_file = args.next().map(PathBuf::from),
            "--elixir" => language = Language::Elixir,
            "--runtime" => runtime = true,
            _ if addr.is_none() => addr = Some(a),
            _ => expr = Some(a),
        }
    }
    let addr = addr.ok_or("usage: beamredir-rpc-proto ADDR:PORT --cookie-file FILE [--elixir] EXPR")?;
    let env = |v: &str| std::env::var(v).ok();
    let lookup = cookie::Lookup { cookie_file: cookie_file.as_deref(), env: &env, pod: None, kube: &cookie::NoKube };
    let cookie = cookie::resolve(lookup).await?.cookie;
    let stream = tokio::net::TcpStream::connect(&addr).await?;
    let mut client = RpcClient::connect(stream, &cookie, Duration::from_secs(10)).await?;
    if runtime {
        let r = client.runtime(Duration::from_secs(10)).await?;
        println!("elixir={} iex={}", r.elixir, r.iex);
        return Ok(0);
    }
    let evaluation = client.eval(language, &expr.unwrap_or_default(), Duration::from_secs(30)).await?;
    evaluation.print(&mut std::io::stdout(), &mut std::io::stderr())?;
    client.close().await;
    Ok(evaluation.exit_code() as u8)
}
