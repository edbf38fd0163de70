//! Background jobs: what a job is, what each kind does, the job queue, and
//! the workers that run the jobs and send their results back.
//!
//! The consumer ([`crate::background_job`]) never runs a job itself. It puts
//! a [`Job`] in the [`JobQueue`] and returns to its client at once. A worker
//! takes the job out, runs it, and sends the result through the channel
//! layer to the channel named in the job's `reply_to`: the channel of the
//! connection that asked.
//!
//! Where the queue lives is decided once, in [`Backends::from_config`]:
//!
//! - without `REDIS_URL`, in this process: apalis's in-memory storage, a pool
//!   of workers in this process that runs several jobs at once, and the
//!   in-memory channel layer;
//! - with `REDIS_URL`, in Redis: apalis-redis's storage, which any number of
//!   `worker` processes ([`run_worker`], `src/bin/worker.rs`) take jobs
//!   from, and the Redis pub/sub channel layer, which carries each result
//!   back to whichever server process holds the connection. With several
//!   Redis URLs, the queue lives on the first (see [`queue_host`]).

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::{BackendFactory, PollWith, StreamStrategy};
use apalis::prelude::{
    BoxDynError, Data, MemorySink, MemoryStorage, MemoryStorageError, ParallelizeExt, Task,
    TaskBuilder, TaskId, TaskSink, WorkerBuilder, WorkerBuilderExt,
};
use apalis_redis::factory::{Pubsub, RedisStorageFactory};
use apalis_redis::{Client, IntoConnectionInfo, RedisError, RedisStorage};
use futures_channel::mpsc::{self, UnboundedSender};
use futures_util::lock::Mutex;
use futures_util::{SinkExt, StreamExt};
use redis::ProtocolVersion;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use ulid::Ulid;

use axum_channels::layer::{ChannelLayer, Layers, to_layer_message};
use axum_channels::server::shutdown_signal;
use axum_channels::{LayerEvent, Runtime};

use crate::config::{Config, redis_hosts};
use crate::layers;

/// How many jobs one worker runs at once. The original's single worker ran
/// them one after the other.
const CONCURRENCY: usize = 4;

/// The Redis queue's name: its keys are `background_jobs:active`,
/// `background_jobs:inflight`, ...
const QUEUE: &str = "background_jobs";

/// A worker silent for this many heartbeats is taken for dead.
const MISSED_HEARTBEATS: usize = 3;

// ANCHOR: job
/// One job, as it waits in the queue: `{"kind": "translate", "content":
/// "hello", "reply_to": "specific.inmemory!5e0c71a21"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// What to do.
    pub kind: JobKind,
    /// What to do it to.
    pub content: String,
    /// The channel of the connection that asked: where the result goes.
    pub reply_to: String,
}

/// The four kinds of job, with the original's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Default,
    Translate,
    Analyze,
    Generate,
}
// ANCHOR_END: job

impl JobKind {
    /// Every kind, in the order the page lists them.
    pub const ALL: [JobKind; 4] = [
        JobKind::Default,
        JobKind::Translate,
        JobKind::Analyze,
        JobKind::Generate,
    ];

    /// The name the page sends as `"type"`.
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Default => "default",
            JobKind::Translate => "translate",
            JobKind::Analyze => "analyze",
            JobKind::Generate => "generate",
        }
    }

    /// The kind called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<JobKind> {
        JobKind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    // ANCHOR: delay
    /// How long the original's job of this kind pretends to work.
    pub fn delay(self) -> Duration {
        let seconds = match self {
            JobKind::Default => 1,
            JobKind::Translate => 2,
            JobKind::Analyze => 3,
            JobKind::Generate => 4,
        };
        Duration::from_secs(seconds)
    }
    // ANCHOR_END: delay

    // ANCHOR: process
    /// The work itself: the original's result for `content`, exactly.
    pub fn process(self, content: &str) -> String {
        match self {
            JobKind::Default => format!("✅ Processed: {}", content.to_uppercase()),
            JobKind::Translate => format!("🌍 Translated: '{content}' → '{}'", translate(content)),
            JobKind::Analyze => analyze(content),
            JobKind::Generate => format!("🤖 AI Response to '{content}':\n{}", generate(content)),
        }
    }
    // ANCHOR_END: process
}

/// A four-entry dictionary; the whole text must match, in any case.
fn translate(content: &str) -> String {
    let known = match content.to_lowercase().as_str() {
        "hello" => "hola",
        "world" => "mundo",
        "good morning" => "buenos días",
        "thank you" => "gracias",
        _ => return format!("[TRANSLATED: {content}]"),
    };
    known.to_owned()
}

