//! The server of `cargo xtask bench fanout`: one room, `/ws/bench`, served by
//! a consumer written against axum-channels, on the channel layer chosen
//! with `--layer`:
//!
//! - `memory`: the in-memory layer, as steps 00 to 02 use;
//! - `pubsub`: the Redis pub/sub layer, on the Redis at `--redis URL`;
//! - `queue`: the Redis queue layer, on the same;
//! - `pubsub-cluster`, `queue-cluster`: the same two on a Redis Cluster
//!   (`RedisPubSubLayer::connect_cluster`, `RedisClusterLayer`), whose
//!   nodes `--redis` lists, comma-separated.
//!
//! ```text
//! room-server --layer pubsub --redis redis://127.0.0.1:PORT --port 9003
//! room-server --layer queue-cluster --redis redis://127.0.0.1:P1,redis://127.0.0.1:P2
//! ```
//!
//! Every connection joins the group `bench`; every text a client sends goes
//! through the layer to every member (the sender included) unchanged, so the
//! load generator can read its sequence number and send time back out of
//! it. Nothing else is said: no greeting, no join notice, so what a client
//! receives is exactly the room's traffic.
//!
//! The layer is connected before the port is bound, so a server that
//! accepts connections is ready to be measured. Several of these on one
//! Redis form one room across processes (what a two-server fan-out needs).

#[path = "../args.rs"]
mod args;

use std::process::ExitCode;

use axum::Router;
use axum_channels::layer::redis::{RedisClusterLayer, RedisConfig, RedisLayer, RedisPubSubLayer};
use axum_channels::layer::{BackendError, InMemoryLayer, LayerError, Layers};
use axum_channels::{Consumer, Frame, LayerEvent, Result, Scope, Socket};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// The one group every connection joins.
const GROUP: &str = "bench";

/// What travels through the layer, in the shape a step's room uses.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BenchEvent {
    RoomMessage { message: String },
}

impl LayerEvent for BenchEvent {}

/// One member of the room.
struct BenchRoom;

impl Consumer for BenchRoom {
    type Event = BenchEvent;
    const LAYER: Option<&'static str> = Some("room");

    fn new(_scope: &Scope) -> Self {
        BenchRoom
    }

    fn groups(&self) -> Vec<String> {
        vec![GROUP.to_owned()]
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await
    }

    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        match frame {
            Frame::Text(message) => {
                socket
                    .group_send(GROUP, &BenchEvent::RoomMessage { message })
                    .await
            }
            Frame::Binary(_) => Ok(()),
        }
    }

    async fn event(&mut self, socket: &mut Socket, event: BenchEvent) -> Result<()> {
        match event {
            BenchEvent::RoomMessage { message } => socket.send_text(message).await,
        }
    }
}

/// The layer named by `--layer`, connected.
async fn layers(kind: &str, redis: &str) -> Result<Layers, LayerError> {
    let layers = Layers::new();
    if kind != "memory" && redis.is_empty() {
        // No default URL: a benchmark must never touch a Redis it did not
        // start (say, the machine's own on port 6379).
        return Err(LayerError::Backend(BackendError::new(format!(
            "--layer {kind} needs --redis redis://127.0.0.1:PORT"
        ))));
    }
    Ok(match kind {
        "memory" => layers.with("room", InMemoryLayer::default()),
        "pubsub" => layers.with(
            "room",
            RedisPubSubLayer::connect(RedisConfig::new(redis)).await?,
        ),
        "queue" => layers.with("room", RedisLayer::connect(RedisConfig::new(redis)).await?),
        "pubsub-cluster" => layers.with(
            "room",
            RedisPubSubLayer::connect_cluster(cluster(redis)).await?,
        ),
        "queue-cluster" => layers.with("room", RedisClusterLayer::connect(cluster(redis)).await?),
        other => {
            return Err(LayerError::Backend(BackendError::new(format!(
                "unknown --layer {other:?}: use memory, pubsub, queue, pubsub-cluster or \
                 queue-cluster"
            ))));
        }
    })
}

/// A cluster's nodes, from `--redis url1,url2,...`.
fn cluster(nodes: &str) -> RedisConfig {
    RedisConfig::default().with_hosts(nodes.split(',').map(str::to_owned).collect::<Vec<_>>())
}

fn main() -> ExitCode {
    let kind: String = args::arg("layer", "memory".to_owned());
    let redis: String = args::arg("redis", String::new());
    let port: u16 = args::arg("port", 9003);
    // Warnings only, on stderr (the bench discards stdout, and shows
    // stderr): a layer that drops messages or loses Redis says so.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    // The runtime a step's `#[tokio::main]` builds: one worker per CPU this
    // process may use (one, when the bench pins it).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let layers = match layers(&kind, &redis).await {
            Ok(layers) => layers,
            Err(err) => {
                eprintln!("room-server: {err}");
                return ExitCode::FAILURE;
            }
        };
        let app = Router::new().route("/ws/bench", layers.route::<BenchRoom>());
        let listener = match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("room-server: cannot listen on port {port}: {err}");
                return ExitCode::FAILURE;
            }
        };
        // `serve`, as the steps do: TCP_NODELAY and the library's settings.
        match axum_channels::serve(listener, app).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("room-server: {err}");
                ExitCode::FAILURE
            }
        }
    })
}
