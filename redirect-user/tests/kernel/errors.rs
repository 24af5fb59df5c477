//! `redirect run` refusing to start: one line, exit 1, nothing attached.

use super::*;

pub const TESTS: &[(&str, TestFn)] = &[
    ("error_not_root", error_not_root),
    ("error_no_cgroup_v2", error_no_cgroup_v2),
    (
        "error_root_without_capabilities",
        error_root_without_capabilities,
    ),
    ("error_cgroup_does_not_exist", error_cgroup_does_not_exist),
    ("error_port_in_use", error_port_in_use),
    (
        "error_object_rejected_by_verifier",
        error_object_rejected_by_verifier,
    ),
    (
        "error_bad_config_names_file_line_key",
        error_bad_config_names_file_line_key,
    ),
    (
        "error_second_daemon_on_same_control_socket",
        error_second_daemon_on_same_control_socket,
    ),
];

/// stderr must be exactly one `redirect: error: ...` line.
pub fn one_line_error(stderr: &str, expected: &str) -> Result<()> {
    let lines: Vec<&str> = stderr.lines().collect();
    ensure!(lines.len() == 1, "want one line, got:\n{stderr}");
    ensure!(lines[0].starts_with("redirect: error: "), "{stderr}");
    ensure!(stderr.contains(expected), "want {expected:?} in: {stderr}");
    Ok(())
}

/// `redirect run ARGS...`, inside `netns` when given.
/// `redirect run ARGS`, pinning (if it gets that far) in a directory of the test's, which the
/// sweep of the next run removes.
pub fn redirect_run(netns: Option<&NetNs>, args: &[&str]) -> Result<Command> {
    let mut cmd = command_in(DAEMON, None, netns)?;
    cmd.arg("run")
        .args(args)
        .arg("--pin-dir")
        .arg(support::test_pin_dir());
    Ok(cmd)
}

fn error_not_root() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let cg = TestCgroup::new()?;
    let cgroup = cg.path.to_str().unwrap();
    // A copy the unprivileged user can reach: the checkout may sit below a directory only
    // root may enter (a `mktemp -d` parent is mode 0700).
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let binary = dir.path().join("redirect");
    std::fs::copy(DAEMON, &binary)?;
    let mut cmd = command_in(&binary, None, None)?;
    cmd.args([
        "run",
        "--mock",
        "--cgroup",
        cgroup,
        "--control-socket",
        "/nonexistent/x.sock",
    ]);
    cmd.uid(65534).gid(65534);
    let stderr = run_daemon_expecting_failure(cmd)?;
    one_line_error(
        &stderr,
        "needs root, or capabilities (uid 65534 lacks CAP_BPF and CAP_NET_ADMIN)",
    )?;
    assert!(attached_programs(&cg.path)?.is_empty());
    Ok(())
}

/// uid 0 with the capability set a container engine leaves (no CAP_BPF, CAP_SYS_ADMIN,
/// CAP_NET_ADMIN): told which capabilities to add, not that it needs root.
fn error_root_without_capabilities() -> Result<()> {
    let cg = TestCgroup::new()?;
    let mut cmd = Command::new("setpriv");
    cmd.args(["--bounding-set", "-bpf,-sys_admin,-net_admin", DAEMON])
        .args(["run", "--mock", "--control-socket", "/nonexistent/x.sock"])
        .arg("--pin-dir")
        .arg(support::test_pin_dir())
        .arg("--cgroup")
        .arg(&cg.path);
    let stderr = run_daemon_expecting_failure(cmd)?;
    one_line_error(&stderr, "uid 0 with a reduced capability set")?;
    ensure!(!stderr.contains("needs root"), "{stderr}");
    ensure!(stderr.contains("--cap-add SYS_ADMIN"), "{stderr}");
    assert!(attached_programs(&cg.path)?.is_empty());
    Ok(())
}

