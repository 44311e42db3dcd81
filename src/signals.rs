//! The signals that stop a run (SIGINT, SIGTERM, SIGHUP), as one stream of errors.

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::error::Error;

/// SIGINT, SIGTERM and SIGHUP, as one stream.
pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Self> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub async fn recv(&mut self) -> Error {
        let (name, number) = tokio::select! {
            _ = self.int.recv() => ("SIGINT", libc::SIGINT),
            _ = self.term.recv() => ("SIGTERM", libc::SIGTERM),
            _ = self.hup.recv() => ("SIGHUP", libc::SIGHUP),
        };
        Error::Interrupted { name, number }
    }
}
