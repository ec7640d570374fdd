//! One process's share of the idle connections: each in its own task, opened with a bounded
//! number of handshakes at once, then held (reading, which also answers the server's pings)
//! until told to close.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tether::client::{ClientError, SocketOptions};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::stats::Tally;
use crate::target::{connect_established, error_kind, source_ip, Target, Tokens};

/// Which idle connections one process opens, and how.
pub(super) struct ShareSpec {
    /// Global connection indexes: users and source addresses follow them.
    pub(super) range: Range<u64>,
    pub(super) spread: bool,
    pub(super) concurrency: u64,
    pub(super) connect_timeout: Duration,
}

/// One process's share of idle connections, held open until `stop`.
pub(super) struct IdleShare {
    pub(super) connected: u64,
    pub(super) failed: u64,
    /// Connections that ended while held.
    pub(super) lost: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

/// What every connection task of a share needs.
struct Conn {
    target: Target,
    tokens: Arc<Tokens>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
    lost: Arc<AtomicU64>,
    tally: Arc<Tally>,
    spread: bool,
    connect_timeout: Duration,
}

impl IdleShare {
    /// Open the connections of `spec`, each in its own task, and wait until every one is
    /// established or has failed.
    pub(super) async fn open(
        target: &Target,
        tokens: Arc<Tokens>,
        spec: ShareSpec,
        tally: Arc<Tally>,
        progress: Arc<AtomicU64>,
    ) -> Self {
        let stop = CancellationToken::new();
        let lost = Arc::new(AtomicU64::new(0));
        let conn = Arc::new(Conn {
            target: target.clone(),
            tokens,
            permits: Arc::new(Semaphore::new(spec.concurrency.max(1) as usize)),
            stop: stop.clone(),
            lost: lost.clone(),
            tally,
            spread: spec.spread,
            connect_timeout: spec.connect_timeout,
        });
        let n = spec.range.end - spec.range.start;
        let (tx, mut rx) = mpsc::channel::<bool>(1024);
        let mut tasks = JoinSet::new();
        for i in spec.range {
            tasks.spawn(conn.clone().run(i, tx.clone()));
        }
        drop(tx);
        let (mut connected, mut failed) = (0, 0);
        for _ in 0..n {
            match rx.recv().await {
                Some(true) => connected += 1,
                Some(false) => failed += 1,
                None => break,
            }
            progress.fetch_add(1, Ordering::Relaxed);
        }
        Self {
            connected,
            failed,
            lost,
            stop,
            tasks,
        }
    }

    /// Close every connection and wait for the tasks (bounded).
    pub(super) async fn close(mut self) {
        self.stop.cancel();
        // Bounded: tasks still closing after it are aborted below.
        let _closed = tokio::time::timeout(Duration::from_secs(30), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
    }
}

impl Conn {
    /// Connection `i`: connect (reporting whether it did on `ready`), then hold until stopped.
    async fn run(self: Arc<Self>, i: u64, ready: mpsc::Sender<bool>) {
        let sock = SocketOptions {
            bind: source_ip(self.spread, i),
            nodelay: true,
            // The smallest useful buffer: an idle client reads a few small frames.
            read_buffer_size: Some(4096),
        };
        let conn = {
            let Ok(_permit) = self.permits.acquire().await else {
                return;
            };
            tokio::select! {
                _ = self.stop.cancelled() => return,
                r = connect_established(&self.target, self.tokens.for_index(i), &sock, self.connect_timeout) => r,
            }
        };
        // The count waits for every connection's report; a closed channel means it stopped
        // waiting, and there is no one left to tell.
        let mut client = match conn {
            Ok((c, _)) => {
                let _told = ready.send(true).await;
                c
            }
            Err(e) => {
                self.tally
                    .error(error_kind(&e), || format!("connection {i}: {e}"));
                let _told = ready.send(false).await;
                return;
            }
        };
        drop(ready);
        // Hold: keep reading, which also answers the server's pings.
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                r = client.next_json(Duration::from_secs(3600)) => match r {
                    Ok(_) | Err(ClientError::Timeout(_)) => continue,
                    Err(e) => {
                        self.lost.fetch_add(1, Ordering::Relaxed);
                        self.tally.error(format!("lost: {}", error_kind(&e)), || format!("connection {i} lost: {e}"));
                        break;
                    }
                },
            }
        }
        // Dropping the client closes the socket (FIN); the server cleans up.
    }
}
