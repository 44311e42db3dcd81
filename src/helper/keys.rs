//! Keys: the AWS key pair the helper is launched with, the identities the user's ssh flags
//! name, and the helper's host key, which this tool makes so that it can be pinned.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

pub const DEFAULT_KEY_NAME: &str = "EC2-Backup-Key";

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("the key pair {name} exists in {region} but its private key is not at {path}; put it there, delete the key pair in AWS so that a new one is made, or (several hosts sharing one account) give each host a key pair of its own with EC2_BACKUP_FLAGS_AWS=\"--key-name NAME\" or an identity with EC2_BACKUP_FLAGS_SSH=\"-i FILE\"")]
    PrivateKeyMissing {
        name: String,
        region: String,
        path: PathBuf,
    },
    #[error("the key pair {name} named in EC2_BACKUP_FLAGS_AWS does not exist in {region}")]
    NoSuchKeyPair { name: String, region: String },
    #[error("could not read the public half of {path}: {detail}")]
    PublicHalf { path: PathBuf, detail: String },
    #[error("could not save the private key to {path}: {source}")]
    Save {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not make the helper's host key: {0}")]
    HostKey(String),
    #[error("could not make the key {path}: {detail}")]
    Generate { path: PathBuf, detail: String },
    #[error("another run has held the lock {path} for {secs} s; if no other ec2-backup is running, remove it")]
    Locked { path: PathBuf, secs: u64 },
    #[error("the key pair {name} was imported by another host at the same time; its private key is not here: give each host a key pair of its own with EC2_BACKUP_FLAGS_AWS=\"--key-name NAME\"")]
    Raced { name: String },
}

/// What to do about the launch key pair, decided before anything is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPlan {
    /// The key pair exists; log in with this identity (or whatever ssh finds by itself).
    Existing { identity: Option<PathBuf> },
    /// Make a key here and import its public half as the key pair.
    Create { path: PathBuf },
    /// Import the public half of this local key as the key pair.
    Import { path: PathBuf, public_key: String },
}

/// Decides the key plan. `named` is true when the user named the key pair.
pub fn plan(
    name: &str,
    named: bool,
    exists_in_aws: bool,
    home: &Path,
    region: &str,
) -> Result<KeyPlan, KeyError> {
    let path = home.join(".ssh").join(name);
    let local = [path.clone(), path.with_extension("pem")]
        .into_iter()
        .find(|p| p.is_file());
    match (exists_in_aws, local) {
        (true, Some(p)) => Ok(KeyPlan::Existing { identity: Some(p) }),
        (true, None) if named => Ok(KeyPlan::Existing { identity: None }),
        (true, None) => Err(KeyError::PrivateKeyMissing {
            name: name.to_string(),
            region: region.to_string(),
            path,
        }),
        (false, Some(p)) => {
            let public_key = public_half(&p)?;
            Ok(KeyPlan::Import {
                path: p,
                public_key,
            })
        }
        (false, None) if named => Err(KeyError::NoSuchKeyPair {
            name: name.to_string(),
            region: region.to_string(),
        }),
        (false, None) => Ok(KeyPlan::Create { path }),
    }
}

