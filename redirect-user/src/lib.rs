//! `redirect`: makes the cloud instance-metadata service work for every process and container
//! on a Linux host, without iptables. See README.md. The binary (`main.rs`) is the command
//! line over these modules; the fuzz targets use the proxy from here.

pub mod caller;
pub mod cgroup;
pub mod config;
pub mod control;
pub mod daemon;
pub mod docker;
pub mod ebpf;
pub mod handover;
pub mod host_callers;
pub mod metrics;
pub mod mock;
pub mod netns;
pub mod paths;
pub mod policy;
pub mod privileges;
pub mod proxy;
pub mod rlimit;
pub mod router;
pub mod selftest;
pub mod sock_diag;
pub mod status;
