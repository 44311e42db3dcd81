//! The ec2-backup binary: parse, run, report one line, exit.

use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use ec2_backup::cli::{Cli, GcCli};
use ec2_backup::error::{exit, sentence, Error};
use ec2_backup::gc::GcOptions;
use ec2_backup::output;
use ec2_backup::prepare::Options;
use ec2_backup::report::say;
use ec2_backup::run::{self, Done};

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "gc") {
        return gc(&args[1..]);
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&usage_error(&e, USAGE), exit::INPUT),
    };
    let options = match Options::new(cli) {
        Ok(o) => o,
        Err(e) => return fail(&e.to_string(), e.exit_code()),
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let as_json = options.json;
    let method = options.method;
    let result = runtime.block_on(run::run(options));
    // A blocking task still stuck (a read in a hung mount) must not keep the process alive.
    runtime.shutdown_background();
    match result {
        Ok(Done::DryRun(plan)) => {
            if print(&output::dry_run(&plan, method, as_json)).is_err() {
                return ExitCode::from(exit::FAILED as u8);
            }
            ExitCode::SUCCESS
        }
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
                let what = match outcome.transfer.changed.first() {
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
                };
                return fail(&what, exit::INCOMPLETE);
            }
            ExitCode::SUCCESS
        }
        Err(failure) => {
            let code = if failure.leftovers.is_empty() {
                failure.error.exit_code()
            } else {
                exit::LEFTOVERS
            };
            let mut message = failure.error.to_string();
            if matches!(failure.error, Error::Interrupted { .. }) && failure.leftovers.is_empty() {
                message.push_str("; everything this run created was removed");
            }
            if !failure.leftovers.is_empty() {
                message = format!(
                    "{message}; cleanup could not finish: {}; remove them by hand (see 'ec2-backup -h')",
                    failure.leftovers.join(", ")
                );
            }
            fail(&message, code)
        }
    }
}

fn gc(args: &[std::ffi::OsString]) -> ExitCode {
    let cli = match GcCli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&usage_error(&e, GC_USAGE), exit::INPUT),
    };
    let options = GcOptions {
        yes: cli.yes,
        older_than: std::time::Duration::from_secs(cli.older_than.saturating_mul(3600)),
        verbose: ec2_backup::report::verbose_from_env(),
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let result = runtime.block_on(ec2_backup::gc::gc(&options));
    runtime.shutdown_background();
    match result {
        Ok(report) => {
            for line in &report.lines {
                if print(line).is_err() {
                    return ExitCode::from(exit::FAILED as u8);
                }
            }
            if report.lines.is_empty() {
                say("ec2-backup: nothing left behind by ec2-backup runs.");
            } else if !cli.yes {
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

/// clap's multi-line errors, as one sentence.
const USAGE: &str = "ec2-backup [-h] [-m method] [-v volume-id] dir";
const GC_USAGE: &str = "ec2-backup gc [--yes] [--older-than HOURS]";

fn usage_error(e: &clap::Error, usage: &str) -> String {
    let first = match e.kind() {
        ErrorKind::MissingRequiredArgument => "the directory to back up is missing".to_string(),
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
    format!("{first}; usage: {usage}")
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Runtime::new().map_err(|e| {
        fail(
            &format!("cannot start the async runtime: {e}"),
            exit::FAILED,
        )
    })
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
