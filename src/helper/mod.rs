//! Leasing a helper instance, for every command that needs one: its plan (decided before
//! anything is made), the lease (launch, attach, connect, watchdog heartbeats, hand back,
//! unwind), ssh with a pinned host key, the helper's user-data, keys, and the device (found,
//! and probed for what it holds).

pub mod device;
pub mod keys;
pub mod lease;
pub mod plan;
pub mod probe;
pub mod ssh;
pub mod userdata;
