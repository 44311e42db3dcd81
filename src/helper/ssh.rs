//! ssh to the helper: the system's OpenSSH, one multiplexed connection per run.
//!
//! The helper's host key is pinned: the tool generates it and hands it to the instance at
//! launch, so the run-private known_hosts holds the right key before the first connection
//! (never trust on first use, and the user's own known_hosts is never touched). A master
//! connection (ControlMaster) makes every later command cost one round trip instead of a
//! handshake. Every remote command is quoted by [`crate::quote::remote_command`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::process::{Child, Command};

use crate::flags::SshFlags;
use crate::quote::{remote_command, rsh_word, QuoteError};

#[derive(Debug, Error)]
pub enum SshError {
    #[error("could not run ssh: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the helper instance did not accept ssh within {secs} s ({last})")]
    NotReady { secs: u64, last: String },
    #[error("{what} failed on the helper instance: {detail}")]
    Remote { what: String, detail: String },
    #[error(transparent)]
    Quote(#[from] QuoteError),
    #[error("could not write the run's ssh files: {0}")]
    Files(#[source] std::io::Error),
}

/// How to reach one helper instance.
pub struct Session {
    host: String,
    options: Vec<OsString>,
    /// The master connection's socket (one per connection attempt, see [`Session::connect`]).
    control: PathBuf,
    workdir: PathBuf,
    master: Option<Child>,
}

fn control_path(control: &Path) -> OsString {
    let mut o = OsString::from("ControlPath=");
    o.push(control);
    o
}

/// One line saying why a master attempt ended.
async fn failure_of(mut child: Child, status: std::process::ExitStatus) -> String {
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = s.read_to_string(&mut err).await;
    }
    let err = err.trim();
    if err.is_empty() {
        format!("ssh exited with {status}")
    } else {
        last_line(err)
    }
}

impl Session {
    /// Prepares (without connecting) a session to `host` whose pinned host key is
    /// `host_key` (an OpenSSH public key line).
    pub fn new(
        host: &str,
        user: &str,
        workdir: &Path,
        identity: Option<&Path>,
        flags: &SshFlags,
        host_key: &str,
    ) -> Result<Self, SshError> {
        let known_hosts = workdir.join("known_hosts");
        std::fs::write(&known_hosts, format!("{host} {}\n", host_key.trim()))
            .map_err(SshError::Files)?;
        // The user's flags come first: ssh keeps the first value it sees for an option, so
        // they can override defaults such as the login user.
        let mut options: Vec<OsString> = flags.words.iter().map(OsString::from).collect();
        let opt = |o: &mut Vec<OsString>, v: String| {
            o.push("-o".into());
            o.push(v.into());
        };
        opt(&mut options, "BatchMode=yes".into());
        opt(&mut options, "StrictHostKeyChecking=yes".into());
        opt(
            &mut options,
            format!("UserKnownHostsFile={}", known_hosts.display()),
        );
        opt(&mut options, "GlobalKnownHostsFile=/dev/null".into());
        opt(&mut options, "HostKeyAlgorithms=ssh-ed25519".into());
        opt(&mut options, "ConnectTimeout=10".into());
        opt(&mut options, "ServerAliveInterval=10".into());
        opt(&mut options, "ServerAliveCountMax=3".into());
        // AES-GCM is the fastest cipher on hardware with AES instructions; the default list
        // stays as the fallback.
        opt(
            &mut options,
            "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com".into(),
        );
        opt(&mut options, "LogLevel=ERROR".into());
        if let Some(id) = identity {
            options.push("-i".into());
            options.push(id.into());
        }
        options.push("-l".into());
        options.push(user.into());
        Ok(Session {
            host: host.to_string(),
            options,
            control: workdir.join("control-0"),
            workdir: workdir.to_path_buf(),
            master: None,
        })
    }

    fn ssh(&self) -> Command {
        self.ssh_via(&self.control)
    }

    fn ssh_via(&self, control: &Path) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(&self.options);
        cmd.arg("-o").arg(control_path(control));
        detach_from_terminal_signals(&mut cmd);
        cmd.kill_on_drop(true);
        cmd
    }

