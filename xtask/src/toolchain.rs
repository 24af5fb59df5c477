//! What building the eBPF object needs, installed on demand: `rust-src` for the nightly
//! toolchain and a `bpf-linker` built against that toolchain's own LLVM.
//!
//! bpf-linker must read the bitcode rustc emits, so its LLVM has to be the one inside the
//! nightly toolchain. No system LLVM of that version exists on these machines, but the toolchain
//! ships `lib/libLLVM-<major>-rust-<version>.so`; we build bpf-linker against that library
//! (see `../shared/reference/ebpf-notes.md`). Everything is derived from `rustc -vV` and the
//! sysroot, and the linker is cached per (bpf-linker version, LLVM major, nightly commit), so a
//! toolchain update rebuilds it.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{output, run};

/// The bpf-linker release we build. 0.13 is the first with an `llvm-22` feature; bump it
/// together with the nightly toolchain when a newer LLVM needs it.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Toolchain used for the eBPF crate; override with `REDIRECT_EBPF_TOOLCHAIN`.
pub fn ebpf_toolchain() -> String {
    env::var("REDIRECT_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_owned())
}

/// Facts about the nightly toolchain that the linker build depends on.
#[derive(Debug)]
pub struct Nightly {
    pub commit: String,
    pub llvm_major: u32,
    /// Directory holding the toolchain's `libLLVM-*.so`.
    pub lib_dir: PathBuf,
    /// Link name of that library, e.g. `LLVM-22-rust-1.97.0-nightly`.
    pub llvm_lib: String,
}

impl Nightly {
    pub fn probe(toolchain: &str) -> Result<Self> {
        let version = output(
            Command::new("rustc")
                .arg(format!("+{toolchain}"))
                .arg("-vV"),
        )
        .with_context(|| {
            format!(
                "the `{toolchain}` Rust toolchain is needed for the eBPF crate; \
                     install it with `rustup toolchain install {toolchain}`"
            )
        })?;
        let field = |name: &str| {
            version
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
                .with_context(|| format!("`rustc +{toolchain} -vV` printed no `{name}` line"))
        };
        let commit = field("commit-hash:")?;
        let llvm = field("LLVM version:")?;
        let llvm_major: u32 = llvm
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .with_context(|| format!("cannot parse LLVM version {llvm:?}"))?;
        let sysroot = output(
            Command::new("rustc")
                .arg(format!("+{toolchain}"))
                .args(["--print", "sysroot"]),
        )?;
        let lib_dir = Path::new(sysroot.trim()).join("lib");
        let prefix = format!("libLLVM-{llvm_major}-");
        let llvm_lib = fs::read_dir(&lib_dir)
            .with_context(|| format!("reading {}", lib_dir.display()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find_map(|name| {
                name.strip_prefix("lib")
                    .filter(|_| name.starts_with(&prefix))
                    .and_then(|n| n.strip_suffix(".so"))
                    .map(str::to_owned)
            })
            .with_context(|| {
                format!(
                    "no {prefix}*.so in {}: this toolchain does not ship the LLVM library \
                     bpf-linker is built against",
                    lib_dir.display()
                )
            })?;
        Ok(Nightly {
            commit,
            llvm_major,
            lib_dir,
            llvm_lib,
        })
    }
}

/// `rustup component add rust-src` for the toolchain, unless already installed.
pub fn ensure_rust_src(toolchain: &str) -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask: installing rust-src for the {toolchain} toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", toolchain]))
}

fn cache_root() -> PathBuf {
    if let Some(dir) = env::var_os("REDIRECT_TOOL_CACHE") {
        return PathBuf::from(dir);
    }
    let base = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("redirect")
}

/// Returns the directory holding a `bpf-linker` that matches `nightly`, building it when the
/// cache has none (about a minute).
pub fn ensure_bpf_linker(nightly: &Nightly) -> Result<PathBuf> {
    let short_commit = &nightly.commit[..nightly.commit.len().min(12)];
    let key = format!(
        "bpf-linker-{BPF_LINKER_VERSION}-llvm{}-{short_commit}",
        nightly.llvm_major
    );
    let root = cache_root().join(&key);
    let bin_dir = root.join("bin");
    let linker = bin_dir.join("bpf-linker");
    if linker.is_file()
        && Command::new(&linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Ok(bin_dir);
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {} (LLVM {}), into {}",
        nightly.llvm_lib,
        nightly.llvm_major,
        root.display()
    );
    let staging = cache_root().join(format!("{key}.partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let lib_dir = nightly.lib_dir.display();
    let rustflags = format!(
        "-L {lib_dir} -l dylib={} -C link-arg=-Wl,-rpath,{lib_dir}",
        nightly.llvm_lib
    );
    let result = run(Command::new("cargo")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .env("RUSTFLAGS", rustflags)
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{},no-llvm-linking", nightly.llvm_major))
        .arg("--root")
        .arg(&staging));
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&staging);
        return Err(e.context("building bpf-linker"));
    }
    let _ = fs::remove_dir_all(&root);
    fs::rename(&staging, &root)
        .with_context(|| format!("moving {} to {}", staging.display(), root.display()))?;
    if !linker.is_file() {
        bail!(
            "bpf-linker build finished but {} is missing",
            linker.display()
        );
    }
    Ok(bin_dir)
}

/// The cargo-fuzz release `cargo xtask fuzz` installs.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// A `bin` directory holding cargo-fuzz, installed into the cache when missing.
/// cargo-deb, for `cargo xtask deb`: installed from crates.io into the tool cache once.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

pub fn ensure_cargo_deb() -> Result<PathBuf> {
    let root = cache_root().join(format!("cargo-deb-{CARGO_DEB_VERSION}"));
    let bin = root.join("bin/cargo-deb");
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!(
        "xtask: installing cargo-deb {CARGO_DEB_VERSION} into {}",
        root.display()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "cargo-deb",
            "--locked",
            "--version",
            CARGO_DEB_VERSION,
            "--root",
        ])
        .arg(&root))?;
    Ok(bin)
}

pub fn ensure_cargo_fuzz() -> Result<PathBuf> {
    let root = cache_root().join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin = root.join("bin");
    if bin.join("cargo-fuzz").is_file() {
        return Ok(bin);
    }
    eprintln!(
        "xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} into {}",
        root.display()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
            "--root",
        ])
        .arg(&root))?;
    Ok(bin)
}
