//! `redirect`: makes the cloud instance-metadata service work for every process and container
//! on a Linux host, without iptables. See README.md.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};

use redirect::{
    config::{
        self, ListenAddr, Overrides, RedirectToAddr, Sources, Target, UpstreamUrl, parse_duration,
        parse_timeout,
    },
    control, daemon,
    mock::{
        CloudKind,
        ec2::{HttpTokens, events::Event},
    },
    paths,
};

/// Exit status after a panic (EX_SOFTWARE): the daemon stops rather than run half alive.
const EXIT_PANIC: i32 = 70;

#[derive(Parser)]
#[command(
    name = "redirect",
    version,
    about = "Redirects connects to the cloud metadata service (169.254.169.254) to a local proxy, in the kernel, with eBPF"
)]
struct Cli {
    /// Log filter: error, warn, info, debug, trace, or a tracing directive list
    /// (e.g. `info,redirect=debug`). RUST_LOG, when set, takes precedence.
    #[arg(
        long,
        global = true,
        env = "REDIRECT_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    log_level: String,
    /// Log lines as text (journald adds its own timestamps) or as JSON objects, one per line.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        value_name = "FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the redirect and serve the proxy until SIGINT or SIGTERM, then detach.
    Run(Box<RunArgs>),
    /// Show the running daemon's attachments, redirects and counters.
    Status(StatusArgs),
    /// Make the EC2 mock notice an instance event, so an app's handler can be tested: a spot
    /// interruption, a rebalance recommendation, scheduled maintenance or the Auto Scaling
    /// group's termination (`clear` removes them all).
    Simulate(SimulateArgs),
    /// Remove the pinned programs (the uninstall path): covered callers are no longer
    /// redirected. Refused while a daemon serves them.
    Detach(DetachArgs),
    /// Print shell completions for SHELL (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
}

#[derive(Args)]
struct DetachArgs {
    /// The pin directory. [default: /sys/fs/bpf/redirect]
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
}

#[derive(Args)]
struct SimulateArgs {
    /// spot-interruption, rebalance-recommendation, scheduled-maintenance, asg-termination,
    /// or clear.
    #[arg(value_name = "EVENT", value_parser = parse_event)]
    event: SimulatedEvent,
    /// Noticed this long from now (e.g. 30s).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = config::parse_duration)]
    after: Duration,
    /// The daemon's control socket. [default: /run/redirect/control.sock]
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
}

/// An event, or `clear` (`None`).
#[derive(Clone, Copy, Debug)]
struct SimulatedEvent(Option<Event>);

fn parse_event(s: &str) -> Result<SimulatedEvent, String> {
    if s == "clear" {
        return Ok(SimulatedEvent(None));
    }
    Event::parse(s)
        .map(|e| SimulatedEvent(Some(e)))
        .ok_or_else(|| {
            let names: Vec<&str> = Event::ALL.iter().map(|e| e.name()).collect();
            format!("expected clear or one of {}", names.join(", "))
        })
}