    /// Connects the master, retrying while the instance boots, until `limit` passes.
    ///
    /// A booting helper refuses connections until its sshd starts, or (a cloud instance
    /// still pending) lets them hang unanswered: refused attempts are retried every 0.1 to
    /// 0.25 s, and an attempt that hangs for half a second gets a fresh one beside it (each
    /// with its own control socket; at most four, the oldest giving way once it is 5 s old,
    /// longer than a login takes even over a slow link), so that sshd is found soon after
    /// it starts whatever the connect timeout. The first to log in wins.
    pub async fn connect(&mut self, limit: Duration) -> Result<(), SshError> {
        let mut deadline = Instant::now() + limit;
        let mut refused_since: Option<Instant> = None;
        let mut attempts: Vec<(Child, PathBuf, Instant)> = Vec::new();
        let mut pause = Duration::from_millis(100);
        let mut next = Instant::now();
        let mut started = 0;
        let mut last = String::from("no answer");
        loop {
            if attempts.len() >= 4 && attempts[0].2.elapsed() >= Duration::from_secs(5) {
                attempts.remove(0);
            }
            if Instant::now() >= next && attempts.len() < 4 {
                started += 1;
                let (child, control) = self.start_master(started)?;
                attempts.push((child, control, Instant::now()));
                next = Instant::now() + Duration::from_millis(500);
            }
            let mut i = 0;
            while i < attempts.len() {
                let (child, control, _) = &mut attempts[i];
                let Some(status) = child.try_wait().map_err(SshError::Spawn)? else {
                    if control.exists() && self.master_op(control, "check").await {
                        let (child, control, _) = attempts.remove(i);
                        self.master = Some(child);
                        self.control = control;
                        // The other attempts are killed as they are dropped.
                        return Ok(());
                    }
                    i += 1;
                    continue;
                };
                let (child, _, _) = attempts.remove(i);
                last = failure_of(child, status).await;
                next = next.min(Instant::now() + pause);
                pause = (pause * 3 / 2).min(Duration::from_millis(250));
                // A helper that answers but refuses our key or shows another host key is
                // up: waiting the whole boot timeout would not help. A short grace covers
                // cloud-init still writing the keys.
                if is_refusal(&last) && refused_since.is_none() {
                    refused_since = Some(Instant::now());
                    deadline = deadline.min(Instant::now() + REFUSAL_GRACE);
                }
            }
            if Instant::now() >= deadline {
                return Err(SshError::NotReady {
                    secs: limit.as_secs(),
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts master attempt `n` on a control socket of its own.
    fn start_master(&self, n: u32) -> Result<(Child, PathBuf), SshError> {
        let control = self.workdir.join(format!("control-{n}"));
        let _ = std::fs::remove_file(&control);
        let child = self
            .ssh_via(&control)
            .args(["-o", "ControlMaster=yes", "-o", "ControlPersist=no", "-N"])
            .arg(&self.host)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(SshError::Spawn)?;
        Ok((child, control))
    }

    /// Sends `op` (`check`, `exit`) to the master behind `control`; whether it succeeded
    /// (for `check`: whether that master is logged in).
    async fn master_op(&self, control: &Path, op: &str) -> bool {
        self.ssh_via(control)
            .args(["-O", op])
            .arg(&self.host)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    }

    /// A command that runs `words` on the helper over the master connection.
    pub fn command<S: AsRef<str>>(&self, words: &[S]) -> Result<Command, SshError> {
        let remote = remote_command(words)?;
        let mut cmd = self.ssh();
        cmd.args(["-o", "ControlMaster=no"])
            .arg(&self.host)
            .arg(remote);
        Ok(cmd)
    }

    /// The program and arguments of [`Session::command`], for a task that outlives a borrow
    /// of the session.
    pub fn command_line<S: AsRef<str>>(
        &self,
        words: &[S],
    ) -> Result<(OsString, Vec<OsString>), SshError> {
        let cmd = self.command(words)?;
        let std = cmd.as_std();
        Ok((
            std.get_program().to_owned(),
            std.get_args().map(|a| a.to_owned()).collect(),
        ))
    }

    /// Runs `words` on the helper and returns its standard output; `what` names the step
    /// in the error. A step that takes longer than [`STEP_LIMIT`] fails.
    pub async fn run<S: AsRef<str>>(&self, what: &str, words: &[S]) -> Result<String, SshError> {
        self.run_for(what, words, STEP_LIMIT).await
    }

    /// [`Session::run`] with a deadline of its own: a helper that stops answering (a hung
    /// device, a dead link that ssh's keepalives have not noticed yet) fails the step, and the
    /// remote command's ssh is killed.
    pub async fn run_for<S: AsRef<str>>(
        &self,
        what: &str,
        words: &[S],
        limit: Duration,
    ) -> Result<String, SshError> {
        let output = self
            .command(words)?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output();
        let out = tokio::time::timeout(limit, output)
            .await
            .map_err(|_| SshError::Remote {
                what: what.to_string(),
                detail: format!("no answer within {} s", limit.as_secs()),
            })?
            .map_err(SshError::Spawn)?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        Err(SshError::Remote {
            what: what.to_string(),
            detail: describe_failure(out.status.code(), &String::from_utf8_lossy(&out.stderr)),
        })
    }

    /// The ssh command line for rsync's `-e`, quoted as rsync splits it.
    pub fn rsh(&self) -> Result<String, SshError> {
        let mut words = vec!["ssh".to_string()];
        for o in &self.options {
            words.push(rsh_word(&o.to_string_lossy())?);
        }
        words.push("-o".into());
        words.push(rsh_word(&control_path(&self.control).to_string_lossy())?);
        words.push("-o".into());
        words.push("ControlMaster=no".into());
        Ok(words.join(" "))
    }

    /// `user@host`-free remote spec for rsync: the host, bracketed when it is IPv6.
    pub fn rsync_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    /// Closes the master connection.
    pub async fn close(&mut self) {
        if let Some(mut master) = self.master.take() {
            self.master_op(&self.control, "exit").await;
            let _ = master.kill().await;
        }
    }
}

/// How long a quick remote step (finding the device, probing it) may take.
pub const STEP_LIMIT: Duration = Duration::from_secs(120);

/// How long a helper that refuses our key (or shows another host key) gets to change its mind.
const REFUSAL_GRACE: Duration = Duration::from_secs(45);

/// ssh's words for a server that is up but will not have us.
fn is_refusal(message: &str) -> bool {
    message.contains("Permission denied")
        || message.contains("Host key verification failed")
        || message.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || message.contains("Too many authentication failures")
}

/// A one-line description of a failed ssh command: ssh's own failures exit 255.
pub fn describe_failure(code: Option<i32>, stderr: &str) -> String {
    let text = last_line(stderr.trim());
    match code {
        Some(255) if text.is_empty() => "the ssh connection was lost".to_string(),
        Some(255) => format!("the ssh connection failed ({text})"),
        _ if text.is_empty() => match code {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_string(),
        },
        _ => text,
    }
}

fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Children run in their own process group, so a Ctrl-C at the terminal reaches only
/// ec2-backup, which then shuts them down in order (the ssh master must outlive the
/// interrupt to unmount the volume); and they die with ec2-backup if it is killed outright.
pub fn detach_from_terminal_signals(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_descriptions() {
        assert_eq!(
            describe_failure(Some(255), ""),
            "the ssh connection was lost"
        );
        assert_eq!(
            describe_failure(Some(255), "x\nConnection refused\n"),
            "the ssh connection failed (Connection refused)"
        );
        assert_eq!(describe_failure(Some(3), "  \n"), "exit status 3");
        assert_eq!(describe_failure(Some(1), "mount: bad\n"), "mount: bad");
    }

    #[test]
    fn user_flags_come_first_and_rsh_quotes() {
        let dir = tempfile::tempdir().unwrap();
        let flags = SshFlags {
            words: vec!["-i".into(), "/k with space".into()],
        };
        let s = Session::new(
            "10.0.0.1",
            "ec2-user",
            dir.path(),
            None,
            &flags,
            "ssh-ed25519 AAAA",
        )
        .unwrap();
        assert_eq!(s.options[0], "-i");
        let rsh = s.rsh().unwrap();
        assert!(
            rsh.starts_with("ssh -i '/k with space' -o BatchMode=yes"),
            "{rsh}"
        );
        let control = format!("-o ControlPath={}/control-0", dir.path().display());
        assert!(
            rsh.ends_with(&format!("-l ec2-user {control} -o ControlMaster=no")),
            "{rsh}"
        );
        let kh = std::fs::read_to_string(dir.path().join("known_hosts")).unwrap();
        assert_eq!(kh, "10.0.0.1 ssh-ed25519 AAAA\n");
        assert_eq!(s.rsync_host(), "10.0.0.1");
    }
}
