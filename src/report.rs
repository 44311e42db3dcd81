//! Progress for people: steps on stderr when `EC2_BACKUP_VERBOSE` is set. stdout is never
//! used here; it carries only the result.

use std::time::Instant;

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
            eprintln!(
                "ec2-backup [{:6.1}s] {message}",
                self.start.elapsed().as_secs_f64()
            );
        }
    }

    /// Something the user should hear about even without verbose mode.
    pub fn warn(&self, message: &str) {
        eprintln!("ec2-backup: warning: {message}");
    }
}