fn error_no_cgroup_v2() -> Result<()> {
    let mount = support::cgroup2_mount()?;
    let mount_c = std::ffi::CString::new(mount.to_str().unwrap())?;
    let mut cmd = redirect_run(None, &["--mock", "--control-socket", "/nonexistent/x.sock"])?;
    // SAFETY: only syscalls on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            // A private mount namespace without the cgroup2 mount: the host is unaffected.
            let private = libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                && libc::umount2(mount_c.as_ptr(), libc::MNT_DETACH) == 0;
            if private {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let stderr = run_daemon_expecting_failure(cmd)?;
    one_line_error(&stderr, "no cgroup v2 filesystem is mounted")
}

fn error_cgroup_does_not_exist() -> Result<()> {
    let ns = NetNs::new()?;
    let missing = support::cgroup2_mount()?.join("redirect-test-no-such-cgroup");
    let missing_arg = missing.to_str().unwrap();
    let cmd = redirect_run(
        Some(&ns),
        &[
            "--mock",
            "--control-socket",
            "/nonexistent/x.sock",
            "--cgroup",
            missing_arg,
        ],
    )?;
    let stderr = run_daemon_expecting_failure(cmd)?;
    one_line_error(
        &stderr,
        &format!("cgroup {} does not exist", missing.display()),
    )
}

fn error_port_in_use() -> Result<()> {
    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("c.sock");
    let cgroup = cg.path.to_str().unwrap();
    let fails_with = |port: u16, expected: &str| -> Result<()> {
        let _taken = ns.run(move || TcpListener::bind(("127.0.0.1", port)))??;
        let cmd = redirect_run(
            Some(&ns),
            &[
                "--mock",
                "--cgroup",
                cgroup,
                "--control-socket",
                socket.to_str().unwrap(),
            ],
        )?;
        one_line_error(&run_daemon_expecting_failure(cmd)?, expected)?;
        assert!(
            attached_programs(&cg.path)?.is_empty(),
            "nothing attached after the failure"
        );
        Ok(())
    };
    fails_with(
        8169,
        "cannot listen on 127.0.0.1:8169: Address already in use",
    )?;
    // A target's port, taken: the message says why that port.
    fails_with(
        8170,
        "cannot listen on 127.0.0.1:8170 (the port of target 169.254.169.254:80: each target takes a port after the listen port): Address already in use",
    )
}

fn error_object_rejected_by_verifier() -> Result<()> {
    use object::{Object as _, ObjectSection as _};
    let original = std::fs::read(env!("REDIRECT_EBPF_OBJECT"))?;
    let elf = object::File::parse(&*original)?;
    let (offset, size) = elf
        .section_by_name("cgroup/connect4")
        .context("no cgroup/connect4 section")?
        .file_range()
        .context("section has no file data")?;
    let section = usize::try_from(offset)?..usize::try_from(offset + size)?;
    // The first `exit` instruction (opcode 0x95) becomes `r10 = 0`: writing the read-only
    // frame pointer on a reachable path, which the verifier must refuse.
    let exit = section
        .step_by(8)
        .find(|&at| original[at] == 0x95)
        .context("cgroup/connect4 has no exit instruction")?;
    let mut patched = original.clone();
    patched[exit..exit + 8].copy_from_slice(&[0xb7, 0x0a, 0, 0, 0, 0, 0, 0]);
    let dir = tempfile::tempdir()?;
    let object_path = dir.path().join("rejected.o");
    std::fs::write(&object_path, patched)?;

    let ns = NetNs::new()?;
    let cg = TestCgroup::new()?;
    let socket = dir.path().join("c.sock");
    let cmd = redirect_run(
        Some(&ns),
        &[
            "--mock",
            "--cgroup",
            cg.path.to_str().unwrap(),
            "--control-socket",
            socket.to_str().unwrap(),
            "--ebpf-object",
            object_path.to_str().unwrap(),
        ],
    )?;
    let stderr = run_daemon_expecting_failure(cmd)?;
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("redirect: error: the kernel rejected eBPF program `redirect_connect4`"),
        "{stderr}"
    );
    assert!(first.ends_with("verifier log:"), "{stderr}");
    assert!(
        stderr.lines().count() > 1,
        "the verifier's log follows: {stderr}"
    );
    assert!(attached_programs(&cg.path)?.is_empty());
    Ok(())
}

fn error_bad_config_names_file_line_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "mock = \"ec2\"\n\nlisten = [\"127.0.0.1:8169\", \"not-an-address\"]\n",
    )?;
    let with_config = || redirect_run(None, &["--config", config.to_str().unwrap()]);
    let stderr = run_daemon_expecting_failure(with_config()?)?;
    one_line_error(
        &stderr,
        &format!(
            "config {} line 3, key `listen[1]`: invalid listen address \"not-an-address\"",
            config.display()
        ),
    )?;
    std::fs::write(&config, "mock = \"ec2\"\n[ec2]\nhttp_tokens = \"maybe\"\n")?;
    let stderr = run_daemon_expecting_failure(with_config()?)?;
    one_line_error(
        &stderr,
        "line 3, key `ec2.http_tokens`: unknown variant `maybe`",
    )
}

fn error_second_daemon_on_same_control_socket() -> Result<()> {
    let s = mock_setup(&[])?;
    let ns2 = NetNs::new()?;
    let cmd = redirect_run(
        Some(&ns2),
        &[
            "--mock",
            "--cgroup",
            s.client.to_str().unwrap(),
            "--control-socket",
            s.daemon.control_socket.to_str().unwrap(),
        ],
    )?;
    let stderr = run_daemon_expecting_failure(cmd)?;
    one_line_error(&stderr, "another redirect daemon is running")?;
    // The first daemon is unharmed.
    assert_eq!(s.daemon.status(&s.ns)?["pid"], s.daemon.pid());
    Ok(())
}
