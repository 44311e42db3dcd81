//! Errors as users read them: one sentence each, and the exit status that goes with it.

use thiserror::Error;

use crate::cloud::CloudError;
use crate::flags::FlagsError;
use crate::helper::keys::KeyError;
use crate::helper::ssh::SshError;
use crate::method::MethodError;
use crate::select::SelectError;
use crate::walk::PlanError;

/// Exit statuses (documented in the README).
pub mod exit {
    /// The backup is complete and the volume ID was printed.
    pub const OK: i32 = 0;
    /// The backup failed; everything this run created was removed.
    pub const FAILED: i32 = 1;
    /// Bad input (usage, directory, volume, flags, keys); nothing was created.
    pub const INPUT: i32 = 2;
    /// Some files could not be read; the rest is on the volume, whose ID was printed.
    pub const INCOMPLETE: i32 = 3;
    /// The run failed and cleanup could not remove everything it created (listed on stderr).
    pub const LEFTOVERS: i32 = 4;
    /// `verify`: the backup and the directory differ (each difference on stdout).
    pub const DIFFERENT: i32 = 5;
    /// `--snapshot`: the backup is on the volume (its ID printed), but its snapshot failed
    /// and was removed.
    pub const NO_SNAPSHOT: i32 = 6;
}

#[derive(Debug, Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Flags(#[from] FlagsError),
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Bad input found by looking in the cloud (volume, zone, instance type).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(transparent)]
    Method(#[from] MethodError),
    #[error("interrupted by {name}")]
    Interrupted { name: &'static str, number: i32 },
    /// The backup is complete on `volume_id`, but its snapshot failed (or the run was
    /// interrupted while waiting for it); the snapshot was removed, the volume stands.
    #[error("{error}; the backup is complete on {volume_id}, without a snapshot")]
    NoSnapshot {
        volume_id: String,
        error: Box<Error>,
    },
    /// A restore that stopped after it began writing: what is in `dir` is partial.
    #[error("{error}; {} holds a partial restore", dir.display())]
    Partial {
        error: Box<Error>,
        dir: std::path::PathBuf,
    },
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_)
            | Error::Plan(_)
            | Error::Flags(_)
            | Error::Select(_)
            | Error::Invalid(_) => exit::INPUT,
            Error::Key(KeyError::Save { .. } | KeyError::HostKey(_)) => exit::FAILED,
            Error::Key(_) => exit::INPUT,
            Error::Interrupted { number, .. } => 128 + number,
            Error::Partial { error, .. } => error.exit_code(),
            Error::NoSnapshot { error, .. } => match **error {
                Error::Interrupted { number, .. } => 128 + number,
                _ => exit::NO_SNAPSHOT,
            },
            _ => exit::FAILED,
        }
    }
}

/// A command that failed after it began: the error, and what cleanup could not remove.
#[derive(Debug)]
pub struct Failure {
    pub error: Error,
    pub leftovers: Vec<String>,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure {
            error,
            leftovers: Vec::new(),
        }
    }
}

/// Makes a message one sentence: a capital first letter and a full stop.
pub fn sentence(text: &str) -> String {
    let text = text.trim();
    let mut chars = text.chars();
    let mut out = match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect::<String>(),
        None => return String::new(),
    };
    if !out.ends_with(['.', '!', '?']) {
        out.push('.');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences() {
        assert_eq!(sentence("the volume is gone"), "The volume is gone.");
        assert_eq!(sentence("Done."), "Done.");
        assert_eq!(sentence(""), "");
    }

    #[test]
    fn input_errors_exit_2_and_signals_128_plus() {
        assert_eq!(Error::Usage("x".into()).exit_code(), 2);
        assert_eq!(Error::Invalid("x".into()).exit_code(), 2);
        assert_eq!(
            Error::Interrupted {
                name: "SIGINT",
                number: 2
            }
            .exit_code(),
            130
        );
        assert_eq!(Error::Cloud(CloudError::new("x", "y")).exit_code(), 1);
    }
}
