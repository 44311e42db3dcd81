//! The ec2-backup binary: parse, run one command, report its result, exit.

use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use ec2_backup::cli::{Cli, Command, GcArgs};
use ec2_backup::commands::backup::{self, Done};
use ec2_backup::commands::gc::{self, GcOptions};
use ec2_backup::error::{exit, sentence, Error};
use ec2_backup::output;
use ec2_backup::report::say;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&usage_error(&e), exit::INPUT),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            return fail(
                &format!("cannot start the async runtime: {e}"),
                exit::FAILED,
            )
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            None => run_backup(cli.backup).await,
            Some(Command::Gc(args)) => run_gc(args).await,
        }
    });
    // A blocking task still stuck (a read in a hung mount) must not keep the process alive.
    runtime.shutdown_background();
    code
}

async fn run_backup(args: ec2_backup::cli::BackupArgs) -> ExitCode {
    let options = match backup::Options::new(args) {
        Ok(o) => o,
        Err(e) => return fail(&e.to_string(), e.exit_code()),
    };
    let (as_json, method) = (options.json, options.method);
    match backup::run(options).await {
        Ok(Done::DryRun(plan)) => print_or_fail(&output::dry_run(&plan, method, as_json)),
        Ok(Done::Backup(outcome)) => {
            if print(&output::backup(&outcome, as_json)).is_err() {
                return ExitCode::from(exit::FAILED as u8);
            }
            if !outcome.leftovers.is_empty() {
                return fail(
                    &format!(
                        "the backup on {} is complete, but cleanup could not finish: {}; remove them by hand",
                        outcome.volume_id,
                        outcome.leftovers.join(", ")
                    ),
                    exit::LEFTOVERS,
                );
            }
            if outcome.transfer.incomplete {
                return fail(&incomplete(&outcome), exit::INCOMPLETE);
            }
            ExitCode::SUCCESS
        }
        Err(failure) => failed(failure.error, &failure.leftovers),
    }
}

/// The final sentence of a backup that holds everything but some files.
fn incomplete(outcome: &backup::Outcome) -> String {
    match outcome.transfer.changed.first() {
        Some(first) => format!(
            "{} changed while it was read{} and its copy may be torn (named above); the backup is marked incomplete, everything else is on {}",
            first.display(),
            match outcome.transfer.changed.len() {
                1 => String::new(),
                n => format!(" (with {} more files)", n - 1),
            },
            outcome.volume_id
        ),
        None => format!(
            "some files could not be read (named above); everything else is on {}",
            outcome.volume_id
        ),
    }
}

/// A command that failed: its sentence, what cleanup left, and the status that goes with it.
fn failed(error: Error, leftovers: &[String]) -> ExitCode {
    let code = if leftovers.is_empty() {
        error.exit_code()
    } else {
        exit::LEFTOVERS
    };
    let mut message = error.to_string();
    if matches!(error, Error::Interrupted { .. }) && leftovers.is_empty() {
        message.push_str("; everything this run created was removed");
    }
    if !leftovers.is_empty() {
        message = format!(
            "{message}; cleanup could not finish: {}; remove them by hand (see 'ec2-backup -h')",
            leftovers.join(", ")
        );
    }
    fail(&message, code)
}

async fn run_gc(args: GcArgs) -> ExitCode {
    let options = GcOptions {
        yes: args.yes,
        older_than: std::time::Duration::from_secs(args.older_than.saturating_mul(3600)),
        verbose: ec2_backup::report::verbose_from_env(),
    };
    match gc::gc(&options).await {
        Ok(report) => {
            for line in &report.lines {
                if print(line).is_err() {
                    return ExitCode::from(exit::FAILED as u8);
                }
            }
            if report.lines.is_empty() {
                say("ec2-backup: nothing left behind by ec2-backup runs.");
            } else if !args.yes {
                say("ec2-backup: run 'ec2-backup gc --yes' to remove these.");
            }
            if report.leftovers.is_empty() {
                ExitCode::SUCCESS
            } else {
                fail(
                    &format!("gc could not remove: {}", report.leftovers.join(", ")),
                    exit::LEFTOVERS,
                )
            }
        }
        Err(e) => fail(&e.to_string(), e.exit_code()),
    }
}

/// clap's multi-line errors, as one sentence with the usage of the command it was about.
fn usage_error(e: &clap::Error) -> String {
    let first = match e.kind() {
        ErrorKind::MissingRequiredArgument
            if e.to_string().contains("<dir>") || e.to_string().contains(" dir") =>
        {
            "the directory to back up is missing".to_string()
        }
        _ => {
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .to_string();
            first.strip_prefix("error: ").unwrap_or(&first).to_string()
        }
    };
    let usage = e
        .to_string()
        .lines()
        .find_map(|l| l.trim().strip_prefix("Usage: ").map(str::to_string))
        .filter(|u| u.starts_with("ec2-backup ") && !u.starts_with("ec2-backup [-h]"))
        .unwrap_or_else(|| USAGE.to_string());
    format!("{first}; usage: {usage}")
}

/// The classic line, as usage errors repeat it.
const USAGE: &str = "ec2-backup [-h] [-m method] [-v volume-id] dir";

fn print_or_fail(text: &str) -> ExitCode {
    match print(text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(exit::FAILED as u8),
    }
}

fn print(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

fn fail(message: &str, code: i32) -> ExitCode {
    say(&format!("ec2-backup: {}", sentence(message)));
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
