//! The ec2-backup binary: parse, run one command, report its result, exit.

use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use ec2_backup::cli::{Cli, Command, GcArgs, PruneArgs, RestoreArgs, VerifyArgs};
use ec2_backup::commands::backup::{self, Done};
use ec2_backup::commands::gc::{self, GcOptions};
use ec2_backup::commands::prune::{self, PruneOptions};
use ec2_backup::commands::{list, restore, verify};
use ec2_backup::error::{exit, sentence, Error};
use ec2_backup::history::policy::Policy;
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
            Some(Command::Prune(args)) => run_prune(args).await,
            Some(Command::Restore(args)) => run_restore(args).await,
            Some(Command::Verify(args)) => run_verify(args).await,
            Some(Command::List(args)) => match list::run().await {
                Ok(entries) if args.json => print_or_fail(&list::json(&entries)),
                Ok(entries) => print_or_fail(&list::table(&entries)),
                Err(e) => fail(&e.to_string(), e.exit_code()),
            },
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
    let (as_json, method, history) = (options.json, options.method, options.history);
    match backup::run(options).await {
        Ok(Done::DryRun(plan)) => print_or_fail(&output::dry_run(&plan, method, history, as_json)),
        Ok(Done::DirectDryRun(plan)) => {
            print_or_fail(&output::direct_dry_run(&plan, history, as_json))
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
                return fail(&incomplete(&outcome), exit::INCOMPLETE);
            }
            ExitCode::SUCCESS
        }
        Err(failure) => {
            // The backup stands on its volume: stdout names it, as for a finished run.
            if let Error::NoSnapshot { volume_id, error } = &failure.error {
                let line = match as_json {
                    true => serde_json::json!({
                        "volume_id": volume_id,
                        "snapshot_id": null,
                        "error": sentence(&error.to_string()),
                    })
                    .to_string(),
                    false => volume_id.clone(),
                };
                if print(&line).is_err() {
                    return ExitCode::from(exit::FAILED as u8);
                }
            }
            failed(failure.error, &failure.leftovers)
        }
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

async fn run_restore(args: RestoreArgs) -> ExitCode {
    let to_stdout = args.dir.as_os_str() == "-";
    let options = restore::Options {
        source: args.source,
        dir: (!to_stdout).then_some(args.dir),
        paths: args.paths.into_iter().map(|p| p.into_os_string()).collect(),
    };
    let dir = options.dir.clone();
    match restore::run(options).await {
        Ok(done) if !done.leftovers.is_empty() => fail(
            &format!(
                "the restore is complete, but cleanup could not finish: {}; remove them by hand",
                done.leftovers.join(", ")
            ),
            exit::LEFTOVERS,
        ),
        Ok(done) if done.owners_lost => fail(
            &format!(
                "restored into {}, but not as root: the files belong to you, not to their recorded owners (run as root to keep them)",
                dir.unwrap_or_default().display()
            ),
            exit::INCOMPLETE,
        ),
        Ok(_) => ExitCode::SUCCESS,
        Err(failure) => failed(failure.error, &failure.leftovers),
    }
}

async fn run_verify(args: VerifyArgs) -> ExitCode {
    let options = match verify::Options::new(args) {
        Ok(o) => o,
        Err(e) => return fail(&e.to_string(), e.exit_code()),
    };
    match verify::run(options).await {
        Ok(done) => {
            for line in &done.differences {
                if print(line).is_err() {
                    return ExitCode::from(exit::FAILED as u8);
                }
            }
            // A difference outranks a cleanup that could not finish: the answer is the
            // point of the command (the leftovers are named either way).
            if !done.leftovers.is_empty() {
                say(&format!(
                    "ec2-backup: cleanup could not finish: {}; remove them by hand.",
                    done.leftovers.join(", ")
                ));
            }
            match (done.differences.is_empty(), done.leftovers.is_empty()) {
                (false, _) => fail(
                    &format!("{} differences (listed on stdout)", done.differences.len()),
                    exit::DIFFERENT,
                ),
                (true, false) => ExitCode::from(exit::LEFTOVERS as u8),
                (true, true) => ExitCode::SUCCESS,
            }
        }
        // Could not check: 1, whatever kind of failure (a usage error keeps its 2).
        Err(failure) => failed(failure.error, &failure.leftovers),
    }
}

async fn run_prune(args: PruneArgs) -> ExitCode {
    let options = PruneOptions {
        policy: Policy {
            last: args.keep_last,
            hourly: args.keep_hourly,
            daily: args.keep_daily,
            weekly: args.keep_weekly,
            monthly: args.keep_monthly,
            yearly: args.keep_yearly,
        },
        yes: args.yes,
        verbose: ec2_backup::report::verbose_from_env(),
    };
    match prune::prune(&options).await {
        Ok(report) => {
            for line in &report.lines {
                if print(line).is_err() {
                    return ExitCode::from(exit::FAILED as u8);
                }
            }
            let doomed = report.lines.iter().any(|l| !l.starts_with("keep "));
            if report.lines.is_empty() {
                say("ec2-backup: no backups made by ec2-backup to prune.");
            } else if doomed && !args.yes {
                say("ec2-backup: run again with --yes to delete these.");
            }
            if report.leftovers.is_empty() {
                ExitCode::SUCCESS
            } else {
                fail(
                    &format!("prune could not delete: {}", report.leftovers.join(", ")),
                    exit::LEFTOVERS,
                )
            }
        }
        Err(e) => fail(&e.to_string(), e.exit_code()),
    }
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
