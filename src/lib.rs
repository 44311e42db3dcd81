//! ec2-backup: back up a local directory into an Amazon EBS volume.
//!
//! The flow of a run, one module each: [`prepare`] (options, the directory's [`plan`], cloud
//! lookups that can still refuse) → [`cloud`] (EC2 behind a trait) → [`ssh`] to the helper and
//! [`device`] discovery → a [`method`] (`dd` or `rsync`) → [`ledger`] (one undo list, unwound on
//! failure or signal). [`run`] ties them together; the binary only parses and reports.

pub mod cli;
pub mod cloud;
pub mod cost;
pub mod device;
pub mod error;
pub mod flags;
pub mod gc;
pub mod keys;
pub mod ledger;
pub mod method;
pub mod output;
pub mod plan;
pub mod prepare;
pub mod probe;
pub mod quote;
pub mod report;
pub mod run;
pub mod signals;
pub mod ssh;
pub mod tags;
pub mod userdata;
