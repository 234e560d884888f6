//! librdkafka's mock cluster behind a TCP proxy per broker, so that the demo and the
//! end-to-end tests can cut the uplink and restore it without librdkafka's own
//! `broker_down`/`broker_up`. In the `demo` feature (not in device builds).
//!
//! Why not those: `broker_down` closes the broker's listening socket and binds its port
//! again at once, and librdkafka *asserts* that this bind succeeds. The port is an
//! ephemeral one, and on a busy machine (tests in parallel, each with a gateway, a
//! consumer and reconnect attempts) the bind now and then loses the port to another
//! socket: the assertion aborts the whole test process and every test in it. Here each
//! broker advertises the address of a proxy that stays bound for the cluster's lifetime.
//! Cutting the uplink closes every proxied connection and closes new ones as soon as they
//! are accepted; restoring it lets connections through again. What the gateway sees is
//! what it sees when a real uplink drops: its connections end and reconnects fail until
//! the broker is reachable again.

// The mock cluster's C API is reached through rdkafka's re-exported bindings: the
// `MockCluster` wrapper keeps its handle private and has no way to change a broker's
// advertised address. Every call below passes the handle created here, alive until drop.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use rdkafka::bindings as sys;
use rdkafka::client::{Client, DefaultClientContext};
use rdkafka::types::RDKafkaType;
use rdkafka::ClientConfig;

/// A mock cluster whose brokers are reached only through [`Proxy`]s.
pub struct ProxiedCluster {
    // Dropped first: the proxies close their connections before the cluster goes away.
    proxies: Vec<Proxy>,
    cluster: *mut sys::rd_kafka_mock_cluster_t,
    // The client that owns the cluster; must outlive it (dropped after `Drop::drop`).
    _client: Client<DefaultClientContext>,
    /// The proxies' `host:port` list, to use as `bootstrap.servers`.
    pub bootstrap: String,
}

impl ProxiedCluster {
    /// A cluster of `brokers` brokers, each behind its own proxy.
    pub fn new(brokers: i32) -> anyhow::Result<ProxiedCluster> {
        let config = ClientConfig::new();
        let client = Client::new(
            &config,
            config.create_native_config()?,
            RDKafkaType::RD_KAFKA_PRODUCER,
            DefaultClientContext,
        )?;
        // SAFETY: the client handle is valid; the cluster it returns is destroyed in
        // `Drop` before the client is.
        let cluster = unsafe { sys::rd_kafka_mock_cluster_new(client.native_ptr(), brokers) };
        anyhow::ensure!(!cluster.is_null(), "librdkafka refused a mock cluster");
        // SAFETY: a valid cluster; the string is copied before any other call.
        let direct = unsafe { CStr::from_ptr(sys::rd_kafka_mock_cluster_bootstraps(cluster)) }
            .to_string_lossy()
            .into_owned();
        let mut this = ProxiedCluster {
            proxies: Vec::new(),
            cluster,
            _client: client,
            bootstrap: String::new(),
        };
        // The list is in broker order, ids 1..=brokers.
        let host = CString::new("127.0.0.1")?;
        for (id, target) in (1..).zip(direct.split(',')) {
            let proxy = Proxy::start(target)?;
            // SAFETY: a valid cluster and a NUL-terminated host that outlives the call
            // (librdkafka copies it).
            unsafe {
                sys::rd_kafka_mock_broker_set_host_port(
                    this.cluster,
                    id,
                    host.as_ptr(),
                    i32::from(proxy.port),
                )
            };
            this.proxies.push(proxy);
        }
        this.bootstrap = this
            .proxies
            .iter()
            .map(|p| format!("127.0.0.1:{}", p.port))
            .collect::<Vec<_>>()
            .join(",");
        Ok(this)
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        let name = CString::new(topic)?;
        // SAFETY: a valid cluster and a NUL-terminated name that outlives the call.
        let err =
            unsafe { sys::rd_kafka_mock_topic_create(self.cluster, name.as_ptr(), partitions, 1) };
        anyhow::ensure!(
            err == sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
            "mock topic {topic}: {err:?}"
        );
        Ok(())
    }

