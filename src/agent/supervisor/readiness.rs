//! When a run counts as ready (a console marker, a TCP port on the guest's address, or at
//! once), the watcher that decides it under the boot deadline, and the timeout that fails it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;
use crate::agent::console;
use crate::vm::{ExitReason, RunExit, VmSpec};

/// After this many runs in a row miss their boot deadline, the miss is permanent: restarting
/// the same guest again is pointless, and the MicroVM goes `Stalled` (kstatus reaches a
/// verdict) until its spec changes or it is re-created.
pub(crate) const BOOT_TIMEOUTS_BEFORE_PERMANENT: u32 = 3;

/// The longest one TCP readiness probe may take: a guest whose network is not up yet does not
/// answer ARP, and a connect would otherwise hang for seconds.
const TCP_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// When a run counts as ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Readiness {
    /// The marker appears on the console.
    Marker(String),
    /// A TCP connection to the guest's first address on the port succeeds.
    Tcp(std::net::SocketAddr),
    /// As soon as the VMM started the guest (no readiness configured, or no guest at all).
    Immediate,
}

impl Readiness {
    /// A TCP port wins over a console marker; without a known guest address (a VM re-adopted
    /// from an agent that did not record one) the marker, or nothing, is used.
    pub(super) fn of(spec: &VmSpec, hypervisor: Hypervisor, ip_addresses: &[String]) -> Self {
        if hypervisor == Hypervisor::Simulated {
            return Readiness::Immediate;
        }
        let first_ip = ip_addresses
            .first()
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
        if let (Some(port), Some(ip)) = (spec.readiness_tcp_port, first_ip) {
            return Readiness::Tcp(std::net::SocketAddr::new(ip, port));
        }
        match &spec.readiness_console_marker {
            Some(marker) => Readiness::Marker(marker.clone()),
            None => Readiness::Immediate,
        }
    }
}

