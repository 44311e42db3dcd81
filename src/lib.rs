//! ec2-backup: back up a local directory into an Amazon EBS volume, and read it back.
//!
//! The folders follow the flow of a command: [`commands`] (one per command: backup, gc, …)
//! → [`helper`] (deciding and leasing a helper instance with a volume attached: launch,
//! ssh, device, watchdog) → [`method`] (the two on-volume formats, `dd` and `rsync`) → the
//! [`cloud`] (EC2 behind a narrow trait) and the [`ledger`] (one undo list, unwound on
//! failure or signal). [`select`] decides what of a directory a backup holds (excludes, one filesystem) and
//! [`walk`] walks it by those rules (sizing it, listing it for tar); [`tags`] is the tag
//! schema. The binary
//! only parses, calls one command and maps its error to an exit status.

pub mod cli;
pub mod cloud;
pub mod commands;
pub mod cost;
pub mod error;
pub mod flags;
pub mod helper;
pub mod history;
pub mod ledger;
pub mod method;
pub mod output;
pub mod quote;
pub mod report;
pub mod select;
pub mod signals;
pub mod tags;
pub mod walk;
