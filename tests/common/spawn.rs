//! A live `ec2-backup` run for the reliability tests: stderr is read line by line in a thread,
//! so a test can wait for a step line (a marker) and then act (send a signal, cut the ssh
//! sessions, ...) while the run is in that phase; then the outcome is collected.
//!
//! A run still alive when its `Live` is dropped (a failing test) gets SIGTERM, time to clean
//! up, and SIGKILL only after that, so one failure does not leave helpers running for the next.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the reader thread has seen on stderr so far.
#[derive(Default)]
struct Seen {
    lines: Vec<String>,
    closed: bool,
}

pub struct Live {
    child: Option<Child>,
    seen: Arc<(Mutex<Seen>, Condvar)>,
    stderr_reader: Option<JoinHandle<()>>,
    stdout_reader: Option<JoinHandle<String>>,
}

/// How a run ended.
#[derive(Debug)]
pub struct Ended {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Live {
    /// Starts `cmd` with stdout and stderr piped (stdin closed).
    pub fn start(cmd: &mut Command) -> Live {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ec2-backup starts");
        let seen: Arc<(Mutex<Seen>, Condvar)> = Arc::default();
        let err = child.stderr.take().expect("piped");
        let s = Arc::clone(&seen);
        let stderr_reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(err);
            loop {
                let mut buf = Vec::new();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches('\n')
                            .to_string();
                        let (lock, cv) = &*s;
                        lock.lock().unwrap().lines.push(line);
                        cv.notify_all();
                    }
                }
            }
            let (lock, cv) = &*s;
            lock.lock().unwrap().closed = true;
            cv.notify_all();
        });
        let mut out = child.stdout.take().expect("piped");
        let stdout_reader = std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = out.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        });
        Live {
            child: Some(child),
            seen,
            stderr_reader: Some(stderr_reader),
            stdout_reader: Some(stdout_reader),
        }
    }

    /// Whether the run is still going (its stderr is still open).
    pub fn running(&self) -> bool {
        !self.seen.0.lock().unwrap().closed
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// The stderr lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.seen.0.lock().unwrap().lines.clone()
    }

    /// Waits until the `n`th (1-based) stderr line containing `marker` appears and returns it.
    /// Panics (showing stderr so far) if the run ends first or `limit` passes.
    pub fn wait_for_nth(&self, marker: &str, n: usize, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let (lock, cv) = &*self.seen;
        let mut seen = lock.lock().unwrap();
        loop {
            if let Some(line) = seen.lines.iter().filter(|l| l.contains(marker)).nth(n - 1) {
                return line.clone();
            }
            let now = Instant::now();
            if seen.closed || now >= deadline {
                panic!(
                    "{} before the marker {marker:?} (#{n}); stderr so far:\n{}",
                    if seen.closed {
                        "the run ended"
                    } else {
                        "timed out"
                    },
                    seen.lines.join("\n")
                );
            }
            seen = cv.wait_timeout(seen, deadline - now).unwrap().0;
        }
    }

    /// Waits for the first stderr line containing `marker`.
    pub fn wait_for(&self, marker: &str, limit: Duration) -> String {
        self.wait_for_nth(marker, 1, limit)
    }

    /// Sends `sig` to the run (only to its own process, as `kill PID` would).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a child's PID we have not reaped yet.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid());
    }

    /// Waits for the run to end (at most `limit`; then it is killed and the test fails).
    pub fn finish(mut self, limit: Duration) -> Ended {
        let start = Instant::now();
        let mut child = self.child.take().expect("running");
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break st;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "ec2-backup did not end within {limit:?}; stderr:\n{}",
                    self.lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The pipes close when the process and every child holding them are gone; a child
        // that outlives the run must not hang the test, so this waits a bounded time.
        let out_reader = self.stdout_reader.take().unwrap();
        let err_reader = self.stderr_reader.take().unwrap();
        let settle = Instant::now();
        while !(out_reader.is_finished() && err_reader.is_finished())
            && settle.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let stdout = if out_reader.is_finished() {
            out_reader.join().unwrap()
        } else {
            "<stdout still open: a child of ec2-backup outlived it>".to_string()
        };
        let mut stderr = self.lines().join("\n");
        if !stderr.is_empty() {
            stderr.push('\n');
        }
        Ended {
            status,
            stdout,
            stderr,
            took: start.elapsed(),
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: as in `signal`.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Ended {
    /// The exit code when the process exited (not killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }

    /// The last stderr line: the final message of a failed run.
    pub fn last_line(&self) -> &str {
        self.stderr.lines().last().unwrap_or("")
    }

    /// The first word after `prefix` in a step line (e.g. `launched ` → the instance ID).
    pub fn id_after(&self, prefix: &str) -> Option<String> {
        id_after(&self.stderr, prefix)
    }

    /// The volume the run created (from the verbose `created vol-… (N GiB)` step).
    pub fn created_volume(&self) -> Option<String> {
        self.id_after("] created vol-")
            .map(|rest| format!("vol-{rest}"))
    }

    /// The helper instance the run launched (from the verbose `launched i-…` step).
    pub fn launched_instance(&self) -> Option<String> {
        self.id_after("] launched i-")
            .map(|rest| format!("i-{rest}"))
    }

    /// A description for assertion messages.
    pub fn show(&self) -> String {
        format!(
            "status {:?} (signal {:?}) after {:?}\nstdout: {:?}\nstderr:\n{}",
            self.status.code(),
            self.status.signal(),
            self.took,
            self.stdout,
            self.stderr
        )
    }
}

/// The first whitespace-delimited word after `prefix` anywhere in `text`.
pub fn id_after(text: &str, prefix: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let at = l.find(prefix)?;
        l[at + prefix.len()..]
            .split(|c: char| c.is_whitespace() || c == ':' || c == ',')
            .next()
            .filter(|w| !w.is_empty())
            .map(str::to_string)
    })
}