/// One bounded TCP readiness probe: does something accept a connection on `addr`?
pub(super) async fn tcp_accepts(addr: std::net::SocketAddr, within: Duration) -> bool {
    matches!(
        tokio::time::timeout(within, tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

impl Inner {
    pub(super) fn spawn_readiness(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        run: &RunHandle,
        readiness: Readiness,
        console_log: PathBuf,
        deadline: Instant,
    ) {
        let inner = self.clone();
        let slot = slot.clone();
        let run = run.clone();
        tokio::spawn(async move {
            let mut exited = run.exited.clone();
            let mut cursor = console::LogCursor::new(&console_log, Some(0));
            let mut scanner = match &readiness {
                Readiness::Marker(marker) => Some(console::MarkerScanner::new(marker)),
                Readiness::Tcp(_) | Readiness::Immediate => None,
            };
            loop {
                let ready = match (&readiness, scanner.as_mut()) {
                    (Readiness::Tcp(addr), _) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        tcp_accepts(*addr, left.min(TCP_PROBE_TIMEOUT)).await
                    }
                    (_, None) => true,
                    (_, Some(scanner)) => match cursor.read_new(1 << 20) {
                        Ok(chunk) => scanner.feed(&chunk),
                        Err(error) => {
                            tracing::warn!(uid = %slot.uid, error = %error, "cannot read the console log");
                            false
                        }
                    },
                };
                if ready {
                    inner.mark_ready(&slot, run.generation);
                    return;
                }
                if Instant::now() >= deadline {
                    inner.boot_timed_out(&slot, &run, &readiness).await;
                    return;
                }
                tokio::select! {
                    _ = run.cancel.cancelled() => return,
                    _ = inner.shutdown.cancelled() => return,
                    changed = exited.changed() => {
                        if changed.is_err() || *exited.borrow() {
                            // The exit watcher records how it ended.
                            return;
                        }
                    }
                    _ = tokio::time::sleep(console::POLL_INTERVAL) => {}
                }
            }
        });
    }

    pub(super) fn mark_ready(&self, slot: &VmSlot, generation: u64) {
        let now = crate::time::now_unix_ms();
        let mut took = None;
        self.update(slot, Some(generation), |rt| {
            if rt.status.state != RunState::Starting {
                return;
            }
            let ms = u64::try_from(now - rt.status.applied_at_unix_ms).unwrap_or(0);
            rt.status.state = RunState::Running;
            rt.status.ready = true;
            rt.status.ready_at_unix_ms = now;
            rt.status.apply_to_ready_ms = ms;
            took = Some(ms);
        });
        if let Some(ms) = took {
            self.metrics.apply_to_ready.observe(ms as f64 / 1000.0);
            tracing::info!(uid = %slot.uid, apply_to_ready_ms = ms, "VM ready");
        }
    }

    pub(super) async fn boot_timed_out(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        run: &RunHandle,
        readiness: &Readiness,
    ) {
        if run.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        Self::kill_and_wait(run).await;
        // The console log holds the guest's serial output only (every backend keeps the VMM's
        // own log apart), so what is quoted here is what the guest said.
        let tail = console::tail_text(&run.handle.console_log, 512);
        let missed = slot.lock().status.boot_timeouts.saturating_add(1);
        let exit = boot_timeout_exit(self.config.boot_timeout, readiness, tail.trim(), missed);
        self.metrics.boot_failed(ExitReason::BootTimeout.as_str());
        tracing::warn!(uid = %slot.uid, missed, permanent = exit.permanent, "boot timeout");
        {
            // Persisted with the failure just below (same run only).
            let mut rt = slot.lock();
            if rt.run.as_ref().map(|r| r.generation) == Some(run.generation) {
                rt.status.boot_timeouts = missed;
            }
        }
        self.fail_with(slot, Some(run.generation), exit);
        self.spawn_release_if_failed(slot);
    }
}

/// The exit of a run that missed its boot deadline, the `missed`-th in a row: permanent once
/// [`BOOT_TIMEOUTS_BEFORE_PERMANENT`] is reached.
pub(super) fn boot_timeout_exit(
    boot_timeout: Duration,
    readiness: &Readiness,
    console_tail: &str,
    missed: u32,
) -> RunExit {
    let what = match readiness {
        Readiness::Marker(marker) => format!("console marker {marker:?} not seen"),
        Readiness::Tcp(addr) => format!("nothing accepted a TCP connection on {addr}"),
        Readiness::Immediate => "no readiness".to_owned(),
    };
    let said = if console_tail.is_empty() {
        "The guest printed nothing on its console.".to_owned()
    } else {
        format!("Last guest console output: {console_tail}")
    };
    let permanent = missed >= BOOT_TIMEOUTS_BEFORE_PERMANENT;
    let verdict = if permanent {
        format!(
            " {missed} runs in a row missed their deadline, so it is not restarted again: fix \
             the guest or its readiness check (a change of spec.readiness starts a new run), or \
             re-create the MicroVM."
        )
    } else if missed > 1 {
        format!(" {missed} runs in a row missed their deadline.")
    } else {
        String::new()
    };
    RunExit {
        success: false,
        reason: ExitReason::BootTimeout,
        message: format!(
            "the guest did not become ready within {boot_timeout:?} ({what}); the VMM was killed.{verdict} {said}"
        ),
        permanent,
        exit_code: -1,
        at_unix_ms: crate::time::now_unix_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::vm_spec as spec;

    #[test]
    fn the_bounded_boot_timeout_in_a_row_is_permanent_and_quotes_the_guest() {
        let marker = Readiness::Marker("ignis: ready".into());
        let first = boot_timeout_exit(Duration::from_secs(60), &marker, "", 1);
        assert_eq!(first.reason, ExitReason::BootTimeout);
        assert!(!first.permanent && !first.success);
        assert!(
            first
                .message
                .ends_with("The guest printed nothing on its console."),
            "{}",
            first.message
        );
        let second = boot_timeout_exit(Duration::from_secs(60), &marker, "Booting", 2);
        assert!(!second.permanent);
        assert!(
            second.message.contains("2 runs in a row"),
            "{}",
            second.message
        );
        assert!(
            second
                .message
                .ends_with("Last guest console output: Booting")
        );
        let last = boot_timeout_exit(
            Duration::from_secs(60),
            &marker,
            "",
            BOOT_TIMEOUTS_BEFORE_PERMANENT,
        );
        assert!(last.permanent, "{}", last.message);
        assert!(
            last.message.contains("not restarted again"),
            "{}",
            last.message
        );
    }

    #[test]
    fn readiness_prefers_the_tcp_port_on_the_first_address() {
        let marker = VmSpec {
            readiness_console_marker: Some("ready".into()),
            ..spec("u")
        };
        let ips = vec!["10.88.0.7".to_string(), "192.168.1.4".to_string()];
        assert_eq!(
            Readiness::of(&marker, Hypervisor::Qemu, &ips),
            Readiness::Marker("ready".into())
        );
        let tcp = VmSpec {
            readiness_tcp_port: Some(80),
            ..marker.clone()
        };
        assert_eq!(
            Readiness::of(&tcp, Hypervisor::Qemu, &ips),
            Readiness::Tcp("10.88.0.7:80".parse().expect("addr"))
        );
        assert_eq!(
            Readiness::of(&tcp, Hypervisor::Qemu, &[]),
            Readiness::Marker("ready".into()),
            "no recorded address: the marker"
        );
        assert_eq!(
            Readiness::of(&tcp, Hypervisor::Simulated, &ips),
            Readiness::Immediate
        );
        assert_eq!(
            Readiness::of(&spec("u"), Hypervisor::Qemu, &[]),
            Readiness::Immediate
        );
    }

    #[tokio::test]
    async fn tcp_probes_are_bounded() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = listener.local_addr().expect("addr");
        assert!(tcp_accepts(open, Duration::from_secs(2)).await);
        drop(listener);
        assert!(!tcp_accepts(open, Duration::from_secs(2)).await, "closed");
        // TEST-NET-1 is never routed: the probe gives up at its bound instead of hanging.
        let started = Instant::now();
        assert!(
            !tcp_accepts(
                "192.0.2.1:80".parse().expect("addr"),
                Duration::from_millis(300)
            )
            .await
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
