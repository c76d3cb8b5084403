//! The metadata channel's listeners: accept, read one bounded request head within a deadline,
//! tell who calls from its source address, answer, close. A long-poll waits on the hub for the
//! caller's metadata to change, within [`LONG_POLL`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::Served;
use super::http::{self, Head, MAX_HEAD, Route};

/// How long a `version?wait=` request waits for a change (under a client's usual 60 s).
pub(crate) const LONG_POLL: Duration = Duration::from_secs(55);
/// How long a client has to send its request head, and to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once by one listener; more are closed unanswered. Each guest keeps
/// one long-poll open, so the node's listener needs one per `nat` guest.
const MAX_CONNECTIONS: usize = 512;
/// Connections served at once for one caller, so a guest cannot take the others' share.
const MAX_PER_CALLER: usize = 4;

/// Connections open per caller address.
#[derive(Default)]
struct PerCaller(std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>);

/// One connection counted against its caller until dropped.
struct CallerSlot {
    callers: Arc<PerCaller>,
    ip: IpAddr,
}

impl PerCaller {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<CallerSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(ip).or_default();
        if *count >= MAX_PER_CALLER {
            return None;
        }
        *count += 1;
        Some(CallerSlot {
            callers: self.clone(),
            ip,
        })
    }
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut open = self.callers.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Who a source address is: what that guest serves, or `None` for an address that is no
/// guest's (answered 403).
pub(crate) type Identify = Arc<dyn Fn(IpAddr) -> Option<watch::Receiver<Served>> + Send + Sync>;

/// Serve `listener` until `cancel`.
pub(crate) async fn serve(listener: TcpListener, identify: Identify, cancel: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let callers = Arc::new(PerCaller::default());
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::debug!(%error, "metadata channel: accept failed");
                // A full file table or the like: do not spin on it.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let Some(caller) = callers.take(peer.ip()) else {
            continue;
        };
        let identify = identify.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _held = (permit, caller);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = answer(stream, peer.ip(), identify) => {}
            }
        });
    }
}

async fn answer(mut stream: TcpStream, peer: IpAddr, identify: Identify) {
    let Ok(Some(route)) = tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream)).await else {
        return;
    };
    let mut served = match route {
        Route::Refused(_) => None,
        _ => identify(peer),
    };
    if let (Route::Version { wait: Some(seen) }, Some(rx)) = (&route, served.as_mut()) {
        let seen = *seen;
        let _ = tokio::time::timeout(LONG_POLL, rx.wait_for(|now| now.version != seen)).await;
    }
    let current = served.as_ref().map(|rx| rx.borrow().clone());
    let (status, body) = http::answer(&route, current.as_ref());
    let _ = tokio::time::timeout(IO_TIMEOUT, stream.write_all(&http::encode(status, &body))).await;
    let _ = stream.shutdown().await;
}

/// The request's route once its head is in; `None` if the client went away first.
async fn read_head(stream: &mut TcpStream) -> Option<Route> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let room = MAX_HEAD.saturating_sub(buf.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room.max(1)]).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Head::Complete(route) = http::parse_head(&buf) {
            return Some(route);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::GuestMetadata;

    async fn get(addr: std::net::SocketAddr, target: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut out))
            .await
            .expect("answered in time")
            .expect("read");
        out
    }

    #[tokio::test]
    async fn a_caller_reads_its_own_data_and_a_long_poll_ends_on_a_change() {
        let (tx, _) = watch::channel(Served::of(GuestMetadata {
            hostname: "warm".into(),
            ..Default::default()
        }));
        let tx = Arc::new(tx);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let known = tx.clone();
        let identify: Identify = Arc::new(move |ip| ip.is_loopback().then(|| known.subscribe()));
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(listener, identify, cancel.clone()));

        assert!(
            get(addr, "/ignis/v1/hostname")
                .await
                .ends_with("\r\n\r\nwarm\n")
        );
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.0 404"));
        let version = tx.borrow().version;
        let poll =
            tokio::spawn(
                async move { get(addr, &format!("/ignis/v1/version?wait={version}")).await },
            );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!poll.is_finished(), "the same version waits");
        let claimed = Served::of(GuestMetadata {
            hostname: "web-1".into(),
            ..Default::default()
        });
        let new_version = claimed.version;
        tx.send_replace(claimed);
        let answer = tokio::time::timeout(Duration::from_secs(5), poll)
            .await
            .expect("the change ends the wait")
            .expect("join");
        assert!(
            answer.ends_with(&format!("\r\n\r\n{new_version}\n")),
            "{answer}"
        );
        assert!(get(addr, "/ignis/v1/hostname").await.ends_with("web-1\n"));

        // One caller holds at most MAX_PER_CALLER connections; the next is closed unanswered.
        let mut idle = Vec::new();
        for _ in 0..MAX_PER_CALLER {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = TcpStream::connect(addr).await.expect("connect");
        let _ = extra
            .write_all(b"GET /ignis/v1/hostname HTTP/1.0\r\n\r\n")
            .await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut out)).await;
        assert!(read.is_ok() && out.is_empty(), "{out:?}");
        drop(idle);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(get(addr, "/ignis/v1/hostname").await.ends_with("web-1\n"));

        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("stops on cancel")
            .expect("join");
    }
}
