//! A TCP proxy in front of a dependency (PostgreSQL, RabbitMQ) that can fail it the two ways a
//! network fails, without touching the machine's server:
//!
//! - **cut**: the dependency refuses: new connections are closed at once, open ones are closed;
//! - **freeze**: the dependency hangs (a frozen host, a dropped route): connections stay open and
//!   new ones are accepted, but not a byte goes through either way until it thaws.
//!
//! Used by the benchmark, the drills and the integration tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
                        _ = relay(inbound, upstream, frozen) => {}
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
async fn relay(inbound: TcpStream, upstream: SocketAddr, mut frozen: watch::Receiver<bool>) {
    if wait_thawed(&mut frozen).await.is_err() {
        return;
    }
    let Ok(outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    let (inbound_read, inbound_write) = inbound.into_split();
    let (outbound_read, outbound_write) = outbound.into_split();
    tokio::select! {
        _ = copy(inbound_read, outbound_write, frozen.clone()) => {}
        _ = copy(outbound_read, inbound_write, frozen) => {}
    }
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
