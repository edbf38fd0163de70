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
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{
    BackendExt, BoxDynError, Data, MemorySink, MemoryStorage, ParallelizeExt, PollSnapshot,
    PollStrategy, Task, TaskBuilder, TaskId, TaskSink, WorkerBuilder, WorkerBuilderExt,
};
use apalis_core::backend::Vacuum;
use apalis_redis::RedisStorage;
use futures_util::lock::Mutex;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::{self, Sender, error::TrySendError};
use tokio::time::{Interval, MissedTickBehavior};
use ulid::Ulid;

use axum_channels::layer::{ChannelLayer, Layers, to_layer_message};
use axum_channels::server::shutdown_signal;
use axum_channels::{LayerEvent, Runtime};

use crate::config::{Config, redis_hosts};
use crate::layers;
use crate::rooms::Rooms;

/// How many jobs one worker runs at once. The original's single worker ran
/// them one after the other.
const CONCURRENCY: usize = 4;

/// The Redis queue's name: its keys are `background_jobs:active`,
/// `background_jobs:inflight`, ...
const QUEUE: &str = "background_jobs";

/// A worker silent for this many heartbeats is taken for dead.
const MISSED_HEARTBEATS: usize = 3;

/// How often an idle worker asks Redis for a job: a job waits at most this
/// long for a free worker.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

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

/// The kinds of job: the original's four, and `Compute`, whose work is
/// real.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Default,
    Translate,
    Analyze,
    Generate,
    Compute,
}
// ANCHOR_END: job

impl JobKind {
    /// Every kind, in the order the page lists them.
    pub const ALL: &[JobKind] = &[
        JobKind::Default,
        JobKind::Translate,
        JobKind::Analyze,
        JobKind::Generate,
        JobKind::Compute,
    ];

