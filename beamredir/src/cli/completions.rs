//! Fitting into the user's tools, all generated from the clap definitions in [`super::Cli`], so
//! they follow whatever subcommands and flags it has:
//!
//! * `beamredir completions bash|zsh|fish` prints a completion script (clap_complete);
//! * `beamredir man` prints beamredir(1); `beamredir man --out DIR` writes it and one page per
//!   subcommand, beamredir-up(1) and so on (clap_mangen);
//! * invoked as `kubectl-beamredir` (a link or copy on PATH, which kubectl runs for
//!   `kubectl beamredir …`), the program is beamredir; only its usage and help say
//!   `kubectl beamredir`;
//! * invoked as `kubectl_complete-beamredir`, it answers kubectl's (≥ 1.26) plugin completion:
//!   kubectl runs it with the words after `beamredir`, the last one being completed, and reads
//!   candidates, one per line, then Cobra's `:DIRECTIVE` line.
//!
//! Hidden subcommands (`__network-part`) are internal: they are neither completed nor
//! documented.
use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use clap::{Args, Command, CommandFactory, FromArgMatches, ValueEnum};

use super::Cli;

/// The name kubectl looks for on PATH to run `kubectl beamredir …`.
pub const KUBECTL_PLUGIN: &str = "kubectl-beamredir";
/// The name kubectl runs to complete `kubectl beamredir …` in the shell.
pub const KUBECTL_COMPLETE: &str = "kubectl_complete-beamredir";

// No doc comment here: the variant's own is the subcommand's description.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    beamredir completions bash > ~/.local/share/bash-completion/completions/beamredir\n  \
    beamredir completions zsh > ~/.zfunc/_beamredir    # with fpath+=(~/.zfunc) before compinit\n  \
    beamredir completions fish > ~/.config/fish/completions/beamredir.fish")]
pub struct CompletionsArgs {
    /// The shell to write the completion script for.
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    beamredir man | man -l -\n  \
    beamredir man --out ~/.local/share/man/man1")]
pub struct ManArgs {
    /// Write beamredir.1 and one page per subcommand (beamredir-up.1, …) into DIR instead of
    /// printing beamredir.1.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Parses the command line, as `Cli::parse()` does, except that under the plugin name the
/// usage, help and errors say `kubectl beamredir`.
pub fn parse() -> Cli {
    let argv0 = std::env::args_os().next();
    if file_name_is(argv0.as_deref(), KUBECTL_COMPLETE) {
        let words: Vec<String> = std::env::args().skip(1).collect();
        let answer = kubectl_complete(&words);
        let code = write_stdout(answer.as_bytes()).map_or(1, |_| 0);
        std::process::exit(code);
    }
    let mut cmd = Cli::command();
    if invoked_as_kubectl_plugin(argv0.as_deref()) {
        cmd = cmd.bin_name("kubectl beamredir");
    }
    let mut matches = cmd.get_matches_mut();
    Cli::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.format(&mut cmd).exit())
}

/// Whether argv[0] names the kubectl plugin (kubectl runs it by its full path).
fn invoked_as_kubectl_plugin(argv0: Option<&std::ffi::OsStr>) -> bool {
    file_name_is(argv0, KUBECTL_PLUGIN)
}

fn file_name_is(argv0: Option<&std::ffi::OsStr>, name: &str) -> bool {
    argv0
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == name)
}

/// Cobra's completion directives (what kubectl's shell scripts do after the candidates).
const DIRECTIVE_DEFAULT: u8 = 0; // the shell may complete file names
const DIRECTIVE_NO_FILE: u8 = 4;

