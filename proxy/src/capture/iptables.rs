//! `wasp iptables`: installs, prints or removes the rules that redirect a
//! network namespace's TCP into the sidecar.
//!
//! The rules live in four chains of the `nat` table, hooked from
//! `PREROUTING` (inbound) and `OUTPUT` (outbound) by one jump each:
//!
//! - `WASP_INBOUND`: TCP arriving at the namespace, minus the excluded
//!   ports, goes to `WASP_IN_REDIRECT` (REDIRECT to the inbound port).
//! - `WASP_OUTPUT`: TCP the namespace opens, minus the proxy's own UID/GID
//!   (so its upstream connections are not captured again), loopback, and the
//!   excluded ports and CIDRs, goes to `WASP_REDIRECT` (REDIRECT to the
//!   outbound port).
//!
//! Installing first removes whatever an earlier run installed, so running
//! it twice leaves one copy; `--cleanup` removes exactly these chains and
//! jumps and nothing else. The rule text is built by a pure function
//! ([`Plan::script`]) so `--dry-run` prints exactly what would be applied.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context as _};

use crate::config::trust::Net;

/// The chains this command owns, in the order they are removed.
const CHAINS: [&str; 4] = [
    "WASP_INBOUND",
    "WASP_IN_REDIRECT",
    "WASP_OUTPUT",
    "WASP_REDIRECT",
];

/// Inbound ports never redirected, whatever `--exclude-inbound-ports` says:
/// the probes address (`[admin] probes`, 15021 by convention) and the admin
/// API (9901), so the kubelet's probes reach wasp itself, not the app.
pub const ALWAYS_EXCLUDED_INBOUND: [u16; 2] = [15021, 9901];

/// The jumps from the built-in chains into ours.
const HOOKS: [(&str, &str); 2] = [("PREROUTING", "WASP_INBOUND"), ("OUTPUT", "WASP_OUTPUT")];

#[derive(Debug, Clone, clap::Args)]
pub struct IptablesArgs {
    /// UID the proxy runs as: its own connections are never redirected.
    /// It must be the UID wasp really runs as (the image's `USER 1337`, a
    /// pod's `runAsUser: 1337`), or wasp's upstream connections would be
    /// captured again and loop back into it.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// GID the proxy runs as (also exempt), if it has one of its own.
    #[arg(long)]
    pub proxy_gid: Option<u32>,
    /// Port of the inbound capture listener; 0 turns inbound capture off.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Port of the outbound capture listener; 0 turns outbound capture off.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Inbound ports left alone besides 15021 and 9901 (always), comma separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination networks left alone (`10.0.0.0/8,fd00::/8`).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<String>,
    /// IPv6 rules too: `auto` when ip6tables and IPv6 NAT are available.
    #[arg(long, value_enum, default_value_t = Ipv6::Auto)]
    pub ipv6: Ipv6,
    /// Print the rules (and the removal commands run first) without applying them.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove the rules an earlier run installed, and nothing else.
    #[arg(long)]
    pub cleanup: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipv6 {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
}

/// Validated arguments: what to install.
#[derive(Debug, Clone)]
pub struct Plan {
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<Net>,
}

impl Plan {
    pub fn from_args(args: &IptablesArgs) -> anyhow::Result<Plan> {
        let cidrs = args
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| !c.trim().is_empty())
            .map(|c| Net::parse(c).map_err(|e| anyhow::anyhow!("\"{}\": {e}", c.trim())))
            .collect::<anyhow::Result<Vec<_>>>()
            .context("--exclude-outbound-cidrs")?;
        if args.inbound_port == 0 && args.outbound_port == 0 {
            bail!("both --inbound-port and --outbound-port are 0: nothing to capture");
        }
        if args.inbound_port != 0 && args.inbound_port == args.outbound_port {
            bail!(
                "--inbound-port and --outbound-port are both {}: they must be two listeners",
                args.inbound_port
            );
        }
        Ok(Plan {
            proxy_uid: args.proxy_uid,
            proxy_gid: args.proxy_gid,
            inbound_port: args.inbound_port,
            outbound_port: args.outbound_port,
            exclude_inbound_ports: {
                let mut ports = ALWAYS_EXCLUDED_INBOUND.to_vec();
                for p in &args.exclude_inbound_ports {
                    if !ports.contains(p) {
                        ports.push(*p);
                    }
                }
                ports
            },
            exclude_outbound_ports: args.exclude_outbound_ports.clone(),
            exclude_outbound_cidrs: cidrs,
        })
    }

