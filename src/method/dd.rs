//! `dd`: the directory becomes a POSIX (pax) tar archive, streamed from here over ssh and
//! written raw onto the device from byte 0. The pax format carries long names, large and
//! sparse files, hard links, symlinks, numeric owners, ACLs, xattrs and names that are not
//! UTF-8. The stream passes through this process so that its length and SHA-256 are known
//! here; the helper hashes the very bytes it writes, and the two must agree.

use std::process::Stdio;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{MethodError, Source, Transfer};
use crate::quote::glob_escape;
use crate::ssh::{describe_failure, detach_from_terminal_signals, Session};

/// Writes stdin to the device, fsyncs it, and prints the SHA-256 of what it wrote. OpenSSL's
/// digest uses the CPU's SHA instructions (5x coreutils' sha256sum here), so it is preferred.
const WRITE_SCRIPT: &str = r#"set -euo pipefail
if command -v openssl >/dev/null 2>&1; then digest() { openssl dgst -sha256 -r; }
else digest() { sha256sum; }; fi
tee -- "$1" | digest
sync -- "$1"
"#;

/// The local tar command for `source`.
pub fn tar_command(source: &Source) -> Command {
    let mut cmd = Command::new("tar");
    cmd.arg("--create")
        .arg("--file=-")
        .arg("--directory")
        .arg(&source.dir)
        .args([
            "--format=posix",
            "--numeric-owner",
            "--sparse",
            "--acls",
            "--xattrs",
            "--xattrs-include=*",
            "--anchored",
            "--warning=no-file-ignored",
        ]);
    for skip in &source.skip_contents_of {
        cmd.arg(format!("--exclude=./{}/*", glob_escape(skip)));
    }
    cmd.arg(".");
    cmd
}

pub async fn backup(
    ssh: &Session,
    source: &Source,
    device: &str,
    progress: &indicatif::ProgressBar,
) -> Result<Transfer, MethodError> {
    let mut tar = tar_command(source);
    detach_from_terminal_signals(&mut tar);
    let mut tar = tar
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| MethodError::Spawn {
            program: "tar",
            source: e,
        })?;
    let mut writer = ssh
        .command(&["sudo", "-n", "bash", "-c", WRITE_SCRIPT, "write", device])?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| MethodError::Spawn {
            program: "ssh",
            source: e,
        })?;

    let mut from_tar = tar.stdout.take().expect("piped");
    let mut to_helper = writer.stdin.take().expect("piped");
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut cut = None;
    loop {
        let n = from_tar
            .read(&mut buf)
            .await
            .map_err(|e| MethodError::Failed(format!("reading from tar failed: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
        progress.inc(n as u64);
        if let Err(e) = to_helper.write_all(&buf[..n]).await {
            cut = Some(e.to_string());
            break;
        }
    }
    drop(to_helper);
    progress.finish_and_clear();
    let local = hex::encode(hasher.finalize());

    let out = writer
        .wait_with_output()
        .await
        .map_err(|e| MethodError::Failed(format!("waiting for ssh failed: {e}")))?;
    if !out.status.success() || cut.is_some() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let _ = tar.kill().await;
        if stderr.contains("No space left") {
            return Err(MethodError::Failed(format!(
                "the archive ({bytes} bytes so far) does not fit on the volume"
            )));
        }
        return Err(MethodError::Cut(describe_failure(
            out.status.code(),
            &stderr,
        )));
    }
    let status = tar
        .wait()
        .await
        .map_err(|e| MethodError::Failed(format!("waiting for tar failed: {e}")))?;
    // GNU tar: 1 = a file changed while it was read (the archive is still whole);
    // 2 = some files could not be read (the archive holds the rest).
    let incomplete = match status.code() {
        Some(0) | Some(1) => false,
        Some(2) => true,
        _ => return Err(MethodError::Failed(format!("tar failed ({status})"))),
    };
    let remote = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    if remote != local {
        return Err(MethodError::Mismatch { local, remote });
    }
    Ok(Transfer {
        bytes,
        sha256: Some(local),
        incomplete,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_excludes_pseudo_mount_contents_literally() {
        let source = Source {
            dir: "/".into(),
            skip_contents_of: vec!["proc".into(), "odd*[dir]".into()],
        };
        let cmd = tar_command(&source);
        let args: Vec<_> = cmd
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.contains(&"--exclude=./proc/*".to_string()));
        assert!(args.contains(&"--exclude=./odd\\*\\[dir\\]/*".to_string()));
        assert_eq!(args.last().map(String::as_str), Some("."));
        let dot = args.iter().position(|a| a == ".").unwrap();
        assert!(
            args.iter()
                .position(|a| a.starts_with("--exclude"))
                .unwrap()
                < dot
        );
    }
}
