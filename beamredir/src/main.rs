//! The `beamredir` command line: errors are reported here, in one line each, with anyhow.
mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::completions::parse();
    cli::init_logging(&args);
    match cli::run(args) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            // One line, whatever the causes contain.
            let text = format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("beamredir: error: {text}");
            ExitCode::from(1)
        }
    }
}
