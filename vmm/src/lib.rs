//! splitvisor: a KVM virtual machine monitor whose disk and network devices run outside it, as
//! vhost-user backend daemons. This crate is the VMM: CPU and memory through KVM, a few tiny
//! emulated devices, and the control plane of the vhost-user devices.

pub mod attach;
pub mod bench;
pub mod bench_net;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod config;
pub mod devices;
pub mod event_loop;
pub mod layout;
pub mod memory;
pub mod stats;
pub mod vcpu;
pub mod vhost_user;
pub mod virtio;
pub mod vm;
pub mod vm_end;