/// Counts as the original does: characters are Unicode code points, words
/// are separated by whitespace, vowels are `aeiou` only, and consonants are
/// the other letters, `ñ` and `í` included.
fn analyze(content: &str) -> String {
    let lower = content.to_lowercase();
    let is_vowel = |c: &char| "aeiou".contains(*c);
    let vowels = lower.chars().filter(is_vowel).count();
    let consonants = lower
        .chars()
        .filter(|c| c.is_alphabetic() && !is_vowel(c))
        .count();
    format!(
        "📊 Analysis of '{content}':\n• Characters: {}\n• Words: {}\n• Vowels: {vowels}\n• Consonants: {consonants}",
        content.chars().count(),
        content.split_whitespace().count(),
    )
}

/// The first rule that matches wins. As in the original, `eat` also matches
/// inside words: "great" and "seat" are about food.
fn generate(content: &str) -> String {
    let lower = content.to_lowercase();
    let answer = if lower.contains("weather") {
        "The weather is looking great today! Perfect for a walk outside."
    } else if lower.contains("food") || lower.contains("eat") {
        "I'd recommend trying that new restaurant downtown. Their pasta is excellent!"
    } else if lower.contains("help") {
        "I'm here to help! Feel free to ask me anything you'd like to know."
    } else {
        return format!(
            "That's an interesting point about '{content}'. Let me think about that... \
             Based on my analysis, I would suggest exploring this topic further through \
             research and practical application."
        );
    };
    answer.to_owned()
}

// ANCHOR: event
/// What a worker sends to a job's `reply_to` channel when the job is done:
/// `{"type": "job_result", "message": "✅ Processed: HELLO", "job_id": "01K…"}`.
/// The consumer passes it on to its client as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobEvent {
    JobResult { message: String, job_id: String },
}

impl LayerEvent for JobEvent {}
// ANCHOR_END: event

// ANCHOR: queue
/// Where the consumer puts jobs. Cheap to clone: clones share one queue.
#[derive(Clone)]
pub enum JobQueue {
    /// A channel to the worker pool in this process.
    Memory(UnboundedSender<Task<Job>>),
    /// A queue in Redis, which `worker` processes take jobs from. (Boxed:
    /// it is large, and the other variant is small.)
    Redis(Box<RedisStorage<Job>>),
}

impl JobQueue {
    /// Queues `job` and returns the id it was given.
    pub async fn push(&self, job: Job) -> Result<String, String> {
        // A ULID: unique, and sorted by the time it was made.
        let id = TaskId::from(Ulid::generate());
        let task = TaskBuilder::new(job).task_id(id.clone()).build();
        let pushed = match self {
            JobQueue::Memory(sender) => sender.unbounded_send(task).map_err(|e| e.to_string()),
            // Pushing takes `&mut`: a clone of our own (clones share the
            // connection).
            JobQueue::Redis(storage) => RedisStorage::clone(storage)
                .push_task(task)
                .await
                .map_err(|e| e.to_string()),
        };
        pushed.map(|()| id.to_string())
    }
}
// ANCHOR_END: queue

// ANCHOR: run_job
/// What every job needs besides itself, shared by the worker's jobs.
#[derive(Clone)]
struct Tools {
    /// The layer the results go through: the app's `"chat"` layer.
    results: Arc<dyn ChannelLayer>,
    /// How long every job pretends to work, or `None` for its kind's delay.
    delay: Option<Duration>,
}

/// Runs one job, the same way in every worker: waits, works, and sends the
/// result to the channel that asked. apalis calls it with the job, its id,
/// and the `Tools` given to the worker with `.data(...)`.
async fn run_job(job: Job, id: TaskId, tools: Data<Tools>) -> Result<(), BoxDynError> {
    tracing::debug!(%id, kind = job.kind.name(), "job started");
    tokio::time::sleep(tools.delay.unwrap_or(job.kind.delay())).await;
    let result = JobEvent::JobResult {
        message: job.kind.process(&job.content),
        job_id: id.to_string(),
    };
    // If the client has left, its channel is gone and the layer drops the
    // result (with a debug line); nothing else needs to happen.
    tools
        .results
        .send(&job.reply_to, to_layer_message(&result)?)
        .await?;
    tracing::debug!(%id, "job done");
    Ok(())
}
// ANCHOR_END: run_job

// ANCHOR: backends
/// The channel layers and the job queue of the app, chosen together.
pub struct Backends {
    /// The channel layers, by alias.
    pub layers: Layers,
    /// Where the consumer puts jobs.
    pub queue: JobQueue,
}

impl Backends {
    /// The one place that decides where jobs and results go: Redis if
    /// `REDIS_URL` is set, this process otherwise.
    pub async fn from_config(config: &Config, runtime: &Runtime) -> Result<Backends, String> {
        match &config.redis_url {
            None => Ok(Backends::in_memory(config.job_delay, runtime)),
            Some(url) => Backends::redis(url, config).await,
        }
    }

