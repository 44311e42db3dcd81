//! The two ways a directory reaches the volume: `dd` (a tar archive written raw at byte 0)
//! and `rsync` (a mirror on a filesystem).

pub mod archive;
pub mod dd;
pub mod direct;
pub mod rsync;
pub mod wire;

use std::path::PathBuf;

use thiserror::Error;

use crate::helper::ssh::SshError;
use crate::select::Selection;
use crate::walk::Rules;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Dd,
    Rsync,
}

impl Method {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "dd" => Some(Method::Dd),
            "rsync" => Some(Method::Rsync),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Dd => "dd",
            Method::Rsync => "rsync",
        }
    }

    /// Whether the volume carries a filesystem (and so has room taken by it).
    pub fn uses_filesystem(self) -> bool {
        self == Method::Rsync
    }
}

/// What a transfer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes written to the volume (dd: the archive's length).
    pub bytes: u64,
    /// SHA-256 of those bytes, hex, when the method streams a single archive.
    pub sha256: Option<String>,
    /// Some files could not be read, or changed while they were read: the backup holds
    /// everything else.
    pub incomplete: bool,
    /// Regular files that changed while they were read (their copies may be torn).
    pub changed: Vec<PathBuf>,
    /// How the data travelled ("plain" or "zstd"), for dd.
    pub wire: Option<&'static str>,
    /// Bytes that crossed the link (less than `bytes` when compressed).
    pub wire_bytes: u64,
}

/// Grows a pipe's buffer to 1 MiB (the most an unprivileged process may ask for by
/// default), so that the processes at its two ends run ahead of each other instead of in
/// 64 KiB lockstep. A refusal only costs speed.
pub(crate) fn widen_pipe(pipe: &impl std::os::fd::AsRawFd) {
    // SAFETY: fcntl on a descriptor the caller owns; F_SETPIPE_SZ takes an int and does not
    // touch memory.
    unsafe {
        libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
    }
}

/// Where the transfer gets its data, and the rules of the walk that decides what of it.
#[derive(Debug, Clone)]
pub struct Source {
    pub dir: PathBuf,
    pub rules: Rules,
}

impl Source {
    /// The source of `dir` (canonical) with `selection`, and the mount points below it as
    /// mounted now.
    pub fn new(dir: &std::path::Path, selection: &Selection) -> Source {
        Source {
            dir: dir.to_path_buf(),
            rules: Rules::new(dir, selection),
        }
    }
}

#[derive(Debug, Error)]
pub enum MethodError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("could not run {program}: {source}")]
    Spawn {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("the transfer to the helper instance was cut: {0}")]
    Cut(String),
    #[error("{0}")]
    Failed(String),
    #[error("the volume does not hold what was sent: the local archive's SHA-256 is {local} but the helper's hash of what it wrote to the volume is {remote}")]
    Mismatch { local: String, remote: String },
    /// What a `-v` volume holds, or its size, forbids writing it; nothing was written.
    #[error("{0}")]
    Refused(String),
    /// `--direct`: the archive reached the end of the snapshot it was being written into
    /// (sized from the walk); nothing was written past it.
    #[error("the archive is larger than the snapshot started for it")]
    Outgrown,
}