/// The answer to kubectl's plugin completion for `kubectl beamredir WORDS…` (the last word is
/// the one being completed, possibly empty): subcommands, flags, or a flag's values, each as
/// `candidate<TAB>description`, then `:DIRECTIVE`.
pub fn kubectl_complete(words: &[String]) -> String {
    let mut root = public_command();
    root.build();
    let (done, current) = match words.split_last() {
        Some((last, done)) => (done, last.as_str()),
        None => (&[][..], ""),
    };
    let mut cmd = &root;
    // The flag whose value is being completed, if any.
    let mut pending: Option<&clap::Arg> = None;
    for word in done {
        if pending.take().is_some() {
            continue;
        }
        if word == "--" {
            // The command to run in the session: the shell's business.
            return format!(":{DIRECTIVE_DEFAULT}\n");
        }
        if let Some(long) = word.strip_prefix("--") {
            if !long.contains('=') {
                pending = cmd
                    .get_arguments()
                    .find(|a| a.get_long() == Some(long))
                    .filter(|a| a.get_action().takes_values());
            }
        } else if let Some(shorts) = word.strip_prefix('-').filter(|s| !s.is_empty()) {
            // -abc: only the last short flag can take the next word as its value.
            let last = shorts.chars().last().unwrap();
            pending = cmd
                .get_arguments()
                .find(|a| a.get_short() == Some(last))
                .filter(|a| a.get_action().takes_values());
        } else if let Some(sub) = cmd.find_subcommand(word) {
            cmd = sub;
        }
    }
    let mut candidates: Vec<(String, String)> = Vec::new();
    let mut directive = DIRECTIVE_NO_FILE;
    let help = |h: Option<&clap::builder::StyledStr>| {
        h.map(|h| h.to_string().lines().next().unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    if let Some(arg) = pending {
        let values = arg.get_possible_values();
        if values.is_empty() {
            let names = arg.get_value_names().unwrap_or_default();
            let path = |n: &str| n.ends_with("PATH") || n.ends_with("DIR") || n.ends_with("FILE");
            if names.iter().any(|n| path(n.as_str())) {
                directive = DIRECTIVE_DEFAULT;
            }
        }
        for v in values.iter().filter(|v| !v.is_hide_set()) {
            candidates.push((v.get_name().to_owned(), help(v.get_help())));
        }
    } else if current.starts_with('-') {
        for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            if let Some(long) = arg.get_long() {
                candidates.push((format!("--{long}"), help(arg.get_help())));
            }
        }
    } else {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            candidates.push((sub.get_name().to_owned(), help(sub.get_about())));
        }
        // Positional arguments with a fixed set of values (`completions SHELL`).
        for arg in cmd.get_positionals().filter(|a| !a.is_hide_set()) {
            for v in arg
                .get_possible_values()
                .iter()
                .filter(|v| !v.is_hide_set())
            {
                candidates.push((v.get_name().to_owned(), help(v.get_help())));
            }
        }
    }
    let mut out = String::new();
    for (candidate, about) in candidates.iter().filter(|(c, _)| c.starts_with(current)) {
        if about.is_empty() {
            out.push_str(&format!("{candidate}\n"));
        } else {
            out.push_str(&format!("{candidate}\t{about}\n"));
        }
    }
    out.push_str(&format!(":{directive}\n"));
    out
}

/// The command line users see: [`Cli`] without its hidden subcommands.
pub fn public_command() -> Command {
    without_hidden(Cli::command())
}

/// `cmd` without hidden subcommands, at every level. clap cannot remove a subcommand, so a
/// command that has hidden ones is rebuilt from its parts (the help it renders stays the same:
/// see the tests).
fn without_hidden(cmd: Command) -> Command {
    if !cmd.get_subcommands().any(Command::is_hide_set) {
        return cmd.mut_subcommands(without_hidden);
    }
    let mut out = Command::new(cmd.get_name().to_owned())
        .args(cmd.get_arguments().cloned())
        .groups(cmd.get_groups().cloned())
        .subcommands(
            cmd.get_subcommands()
                .filter(|s| !s.is_hide_set())
                .cloned()
                .map(without_hidden),
        )
        .visible_aliases(cmd.get_visible_aliases().map(str::to_owned))
        .subcommand_required(cmd.is_subcommand_required_set())
        .arg_required_else_help(cmd.is_arg_required_else_help_set())
        .args_conflicts_with_subcommands(cmd.is_args_conflicts_with_subcommands_set())
        .subcommand_negates_reqs(cmd.is_subcommand_negates_reqs_set())
        .subcommand_precedence_over_arg(cmd.is_subcommand_precedence_over_arg_set())
        .propagate_version(cmd.is_propagate_version_set())
        .disable_help_flag(cmd.is_disable_help_flag_set())
        .disable_version_flag(cmd.is_disable_version_flag_set())
        .disable_help_subcommand(cmd.is_disable_help_subcommand_set())
        .hide(cmd.is_hide_set());
    // Each text only if set: `None` would reset what clap derives from others.
    macro_rules! copy_text {
        ($($get:ident => $set:ident),*) => {$(
            if let Some(text) = cmd.$get() {
                out = out.$set(text.clone());
            }
        )*};
    }
    copy_text!(
        get_about => about,
        get_long_about => long_about,
        get_before_help => before_help,
        get_before_long_help => before_long_help,
        get_after_help => after_help,
        get_after_long_help => after_long_help
    );
    if let Some(v) = cmd.get_version() {
        out = out.version(v.to_owned());
    }
    if let Some(v) = cmd.get_long_version() {
        out = out.long_version(v.to_owned());
    }
    if let Some(a) = cmd.get_author() {
        out = out.author(a.to_owned());
    }
    if let Some(n) = cmd.get_bin_name() {
        out = out.bin_name(n.to_owned());
    }
    if let Some(n) = cmd.get_subcommand_value_name() {
        out = out.subcommand_value_name(n.to_owned());
    }
    if let Some(h) = cmd.get_subcommand_help_heading() {
        out = out.subcommand_help_heading(h.to_owned());
    }
    out
}

