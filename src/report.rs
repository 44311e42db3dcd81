//! Progress for people: steps on stderr when `EC2_BACKUP_VERBOSE` is set. stdout is never
//! used here; it carries only the result.

use std::io::Write;
use std::time::Instant;

/// Writes a line to stderr. A closed or broken stderr (`2>&1 | head`) must never stop a run
/// halfway (eprintln! would panic and skip the cleanup), so write errors are ignored.
pub fn say(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// Whether `EC2_BACKUP_VERBOSE` asks for steps (set and not empty).
pub fn verbose_from_env() -> bool {
    std::env::var_os("EC2_BACKUP_VERBOSE").is_some_and(|v| !v.is_empty())
}

#[derive(Clone)]
pub struct Reporter {
    verbose: bool,
    start: Instant,
}

impl Reporter {
    pub fn new(verbose: bool) -> Self {
        Reporter {
            verbose,
            start: Instant::now(),
        }
    }

    pub fn step(&self, message: &str) {
        if self.verbose {
            say(&format!(
                "ec2-backup [{:6.1}s] {message}",
                self.start.elapsed().as_secs_f64()
            ));
        }
    }

    /// Something the user should hear about even without verbose mode.
    pub fn warn(&self, message: &str) {
        say(&format!("ec2-backup: warning: {message}"));
    }
}
