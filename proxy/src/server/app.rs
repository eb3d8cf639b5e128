//! Wrapper mode: `wasp run -- ./my-app args...` runs the app as a child once
//! the proxy is ready, points its HTTP proxy variables at the outbound
//! listener, forwards SIGTERM to it, and ends the proxy with the app's exit
//! code. This fixes the three classic sidecar complaints: the app never
//! calls out before the proxy is ready, a batch job's pod completes when the
//! job does, and the proxy outlives the app's own in-flight calls.

use std::net::SocketAddr;

use anyhow::Context as _;

/// The listener whose address becomes the app's `HTTP_PROXY` by default.
pub const DEFAULT_PROXY_LISTENER: &str = "outbound";

pub const TERM: rustix::process::Signal = rustix::process::Signal::TERM;

#[derive(Clone, Debug)]
pub struct AppSpec {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// The listener the app's `HTTP_PROXY` points at.
    pub proxy_listener: String,
}

#[derive(Debug)]
pub struct Child {
    inner: tokio::process::Child,
    name: String,
}

/// Starts the app. `HTTP_PROXY`/`http_proxy` point at `outbound` unless the
/// environment already sets them; loopback is excluded via `NO_PROXY`.
pub fn spawn(spec: &AppSpec, outbound: Option<SocketAddr>) -> anyhow::Result<Child> {
    let (program, args) = spec
        .argv
        .split_first()
        .context("no app command after `--`")?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    match outbound {
        Some(mut addr) => {
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            let url = format!("http://{addr}");
            for var in ["HTTP_PROXY", "http_proxy"] {
                if std::env::var_os(var).is_none() {
                    cmd.env(var, &url);
                }
            }
            for var in ["NO_PROXY", "no_proxy"] {
                if std::env::var_os(var).is_none() {
                    cmd.env(var, "localhost,127.0.0.1,::1");
                }
            }
        }
        None => tracing::warn!(
            "no listener named \"{}\": the app's HTTP_PROXY is not set",
            spec.proxy_listener
        ),
    }
    let inner = cmd
        .spawn()
        .with_context(|| format!("cannot start the app `{program}`"))?;
    tracing::info!(
        pid = inner.id(),
        "started the app `{}`",
        spec.argv.join(" ")
    );
    Ok(Child {
        inner,
        name: program.clone(),
    })
}

/// The app's exit code (128 + signal when killed); never resolves without an app.
pub async fn wait(child: &mut Option<&mut Child>) -> u8 {
    let Some(child) = child.as_deref_mut() else {
        return std::future::pending().await;
    };
    match child.inner.wait().await {
        Ok(status) => exit_code(status),
        Err(e) => {
            tracing::error!("cannot wait for the app `{}`: {e}", child.name);
            1
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        _ => 1,
    }
}

impl Child {
    /// Sends `signal` to the app, if it is still running.
    pub fn forward(&self, signal: rustix::process::Signal) {
        let Some(pid) = self
            .inner
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        else {
            return;
        };
        match rustix::process::kill_process(pid, signal) {
            Ok(()) => tracing::info!("forwarded {signal:?} to the app `{}`", self.name),
            Err(e) => tracing::warn!("cannot signal the app `{}`: {e}", self.name),
        }
    }

    pub async fn kill(&mut self) {
        let _ = self.inner.kill().await;
    }
}
