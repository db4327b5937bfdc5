//! A TCP proxy in front of a dependency (PostgreSQL, RabbitMQ) that can fail it the two ways a
//! network fails, without touching the machine's server:
//!
//! - **cut**: the dependency refuses: new connections are closed at once, open ones are closed;
//! - **freeze**: the dependency hangs (a frozen host, a dropped route): connections stay open and
//!   new ones are accepted, but not a byte goes through either way until it thaws.
//!
//! It can also put a distance between the two ends ([`TcpProxy::start_with_delay`]): every byte
//! arrives a fixed time after it was sent, each way, as from a dependency on another host.
//!
//! Used by the benchmark, the drills and the integration tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy the caller controls; see the module documentation.
pub struct TcpProxy {
    pub port: u16,
    open: Arc<AtomicBool>,
    cut_signal: watch::Sender<u64>,
    frozen: watch::Sender<bool>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        TcpProxy::start_with_delay(upstream, Duration::ZERO).await
    }

    /// A proxy whose every byte arrives `one_way` after it was sent, each way (a round trip
    /// costs twice that), however many are in flight: a distance, not a bandwidth limit. Tokio's
    /// timers have a resolution of 1 ms.
    pub async fn start_with_delay(upstream: SocketAddr, one_way: Duration) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let (cut_signal, _) = watch::channel(0u64);
        let (frozen, _) = watch::channel(false);
        let accept_open = open.clone();
        let accept_signal = cut_signal.clone();
        let accept_frozen = frozen.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !accept_open.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut = accept_signal.subscribe();
                let frozen = accept_frozen.subscribe();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = relay(inbound, upstream, frozen, one_way) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        TcpProxy {
            port,
            open,
            cut_signal,
            frozen,
        }
    }

    /// The dependency refuses: open connections are closed, new ones too.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cut_signal.send_modify(|n| *n += 1);
    }

    /// The dependency is back after a cut.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// The dependency hangs: nothing goes through, nothing is closed.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// The dependency answers again: what waited goes through.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }
}

/// One connection: waits while frozen before even connecting upstream, then copies both ways.
async fn relay(
    inbound: TcpStream,
    upstream: SocketAddr,
    mut frozen: watch::Receiver<bool>,
    one_way: Duration,
) {
    if wait_thawed(&mut frozen).await.is_err() {
        return;
    }
    let Ok(outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (inbound_read, inbound_write) = inbound.into_split();
    let (outbound_read, outbound_write) = outbound.into_split();
    if one_way.is_zero() {
        tokio::select! {
            _ = copy(inbound_read, outbound_write, frozen.clone()) => {}
            _ = copy(outbound_read, inbound_write, frozen) => {}
        }
    } else {
        tokio::select! {
            _ = copy_delayed(inbound_read, outbound_write, one_way) => {}
            _ = copy_delayed(outbound_read, inbound_write, one_way) => {}
        }
    }
}

/// Copies one way, each chunk written `one_way` after it was read; reading goes on meanwhile,
/// so the delay does not limit the throughput.
async fn copy_delayed(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin + Send + 'static,
    one_way: Duration,
) -> std::io::Result<()> {
    let (chunks, mut delayed) =
        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = delayed.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        to.shutdown().await.ok();
    });
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = from.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        let due = tokio::time::Instant::now() + one_way;
        if chunks.send((due, buffer[..read].to_vec())).is_err() {
            break;
        }
    }
    drop(chunks);
    writer.await.ok();
    Ok(())
}

async fn wait_thawed(frozen: &mut watch::Receiver<bool>) -> Result<(), watch::error::RecvError> {
    while *frozen.borrow_and_update() {
        frozen.changed().await?;
    }
    Ok(())
}

/// Copies one way; while frozen it neither reads nor writes, so the sender's buffers fill as on
/// a stalled network.
async fn copy(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut frozen: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if wait_thawed(&mut frozen).await.is_err() {
            return Ok(());
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read?,
            _ = frozen.changed() => continue,
        };
        if read == 0 {
            to.shutdown().await.ok();
            return Ok(());
        }
        if wait_thawed(&mut frozen).await.is_err() {
            return Ok(());
        }
        to.write_all(&buffer[..read]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server behind a proxy that delays each way by 20 ms: a round trip takes at least
    /// 40 ms, and bytes sent back to back are not held up behind each other's delay.
    #[tokio::test]
    async fn a_delayed_proxy_delays_each_way_without_queueing_the_bytes() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = echo.accept().await.unwrap();
            let mut buffer = [0u8; 64];
            loop {
                let n = socket.read(&mut buffer).await.unwrap_or(0);
                if n == 0 || socket.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
        });
        let proxy = TcpProxy::start_with_delay(upstream, Duration::from_millis(20)).await;
        let mut client = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        let started = std::time::Instant::now();
        for _ in 0..5 {
            client.write_all(b"ping").await.unwrap();
        }
        let mut answer = [0u8; 20];
        client.read_exact(&mut answer).await.unwrap();
        let took = started.elapsed();
        assert_eq!(&answer, b"pingpingpingpingping");
        assert!(took >= Duration::from_millis(40), "{took:?}");
        // Five pieces in flight at once: about one round trip, not five.
        assert!(took < Duration::from_millis(150), "{took:?}");
    }
}