/// `beamredir completions SHELL`: the script on stdout.
pub fn completions(args: &CompletionsArgs) -> Result<i32> {
    let mut script = Vec::new();
    write_completions(args.shell, &mut script);
    write_stdout(&script)
}

pub fn write_completions(shell: CompletionShell, out: &mut dyn Write) {
    use clap_complete::aot::{Shell, generate};
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    generate(shell, &mut public_command(), "beamredir", out);
}

/// `beamredir man [--out DIR]`.
pub fn man(args: &ManArgs) -> Result<i32> {
    let Some(dir) = &args.out else {
        let page = render_man(man_page(public_command().disable_help_subcommand(true)))?;
        return write_stdout(page.as_bytes());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for path in write_man_pages(dir)? {
        println!("{}", path.display());
    }
    Ok(0)
}

/// Writes beamredir.1 and a page per (visible) subcommand at every level into `dir`.
pub fn write_man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    fn pages(cmd: Command, dir: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
        let page = man_page(cmd.clone());
        let path = dir.join(page.get_filename());
        std::fs::write(&path, render_man(page)?)
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        for sub in cmd.get_subcommands().cloned() {
            pages(sub, dir, written)?;
        }
        Ok(())
    }
    let mut cmd = public_command().disable_help_subcommand(true);
    // Subcommands' display names (beamredir-up, …) are set when the command is built.
    cmd.build();
    let mut written = Vec::new();
    pages(cmd, dir, &mut written)?;
    Ok(written)
}

fn man_page(cmd: Command) -> clap_mangen::Man {
    // Without a date, .TH would take the version for the date (its third argument).
    clap_mangen::Man::new(cmd)
        .date(man_date())
        .manual("beamredir manual")
}

/// The page as roff in ASCII: other characters (the help texts' "…") become groff's `\[uXXXX]`
/// escapes, so plain `groff -man` renders them too, not only man-db (which runs preconv).
fn render_man(page: clap_mangen::Man) -> Result<String> {
    let mut roff = Vec::new();
    page.render(&mut roff)?;
    let roff = String::from_utf8(roff)?;
    Ok(roff
        .chars()
        .map(|c| {
            if c.is_ascii() {
                c.to_string()
            } else {
                format!("\\[u{:04X}]", c as u32)
            }
        })
        .collect())
}