#[derive(Args)]
struct RunArgs {
    /// Serve a built-in mock of the metadata service. KIND: ec2 (the default), azure, gcp,
    /// openstack or cloudstack: the cloud of callers whose policy names none.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "ec2", value_name = "KIND", conflicts_with_all = ["upstream", "redirect_to"])]
    mock: Option<CloudKind>,
    /// Forward to this metadata service, e.g. http://169.254.169.254. The daemon's own connects
    /// to it are never redirected.
    #[arg(long, value_name = "URL", conflicts_with = "redirect_to")]
    upstream: Option<UpstreamUrl>,
    /// Serve no proxy: send redirected connects to this address, where another program (your
    /// own metadata proxy, nginx, ...) serves it. At most one IPv4 and one IPv6 address. Keep
    /// that program outside the redirected cgroups, or its own upstream connects come back to it.
    #[arg(
        long = "redirect-to",
        value_name = "ADDR:PORT",
        conflicts_with = "listen"
    )]
    redirect_to: Vec<RedirectToAddr>,
    /// Redirect connects from this cgroup v2 directory and its descendants. Repeatable. A
    /// filesystem path or a path inside the hierarchy (as in /proc/PID/cgroup).
    /// [default: the root of the cgroup v2 hierarchy, i.e. every process]
    #[arg(long = "cgroup", value_name = "PATH")]
    cgroups: Vec<PathBuf>,
    /// Where the proxy listens. Redirected connects go to the next ports on the same address,
    /// one per target (8170, 8171, ...). Use an address the callers can reach (a bridge address
    /// for containers in their own network namespace). At most one IPv4 and one IPv6 address;
    /// port 0 picks free ports. [default: 127.0.0.1:8169]
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<ListenAddr>,
    /// A metadata endpoint to redirect. Repeatable; replaces the defaults.
    /// [default: 169.254.169.254:80 and [fd00:ec2::254]:80]
    #[arg(long = "target", value_name = "ADDR:PORT")]
    targets: Vec<Target>,
    /// TOML config file; flags override its settings.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Unix socket for `redirect status`. [default: /run/redirect/control.sock]
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Where the programs' links are pinned (bpffs, mounted at /sys/fs/bpf when it is not),
    /// so that covered callers are refused, never handed the real service, while no daemon
    /// runs. [default: /sys/fs/bpf/redirect]
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Pin nothing: when the daemon stops or dies, the redirect goes with it and callers
    /// reach the real metadata service.
    #[arg(long)]
    fail_open: bool,
    /// The daemon's state directory (the IMDSv2 token key, mode 0600: tokens stay valid over
    /// a restart). [default: /run/redirect]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Take over from the daemon on the same control socket without a failed request: join
    /// its ports, adopt its pinned programs, then let it finish its requests and exit. With
    /// no daemon there, just start.
    #[arg(long)]
    replace: bool,
    /// Also serve /metrics (Prometheus), /healthz and /readyz on this loopback address.
    #[arg(long, value_name = "ADDR:PORT", value_parser = config::parse_metrics_listen)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Budget for connecting to the upstream. [default: 1s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    upstream_connect_timeout: Option<Duration>,
    /// Budget for the upstream's whole response (not applied to GCE wait_for_change long
    /// polls). [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    upstream_timeout: Option<Duration>,
    /// On SIGINT/SIGTERM, how long open requests may take to finish. [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    shutdown_grace: Option<Duration>,
    /// Close client connections idle this long between requests; 0s: never. [default: 75s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// A request head must arrive within this of its first byte (else the connection
    /// closes), its body within this more (else 408). [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    request_read_timeout: Option<Duration>,
    /// Close a connection whose client takes nothing of a response for this long.
    /// [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    send_timeout: Option<Duration>,
    /// Client connections held at once; at the limit the longest-idle one is closed for a
    /// new one. [default: what RLIMIT_NOFILE leaves room for]
    #[arg(long, value_name = "N", value_parser = config::parse_max_connections)]
    max_connections: Option<usize>,
    /// Largest request body forwarded upstream; larger ones get 413. [default: 64KiB]
    #[arg(long, value_name = "SIZE", value_parser = config::parse_size)]
    max_request_body: Option<usize>,
    /// IMDSv2 mode of the EC2 mock: `optional` serves tokenless requests, `required` answers
    /// them 401. [default: optional]
    #[arg(long, value_enum, value_name = "MODE")]
    http_tokens: Option<HttpTokens>,
    /// Proxy worker threads, each accepting on every listener and keeping its own upstream
    /// connections. [default: the number of CPUs with --upstream, 1 with --mock]
    #[arg(long, value_name = "N", value_parser = config::parse_workers)]
    workers: Option<usize>,
    /// The host's /proc, when the daemon runs in a container without the host's pid namespace
    /// (`-v /proc:/host/proc:ro`, then `--host-proc /host/proc`). [default: /proc]
    #[arg(long, value_name = "PATH")]
    host_proc: Option<PathBuf>,
    /// Network namespaces (containers) served at once; beyond, new ones wait. [default: 8192]
    #[arg(long, value_name = "N", value_parser = config::parse_max_namespaces)]
    max_namespaces: Option<usize>,
    /// Docker's API socket, for container starts and names: `auto` (DOCKER_HOST, else
    /// /var/run/docker.sock, fine if absent), `off`, or a socket path. [default: auto]
    #[arg(long, value_name = "SOCKET", value_parser = config::parse_docker)]
    docker: Option<config::DockerApi>,
    /// Turn on the eBPF programs' debug logs (one line per rewritten connect).
    #[arg(long)]
    ebpf_log: bool,
    /// Load this eBPF object instead of the one built into the binary (development).
    #[arg(long, value_name = "FILE")]
    ebpf_object: Option<PathBuf>,
}

