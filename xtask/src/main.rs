//! `cargo xtask`: builds the eBPF object and the daemon, runs the daemon, the tests and the
//! lints, installing whatever those need on a fresh machine.

mod cmd;
mod host;
mod image;
mod toolchain;
mod vm;

use toolchain::ensure_cargo_fuzz;

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use clap::Parser;

use crate::{
    cmd::{output, run},
    toolchain::{Nightly, ebpf_toolchain, ensure_bpf_linker, ensure_rust_src},
};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test redirect")]
enum Task {
    /// Install everything the build and the tests need: rust-src and bpf-linker for the eBPF
    /// crate, bpftool, curl, iproute2, util-linux, qemu and busybox (vm-test) and the Python
    /// SDKs used by the tests.
    Setup,
    /// Build the eBPF object (installs rust-src and a matching bpf-linker when missing).
    BuildEbpf,
    /// Build the eBPF object and the daemon (`target/{debug,release}/redirect`).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `redirect` with the arguments after `--` (under sudo when not root).
    Run {
        #[arg(long)]
        release: bool,
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Install test prerequisites, build, and run every test: unit tests and the real-kernel
    /// integration tests (root). Arguments after `--` go to the test binaries.
    Test {
        #[arg(long)]
        release: bool,
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// rustfmt and clippy (host crates and the eBPF crate), warnings as errors.
    Lint,
    /// Build the daemon (release) and import it as a local image, `NAME:VERSION` and
    /// `NAME:latest`: the binary and the libraries it loads, no base image, no registry.
    Image {
        #[arg(long, default_value = "redirect")]
        name: String,
    },
    /// The real-kernel tests (all but the Docker ones) under qemu on Debian's packaged kernels:
    /// bullseye's 5.10, bookworm's 6.1, trixie's 6.12 (root). Arguments after `--` go to the
    /// test binary, e.g. `-- escapes`.
    VmTest {
        /// Only the tests of kind `[kernel]`: one per kernel feature the daemon relies on
        /// (what CI runs: without KVM a whole run takes most of an hour per kernel).
        #[arg(long)]
        quick: bool,
        /// Debian suites whose kernel to boot, comma-separated (default: all of them).
        #[arg(long, value_delimiter = ',')]
        kernel: Vec<String>,
        /// How qemu runs the guest.
        #[arg(long, value_enum, default_value = "auto")]
        accel: vm::Accel,
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build the daemon (release) and a Debian package of it with cargo-deb: the binary, the
    /// systemd unit, /etc/redirect.toml, the man page and shell completions, and removal
    /// scripts that run `redirect detach`. Written to target/debian/.
    Deb,
    /// libFuzzer on the proxy's request path (cargo-fuzz, nightly) for a bounded time; never
    /// part of CI. Findings land in redirect-user/fuzz/artifacts/request/.
    Fuzz {
        /// How long to fuzz, in seconds.
        #[arg(long, default_value_t = 300)]
        time: u64,
        /// Passed to libFuzzer, e.g. `-- -jobs=2`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Benchmarks against iptables DNAT and nginx (root): prints a table and writes
    /// target/bench/{results.json,table.md,chart.png}. Installs wrk, nginx, iptables, matplotlib.
    Bench {
        /// Longer runs (several minutes) instead of the quick mode (under 2 minutes).
        #[arg(long)]
        full: bool,
        /// Passed to the benchmark, e.g. `-- --only connect`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
}

fn main() -> std::process::ExitCode {
    match run_task(Task::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> Result<()> {
    let workspace = workspace_root();
    match task {
        Task::Setup => {
            build_ebpf(&workspace)?;
            host::ensure_tools(host::TEST_TOOLS)?;
            host::ensure_tools(host::BENCH_TOOLS)?;
            host::ensure_tools(vm::VM_TOOLS)?;
            host::ensure_python(&workspace, "test-venv", host::PYTHON_TEST_PACKAGES)?;
            host::ensure_python(&workspace, "bench-venv", host::PYTHON_BENCH_PACKAGES)?;
            host::ensure_cloud_init(&workspace)?;
            Ok(())
        }
        Task::BuildEbpf => build_ebpf(&workspace).map(|obj| println!("{}", obj.display())),
        Task::Build { release } => {
            build(&workspace, release).map(|bin| println!("{}", bin.display()))
        }
        Task::Run { release, args } => {
            let bin = build(&workspace, release)?;
            let mut cmd = if host::is_root() {
                Command::new(&bin)
            } else {
                eprintln!("xtask: not root, running under sudo");
                let mut sudo = Command::new("sudo");
                sudo.arg("-E").arg(&bin);
                sudo
            };
            // Replace this process, as `cargo run` does: Ctrl-C reaches the daemon alone, and
            // its exit status is ours.
            let error = std::os::unix::process::CommandExt::exec(cmd.args(args));
            Err(anyhow::Error::new(error).context(format!("cannot run {}", bin.display())))
        }
        Task::Test { release, args } => test(&workspace, release, &args),
        Task::Lint => lint(&workspace),
        Task::Image { name } => {
            let bin = build(&workspace, true)?;
            let tag = image::import(&bin, &name, env!("CARGO_PKG_VERSION"))?;
            println!("{tag}");
            Ok(())
        }
        Task::Bench { full, args } => bench(&workspace, full, &args),
        Task::Fuzz { time, args } => fuzz(&workspace, time, &args),
        Task::VmTest {
            quick,
            kernel,
            accel,
            mut args,
        } => {
            if quick {
                // libtest takes one filter: `--quick` is that filter.
                anyhow::ensure!(
                    args.iter().all(|a| a.to_string_lossy().starts_with('-')),
                    "--quick selects the [kernel] tests: give a test filter without it"
                );
                args.insert(0, "[kernel]".into());
            }
            vm_test(&workspace, &kernel, accel, &args)
        }
        Task::Deb => deb(&workspace).map(|deb| println!("{}", deb.display())),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Where `build_ebpf` leaves the object; `redirect-user/build.rs` looks here too.
fn ebpf_object(workspace: &Path) -> PathBuf {
    workspace.join("target/ebpf/bpfel-unknown-none/release/redirect-ebpf")
}

/// A `cargo` for the eBPF crate: its toolchain, a matching bpf-linker first on PATH, and none of
/// the variables of the `cargo xtask` invocation that would override its config.
fn ebpf_cargo(workspace: &Path) -> Result<Command> {
    let toolchain = ebpf_toolchain();
    ensure_rust_src(&toolchain)?;
    let nightly = Nightly::probe(&toolchain)?;
    let linker_dir = ensure_bpf_linker(&nightly)?;
    nightly_cargo(
        &toolchain,
        linker_dir,
        &workspace.join("redirect-ebpf"),
        &workspace.join("target/ebpf"),
    )
}

/// A `cargo` of the nightly `toolchain` in `dir`, with `tools` first on PATH, its own
/// `target` directory, and none of the variables of the `cargo xtask` invocation that would
/// override its config.
fn nightly_cargo(toolchain: &str, tools: PathBuf, dir: &Path, target: &Path) -> Result<Command> {
    let path = env::join_paths(
        std::iter::once(tools).chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )?;
    let mut cargo = Command::new("cargo");
    cargo
        .current_dir(dir)
        .arg(format!("+{toolchain}"))
        .env("PATH", path)
        .env("CARGO_TARGET_DIR", target);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC",
        "RUSTC_WRAPPER",
    ] {
        cargo.env_remove(var);
    }
    Ok(cargo)
}

fn build_ebpf(workspace: &Path) -> Result<PathBuf> {
    run(ebpf_cargo(workspace)?.args(["build", "--release"])).context("building the eBPF object")?;
    Ok(ebpf_object(workspace))
}

/// Host cargo with the object path the daemon embeds.
fn host_cargo(workspace: &Path, object: &Path) -> Command {
    let mut cargo = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .current_dir(workspace)
        .env("REDIRECT_EBPF_OBJECT", object);
    cargo
}

fn build(workspace: &Path, release: bool) -> Result<PathBuf> {
    let object = build_ebpf(workspace)?;
    let mut cargo = host_cargo(workspace, &object);
    cargo.args(["build", "--package", "redirect-user", "--bin", "redirect"]);
    if release {
        cargo.arg("--release");
    }
    run(&mut cargo)?;
    Ok(workspace
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("redirect"))
}

fn test(workspace: &Path, release: bool, args: &[OsString]) -> Result<()> {
    let ci = env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let mut cloud_init = None;
    let python = if host::is_root() {
        host::ensure_tools(host::TEST_TOOLS)?;
        cloud_init = Some(host::ensure_cloud_init(workspace)?);
        Some(host::ensure_python(
            workspace,
            "test-venv",
            host::PYTHON_TEST_PACKAGES,
        )?)
    } else if ci {
        anyhow::bail!("CI=true: the real-kernel tests must run, and they need root");
    } else {
        eprintln!("xtask: not root: the real-kernel tests will be reported as ignored");
        None
    };
    let object = build_ebpf(workspace)?;
    let mut cargo = host_cargo(workspace, &object);
    cargo.args(["test", "--workspace"]);
    if release {
        cargo.arg("--release");
    }
    if let Some(python) = python {
        cargo.env("REDIRECT_TEST_PYTHON", python);
    }
    if let Some(cloud_init) = cloud_init {
        cargo.env("REDIRECT_TEST_CLOUD_INIT", cloud_init);
    }
    if !args.is_empty() {
        cargo.arg("--").args(args);
    }
    run(&mut cargo)
}

fn vm_test(workspace: &Path, suites: &[String], accel: vm::Accel, args: &[OsString]) -> Result<()> {
    anyhow::ensure!(
        host::is_root(),
        "vm-test runs the real-kernel tests inside the guest as root, and apt as root: run it as root"
    );
    let kernels = if suites.is_empty() {
        vm::KERNELS.iter().collect::<Vec<_>>()
    } else {
        suites
            .iter()
            .map(|s| {
                vm::KERNELS.iter().find(|k| k.suite == s).with_context(|| {
                    let known: Vec<_> = vm::KERNELS.iter().map(|k| k.suite).collect();
                    format!("no kernel for {s:?}: known are {}", known.join(", "))
                })
            })
            .collect::<Result<_>>()?
    };
    host::ensure_tools(host::TEST_TOOLS)?;
    let env = [
        (
            "REDIRECT_TEST_PYTHON",
            host::ensure_python(workspace, "test-venv", host::PYTHON_TEST_PACKAGES)?,
        ),
        (
            "REDIRECT_TEST_CLOUD_INIT",
            host::ensure_cloud_init(workspace)?,
        ),
    ];
    let object = build_ebpf(workspace)?;
    let binary = test_binary(workspace, &object, "kernel")?;
    let outcomes = vm::run_all(workspace, &kernels, accel, &binary, &env, args)?;
    eprintln!();
    for o in &outcomes {
        eprintln!(
            "xtask: {} {}: {}",
            if o.passed { "ok  " } else { "FAIL" },
            o.kernel,
            o.summary
        );
    }
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    anyhow::ensure!(failed == 0, "{failed} of {} kernels failed", outcomes.len());
    Ok(())
}

/// Builds the integration test `name` of redirect-user (and the daemon it runs) and returns the
/// test executable cargo reports.
fn test_binary(workspace: &Path, object: &Path, name: &str) -> Result<PathBuf> {
    let out = host_cargo(workspace, object)
        .args([
            "test",
            "--package",
            "redirect-user",
            "--test",
            name,
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    anyhow::ensure!(out.status.success(), "building the {name} tests failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo named no executable for the {name} tests"))
}

fn lint(workspace: &Path) -> Result<()> {
    let object = build_ebpf(workspace)?;
    run(host_cargo(workspace, &object).args(["fmt", "--all", "--", "--check"]))?;
    run(host_cargo(workspace, &object).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(ebpf_cargo(workspace)?.args(["fmt", "--", "--check"]))?;
    run(ebpf_cargo(workspace)?.args(["clippy", "--release", "--", "-D", "warnings"]))
}

fn bench(workspace: &Path, full: bool, extra: &[OsString]) -> Result<()> {
    if !host::is_root() {
        anyhow::bail!(
            "the benchmark makes network namespaces and cgroups and attaches programs: run it as root"
        );
    }
    host::ensure_tools(host::BENCH_TOOLS)?;
    let python = host::ensure_python(workspace, "bench-venv", host::PYTHON_BENCH_PACKAGES)?;
    let goproxy = build_goproxy(workspace)?;
    let object = build_ebpf(workspace)?;
    run(host_cargo(workspace, &object)
        .args([
            "bench",
            "--package",
            "redirect-user",
            "--bench",
            "compare",
            "--",
        ])
        .arg(if full { "--full" } else { "--quick" })
        .args(extra)
        .env("REDIRECT_BENCH_PYTHON", python)
        .env("REDIRECT_BENCH_GOPROXY", goproxy)
        .env("REDIRECT_BENCH_OUT", workspace.join("target/bench")))
}

/// The benchmark's Go ReverseProxy (`benches/compare/goproxy.go`, standard library only),
/// built with the Go of Debian's packages into `target/bench/`.
fn build_goproxy(workspace: &Path) -> Result<PathBuf> {
    let out = workspace.join("target/bench/goproxy");
    let bench = workspace.join("target/bench");
    run(Command::new(host::which("go").context("go is needed")?)
        .current_dir(workspace.join("redirect-user/benches/compare"))
        .args(["build", "-o"])
        .arg(&out)
        .arg("goproxy.go")
        .env("GOCACHE", bench.join("go-cache"))
        .env("GOPATH", bench.join("go-path"))
        .env("GOFLAGS", "")
        .env("GOPROXY", "off"))
    .context("building the Go proxy")?;
    Ok(out)
}

/// `cargo fuzz run request` on the nightly toolchain, from the seeds in `fuzz/seeds/request`,
/// keeping what it finds interesting in `fuzz/corpus/request` for the next run.
/// The .deb: the release binary, then its man page and completions generated from the clap
/// definitions (`redirect man`, `redirect completions`), then cargo-deb with what
/// `[package.metadata.deb]` lists.
fn deb(workspace: &Path) -> Result<PathBuf> {
    let bin = build(workspace, true)?;
    let assets = workspace.join("target/deb-assets");
    std::fs::create_dir_all(&assets)?;
    let generate = |args: &[&str], file: &str| -> Result<()> {
        let out = Command::new(&bin)
            .args(args)
            .output()
            .with_context(|| format!("running {} {args:?}", bin.display()))?;
        anyhow::ensure!(out.status.success(), "redirect {args:?} failed");
        std::fs::write(assets.join(file), out.stdout)?;
        Ok(())
    };
    generate(&["man"], "redirect.1")?;
    generate(&["completions", "bash"], "redirect.bash")?;
    generate(&["completions", "zsh"], "_redirect")?;
    generate(&["completions", "fish"], "redirect.fish")?;
    let cargo_deb = toolchain::ensure_cargo_deb()?;
    let out_dir = workspace.join("target/debian");
    let out = Command::new(&cargo_deb)
        .current_dir(workspace)
        .args(["--package", "redirect-user", "--no-build", "--output"])
        .arg(&out_dir)
        .output()
        .context("running cargo-deb")?;
    anyhow::ensure!(
        out.status.success(),
        "cargo-deb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();
    let deb = PathBuf::from(deb);
    check_deb(&deb)?;
    check_deb_in_container(&deb)?;
    Ok(deb)
}

/// What dpkg runs to install and remove a package (it refuses to start without ldconfig and
/// start-stop-daemon on PATH), and what the check's script uses.
const DPKG_TOOLS: &[&str] = &[
    "dpkg",
    "dpkg-deb",
    "dpkg-query",
    "dpkg-split",
    "dpkg-divert",
    "dpkg-trigger",
    "sh",
    "rm",
    "tar",
    "diff",
    "ldconfig",
    "start-stop-daemon",
    "ls",
];

/// `dpkg -i` of `deb` in a container of an image holding dpkg alone (host files, no network):
/// the maintainer scripts run as on a machine, with no systemd and no bpffs there; the
/// installed daemon runs; `dpkg --purge` leaves nothing.
fn check_deb_in_container(deb: &Path) -> Result<()> {
    let root = image::Rootfs::new("deb-check")?;
    root.like_host_usr()?;
    for tool in DPKG_TOOLS {
        let path = host::which(tool).with_context(|| format!("{tool} is needed"))?;
        let path = std::fs::canonicalize(&path)?;
        root.add_program(&path, &path)?;
    }
    // What the packaged binary loads (libgcc_s too: required on every Debian system, so the
    // package does not name it).
    root.add_libraries(&workspace_root().join("target/release/redirect"))?;
    // `sh` is a link to dash on Debian: the image needs /bin/sh by that name.
    let sh = std::fs::canonicalize(host::which("sh").context("sh")?)?;
    if !root.path().join("usr/bin/sh").exists() {
        std::os::unix::fs::symlink(&sh, root.path().join("usr/bin/sh"))?;
    }
    root.mkdirs(&[
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
        "var/lib/dpkg/alternatives",
        "etc/dpkg/dpkg.cfg.d",
        "var/log",
        "tmp",
        "run",
        "deb",
    ])?;
    // The image holds this host's libraries: its dpkg knows them as this host's dpkg does.
    let depends = output(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Depends"))?;
    let mut status = String::new();
    for package in depends
        .split(',')
        .filter_map(|d| d.split_whitespace().next())
    {
        status += &output(Command::new("dpkg-query").args(["-s", package]))
            .with_context(|| format!("the package needs {package}, which this host lacks"))?;
        status += "\n";
        let name =
            output(Command::new("dpkg-query").args(["-f", "${binary:Package}", "-W", package]))?;
        std::fs::write(
            root.path()
                .join(format!("var/lib/dpkg/info/{}.list", name.trim())),
            "",
        )?;
    }
    std::fs::write(root.path().join("var/lib/dpkg/status"), status)?;
    let tag = format!("redirect-deb-check:{}", std::process::id());
    root.import(&tag, &[])?;
    let _image = RemoveImage(tag.clone());
    let deb = std::fs::canonicalize(deb)?;
    let script = "set -e
dpkg --install /deb/redirect.deb
redirect --version
for f in /usr/bin/redirect /lib/systemd/system/redirect.service /etc/redirect.toml \
         /usr/share/man/man1/redirect.1.gz; do test -f $f || { echo missing $f; exit 1; }; done
dpkg --purge redirect
for f in /usr/bin/redirect /etc/redirect.toml; do ! test -e $f || { echo left $f; exit 1; }; done
echo installed, ran and purged";
    let out = Command::new("docker")
        .args(["run", "--rm", "--network", "none", "-v"])
        .arg(format!("{}:/deb/redirect.deb:ro", deb.display()))
        .args([&tag, "/bin/sh", "-c", script])
        .output()
        .context("docker run")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        out.status.success() && said.contains("installed, ran and purged"),
        "the package in a container: {said}"
    );
    eprintln!("xtask: in a container: {}", said.trim().replace('\n', "; "));
    Ok(())
}

struct RemoveImage(String);

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["image", "rm", "-f", &self.0])
            .output();
    }
}

/// Installs `deb` with dpkg into a scratch root (its maintainer scripts run outside a chroot,
/// with `DPKG_ROOT` set, as dpkg does for such roots), checks what it installed, then removes
/// and purges it: the removal script's `redirect detach` runs, and nothing is left.
fn check_deb(deb: &Path) -> Result<()> {
    let root = tempfile::tempdir()?;
    let r = root.path();
    for dir in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(r.join(dir))?;
    }
    std::fs::write(r.join("var/lib/dpkg/status"), "")?;
    let dpkg = |args: &[&str]| -> Result<String> {
        let out = Command::new("dpkg")
            .arg(format!("--root={}", r.display()))
            .args([
                "--force-script-chrootless",
                "--force-depends",
                "--log=/dev/null",
            ])
            .args(args)
            .output()
            .context("running dpkg")?;
        anyhow::ensure!(
            out.status.success(),
            "dpkg {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    dpkg(&["--install", deb.to_str().context("path")?])?;
    for file in [
        "usr/bin/redirect",
        "lib/systemd/system/redirect.service",
        "etc/redirect.toml",
        "usr/share/man/man1/redirect.1.gz",
        "usr/share/bash-completion/completions/redirect",
    ] {
        anyhow::ensure!(
            r.join(file).is_file(),
            "the package did not install /{file}"
        );
    }
    let version = Command::new(r.join("usr/bin/redirect"))
        .arg("--version")
        .output()?;
    anyhow::ensure!(
        version.status.success(),
        "the installed redirect does not run"
    );
    let removed = dpkg(&["--purge", "redirect"])?;
    anyhow::ensure!(
        !r.join("usr/bin/redirect").exists() && !r.join("etc/redirect.toml").exists(),
        "files left after purge"
    );
    eprintln!(
        "xtask: {} installs, runs and purges cleanly ({})",
        deb.display(),
        removed.trim().replace('\n', "; ")
    );
    Ok(())
}

fn fuzz(workspace: &Path, seconds: u64, extra: &[OsString]) -> Result<()> {
    let object = build_ebpf(workspace)?;
    let cargo_fuzz = ensure_cargo_fuzz()?;
    let fuzz_dir = workspace.join("redirect-user/fuzz");
    let corpus = fuzz_dir.join("corpus/request");
    std::fs::create_dir_all(&corpus)?;
    let mut cargo = nightly_cargo(
        &ebpf_toolchain(),
        cargo_fuzz,
        &workspace.join("redirect-user"),
        &workspace.join("target/fuzz"),
    )?;
    cargo
        .args(["fuzz", "run", "request"])
        .arg(&corpus)
        .arg(fuzz_dir.join("seeds/request"))
        .env("REDIRECT_EBPF_OBJECT", object)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .args(extra);
    run(&mut cargo)
        .context("fuzzing (a crash leaves its input in redirect-user/fuzz/artifacts/request/)")
}
