//! One module per command, each the short story of its steps; the shared parts live in
//! [`crate::helper`] (leasing a helper), [`crate::method`] (the on-volume formats) and
//! [`crate::cloud`].

pub mod backup;
pub mod gc;
pub mod list;
pub mod prune;
pub mod restore;
pub mod source;
pub mod verify;
