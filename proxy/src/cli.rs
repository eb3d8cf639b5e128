//! The command line: `wasp run [-- APP...]`, `wasp check`, `wasp await`,
//! `wasp filter new|test`,
//! `wasp iptables`, `wasp --version`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use std::sync::Arc;

use crate::config;
use crate::snapshot::Compiled;
use crate::telemetry::Metrics;

#[derive(Debug, Parser)]
#[command(
    name = "wasp",
    version,
    about = "A WebAssembly-pluggable sidecar proxy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy; with `-- APP ARGS...`, also run the app once the proxy
    /// is ready, and exit with the app's exit code after draining.
    Run {
        /// The TOML configuration file.
        #[arg(short, long, default_value = "wasp.toml")]
        config: PathBuf,
        /// The listener the app's HTTP_PROXY points at (wrapper mode).
        #[arg(long, default_value = crate::server::app_default_proxy_listener())]
        proxy_listener: String,
        /// The app to run as a child (wrapper mode).
        #[arg(last = true)]
        app: Vec<String>,
    },
    /// Work with filters.
    Filter {
        #[command(subcommand)]
        command: FilterCommand,
    },
    /// Block until a wasp admin endpoint reports ready (for apps that cannot
    /// use wrapper mode): exit 0 when ready, 1 on timeout.
    Await {
        /// The admin address of the wasp to wait for.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
        /// How long to wait, e.g. "30s".
        #[arg(long, default_value = "30s")]
        timeout: String,
    },
    /// Write development certificates: a mesh CA and one certificate per
    /// service (SPIFFE URI SAN, DNS SANs NAME and localhost, IP 127.0.0.1).
    Certs(crate::certs::CertsArgs),
    /// Install (or print, or remove) the iptables rules that redirect this
    /// network namespace's TCP into the sidecar (run as root or with
    /// NET_ADMIN, e.g. in an init container).
    Iptables(crate::capture::iptables::IptablesArgs),
    /// Validate a configuration file and print what it sets up.
    Check {
        #[arg(short, long, default_value = "wasp.toml")]
        config: PathBuf,
    },
    /// Internal: `wasp run` compiles each filter module in a child process
    /// of its own binary (module on stdin, compiled artefact on stdout).
    #[command(name = "__compile-module", hide = true)]
    CompileModule {
        /// `winch` or `cranelift`.
        #[arg(long)]
        compiler: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum FilterCommand {
    /// Create a filter crate with a filter-test.toml, or add the fixture file to a filter's folder
    ///
    /// With a NAME: a crate from the template (Rust, wasp-sdk, wasm32-wasip1)
    /// and its `filter-test.toml`. With the folder of an existing filter (any
    /// SDK, any language: it has a Cargo.toml, package.json, go.mod or
    /// CMakeLists.txt): only `filter-test.toml`, beside it.
    New {
        /// The crate name, e.g. `my-auth`, or the folder of an existing filter.
        name: String,
        /// Where to create it (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The wasp-sdk source folder (default: the one this wasp was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Run a compiled filter in wasp's real engine against the cases of a fixture file
    ///
    /// Per case: a request, the upstream's answer, answers to the filter's
    /// http_calls, and what the upstream, the client, the logs and the
    /// metrics must show (docs/filters.md). Exit 0 when every case passes,
    /// 1 when one differs (each differing field is printed), 2 when the
    /// fixture file is unusable.
    Test {
        /// The module, e.g. target/wasm32-wasip1/release/my_auth.wasm.
        module: PathBuf,
        /// The fixture file (see `wasp filter new`).
        fixtures: PathBuf,
        /// Run only the cases whose name contains this.
        #[arg(long)]
        case: Option<String>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            proxy_listener,
            app,
        } => {
            let app = (!app.is_empty()).then_some(crate::server::AppSpec {
                argv: app,
                proxy_listener,
            });
            run(&config, app)
        }
        Command::Check { config } => check(&config),
        Command::Filter {
            command: FilterCommand::New { name, dir, sdk },
        } => crate::scaffold::new_filter(&name, dir.as_deref(), sdk.as_deref()),
        Command::Filter {
            command:
                FilterCommand::Test {
                    module,
                    fixtures,
                    case,
                },
        } => crate::filtertest::main(&module, &fixtures, case.as_deref()),
        Command::Certs(args) => crate::certs::main(&args),
        Command::Iptables(args) => crate::capture::iptables::main(&args),
        Command::Await { admin, timeout } => crate::await_ready::main(&admin, &timeout),
        Command::CompileModule { compiler } => crate::filter::compile_child_main(&compiler),
    }
}

/// Loads the config and compiles it (names resolved, certificates and
/// discovery files read): a problem in either is a config error.
fn load(path: &std::path::Path) -> Result<Compiled, ExitCode> {
    let report = |e: config::ConfigError| {
        eprint!("error: {e}");
        ExitCode::from(2)
    };
    let config = config::load(path).map_err(report)?;
    crate::snapshot::compile(Arc::new(config), None).map_err(report)
}

fn run(path: &std::path::Path, app: Option<crate::server::AppSpec>) -> ExitCode {
    let compiled = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let file = &compiled.config.file;
    let log = crate::telemetry::logging::init(file.log.level, file.log.format);
    match crate::server::run(compiled, Metrics::new(), log, app) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let compiled = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    print!("{}", summary(&compiled));
    for w in crate::admin::exposure_warnings(&compiled.config.admin) {
        eprintln!("warning: {w}");
    }
    for w in crate::l4::access_warnings(&compiled.config) {
        eprintln!("warning: {w}");
    }
    ExitCode::SUCCESS
}

/// What `wasp check` prints: every listener with its routes, every cluster.
pub fn summary(compiled: &Compiled) -> String {
    use std::fmt::Write;
    let config = &compiled.config;
    let mut out = String::new();
    let _ = writeln!(out, "{}: OK", config.path.display());
    let _ = writeln!(
        out,
        "workers: {}  admin: {}{}{}",
        config.workers,
        config.admin.bind,
        config
            .admin
            .probes
            .map_or(String::new(), |p| format!("  probes: {p}")),
        if config.admin.token.is_some() {
            "  (token required)"
        } else {
            ""
        }
    );
    if let Some(t) = &config.tracing {
        let _ = writeln!(
            out,
            "tracing: OTLP/{} to {}  sample_ratio: {}  service: {}",
            match t.protocol {
                crate::config::TraceProtocol::Grpc => "gRPC",
                crate::config::TraceProtocol::Http => "HTTP",
            },
            t.endpoint,
            t.sample_ratio,
            t.service_name
        );
    }
    let _ = writeln!(out, "listeners:");
    for l in &compiled.listeners {
        let pipeline: Vec<&str> = l.pipeline.iter().map(|p| &**p).collect();
        let _ = writeln!(
            out,
            "  {} on {}{}  pipeline: [{}]",
            l.name,
            l.bind,
            match (l.l4.is_tcp(), l.l4.capture) {
                (true, _) => " (tcp)",
                (false, Some(crate::config::CaptureMode::Outbound)) => " (capture outbound)",
                (false, Some(crate::config::CaptureMode::Inbound)) => " (capture inbound)",
                (false, None) => "",
            },
            pipeline.join(", ")
        );
        for (i, r) in l.routes.iter().enumerate() {
            // A route's own chain; a filter with a per-route config is
            // marked `*`.
            let own = l.config.routes.get(i).and_then(|rc| rc.filters.as_ref());
            let chain = own.map_or(String::new(), |f| {
                let names: Vec<String> = f
                    .pipeline
                    .iter()
                    .map(|n| match f.configs.contains_key(n) {
                        true => format!("{n}*"),
                        false => n.to_string(),
                    })
                    .collect();
                format!("  pipeline: [{}]", names.join(", "))
            });
            let clusters: Vec<&str> = r
                .clusters()
                .iter()
                .filter_map(|c| {
                    if *c == crate::route::PASSTHROUGH {
                        return Some(crate::route::PASSTHROUGH_NAME);
                    }
                    config.clusters.get(*c).map(|c| &*c.name)
                })
                .collect();
            let _ = writeln!(
                out,
                "    route {} -> {}{chain}",
                r.name,
                clusters.join(" | ")
            );
        }
        for r in &l.l4.tcp_routes {
            let clusters: Vec<&str> = r
                .clusters()
                .iter()
                .filter_map(|c| {
                    if *c == crate::route::PASSTHROUGH {
                        return Some(crate::route::PASSTHROUGH_NAME);
                    }
                    config.clusters.get(*c).map(|c| &*c.name)
                })
                .collect();
            let _ = writeln!(out, "    tcp route {} -> {}", r.name, clusters.join(" | "));
        }
        if let Some(tls) = &l.tls {
            let _ = writeln!(out, "    tls: {}", server_tls_summary(tls.settings()));
        }
        if let Some(allow) = &l.allow {
            let entries: Vec<&str> = allow.entries().collect();
            let _ = writeln!(out, "    allow: [{}]", entries.join(", "));
        }
    }
    let _ = writeln!(out, "clusters:");
    for c in &compiled.clusters {
        let eps: Vec<String> = c
            .endpoints
            .iter()
            .map(|e| {
                if e.weight == 1 {
                    e.addr.to_string()
                } else {
                    format!("{} (weight {})", e.addr, e.weight)
                }
            })
            .collect();
        let source = crate::upstream::discovery_label(&c.state);
        let _ = writeln!(
            out,
            "  {} [{:?}, {:?}, {}]: {}",
            c.name,
            c.protocol,
            c.balance,
            source,
            eps.join(", ")
        );
        if let Some(tls) = &c.tls {
            let _ = writeln!(out, "    tls: {}", client_tls_summary(tls.settings()));
        }
    }
    let _ = writeln!(out, "filters:");
    for (name, f) in &config.file.filters {
        let _ = writeln!(out, "  {name}: {} (fail {:?})", f.module, f.fail);
    }
    out
}

/// A listener's TLS in one line: what it serves, whom it asks for a
/// certificate, the lowest version.
fn server_tls_summary(s: &crate::tls::ServerTlsSettings) -> String {
    let mut parts = Vec::new();
    if let Some(d) = &s.default {
        parts.push(format!("cert {}", d.cert.display()));
    }
    for sni in &s.sni {
        parts.push(format!("sni {} -> {}", sni.sni, sni.paths.cert.display()));
    }
    parts.push(match &s.client_ca {
        Some(ca) => format!("mTLS: client certificates from {}", ca.display()),
        None => "no client certificates".to_string(),
    });
    parts.push(match s.min_version {
        crate::tls::MinVersion::Tls12 => "min TLS 1.2".to_string(),
        crate::tls::MinVersion::Tls13 => "min TLS 1.3".to_string(),
    });
    parts.join(", ")
}

/// A cluster's TLS in one line: whom it trusts, what it presents, which
/// name and identity it expects.
fn client_tls_summary(s: &crate::tls::ClientTlsSettings) -> String {
    let mut parts = vec![match &s.ca {
        Some(ca) => format!("trusts {}", ca.display()),
        None => "trusts the webpki roots".to_string(),
    }];
    if let Some(c) = &s.client {
        parts.push(format!("mTLS: presents {}", c.cert.display()));
    }
    if let Some(sni) = &s.sni {
        parts.push(format!("sni {sni}"));
    }
    if let Some(id) = &s.expect_identity {
        parts.push(format!("expects {id}"));
    }
    if s.insecure_skip_verify {
        parts.push("INSECURE: upstream certificates are not verified".to_string());
    }
    parts.join(", ")
}
