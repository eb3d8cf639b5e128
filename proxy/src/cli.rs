//! The command line: `wasp run`, `wasp check`, `wasp --version`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config};

#[derive(Debug, Parser)]
#[command(name = "wasp", version, about = "A WebAssembly-pluggable sidecar proxy")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Run {
        /// The TOML configuration file.
        #[arg(short, long, default_value = "wasp.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file and print what it sets up.
    Check {
        #[arg(short, long, default_value = "wasp.toml")]
        config: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    config::load(path).map_err(|e| {
        eprint!("error: {e}");
        ExitCode::from(2)
    })
}

fn run(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let log = crate::telemetry::logging::init(config.file.log.level, config.file.log.format);
    match crate::server::run(config, log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    print!("{}", summary(&config));
    ExitCode::SUCCESS
}

/// What `wasp check` prints: every listener with its routes, every cluster.
pub fn summary(config: &Config) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{}: OK", config.path.display());
    let _ = writeln!(out, "workers: {}  admin: {}", config.workers, config.admin);
    let _ = writeln!(out, "listeners:");
    for l in &config.listeners {
        let pipeline: Vec<&str> = l.pipeline.iter().map(|p| &**p).collect();
        let _ = writeln!(
            out,
            "  {} on {}  pipeline: [{}]",
            l.name,
            l.bind,
            pipeline.join(", ")
        );
        for r in l.routes.routes() {
            let clusters: Vec<&str> = r
                .clusters()
                .iter()
                .filter_map(|c| config.clusters.get(*c).map(|c| &*c.name))
                .collect();
            let _ = writeln!(out, "    route {} -> {}", r.name, clusters.join(" | "));
        }
    }
    let _ = writeln!(out, "clusters:");
    for c in &config.clusters {
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
        let _ = writeln!(
            out,
            "  {} [{:?}, {:?}]: {}",
            c.name,
            c.protocol,
            c.balance,
            eps.join(", ")
        );
    }
    let _ = writeln!(out, "filters:");
    for (name, f) in &config.file.filters {
        let _ = writeln!(out, "  {name}: {} (fail {:?})", f.module, f.fail);
    }
    out
}