    /// The name the page sends as `"type"`.
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Default => "default",
            JobKind::Translate => "translate",
            JobKind::Analyze => "analyze",
            JobKind::Generate => "generate",
            JobKind::Compute => "compute",
        }
    }

    /// The kind called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<JobKind> {
        JobKind::ALL
            .iter()
            .copied()
            .find(|kind| kind.name() == name)
    }

    // ANCHOR: delay
    /// How long the original's job of this kind pretends to work. `Compute`
    /// doesn't pretend: its work takes the time.
    pub fn delay(self) -> Duration {
        let seconds = match self {
            JobKind::Default => 1,
            JobKind::Translate => 2,
            JobKind::Analyze => 3,
            JobKind::Generate => 4,
            JobKind::Compute => 0,
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
            JobKind::Compute => format!(
                "🧮 Computed for '{content}': there are {} primes below {PRIMES_BELOW}",
                count_primes(PRIMES_BELOW)
            ),
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

// ANCHOR: compute
/// How far `Compute` counts: about a second of work for one core in a
/// debug build (far less with `--release`).
const PRIMES_BELOW: u64 = 500_000;

/// Counts the primes below `limit` the slow way, dividing each number by
/// every candidate up to its square root: work for the CPU, with no
/// `.await` in it.
fn count_primes(limit: u64) -> usize {
    let is_prime = |n: u64| {
        n >= 2
            && (2..)
                .take_while(|d| d * d <= n)
                .all(|d| !n.is_multiple_of(d))
    };
    (0..limit).filter(|&n| is_prime(n)).count()
}
// ANCHOR_END: compute

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
pub struct JobQueue {
    /// Where the jobs wait.
    store: Store,
    /// How many jobs may wait for a worker, all connections together.
    max_queued: usize,
    /// How many jobs one connection may have waiting for their results.
    pub max_per_connection: usize,
}

#[derive(Clone)]
enum Store {
    /// A channel to the worker pool in this process, which holds at most
    /// `max_queued` jobs.
    Memory(Sender<Task<Job>>),
    /// A queue in Redis, which `worker` processes take jobs from. (Boxed:
    /// it is large, and the other variant is small.)
    Redis(Box<RedisStorage<Job>>),
}

/// Why a job was not queued.
#[derive(Debug)]
pub enum PushError {
    /// `max_queued` jobs are waiting already: try again later.
    Full,
    /// The queue can't be reached (Redis is away, say): the reason, for the
    /// log.
    Unavailable(String),
}

impl JobQueue {
    /// Queues `job` and returns the id it was given.
    pub async fn push(&self, job: Job) -> Result<String, PushError> {
        // A ULID: unique, and sorted by the time it was made.
        let id = TaskId::from(Ulid::generate());
        let task = TaskBuilder::new(job).task_id(id.clone()).build();
        match &self.store {
            // `try_send` never waits: a full channel is an error at once.
            Store::Memory(sender) => sender.try_send(task).map_err(|err| match err {
                TrySendError::Full(_) => PushError::Full,
                TrySendError::Closed(_) => PushError::Unavailable("the workers stopped".into()),
            })?,
            Store::Redis(storage) => {
                // Pushing takes `&mut`: a clone of our own (clones share the
                // connection).
                let mut storage = RedisStorage::clone(storage);
                if waiting_in_redis(&mut storage).await? >= self.max_queued {
                    return Err(PushError::Full);
                }
                storage.push_task(task).await.map_err(unavailable)?;
            }
        }
        Ok(id.to_string())
    }
}

/// How many jobs wait in Redis for a worker. apalis-redis 1.0 files a new
/// job in the `:scheduled` set, due at once, and a worker that asks for work
/// moves it to the `:active` list and takes it from there: a waiting job is
/// in one of the two.
async fn waiting_in_redis(storage: &mut RedisStorage<Job>) -> Result<usize, PushError> {
    let config = storage.get_config().clone();
    let (active, scheduled): (usize, usize) = redis::pipe()
        .llen(config.active_jobs_list())
        .zcard(config.scheduled_jobs_set())
        .query_async(storage.get_connection())
        .await
        .map_err(unavailable)?;
    Ok(active + scheduled)
}

fn unavailable(err: impl std::fmt::Display) -> PushError {
    PushError::Unavailable(err.to_string())
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
    let Job {
        kind,
        content,
        reply_to,
    } = job;
    tracing::debug!(%id, kind = kind.name(), "job started");
    let message = if kind == JobKind::Compute {
        // Work for the CPU, with no `.await` to pause at: on a thread of
        // tokio's blocking pool, where it holds up no other task.
        tokio::task::spawn_blocking(move || kind.process(&content)).await?
    } else {
        // Pretend work: `sleep` is an `.await`, which holds up nothing.
        tokio::time::sleep(tools.delay.unwrap_or(kind.delay())).await;
        kind.process(&content)
    };
    let result = JobEvent::JobResult {
        message,
        job_id: id.to_string(),
    };
    // If the client has left, its channel is gone and the layer drops the
    // result (with a debug line); nothing else needs to happen.
    tools
        .results
        .send(&reply_to, to_layer_message(&result)?)
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
    /// Presence and history of the named rooms.
    pub rooms: Rooms,
}

impl Backends {
    /// The one place that decides where jobs and results go: Redis if
    /// `REDIS_URL` is set, this process otherwise.
    pub async fn from_config(config: &Config, runtime: &Runtime) -> Result<Backends, String> {
        match &config.redis_url {
            None => Ok(Backends::in_memory(config, runtime)),
            Some(url) => Backends::redis(url, config, runtime).await,
        }
    }

    /// Everything in this process: the in-memory layer, an in-memory queue,
    /// and a pool of workers on this server's runtime.
    pub fn in_memory(config: &Config, runtime: &Runtime) -> Backends {
        let layers = layers::setup();
        let results = layers
            .get("chat")
            .expect("layers::setup registers \"chat\"");
        let rooms = Rooms::in_memory(config, runtime, Arc::clone(&results))
            .expect("Config::from_env checked the presence settings");
        let (sender, storage) = memory_queue(config.max_queued_jobs);
        let delay = config.job_delay;
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
        let queue = JobQueue {
            store: Store::Memory(sender),
            max_queued: config.max_queued_jobs,
            max_per_connection: config.max_jobs_per_connection,
        };
        Backends {
            layers,
            queue,
            rooms,
        }
    }

    /// Jobs wait in Redis for `worker` processes; results come back through
    /// Redis pub/sub.
    async fn redis(url: &str, config: &Config, runtime: &Runtime) -> Result<Backends, String> {
        let layers = layers::setup_redis(
            url,
            config.redis_cluster_url.as_deref(),
            config.group_expiry,
        )
        .await?;
        let chat = layers.get("chat").map_err(|err| err.to_string())?;
        let rooms = Rooms::redis(url, config, runtime, chat)
            .await
            .map_err(|err| err.to_string())?;
        let storage = redis_storage(&queue_host(url), config.worker_heartbeat).await?;
        let queue = JobQueue {
            store: Store::Redis(Box::new(storage)),
            max_queued: config.max_queued_jobs,
            max_per_connection: config.max_jobs_per_connection,
        };
        Ok(Backends {
            layers,
            queue,
            rooms,
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
/// The in-process queue: a channel that holds at most `capacity` jobs, whose
/// sending half the consumers share, and whose receiving half apalis's
/// `MemoryStorage` reads for the workers. (`MemoryStorage::new` makes a
/// channel without a limit, so the channel is made here.)
fn memory_queue(capacity: usize) -> (Sender<Task<Job>>, MemoryStorage<Job>) {
    let (sender, mut receiver) = mpsc::channel(capacity);
    let jobs = futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx));
    // The storage wants a way in too; jobs come in through `sender` only,
    // so it gets one that takes nothing anywhere.
    let unused = futures_util::sink::drain().sink_map_err(|never| match never {});
    let unused = MemorySink::new(Arc::new(Mutex::new(Box::new(unused))));
    (sender, MemoryStorage::new_with(unused, jobs.boxed()))
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
                    (`cargo xtask step 06 --redis` starts one for you)"
            .into());
    };
    let layers = layers::setup_redis(
        url,
        config.redis_cluster_url.as_deref(),
        config.group_expiry,
    )
    .await?;
    let results = layers.get("chat").map_err(|e| e.to_string())?;
    let storage = redis_storage(&queue_host(url), config.worker_heartbeat).await?;
    // Finished jobs leave Redis after a while (see `remove_finished_jobs`).
    tokio::spawn(remove_finished_jobs(
        storage.clone(),
        config.worker_heartbeat,
        config.job_retention,
    ));
    // Every worker has a name of its own in Redis, which keeps its
    // heartbeat and the jobs it holds.
    let id = Ulid::generate().to_string();
    let name = format!("worker-{}-{}", std::process::id(), &id[20..]);
    tracing::info!(name, "waiting for jobs");
    let worker = WorkerBuilder::new(name.as_str())
        // An idle worker asks Redis for a job every `POLL_INTERVAL`.
        .backend(storage.poll_with_strategy(EveryTick::new(POLL_INTERVAL)))
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

// ANCHOR: every_tick
/// Wakes an idle worker every `period`, to ask Redis for a job. (apalis's
/// own `poll_with_interval` sets its next timer only when it is asked
/// again, which a worker that has just found the queue empty doesn't do:
/// it then sleeps until its next heartbeat.)
struct EveryTick(Interval);

impl EveryTick {
    fn new(period: Duration) -> EveryTick {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        EveryTick(interval)
    }
}

impl PollStrategy for EveryTick {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        // Takes the tick that is due, if any, until the interval says
        // `Pending`: it then wakes this worker at the next one.
        while self.0.poll_tick(cx).is_ready() {}
        Poll::Pending
    }
}
// ANCHOR_END: every_tick

/// The queue in Redis, as the server and the workers use it.
async fn redis_storage(url: &str, heartbeat: Duration) -> Result<RedisStorage<Job>, String> {
    let connection = apalis_redis::connect(url)
        .await
        .map_err(|e| format!("cannot connect to Redis at {url}: {e}"))?;
    Ok(RedisStorage::new(connection).with_config(queue_config(heartbeat)))
}

// ANCHOR: remove_finished_jobs
/// Every `interval`, removes from Redis the jobs that finished more than
/// `retention` ago. apalis keeps each finished job's data, status and
/// result until something removes them, and its `vacuum_before` is that
/// something. It leaves the job's id in the `:done` set, which nothing in
/// this app reads, so that set is emptied too.
async fn remove_finished_jobs(
    mut storage: RedisStorage<Job>,
    interval: Duration,
    retention: Duration,
) {
    let done = storage.get_config().done_jobs_set();
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        let removed = match storage.vacuum_before(retention).await {
            Ok(removed) => removed,
            Err(err) => {
                tracing::warn!(%err, "could not remove finished jobs");
                continue;
            }
        };
        let emptied: redis::RedisResult<()> = redis::cmd("DEL")
            .arg(&done)
            .query_async(storage.get_connection())
            .await;
        if let Err(err) = emptied {
            tracing::warn!(%err, "could not empty {done}");
        }
        if removed > 0 {
            tracing::debug!(removed, "removed finished jobs");
        }
    }
}
// ANCHOR_END: remove_finished_jobs

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for &kind in JobKind::ALL {
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
        // Kind by kind, so that a new kind breaks nothing here.
        assert_eq!(JobKind::Default.delay(), Duration::from_secs(1));
        assert_eq!(JobKind::Translate.delay(), Duration::from_secs(2));
        assert_eq!(JobKind::Analyze.delay(), Duration::from_secs(3));
        assert_eq!(JobKind::Generate.delay(), Duration::from_secs(4));
    }

    #[test]
    fn compute_counts_primes() {
        assert_eq!(count_primes(10), 4);
        assert_eq!(count_primes(100), 25);
        assert_eq!(count_primes(2), 0);
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
