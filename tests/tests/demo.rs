//! The README's first command, run as a new user would: `cargo xtask demo` from the
//! workspace root must end with the local node connected.
use std::process::Command;

#[test]
fn readme_first_command_ends_with_the_local_node_connected() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo).args(["xtask", "demo"]).current_dir(root).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cargo xtask demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("-> pong"), "{stdout}");
    assert!(stdout.contains("rpc:call('app@"), "{stdout}");
    // rpc and remsh with no node name or cookie given.
    assert!(stdout.contains("$ beamredir rpc app-0 'node().'\n'app@"), "{stdout}");
    assert!(stdout.contains("$ beamredir rpc app-0 --elixir 'Enum.sum(1..10)'\n55\n"), "{stdout}");
    assert!(stdout.contains("iex(app@") && stdout.contains(", \"app-0\", \"1.14"), "{stdout}");
    Ok(())
}