#[derive(Args)]
struct StatusArgs {
    /// The daemon's control socket. [default: /run/redirect/control.sock]
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Where to look for pinned programs when no daemon answers. [default: /sys/fs/bpf/redirect]
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    // The readiness self-test's probe: this binary again, told so by the daemon (not a
    // subcommand: nothing a user runs, so not in --help, the man page or the completions).
    if let Some(probe) = std::env::var_os(redirect::selftest::PROBE_ENV) {
        return redirect::selftest::run_probe(&probe);
    }
    let cli = Cli::parse();
    let ebpf_log = matches!(&cli.command, Command::Run(args) if args.ebpf_log);
    init_logging(&cli.log_level, cli.log_format, ebpf_log);
    exit_on_panic();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Status(args) => status(args),
        Command::Simulate(args) => simulate(args),
        Command::Detach(args) => detach(args),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "redirect", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(command)
                .render(&mut std::io::stdout())
                .context("writing the man page")
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redirect: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str, format: LogFormat, ebpf_log: bool) {
    use tracing_subscriber::EnvFilter;
    let mut filter = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_owned());
    if ebpf_log {
        // aya-log records carry the eBPF crate's module path as their target.
        filter.push_str(",redirect_ebpf=trace");
    }
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("redirect: ignoring log filter {filter:?}: {e}");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().init(),
        // Under systemd, journald stamps each line itself.
        LogFormat::Text if std::env::var_os("JOURNAL_STREAM").is_some() => {
            builder.without_time().with_ansi(false).init()
        }
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

/// A panic anywhere (a proxy task, the control socket, a signal handler) stops the daemon
/// with a log line and a non-zero exit: tokio would otherwise catch it in the task and leave
/// the rest running with a piece missing.
fn exit_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        tracing::error!(
            "panic in thread {}: {info}; redirect exits rather than run half alive (this is a bug: please report it)",
            thread.name().unwrap_or("unnamed")
        );
        std::process::exit(EXIT_PANIC);
    }));
}

fn run(args: RunArgs) -> Result<()> {
    let sources = Sources {
        file: args.config,
        flags: Overrides {
            mock: args.mock,
            upstream: args.upstream,
            redirect_to: args.redirect_to,
            listen: args.listen,
            cgroups: args.cgroups,
            targets: args.targets,
            control_socket: args.control_socket,
            pin_dir: args.pin_dir,
            fail_open: args.fail_open,
            metrics_listen: args.metrics_listen,
            state_dir: args.state_dir,
            replace: args.replace,
            upstream_connect_timeout: args.upstream_connect_timeout,
            upstream_timeout: args.upstream_timeout,
            shutdown_grace: args.shutdown_grace,
            idle_timeout: args.idle_timeout,
            request_read_timeout: args.request_read_timeout,
            send_timeout: args.send_timeout,
            max_connections: args.max_connections,
            max_request_body: args.max_request_body,
            ebpf_log: args.ebpf_log,
            ebpf_object: args.ebpf_object,
            docker: args.docker,
            max_namespaces: args.max_namespaces,
            host_proc: args.host_proc,
            http_tokens: args.http_tokens,
            workers: args.workers,
        },
    };
    let settings = sources.settings()?;
    // The proxy's workers run runtimes of their own (see proxy::Proxy); this one carries the
    // control socket, the signals and the eBPF log.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(daemon::run(settings, sources))
}

fn status(args: StatusArgs) -> Result<()> {
    let path = args
        .control_socket
        .unwrap_or_else(paths::default_control_socket);
    let status = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(control::fetch_status(&path));
    let status = match status {
        Ok(status) => status,
        Err(e @ control::ControlError::NotRunning { .. }) => {
            // No daemon: say whether pinned programs still refuse the covered callers.
            let base = args
                .pin_dir
                .unwrap_or_else(|| PathBuf::from(paths::PIN_DIR));
            let dir = base.join(redirect::ebpf::pins::LAYOUT);
            let pinned = redirect::ebpf::pins::list(&dir).unwrap_or_default().len();
            if pinned > 0 {
                return Err(anyhow::Error::new(e).context(format!(
                    "no daemon serves the {pinned} program links pinned in {}: covered callers are refused (fail closed) until `redirect run` adopts them; `redirect detach` removes them",
                    dir.display()
                )));
            }
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.render());
    }
    Ok(())
}

fn simulate(args: SimulateArgs) -> Result<()> {
    let path = args
        .control_socket
        .unwrap_or_else(paths::default_control_socket);
    let done = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(control::post_simulate(&path, args.event.0, args.after))?;
    println!("{done}");
    Ok(())
}

fn detach(args: DetachArgs) -> Result<()> {
    let dir = args
        .pin_dir
        .unwrap_or_else(|| PathBuf::from(paths::PIN_DIR));
    match redirect::ebpf::pins::detach(&dir)? {
        0 => println!("nothing pinned in {}; nothing to detach", dir.display()),
        n => println!(
            "detached {n} pinned program links from {}: covered callers are not redirected any more",
            dir.display()
        ),
    }
    Ok(())
}