/// The OpenSSH public key line of a private key file (its `.pub` beside it, or derived).
pub fn public_half(private: &Path) -> Result<String, KeyError> {
    let mut pub_path = private.as_os_str().to_owned();
    pub_path.push(".pub");
    if let Ok(text) = fs::read_to_string(&pub_path) {
        if let Some(line) = text.lines().find(|l| !l.trim().is_empty()) {
            return Ok(line.trim().to_string());
        }
    }
    let out = Command::new("ssh-keygen")
        .args(["-y", "-P", "", "-f"])
        .arg(private)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| KeyError::PublicHalf {
            path: private.to_path_buf(),
            detail: e.to_string(),
        })?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || text.is_empty() {
        return Err(KeyError::PublicHalf {
            path: private.to_path_buf(),
            detail: format!(
                "{} (a passphrase-protected key needs its .pub file beside it)",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(text)
}

/// Holds `~/.ssh/.NAME.lock` (flock, exclusive) while a run makes or imports the key NAME:
/// runs started together on one host (cron entries at the same minute) take turns, and each
/// finds what the one before made. Released when dropped (and by the kernel if the process
/// dies).
pub struct KeyLock {
    _file: fs::File,
}

/// Takes the key lock, waiting up to `limit` for another run to finish with it.
pub async fn lock(
    ssh_dir: &Path,
    name: &str,
    limit: std::time::Duration,
) -> Result<KeyLock, KeyError> {
    use std::os::fd::AsRawFd;
    let path = ssh_dir.join(format!(".{name}.lock"));
    let err = |source| KeyError::Save {
        path: path.clone(),
        source,
    };
    make_ssh_dir(ssh_dir).map_err(err)?;
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(err)?;
    let started = std::time::Instant::now();
    loop {
        // SAFETY: flock on a descriptor this function owns; it touches no memory.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(KeyLock { _file: file });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err(e));
        }
        if started.elapsed() >= limit {
            return Err(KeyError::Locked {
                path,
                secs: limit.as_secs(),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn make_ssh_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Makes an ed25519 key at `path` (mode 0600, `.pub` beside it) unless one is there already,
/// and returns its public half and whether this call made it. The key is written whole under
/// a temporary name and then linked into place: a crash never leaves a partial key, and an
/// existing file is never replaced (link(2) fails where rename(2) would overwrite).
pub fn make_key(path: &Path) -> Result<(String, bool), KeyError> {
    let generate = |detail: String| KeyError::Generate {
        path: path.to_path_buf(),
        detail,
    };
    if path.is_file() {
        return Ok((public_half(path)?, false));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    make_ssh_dir(dir).map_err(|e| generate(e.to_string()))?;
    let temp = tempfile::Builder::new()
        .prefix(".ec2-backup-key.")
        .tempdir_in(dir)
        .map_err(|e| generate(e.to_string()))?;
    let fresh = temp.path().join("key");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "ec2-backup", "-f"])
        .arg(&fresh)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| generate(e.to_string()))?;
    if !out.status.success() {
        return Err(generate(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    fs::File::open(&fresh)
        .and_then(|f| f.sync_all())
        .map_err(|e| generate(e.to_string()))?;
    match fs::hard_link(&fresh, path) {
        Ok(()) => {
            // The public half is this key's: whatever .pub was there is stale.
            let mut pub_path = path.as_os_str().to_owned();
            pub_path.push(".pub");
            let _ = fs::rename(fresh.with_extension("pub"), &pub_path);
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| generate(e.to_string()))?;
            Ok((public_half(path)?, true))
        }
        // Made meanwhile by a run that does not take the lock (an older version): use it.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok((public_half(path)?, false)),
        Err(e) => Err(KeyError::Save {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// A fresh ed25519 host key for the helper: (private key text, public key line).
pub fn make_host_key(workdir: &Path) -> Result<(String, String), KeyError> {
    let path = workdir.join("helper_host_ed25519");
    let out = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "ec2-backup-helper",
            "-f",
        ])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| KeyError::HostKey(e.to_string()))?;
    if !out.status.success() {
        return Err(KeyError::HostKey(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let private = fs::read_to_string(&path).map_err(|e| KeyError::HostKey(e.to_string()))?;
    let public = public_half(&path)?;
    Ok((private, public))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_every_case() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        let key = h.join(".ssh").join(DEFAULT_KEY_NAME);
        // Nowhere: create it (default name) or refuse (a name the user gave).
        assert_eq!(
            plan(DEFAULT_KEY_NAME, false, false, h, "r").unwrap(),
            KeyPlan::Create { path: key.clone() }
        );
        assert!(matches!(
            plan("mine", true, false, h, "r"),
            Err(KeyError::NoSuchKeyPair { .. })
        ));
        // In AWS only: the default key's private half must be here.
        let e = plan(DEFAULT_KEY_NAME, false, true, h, "eu-west-1").unwrap_err();
        assert!(e.to_string().contains("eu-west-1"), "{e}");
        assert_eq!(
            plan("mine", true, true, h, "r").unwrap(),
            KeyPlan::Existing { identity: None }
        );
        // Here only: import it. Here and in AWS: use it.
        fs::create_dir_all(key.parent().unwrap()).unwrap();
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(st.success());
        match plan(DEFAULT_KEY_NAME, false, false, h, "r").unwrap() {
            KeyPlan::Import { path, public_key } => {
                assert_eq!(path, key);
                assert!(public_key.starts_with("ssh-ed25519 "));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            plan(DEFAULT_KEY_NAME, false, true, h, "r").unwrap(),
            KeyPlan::Existing {
                identity: Some(key)
            }
        );
    }

    #[test]
    fn made_keys_are_0600_whole_and_never_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".ssh/k");
        let (public, made) = make_key(&path).unwrap();
        assert!(made && public.starts_with("ssh-ed25519 "), "{public}");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        // A second call finds it and changes nothing; no temporary file is left.
        let before = fs::read(&path).unwrap();
        assert_eq!(make_key(&path).unwrap(), (public, false));
        assert_eq!(fs::read(&path).unwrap(), before);
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[tokio::test]
    async fn key_lock_makes_runs_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path(), "k", std::time::Duration::from_secs(5))
            .await
            .unwrap();
        let e = lock(dir.path(), "k", std::time::Duration::from_millis(200))
            .await
            .err()
            .expect("held");
        assert!(matches!(e, KeyError::Locked { .. }), "{e}");
        drop(first);
        assert!(lock(dir.path(), "k", std::time::Duration::from_millis(200))
            .await
            .is_ok());
    }

    #[test]
    fn host_keys_are_ed25519() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = make_host_key(dir.path()).unwrap();
        assert!(private.contains("OPENSSH PRIVATE KEY"));
        assert!(public.starts_with("ssh-ed25519 "));
    }
}