/// The pages' date: $SOURCE_DATE_EPOCH (reproducible builds) or today, as YYYY-MM-DD (UTC).
fn man_date() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to a (year, month, day) of the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Writes to stdout; a reader that went away (`… | head`) is not an error.
fn write_stdout(bytes: &[u8]) -> Result<i32> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(e.into()),
        Ok(()) => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(cmd: &Command) -> Vec<String> {
        cmd.get_subcommands()
            .map(|s| s.get_name().to_owned())
            .collect()
    }

    #[test]
    fn hidden_subcommands_are_left_out_and_the_rest_renders_the_same_help() {
        let mut full = Cli::command();
        let mut public = public_command();
        assert!(names(&full).iter().any(|n| n == "__network-part"));
        assert!(
            !names(&public).iter().any(|n| n.starts_with("__")),
            "{:?}",
            names(&public)
        );
        let visible: Vec<_> = full
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| s.get_name().to_owned())
            .collect();
        assert_eq!(names(&public), visible);
        // The rebuilt command is the same to a user: every help text, top level and each
        // subcommand, renders identically.
        full.build();
        public.build();
        assert_eq!(
            public.render_long_help().to_string(),
            full.render_long_help().to_string()
        );
        assert_eq!(
            public.render_usage().to_string(),
            full.render_usage().to_string()
        );
        assert_eq!(public.render_version(), full.render_version());
        for name in &visible {
            let a = full
                .find_subcommand_mut(name)
                .unwrap()
                .render_long_help()
                .to_string();
            let b = public
                .find_subcommand_mut(name)
                .unwrap()
                .render_long_help()
                .to_string();
            assert_eq!(a, b, "help of {name}");
        }
    }

    #[test]
    fn the_scripts_complete_every_public_subcommand_and_no_hidden_one() {
        for shell in [
            CompletionShell::Bash,
            CompletionShell::Zsh,
            CompletionShell::Fish,
        ] {
            let mut out = Vec::new();
            write_completions(shell, &mut out);
            let script = String::from_utf8(out).unwrap();
            assert!(!script.contains("__network-part"), "{shell:?}");
            for name in names(&public_command()) {
                assert!(script.contains(&name), "{shell:?} lacks {name}");
            }
        }
    }

    #[test]
    fn man_pages_for_every_public_subcommand() {
        let dir = std::env::temp_dir().join(format!("beamredir-man-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let written = write_man_pages(&dir).unwrap();
        let files: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(files[0], "beamredir.1");
        for name in names(&public_command()) {
            assert!(files.contains(&format!("beamredir-{name}.1")), "{files:?}");
        }
        assert!(!files.iter().any(|f| f.contains("__")), "{files:?}");
    }

    fn complete(line: &str) -> (Vec<String>, String) {
        let mut words: Vec<String> = line.split(' ').map(str::to_owned).collect();
        if words == [""] {
            words.clear();
        }
        let answer = kubectl_complete(&words);
        let mut lines: Vec<String> = answer.lines().map(str::to_owned).collect();
        let directive = lines.pop().unwrap();
        let names = lines
            .iter()
            .map(|l| l.split('\t').next().unwrap().to_owned())
            .collect();
        (names, directive)
    }

    #[test]
    fn kubectl_plugin_completion() {
        let (all, d) = complete("");
        assert_eq!(d, ":4");
        assert_eq!(
            all,
            names(&public_command())
                .into_iter()
                .chain(["help".to_owned()])
                .collect::<Vec<_>>()
        );
        assert_eq!(complete("st"), (vec!["status".to_owned()], ":4".to_owned()));
        assert_eq!(complete("__").0, Vec::<String>::new());
        let (flags, _) = complete("up --st");
        assert!(
            flags.contains(&"--statefulset".into()) && flags.contains(&"--state-dir".into()),
            "{flags:?}"
        );
        assert_eq!(complete("status -o ").0, ["table", "wide", "json"]);
        assert_eq!(complete("status --output j").0, ["json"]);
        assert_eq!(complete("-v status -o w").0, ["wide"]);
        assert_eq!(complete("completions ").0, ["bash", "zsh", "fish"]);
        // A flag's value is not a subcommand; after it, subcommands again.
        assert_eq!(complete("--state-dir ").1, ":0");
        assert_eq!(complete("--state-dir /tmp st").0, ["status"]);
        // The command after `--` is the shell's to complete.
        assert_eq!(
            complete("map 10.0.0.1:4369=14369 -- er"),
            (vec![], ":0".to_owned())
        );
    }

    #[test]
    fn man_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }

    #[test]
    fn the_plugin_name_is_recognised_by_its_file_name() {
        let yes = [
            "kubectl-beamredir",
            "/usr/local/bin/kubectl-beamredir",
            "./kubectl-beamredir",
        ];
        for argv0 in yes {
            assert!(invoked_as_kubectl_plugin(Some(argv0.as_ref())), "{argv0}");
        }
        for argv0 in [
            "beamredir",
            "/usr/bin/beamredir",
            "kubectl-beamredir-old",
            "kubectl",
        ] {
            assert!(!invoked_as_kubectl_plugin(Some(argv0.as_ref())), "{argv0}");
        }
        assert!(!invoked_as_kubectl_plugin(None));
    }
}
