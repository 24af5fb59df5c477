//! Embeds the eBPF object that `cargo xtask build-ebpf` builds. The eBPF crate needs nightly,
//! `-Z build-std` and bpf-linker, which a plain `cargo build` cannot provide, so this script
//! only finds the object and says what to run when it is missing.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo::rerun-if-env-changed=REDIRECT_EBPF_OBJECT");
    let object = env::var_os("REDIRECT_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
            manifest.join("../target/ebpf/bpfel-unknown-none/release/redirect-ebpf")
        });
    if !object.is_file() {
        println!(
            "cargo::error=the eBPF object {} is missing: run `cargo xtask build-ebpf` first \
             (or build everything with `cargo xtask build`)",
            object.display()
        );
        return;
    }
    let object = object.canonicalize().expect("the object exists");
    println!("cargo::rerun-if-changed={}", object.display());
    println!("cargo::rustc-env=REDIRECT_EBPF_OBJECT={}", object.display());
}