    /// The `iptables-restore --noflush` input for one family.
    pub fn script(&self, family: Family) -> String {
        let mut s = String::from("*nat\n");
        for chain in CHAINS {
            let _ = writeln!(s, ":{chain} - [0:0]");
        }
        if self.inbound_port != 0 {
            let _ = writeln!(
                s,
                "-A WASP_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
                self.inbound_port
            );
            // Connections made to the inbound port itself need no redirect.
            let _ = writeln!(
                s,
                "-A WASP_INBOUND -p tcp --dport {} -j RETURN",
                self.inbound_port
            );
            for port in &self.exclude_inbound_ports {
                let _ = writeln!(s, "-A WASP_INBOUND -p tcp --dport {port} -j RETURN");
            }
            // Only traffic for this host's own addresses: a packet routed
            // through (the pod as someone's gateway) must not be redirected
            // into the proxy and sent on from there.
            s.push_str("-A WASP_INBOUND -p tcp -m addrtype --dst-type LOCAL -j WASP_IN_REDIRECT\n");
            s.push_str("-A PREROUTING -p tcp -j WASP_INBOUND\n");
        }
        if self.outbound_port != 0 {
            let _ = writeln!(
                s,
                "-A WASP_REDIRECT -p tcp -j REDIRECT --to-ports {}",
                self.outbound_port
            );
            let _ = writeln!(
                s,
                "-A WASP_OUTPUT -m owner --uid-owner {} -j RETURN",
                self.proxy_uid
            );
            if let Some(gid) = self.proxy_gid {
                let _ = writeln!(s, "-A WASP_OUTPUT -m owner --gid-owner {gid} -j RETURN");
            }
            s.push_str("-A WASP_OUTPUT -o lo -j RETURN\n");
            for port in &self.exclude_outbound_ports {
                let _ = writeln!(s, "-A WASP_OUTPUT -p tcp --dport {port} -j RETURN");
            }
            let v4 = family == Family::V4;
            for cidr in self
                .exclude_outbound_cidrs
                .iter()
                .filter(|c| c.is_ipv4() == v4)
            {
                let _ = writeln!(s, "-A WASP_OUTPUT -d {cidr} -j RETURN");
            }
            s.push_str("-A WASP_OUTPUT -j WASP_REDIRECT\n");
            s.push_str("-A OUTPUT -p tcp -j WASP_OUTPUT\n");
        }
        s.push_str("COMMIT\n");
        s
    }
}

/// The commands that remove what an earlier run installed (each may fail
/// harmlessly when there is nothing to remove).
pub fn removal_commands(family: Family) -> Vec<Vec<String>> {
    let tool = family.tool();
    let mut out = Vec::new();
    for (hook, chain) in HOOKS {
        out.push(
            [tool, "-t", "nat", "-D", hook, "-p", "tcp", "-j", chain]
                .map(String::from)
                .to_vec(),
        );
    }
    for op in ["-F", "-X"] {
        for chain in CHAINS {
            out.push([tool, "-t", "nat", op, chain].map(String::from).to_vec());
        }
    }
    out
}

/// Whether `tool` can be run at all.
fn available(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn missing_tool(tool: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "`{tool}` is not installed or not on PATH: install the distribution's iptables package \
         (Debian/Ubuntu: apt-get install iptables; Alpine: apk add iptables ip6tables)"
    )
}