    /// Delays every broker's responses by `rtt`, as a long uplink would.
    pub fn set_rtt(&self, rtt: std::time::Duration) -> anyhow::Result<()> {
        let ms = i32::try_from(rtt.as_millis())?;
        for id in (1..).take(self.proxies.len()) {
            // SAFETY: a valid cluster and one of its broker ids.
            let err = unsafe { sys::rd_kafka_mock_broker_set_rtt(self.cluster, id, ms) };
            anyhow::ensure!(
                err == sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
                "mock broker {id} rtt: {err:?}"
            );
        }
        Ok(())
    }

    /// Fails the next `errors.len()` requests of the protocol API `api_key` with
    /// `errors`, in order (whichever client sends them).
    pub fn push_request_errors(&self, api_key: i16, errors: &[sys::rd_kafka_resp_err_t]) {
        // SAFETY: a valid cluster; librdkafka copies the array during the call.
        unsafe {
            sys::rd_kafka_mock_push_request_errors_array(
                self.cluster,
                api_key,
                errors.len(),
                errors.as_ptr(),
            );
        }
    }

    /// Cuts every broker off: open connections are closed, new ones closed on accept.
    pub fn down(&self) {
        for p in &self.proxies {
            p.set_down(true);
        }
    }

    /// Lets connections through to every broker again.
    pub fn up(&self) {
        for p in &self.proxies {
            p.set_down(false);
        }
    }
}

impl Drop for ProxiedCluster {
    fn drop(&mut self) {
        self.proxies.clear();
        // SAFETY: created in `new`, destroyed once, while its client is still alive.
        unsafe { sys::rd_kafka_mock_cluster_destroy(self.cluster) };
    }
}

/// A TCP proxy in front of one broker (a Kafka mock broker, or Mosquitto in the MQTT
/// connection tests) that can cut its connections and refuse service.
pub struct Proxy {
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    next: AtomicU64,
    /// Whether the broker is cut off, and the connections open through it (both ends),
    /// under one lock so that no connection opens after a cut.
    links: Mutex<Links>,
}

#[derive(Default)]
struct Links {
    down: bool,
    open: HashMap<u64, (TcpStream, TcpStream)>,
}

impl Shared {
    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Proxy {
    /// A proxy to `target` (`host:port`) on a free port.
    pub fn start(target: &str) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let port = listener.local_addr()?.port();
        let target: SocketAddr = target.parse()?;
        let shared = Arc::new(Shared::default());
        let accept = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("proxy-{port}"))
                .spawn(move || accept_loop(&listener, &target, &shared))?
        };
        Ok(Proxy {
            port,
            shared,
            accept: Some(accept),
        })
    }

    /// Closes every connection open through it; new ones go through as before. What
    /// a client sees when a network path drops for a moment.
    pub fn cut(&self) {
        self.set_down(true);
        self.set_down(false);
    }

    fn set_down(&self, down: bool) {
        let mut links = self.shared.links();
        links.down = down;
        if down {
            for (_, (a, b)) in links.open.drain() {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.set_down(true);
        // Wakes the accept loop so that it sees `stop`; if that connect fails the loop
        // may never wake, so it is left behind rather than waited for.
        let woken = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            CONNECT_TIMEOUT,
        )
        .is_ok();
        if let Some(t) = self.accept.take() {
            if woken {
                let _ = t.join();
            }
        }
    }
}

/// How long the proxy waits for the mock broker (or itself) to accept a connection.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

fn accept_loop(listener: &TcpListener, target: &SocketAddr, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let client = match client {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                // Out of descriptors or the like: back off rather than spin.
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        if shared.links().down {
            continue; // dropped: closed at once
        }
        let Ok(server) = TcpStream::connect_timeout(target, CONNECT_TIMEOUT) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        ) else {
            continue;
        };
        let id = shared.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut links = shared.links();
            if links.down {
                continue;
            }
            links.open.insert(id, (c3, s3));
        }
        let up = pump(client, server, id, shared.clone());
        let down = pump(s2, c2, id, shared.clone());
        if up.is_err() || down.is_err() {
            if let Some((a, b)) = shared.links().open.remove(&id) {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Copies `from` to `to` on a thread of its own; when either end closes, closes both and
/// forgets the link.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    id: u64,
    shared: Arc<Shared>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("proxy-pump".into())
        .spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            shared.links().open.remove(&id);
        })
}
