//! The entry point of `cargo xtask fuzz` (compiled only under cargo-fuzz's `--cfg fuzzing`).

use std::{sync::Arc, time::Duration};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use super::{BODY_BUDGET, Backend, Limits, OwnNames, Shared, Timeouts, connection};
use crate::mock::{CloudKind, MockValues, Mocks};

/// Serves `input` as one client connection of the EC2 mock, in memory, on a paused clock (so
/// that every timeout passes at once), and returns everything the proxy answered.
pub fn client_sends(input: &[u8]) -> Vec<u8> {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime");
    }
    RUNTIME.with(|runtime| runtime.block_on(serve(input)))
}

async fn serve(input: &[u8]) -> Vec<u8> {
    let backend = Backend::Mock(Arc::new(Mocks::new(CloudKind::Ec2, &MockValues::default())));
    let limits = Limits {
        max_connections: 1,
        per_caller: 1,
        timeouts: Timeouts {
            idle: Some(Duration::from_secs(75)),
            request_read: Duration::from_secs(10),
            send: Duration::from_secs(60),
        },
    };
    let names = OwnNames::new(["169.254.169.254".to_owned()]);
    let shared = Shared::new(backend, names, limits, BODY_BUDGET);
    let (client, server) = tokio::io::duplex(64 << 10);
    let serving = tokio::spawn(async move {
        let host = crate::caller::Peer {
            caller: Arc::new(crate::caller::Caller::new(
                "net:[1]".to_owned(),
                true,
                String::new(),
            )),
            pid: None,
        };
        connection::serve(server, &shared, &CancellationToken::new(), host, None).await;
    });
    let (mut read, mut write) = tokio::io::split(client);
    let send = async {
        let _ = write.write_all(input).await;
    };
    let mut answer = Vec::new();
    let ((), _) = tokio::join!(send, read.read_to_end(&mut answer));
    serving.await.expect("the connection task does not panic");
    answer
}
