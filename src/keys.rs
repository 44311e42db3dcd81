//! Keys: the AWS key pair the helper is launched with, the identities the user's ssh flags
//! name, and the helper's host key, which this tool makes so that it can be pinned.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

pub const DEFAULT_KEY_NAME: &str = "EC2-Backup-Key";

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("the key pair {name} exists in {region} but its private key is not at {path}; put it there, delete the key pair in AWS so that a new one is made, or name another with EC2_BACKUP_FLAGS_AWS=\"--key-name NAME\"")]
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
}

/// What to do about the launch key pair, decided before anything is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPlan {
    /// The key pair exists; log in with this identity (or whatever ssh finds by itself).
    Existing { identity: Option<PathBuf> },
    /// Create the key pair and save its private key here.
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

/// Saves a private key with mode 0600, refusing to overwrite an existing file.
pub fn save_private_key(path: &Path, pem: &str) -> Result<(), KeyError> {
    let err = |source| KeyError::Save {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    let mut text = pem.trim_end().to_string();
    text.push('\n');
    file.write_all(text.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)
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
    fn private_keys_are_0600_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".ssh/k");
        save_private_key(&path, "PEM").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        assert!(save_private_key(&path, "OTHER").is_err());
        assert_eq!(fs::read_to_string(&path).unwrap(), "PEM\n");
    }

    #[test]
    fn host_keys_are_ed25519() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = make_host_key(dir.path()).unwrap();
        assert!(private.contains("OPENSSH PRIVATE KEY"));
        assert!(public.starts_with("ssh-ed25519 "));
    }
}