    /// Everything in this process: the in-memory layer, an in-memory queue,
    /// and a pool of workers on this server's runtime.
    pub fn in_memory(delay: Option<Duration>, runtime: &Runtime) -> Backends {
        let layers = layers::setup();
        let results = layers
            .get("chat")
            .expect("layers::setup registers \"chat\"");
        let (queue, storage) = memory_queue();
        // Each job is a task of the server's runtime, so that a shutdown waits
        // for the job in hand rather than cut it off.
        let jobs = runtime.clone();
        let worker = WorkerBuilder::new("in-process")
            .backend(storage)
            .data(Tools { results, delay })
            .concurrency(CONCURRENCY)
            .parallelize(move |job| jobs.spawn(job))
            .build(run_job);
        // When the server shuts down, the workers take no new job and
        // finish the ones they run; the shutdown waits for them.
        let stopping = runtime.clone();
        runtime.spawn_background(async move {
            let stopped = worker.run_with_ctx(move |worker| {
                let shutdown = stopping.shutting_down();
                async move {
                    shutdown.await;
                    worker.stop()
                }
            });
            if let Err(err) = stopped.await {
                tracing::warn!(%err, "the in-process workers stopped");
            }
        });
        Backends {
            layers,
            queue: JobQueue::Memory(queue),
        }
    }

    /// Jobs wait in Redis for `worker` processes; results come back through
    /// Redis pub/sub.
    async fn redis(url: &str, config: &Config) -> Result<Backends, String> {
        let layers = layers::setup_redis(
            url,
            config.redis_cluster_url.as_deref(),
            config.group_expiry,
        )
        .await?;
        let queue = queue_host(url);
        let connection = apalis_redis::connect(queue.as_str())
            .await
            .map_err(|e| format!("cannot connect to Redis at {queue}: {e}"))?;
        let storage =
            RedisStorage::new(connection).with_config(queue_config(config.worker_heartbeat));
        Ok(Backends {
            layers,
            queue: JobQueue::Redis(Box::new(storage)),
        })
    }
}
// ANCHOR_END: backends

// ANCHOR: queue_host
/// The Redis that holds the job queue: the first of `REDIS_URL`. apalis
/// keeps a queue on one Redis, and jobs are few beside the messages the
/// layers carry, so the queue is not sharded; every server and worker lists
/// the same first URL, so they all meet there.
fn queue_host(url: &str) -> String {
    redis_hosts(url).swap_remove(0)
}
// ANCHOR_END: queue_host

// ANCHOR: memory_queue
/// The in-process queue: a channel whose sending half the consumers share,
/// and whose receiving half apalis's `MemoryStorage` reads for the workers.
/// (`MemoryStorage::new` keeps its sending half to itself, and the workers
/// need the storage, so the channel is made here.)
fn memory_queue() -> (UnboundedSender<Task<Job>>, MemoryStorage<Job>) {
    let (sender, receiver) = mpsc::unbounded();
    let storage_sender = sender.clone().sink_map_err(MemoryStorageError::SendError);
    let storage_sink = MemorySink::new(Arc::new(Mutex::new(Box::new(storage_sender))));
    (
        sender,
        MemoryStorage::new_with(storage_sink, receiver.boxed()),
    )
}
// ANCHOR_END: memory_queue

// ANCHOR: queue_config
/// The Redis queue's settings, the same for the server and every worker.
fn queue_config(heartbeat: Duration) -> apalis_redis::Config {
    apalis_redis::Config::default()
        .queue(QUEUE)
        // Take one job per free slot, so that several workers share the work.
        .batch_size(1)
        // A worker silent for 3 heartbeats is taken for dead, and the jobs
        // it held go back to the queue for the others.
        .heartbeat_interval(heartbeat)
        .missed_heartbeats(MISSED_HEARTBEATS)
}
// ANCHOR_END: queue_config

// ANCHOR: run_worker
/// Runs a worker on the Redis queue until Ctrl+C: the `worker` binary.
pub async fn run_worker(config: &Config) -> Result<(), String> {
    let Some(url) = config.redis_url.as_deref() else {
        return Err("REDIS_URL is not set: a worker takes its jobs from Redis \
                    (`cargo xtask step 05 --redis` starts one for you)"
            .into());
    };
    let layers = layers::setup_redis(
        url,
        config.redis_cluster_url.as_deref(),
        config.group_expiry,
    )
    .await?;
    let results = layers.get("chat").map_err(|e| e.to_string())?;
    let storage = redis_worker_storage(&queue_host(url), config.worker_heartbeat).await?;
    // Every worker has a name of its own in Redis, which keeps its
    // heartbeat and the jobs it holds.
    let id = Ulid::generate().to_string();
    let name = format!("worker-{}-{}", std::process::id(), &id[20..]);
    tracing::info!(name, "waiting for jobs");
    let worker = WorkerBuilder::new(name.as_str())
        .backend(storage)
        .data(Tools {
            results,
            delay: config.job_delay,
        })
        .concurrency(CONCURRENCY)
        .parallelize(tokio::spawn)
        .build(run_job);
    // On Ctrl+C or SIGTERM the worker takes no new job, finishes the ones
    // it runs, and puts back the ones it had taken but not started.
    let stop = async {
        shutdown_signal().await;
        Ok::<(), std::io::Error>(())
    };
    worker
        .run_until(stop)
        .await
        .map_err(|e| format!("the worker stopped: {e}"))?;
    tracing::info!(name, "stopped");
    Ok(())
}
// ANCHOR_END: run_worker

