//! The command line of `popek run`, which never silently ignores what a
//! user typed.
//!
//! The rule: popek's options come before the guest, or after a Multiboot
//! kernel (which takes no arguments of its own); everything after a Linux
//! program is that program's, as with qemu-i386. So
//!
//! - after a Multiboot kernel, anything that is not a popek option is an
//!   error, with a hint to use `--append` for the kernel command line;
//! - an unknown option before a Linux program (or after a kernel) is an
//!   error with clap's "a similar argument exists" suggestion;
//! - `--` ends popek's options explicitly (`popek run -- -odd-name` runs a
//!   guest whose name starts with `-`; `popek run ./prog -- ...` passes
//!   what follows to the program);
//! - a program argument that is also a popek option (`popek run ./prog
//!   --stats`) goes to the program, and popek says so once on stderr.
//!
//! Parsing takes two passes over the same clap definition: a lenient one
//! (the run arguments trail the guest) finds the guest and what kind of
//! image it is; a strict one (the run arguments only after `--`) then
//! parses what popek owns, so clap reports the errors.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches};

use crate::run::{image_head, is_multiboot};
use crate::Cli;

/// Parse popek's command line (`argv[0]` included). Err(status) when
/// parsing ended the process's work: an error was printed (status 2), or
/// help or the version was.
pub(crate) fn parse(argv: Vec<String>) -> Result<Cli, ExitCode> {
    let lenient = Cli::command().mut_subcommand("run", |c| {
        c.mut_arg("args", |a| {
            a.last(false)
                .trailing_var_arg(true)
                .allow_hyphen_values(true)
        })
    });
    let m = lenient.try_get_matches_from(&argv).map_err(report)?;
    let Some(("run", run)) = m.subcommand() else {
        return Cli::from_arg_matches(&m).map_err(report);
    };
    let (Some(guest), Some(at)) = (run.get_one::<String>("guest"), run.index_of("guest")) else {
        return Cli::from_arg_matches(&m).map_err(report);
    };
    let guest = guest.clone();
    let Some(at) = guest_position(&argv, at, &guest) else {
        return Cli::from_arg_matches(&m).map_err(report);
    };
    // An unreadable guest is treated as a program here; running it reports
    // why it cannot be read.
    let linux = image_head(&guest).is_none_or(|head| !is_multiboot(&head));
    // The strict pass sees popek's options, then the guest under a name
    // that cannot be taken for an option (a `--` the user put before the
    // guest only ended popek's options, which the strict pass does by its
    // own `--`); the guest's real name goes back in after parsing.
    let before = match at.checked_sub(1).map(|b| argv[b].as_str()) {
        Some("--") => at - 1,
        _ => at,
    };
    let mut strict_argv: Vec<String> = argv[..before].to_vec();
    strict_argv.push("guest".into());
    let mut after: Vec<String> = argv[at + 1..].to_vec();
    if linux {
        // Everything after the program is the program's (a `--` right
        // after it only ends popek's options).
        if after.first().is_some_and(|a| a == "--") {
            after.remove(0);
        } else {
            warn_shadowed_options(&guest, &argv[..at], &after);
        }
        strict_argv.push("--".into());
    }
    strict_argv.extend(after);
    let strict = Cli::command().try_get_matches_from(&strict_argv);
    let m = match strict {
        Ok(m) => m,
        Err(e) if !linux && e.kind() == ErrorKind::UnknownArgument => {
            let token = e
                .get(clap::error::ContextKind::InvalidArg)
                .map(|v| v.to_string())
                .unwrap_or_default();
            if token.starts_with('-') {
                return Err(report(e));
            }
            return Err(kernel_takes_no_arguments(&guest, &token));
        }
        Err(e) => return Err(report(e)),
    };
    let mut cli = Cli::from_arg_matches(&m).map_err(report)?;
    if let crate::Cmd::Run(r) = &mut cli.cmd {
        r.guest = guest.clone();
        if !linux {
            if let Some(first) = r.args.first() {
                return Err(kernel_takes_no_arguments(&guest, first));
            }
        }
    }
    Ok(cli)
}

/// Where in `argv` (the binary at 0) the guest is, which clap's
/// `index_of` says is its `index`-th argument: clap counts from the first
/// argument after the binary, an attached value (`--dump=FILE`, `-LDIR`)
/// as an argument of its own, and not the first `--`. (If that does not
/// land on the guest's name, its first occurrence after the subcommand.)
fn guest_position(argv: &[String], index: usize, guest: &str) -> Option<usize> {
    let mut n = 0usize;
    let mut ended = false;
    for (p, a) in argv.iter().enumerate().skip(1) {
        if n == index && a == guest && (ended || a != "--") {
            return Some(p);
        }
        n += match a.as_str() {
            "--" if !ended => {
                ended = true;
                0
            }
            _ if ended => 1,
            long if long.starts_with("--") && long.contains('=') => 2,
            short if short.starts_with('-') && !short.starts_with("--") && short.len() > 2 => 2,
            _ => 1,
        };
        if n > index {
            break;
        }
    }
    argv.iter()
        .enumerate()
        .skip(2)
        .find(|(_, a)| *a == guest)
        .map(|(p, _)| p)
}

/// Print a clap error (or help, or the version) and say how to end.
fn report(e: clap::Error) -> ExitCode {
    let _ = e.print();
    ExitCode::from(if e.use_stderr() { 2 } else { 0 })
}

fn kernel_takes_no_arguments(guest: &str, token: &str) -> ExitCode {
    eprintln!(
        "popek: {guest} is a Multiboot kernel and takes no arguments, but got {token:?}: \
         use --append for the kernel command line"
    );
    ExitCode::from(2)
}

/// Say once if arguments that went to a Linux program are also popek's
/// options, and how to give them to popek instead.
fn warn_shadowed_options(guest: &str, before: &[String], after: &[String]) {
    let cmd = Cli::command();
    let Some(run) = cmd.find_subcommand("run") else {
        return;
    };
    // popek's long options, and whether each takes a value.
    let popeks: Vec<(String, bool)> = run
        .get_arguments()
        .filter_map(|a| {
            let takes = a.get_action().takes_values()
                && a.get_num_args().is_none_or(|n| n.min_values() > 0);
            a.get_long().map(|l| (format!("--{l}"), takes))
        })
        .chain([
            ("--help".to_string(), false),
            ("--version".to_string(), false),
        ])
        .collect();
    let mut shadowed: Vec<&str> = Vec::new();
    for (i, a) in after.iter().enumerate() {
        let name = a.split('=').next().unwrap_or(a);
        if let Some((_, takes)) = popeks.iter().find(|(p, _)| p == name) {
            shadowed.push(a);
            if *takes && !a.contains('=') {
                if let Some(v) = after.get(i + 1) {
                    shadowed.push(v);
                }
            }
        }
    }
    if shadowed.is_empty() {
        return;
    }
    let opts = shadowed.join(" ");
    let mut before = before.get(1..).unwrap_or_default().to_vec();
    if before.first().is_some_and(|c| c == "run") {
        before.remove(0);
    }
    let lead = if before.is_empty() {
        String::new()
    } else {
        format!("{} ", before.join(" "))
    };
    eprintln!(
        "popek: {opts} after {guest} went to the program, as everything after a Linux program \
         does; for popek, put it before the program: popek run {lead}{opts} {guest} ..."
    );
}
