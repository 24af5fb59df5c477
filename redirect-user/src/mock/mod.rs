//! Built-in metadata services, served instead of forwarding when `--mock` is given.

pub mod ec2;
mod token;