// ANCHOR: worker_storage
/// The queue as a worker reads it: besides the storage, a subscription to
/// the queue's "job available" notices, so an idle worker wakes the moment
/// a job is queued instead of asking Redis again and again. (Notices come
/// as RESP3 push messages, hence the protocol.)
async fn redis_worker_storage(
    url: &str,
    heartbeat: Duration,
) -> Result<PollWith<RedisStorage<Job, MultiplexedConnection>, StreamStrategy<Pubsub>>, String> {
    let unreachable = |e: RedisError| format!("cannot connect to Redis at {url}: {e}");
    let info = url.into_connection_info().map_err(unreachable)?;
    let resp3 = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let client = Client::open(info.set_redis_settings(resp3)).map_err(unreachable)?;
    let mut factory = RedisStorageFactory::new(client)
        .await
        .map_err(unreachable)?;
    BackendFactory::<Job>::create_with_config(&mut factory, queue_config(heartbeat))
        .map_err(unreachable)
}
// ANCHOR_END: worker_storage

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in JobKind::ALL {
            assert_eq!(JobKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(JobKind::from_name("Translate"), None);
        assert_eq!(JobKind::from_name("bogus"), None);
    }

    #[test]
    fn the_originals_outputs() {
        let cases = [
            (JobKind::Default, "hello", "✅ Processed: HELLO"),
            (JobKind::Default, "straße", "✅ Processed: STRASSE"),
            (
                JobKind::Translate,
                "hello",
                "🌍 Translated: 'hello' → 'hola'",
            ),
            (
                JobKind::Translate,
                "Good Morning",
                "🌍 Translated: 'Good Morning' → 'buenos días'",
            ),
            (
                JobKind::Translate,
                " hello",
                "🌍 Translated: ' hello' → '[TRANSLATED:  hello]'",
            ),
            (
                JobKind::Analyze,
                "Hello world",
                "📊 Analysis of 'Hello world':\n• Characters: 11\n• Words: 2\n• Vowels: 3\n• Consonants: 7",
            ),
            (
                JobKind::Analyze,
                "Año día",
                "📊 Analysis of 'Año día':\n• Characters: 7\n• Words: 2\n• Vowels: 3\n• Consonants: 3",
            ),
            (
                JobKind::Generate,
                "what about the weather",
                "🤖 AI Response to 'what about the weather':\nThe weather is looking great today! Perfect for a walk outside.",
            ),
            (
                JobKind::Generate,
                "a great seat",
                "🤖 AI Response to 'a great seat':\nI'd recommend trying that new restaurant downtown. Their pasta is excellent!",
            ),
            (
                JobKind::Generate,
                "HELP",
                "🤖 AI Response to 'HELP':\nI'm here to help! Feel free to ask me anything you'd like to know.",
            ),
        ];
        for (kind, content, expected) in cases {
            assert_eq!(kind.process(content), expected, "{kind:?} {content:?}");
        }
    }

    #[test]
    fn the_first_matching_rule_wins() {
        // "weather" comes before "eat", which it contains.
        assert!(
            JobKind::Generate
                .process("weather")
                .contains("walk outside")
        );
        // "food" comes before "help".
        assert!(
            JobKind::Generate
                .process("help me find food")
                .contains("pasta")
        );
        let other = JobKind::Generate.process("rust");
        assert!(
            other.ends_with("research and practical application."),
            "{other}"
        );
    }

    #[test]
    fn the_delays_are_the_originals() {
        let seconds: Vec<u64> = JobKind::ALL.map(|kind| kind.delay().as_secs()).to_vec();
        assert_eq!(seconds, [1, 2, 3, 4]);
    }

    #[test]
    fn a_result_is_the_frame_the_page_expects() {
        let event = JobEvent::JobResult {
            message: "✅ Processed: HI".into(),
            job_id: "01K".into(),
        };
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            r#"{"type":"job_result","message":"✅ Processed: HI","job_id":"01K"}"#
        );
    }
}