/// Whether IPv6 NAT works here (`auto`): the tools exist and the kernel
/// has the nat table for IPv6.
fn ipv6_nat_works() -> bool {
    available(Family::V6.restore())
        && Command::new(Family::V6.tool())
            .args(["-t", "nat", "-S", "OUTPUT"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// Removes this command's rules for one family. A jump rule is deleted
/// until none is left (an interrupted older run may have added two).
fn remove(family: Family) -> anyhow::Result<()> {
    let tool = family.tool();
    if !available(tool) {
        return Err(missing_tool(tool));
    }
    for cmd in removal_commands(family) {
        let (program, args) = cmd.split_first().context("empty command")?;
        let deleting_jump = args.get(2).is_some_and(|a| a == "-D");
        // A chain that does not exist makes these fail: that is the
        // "nothing to remove" case.
        for _ in 0..if deleting_jump { 8 } else { 1 } {
            let ok = Command::new(program)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .with_context(|| format!("running {program}"))?
                .success();
            if !ok {
                break;
            }
        }
    }
    Ok(())
}

fn install(plan: &Plan, family: Family) -> anyhow::Result<()> {
    let restore = family.restore();
    if !available(restore) {
        return Err(missing_tool(restore));
    }
    remove(family)?;
    let mut child = Command::new(restore)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {restore}"))?;
    child
        .stdin
        .take()
        .context("no stdin for the restore command")?
        .write_all(plan.script(family).as_bytes())
        .with_context(|| format!("writing the rules to {restore}"))?;
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {restore}"))?;
    if !out.status.success() {
        bail!(
            "{restore} refused the rules ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn families(args: &IptablesArgs) -> anyhow::Result<Vec<Family>> {
    let mut out = vec![Family::V4];
    match args.ipv6 {
        Ipv6::Off => {}
        Ipv6::On => out.push(Family::V6),
        Ipv6::Auto if args.dry_run || ipv6_nat_works() => out.push(Family::V6),
        Ipv6::Auto => {
            eprintln!("wasp iptables: IPv6 NAT is not available here; IPv4 rules only");
        }
    }
    Ok(out)
}

/// What `--dry-run` prints: the removal commands, then (unless cleaning
/// up) the restore input, per family.
fn dry_run_text(plan: &Plan, families: &[Family], cleanup: bool) -> String {
    let mut out = String::new();
    for family in families {
        let _ = writeln!(
            out,
            "# {} (removal of an earlier run's rules, errors ignored)",
            family.tool()
        );
        for cmd in removal_commands(*family) {
            let _ = writeln!(out, "{}", cmd.join(" "));
        }
        if !cleanup {
            let _ = writeln!(out, "# {} --noflush", family.restore());
            out.push_str(&plan.script(*family));
        }
    }
    out
}

fn run(args: &IptablesArgs) -> anyhow::Result<()> {
    let plan = Plan::from_args(args)?;
    let families = families(args)?;
    if args.dry_run {
        // A closed pipe (`| head`) is the reader's choice, not an error.
        let _ =
            std::io::stdout().write_all(dry_run_text(&plan, &families, args.cleanup).as_bytes());
        return Ok(());
    }
    for family in families {
        if args.cleanup {
            remove(family)?;
        } else {
            install(&plan, family)?;
        }
    }
    let what = if args.cleanup { "removed" } else { "installed" };
    eprintln!("wasp iptables: capture rules {what}");
    Ok(())
}

pub fn main(args: &IptablesArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            proxy_uid: 1337,
            proxy_gid: Some(1337),
            inbound_port: 15006,
            outbound_port: 15001,
            exclude_inbound_ports: vec![15021, 9901],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec![
                Net::parse("10.0.0.0/8").unwrap_or_else(|e| panic!("{e}")),
                Net::parse("fd00::/8").unwrap_or_else(|e| panic!("{e}")),
            ],
        }
    }

    #[test]
    fn script_exempts_the_proxy_and_exclusions_before_redirecting() {
        let v4 = plan().script(Family::V4);
        let lines: Vec<&str> = v4.lines().collect();
        let at = |l: &str| lines.iter().position(|x| *x == l).unwrap_or(usize::MAX);
        let redirect = at("-A WASP_OUTPUT -j WASP_REDIRECT");
        assert!(redirect < usize::MAX, "{v4}");
        for exempt in [
            "-A WASP_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A WASP_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "-A WASP_OUTPUT -o lo -j RETURN",
            "-A WASP_OUTPUT -p tcp --dport 5432 -j RETURN",
            "-A WASP_OUTPUT -d 10.0.0.0/8 -j RETURN",
        ] {
            assert!(
                at(exempt) < redirect,
                "{exempt} before the redirect in\n{v4}"
            );
        }
        assert!(
            at("-A WASP_INBOUND -p tcp --dport 15021 -j RETURN")
                < at("-A WASP_INBOUND -p tcp -m addrtype --dst-type LOCAL -j WASP_IN_REDIRECT")
        );
        assert!(
            !v4.contains("-A WASP_INBOUND -p tcp -j WASP_IN_REDIRECT"),
            "inbound redirects only local destinations:\n{v4}"
        );
        assert!(v4.contains("-A WASP_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n"));
        assert!(v4.contains("-A WASP_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n"));
        assert!(!v4.contains("fd00::"), "no IPv6 network in IPv4 rules");
        assert!(v4.starts_with("*nat\n") && v4.ends_with("COMMIT\n"));
        let v6 = plan().script(Family::V6);
        assert!(v6.contains("-A WASP_OUTPUT -d fd00::/8 -j RETURN\n"));
        assert!(!v6.contains("10.0.0.0/8"));
    }

    #[test]
    fn a_port_of_zero_turns_that_direction_off() {
        let mut p = plan();
        p.inbound_port = 0;
        let s = p.script(Family::V4);
        assert!(!s.contains("PREROUTING"), "{s}");
        assert!(s.contains("-A OUTPUT -p tcp -j WASP_OUTPUT"));
    }

    #[test]
    fn cidrs_are_checked() {
        for bad in ["10.0.0.0/33", "fd00::/129", "nonsense", "10.0.0.0/x", "/8"] {
            assert!(Net::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Net::parse("192.168.1.7").map(|c| c.to_string()),
            Ok("192.168.1.7/32".into())
        );
    }

    #[test]
    fn removal_deletes_jumps_before_chains() {
        let cmds = removal_commands(Family::V4);
        let first_x = cmds
            .iter()
            .position(|c| c.get(3).is_some_and(|a| a == "-X"));
        let last_d = cmds
            .iter()
            .rposition(|c| c.get(3).is_some_and(|a| a == "-D"));
        assert!(last_d < first_x);
        assert!(cmds
            .iter()
            .all(|c| c.first().is_some_and(|t| t == "iptables")));
    }
}
