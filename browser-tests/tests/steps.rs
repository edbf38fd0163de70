//! Each step's page in a real browser: what a reader sees after
//! `cargo xtask step NN`.

use axum_channels::Runtime;
use std::time::Duration;

use axum_channels::testing::{TestServer, Transcript};
use browser_tests::Browser;
use channels_testkit::{RedisServer, ReverseProxy, ServerProcess};
use step_03_background_jobs::{Backends, Config, app_with};

#[tokio::test]
async fn step_00_panels_say_which_step_adds_their_endpoint() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let server = TestServer::start(step_00_skeleton::app()).await;
    browser.open(&format!("http://{}/", server.addr())).await;

    browser.wait_for_state("system", "missing").await;
    assert!(browser.text("#system-status").await.contains("step 01"));
    browser.wait_for_state("room", "missing").await;
    assert!(browser.text("#room-status").await.contains("step 02"));
    assert_eq!(
        browser
            .eval("document.querySelector('#system-send').disabled")
            .await,
        true
    );
    browser.wait_for_state("showcase", "missing").await;
    no_failed_requests(&browser).await;
    browser.picture("step-00", 1280).await;
    browser.close().await;
}

/// The page learns the step's endpoints from `/endpoints.json`: no request
/// of its gets a 4xx or 5xx (each would be a red line in the console), and
/// it never fetches a WebSocket path over plain HTTP.
async fn no_failed_requests(browser: &Browser) {
    let requests = browser
        .eval(
            "performance.getEntriesByType('resource').map(e =>              [new URL(e.name).pathname, e.responseStatus])",
        )
        .await;
    let requests = requests.as_array().expect("a list");
    assert!(
        requests.iter().any(|r| r[0] == "/endpoints.json"),
        "{requests:?}"
    );
    for request in requests {
        let status = request[1].as_u64().unwrap_or(0);
        assert!(status < 400, "a failed request: {request}");
        let path = request[0].as_str().unwrap_or("");
        assert!(!path.starts_with("/ws/"), "a probe: {request}");
    }
}

#[tokio::test]
async fn step_01_echoes_what_you_type() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let server = TestServer::start(step_01_system_chat::app()).await;
    browser.open(&format!("http://{}/", server.addr())).await;

    browser.wait_for_state("system", "open").await;
    // The status says the state; the welcome is the log's first line, once.
    assert_eq!(browser.text("#system-status").await, "Connected");
    browser.type_and_enter("#system-input", "hello").await;
    browser
        .wait_until(
            "document.querySelectorAll('#system-log li').length >= 3",
            "the echo to appear in the log",
        )
        .await;
    assert_eq!(
        browser.log("#system-log").await,
        [
            "🔧 System: Connection established!",
            "👤 User: hello",
            "🔧 System Echo: hello",
        ]
    );
    browser.picture("step-01", 1280).await;
    browser.close().await;
}

#[tokio::test]
async fn the_page_fits_a_phone_screen() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let server = TestServer::start(step_01_system_chat::app()).await;
    browser.resize(360, 800).await;
    browser.open(&format!("http://{}/", server.addr())).await;
    browser.wait_for_state("system", "open").await;
    assert_eq!(
        browser
            .eval("document.documentElement.scrollWidth <= window.innerWidth")
            .await,
        true,
        "the page scrolls sideways at 360 px"
    );
    browser.close().await;
}

/// Waits until the log matching `css` has an entry equal to `text`.
async fn wait_for_entry(browser: &Browser, css: &str, text: &str) {
    let condition = format!(
        "[...document.querySelectorAll('{css} li')].some(li => li.textContent === {})",
        serde_json::to_string(text).expect("a JSON string")
    );
    browser
        .wait_until(&condition, &format!("{text:?} in {css}"))
        .await;
}

async fn join_room(browser: &Browser, room: &str) {
    browser.fill("#room-name", room).await;
    browser.click("#room-connect").await;
}

#[tokio::test]
async fn step_02_two_tabs_chat_in_one_room() {
    let Some(alice) = Browser::launch().await else {
        return;
    };
    let Some(bob) = Browser::launch().await else {
        return;
    };
    let server = TestServer::start(step_02_room_chat::app()).await;
    let url = format!("http://{}/", server.addr());
    for tab in [&alice, &bob] {
        tab.open(&url).await;
        tab.wait_for_state("room", "idle").await;
    }

    join_room(&alice, "general").await;
    wait_for_entry(&alice, "#room-log", "🚪 Someone joined room 'general'").await;
    join_room(&bob, "general").await;
    wait_for_entry(&bob, "#room-log", "🚪 Someone joined room 'general'").await;

    alice
        .type_and_enter("#room-input", "hello from alice")
        .await;
    wait_for_entry(&alice, "#room-log", "💬 hello from alice").await;
    wait_for_entry(&bob, "#room-log", "💬 hello from alice").await;

    bob.click("#room-disconnect").await;
    wait_for_entry(&alice, "#room-log", "👋 Someone left room 'general'").await;
    assert_eq!(
        alice.log("#room-log").await,
        [
            "🚪 Someone joined room 'general'",
            "🚪 Someone joined room 'general'",
            "💬 hello from alice",
            "👋 Someone left room 'general'",
        ]
    );

    // Bob moves to another room: Alice no longer hears him.
    join_room(&bob, "café").await;
    wait_for_entry(&bob, "#room-log", "🚪 Someone joined room 'café'").await;
    bob.type_and_enter("#room-input", "anyone here?").await;
    wait_for_entry(&bob, "#room-log", "💬 anyone here?").await;
    assert_eq!(
        alice.log("#room-log").await.len(),
        4,
        "alice heard another room"
    );
    alice.picture("step-02", 1280).await;
    alice.close().await;
    bob.close().await;
}

#[tokio::test]
async fn step_02_shows_why_a_room_name_is_refused() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let server = TestServer::start(step_02_room_chat::app()).await;
    browser.open(&format!("http://{}/", server.addr())).await;
    browser.wait_for_state("room", "idle").await;
    join_room(&browser, &"x".repeat(65)).await;
    browser.wait_for_state("room", "refused").await;
    let status = browser.text("#room-status").await;
    assert!(
        status.contains("Room names are 1 to 64 characters"),
        "{status}"
    );
    browser.close().await;
}

/// Queues a job from the job panel, as a reader would.
async fn queue_job(browser: &Browser, kind: &str, content: &str) {
    let select = format!("(document.querySelector('#job-type').value = '{kind}', true)");
    browser.eval(&select).await;
    browser.fill("#job-input", content).await;
    browser.click("#job-send").await;
}

#[tokio::test]
async fn step_03_runs_each_kind_of_job() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    // The original's jobs, without the original's seconds of waiting.
    let config = Config {
        job_delay: Some(Duration::from_millis(50)),
        ..Config::default()
    };
    let backends = Backends::in_memory(&config, &Runtime::default());
    let server = TestServer::start(app_with(backends)).await;
    browser.open(&format!("http://{}/", server.addr())).await;
    browser.wait_for_state("job", "open").await;
    assert_eq!(browser.text("#job-status").await, "Connected");

    let jobs = [
        ("default", "hello", "✅ Processed: HELLO"),
        ("translate", "hello", "🌍 Translated: 'hello' → 'hola'"),
        (
            "analyze",
            "Hello world",
            "📊 Analysis of 'Hello world':\n• Characters: 11\n• Words: 2\n• Vowels: 3\n• Consonants: 7",
        ),
        (
            "generate",
            "what about the weather",
            "🤖 AI Response to 'what about the weather':\nThe weather is looking great today! Perfect for a walk outside.",
        ),
    ];
    for (kind, content, result) in jobs {
        queue_job(&browser, kind, content).await;
        wait_for_entry(&browser, "#job-log", result).await;
    }
    let log = browser.log("#job-log").await;
    assert_eq!(log[0], "🔄 Background Job Processor: Connected!");
    assert_eq!(log[1], "⏳ Queuing default job: hello");
    assert!(log[2].starts_with("📋 Job "), "{log:?}");
    assert_eq!(log[3], "✅ Processed: HELLO");
    assert_eq!(log.len(), 1 + 3 * jobs.len(), "{log:?}");

    // Each result wears the badge of its job, the same as its "queued" line.
    let badges = browser
        .eval(
            "[...document.querySelectorAll('#job-log li.log-result')].map(li => \
             [li.dataset.job, getComputedStyle(li, '::before').content, \
              [...document.querySelectorAll('#job-log li')].some(other => \
                other !== li && other.dataset.jobId === li.dataset.jobId)])",
        )
        .await;
    let badges = badges.as_array().expect("a list");
    assert_eq!(badges.len(), jobs.len());
    for badge in badges {
        let job = badge[0].as_str().expect("a data-job attribute");
        assert!(job.starts_with('…') && job.chars().count() == 7, "{badge}");
        assert_eq!(badge[1], format!("\"job {job}\""), "{badge}");
        assert_eq!(badge[2], true, "no queued line for {badge}");
    }

    // Bad input gets a clear error, and the panel keeps working.
    queue_job(&browser, "default", &"x".repeat(1001)).await;
    wait_for_entry(
        &browser,
        "#job-log",
        "❌ The content is 1001 characters long; the limit is 1000. Send a shorter text",
    )
    .await;
    queue_job(&browser, "default", "still here").await;
    wait_for_entry(&browser, "#job-log", "✅ Processed: STILL HERE").await;
    browser.picture("step-03", 1280).await;
    browser.close().await;
}

#[tokio::test]
async fn step_03_keeps_the_earlier_panels() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let server = TestServer::start(step_03_background_jobs::app()).await;
    browser.open(&format!("http://{}/", server.addr())).await;
    browser.wait_for_state("system", "open").await;
    browser.type_and_enter("#system-input", "hello").await;
    wait_for_entry(&browser, "#system-log", "🔧 System Echo: hello").await;
    browser.wait_for_state("room", "idle").await;
    join_room(&browser, "general").await;
    wait_for_entry(&browser, "#room-log", "🚪 Someone joined room 'general'").await;
    browser.close().await;
}

#[tokio::test]
async fn step_04_showcase_panels_talk_and_hear_an_outside_sender() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    // The test keeps the app's layers, to send as an outside program would.
    let backends = step_04_showcase::Backends::in_memory(
        &step_04_showcase::Config::default(),
        &Runtime::default(),
    );
    let layers = backends.layers.clone();
    let server = TestServer::start(step_04_showcase::app_with(backends)).await;
    browser.open(&format!("http://{}/", server.addr())).await;
    browser.wait_for_state("showcase", "open").await;
    assert_eq!(browser.text("#showcase-status").await, "4 of 4 connected");
    wait_for_entry(&browser, "#chat-log", "📢 Someone joined the chat").await;
    wait_for_entry(
        &browser,
        "#reliable-log",
        "🔒 Reliable chat connection established!",
    )
    .await;
    wait_for_entry(
        &browser,
        "#notifications-log",
        "🔔 Connected to notifications!",
    )
    .await;

    browser.type_and_enter("#chat-input", "hello").await;
    wait_for_entry(&browser, "#chat-log", "💬 hello").await;
    browser.type_and_enter("#reliable-input", "hello").await;
    wait_for_entry(&browser, "#reliable-log", "📨 hello").await;
    browser
        .type_and_enter("#notifications-input", "deploy done")
        .await;
    wait_for_entry(
        &browser,
        "#notifications-log",
        "🔔 Notification: deploy done",
    )
    .await;

    // The button in the page's header sends an event to /ws/analytics, whose
    // group echoes it to every watcher, this page included.
    browser.click("#analytics-send").await;
    browser
        .wait_until(
            "[...document.querySelectorAll('#analytics-log li')].some(li => \
             li.textContent.startsWith('📊 Analytics: button_click:send-analytics@'))",
            "the analytics event in its log",
        )
        .await;

    // A notification from outside the connection, shown with its type.
    let notification = serde_json::json!({
        "type": "notification_message",
        "data": {"type": "broadcast", "message": "🔔 From outside"},
    });
    let layer = layers
        .get("notifications")
        .expect("the notifications layer");
    layer
        .group_send(
            "notifications",
            notification.as_object().expect("an object").clone(),
        )
        .await
        .expect("send to the group");
    wait_for_entry(&browser, "#notifications-log", "🔔 From outside").await;
    let types = browser
        .eval("[...document.querySelectorAll('#notifications-log li')].map(li => li.dataset.type)")
        .await;
    assert_eq!(types, serde_json::json!(["system", "user", "broadcast"]));
    no_failed_requests(&browser).await;
    browser.picture("step-04", 1280).await;
    browser.close().await;
}

#[tokio::test]
async fn step_04_keeps_the_earlier_panels() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let config = step_04_showcase::Config {
        job_delay: Some(Duration::ZERO),
        ..step_04_showcase::Config::default()
    };
    let backends = step_04_showcase::Backends::in_memory(&config, &Runtime::default());
    let server = TestServer::start(step_04_showcase::app_with(backends)).await;
    browser.open(&format!("http://{}/", server.addr())).await;
    browser.wait_for_state("system", "open").await;
    browser.type_and_enter("#system-input", "hello").await;
    wait_for_entry(&browser, "#system-log", "🔧 System Echo: hello").await;
    browser.wait_for_state("room", "idle").await;
    join_room(&browser, "general").await;
    wait_for_entry(&browser, "#room-log", "🚪 Someone joined room 'general'").await;
    browser.wait_for_state("job", "open").await;
    queue_job(&browser, "default", "hello").await;
    wait_for_entry(&browser, "#job-log", "✅ Processed: HELLO").await;
    browser.close().await;
}

/// Step 05: two servers on one Redis, a tab on each, one room: what
/// `cargo xtask cluster` shows.
#[tokio::test]
async fn step_05_tabs_on_two_servers_share_a_room() {
    let Some(alice) = Browser::launch().await else {
        return;
    };
    let Some(bob) = Browser::launch().await else {
        return;
    };
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let config = step_05_scaling_out::Config {
        redis_url: Some(redis.url()),
        ..step_05_scaling_out::Config::default()
    };
    let mut servers = Vec::new();
    for _ in 0..2 {
        let backends = step_05_scaling_out::Backends::from_config(&config, &Runtime::default())
            .await
            .expect("connect to the test's Redis");
        servers.push(TestServer::start(step_05_scaling_out::app_with(backends)).await);
    }
    for (tab, server) in [(&alice, &servers[0]), (&bob, &servers[1])] {
        tab.open(&format!("http://{}/", server.addr())).await;
        tab.wait_for_state("room", "idle").await;
    }
    join_room(&alice, "lobby").await;
    wait_for_entry(&alice, "#room-log", "🚪 Someone joined room 'lobby'").await;
    join_room(&bob, "lobby").await;
    wait_for_entry(&bob, "#room-log", "🚪 Someone joined room 'lobby'").await;
    bob.type_and_enter("#room-input", "hello from server B")
        .await;
    wait_for_entry(&alice, "#room-log", "💬 hello from server B").await;
    assert_eq!(
        alice.log("#room-log").await,
        [
            "🚪 Someone joined room 'lobby'",
            "🚪 Someone joined room 'lobby'",
            "💬 hello from server B",
        ]
    );
    alice.close().await;
    bob.close().await;
}

/// The rows of the grid matching `grid` whose children (`cells`) leave an
/// empty space beside them: for each row, its left and right edges as
/// fractions of the grid's width, when they are not 0 and 1.
const ORPHANS: &str = "(grid, cells) => [...document.querySelectorAll(grid)].flatMap(g => { \
    const style = getComputedStyle(g); \
    const box = g.getBoundingClientRect(); \
    const left = box.left + parseFloat(style.paddingLeft); \
    const right = box.right - parseFloat(style.paddingRight); \
    const rows = new Map(); \
    for (const cell of g.querySelectorAll(cells)) { \
      const r = cell.getBoundingClientRect(); \
      const top = Math.round(r.top); \
      const row = rows.get(top) || [Infinity, -Infinity]; \
      rows.set(top, [Math.min(row[0], r.left), Math.max(row[1], r.right)]); \
    } \
    return [...rows.values()] \
      .filter(([l, r]) => Math.abs(l - left) > 1 || Math.abs(r - right) > 1) \
      .map(([l, r]) => [(l - left) / (right - left), (r - left) / (right - left)]); \
  })";

#[tokio::test]
async fn no_panel_stands_alone_in_a_row() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let config = step_04_showcase::Config {
        job_delay: Some(Duration::ZERO),
        ..step_04_showcase::Config::default()
    };
    let backends = step_04_showcase::Backends::in_memory(&config, &Runtime::default());
    let server = TestServer::start(step_04_showcase::app_with(backends)).await;
    browser.open(&format!("http://{}/", server.addr())).await;
    browser.wait_for_state("showcase", "open").await;
    for width in [1280, 1000, 420] {
        browser.resize(width, 900).await;
        for (grid, cells) in [(".grid", ".panel"), (".subgrid", ".subpanel")] {
            let orphans = browser
                .eval(&format!("({ORPHANS})('{grid}', ':scope > {cells}')"))
                .await;
            assert_eq!(
                orphans,
                serde_json::json!([]),
                "at {width} px, rows of {grid} with empty space beside them"
            );
        }
    }
    browser.close().await;
}

/// Step 05 behind nginx, as `cargo xtask cluster` runs it: when the server
/// that holds the page's room stops (the shutdown SIGTERM starts: every
/// WebSocket gets 1001, the port closes), the page reconnects by itself,
/// through nginx, to the other server, and the room talks again.
#[tokio::test]
async fn step_05_the_page_reconnects_to_the_other_server() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let config = step_05_scaling_out::Config {
        redis_url: Some(redis.url()),
        ..step_05_scaling_out::Config::default()
    };
    let mut servers = Vec::new();
    for _ in 0..2 {
        let runtime = Runtime::default();
        let backends = step_05_scaling_out::Backends::from_config(&config, &runtime)
            .await
            .expect("connect to the test's Redis");
        let app = step_05_scaling_out::app_with(backends);
        servers.push(TestServer::start_with(runtime, app).await);
    }
    let addrs: Vec<_> = servers.iter().map(TestServer::addr).collect();
    let nginx = include_str!("../../steps/05-scaling-out/deploy/nginx.conf");
    let Some(proxy) = ReverseProxy::start(nginx, &addrs).await else {
        return;
    };
    browser.open(&format!("http://{}/", proxy.addr())).await;
    browser.wait_for_state("showcase", "open").await;
    browser.wait_for_state("room", "idle").await;
    let open = |servers: &[TestServer]| -> Vec<usize> {
        servers
            .iter()
            .map(|s| s.runtime().open_connections())
            .collect()
    };
    let before = open(&servers);
    join_room(&browser, "lobby").await;
    browser.wait_for_state("room", "open").await;
    // nginx balances each WebSocket: the room's may be on either server.
    let after = open(&servers);
    let a = (0..2)
        .find(|&i| after[i] > before[i])
        .expect("the room's server");
    let b = 1 - a;
    let mut witness = servers[b].connect("/ws/room/lobby").await;

    // Every state the room panel goes through, with its status line.
    browser
        .eval(
            "(window.roomStates = [], new MutationObserver(() => window.roomStates.push( \
               document.querySelector('#room-status').dataset.state + ': ' + \
               document.querySelector('#room-status').textContent)) \
             .observe(document.querySelector('#room-status'), \
               {attributes: true, childList: true, subtree: true, characterData: true}), true)",
        )
        .await;
    servers[a].runtime().shut_down().await;

    let patience = Duration::from_secs(30);
    browser
        .wait_until_within(
            patience,
            "document.querySelector('#room-status').dataset.state === 'open' && \
             window.roomStates.some(s => s.startsWith('reconnecting: '))",
            "the room panel to reconnect",
        )
        .await;
    let states = browser.eval("window.roomStates").await;
    assert!(
        states.as_array().expect("a list").iter().any(|s| {
            let s = s.as_str().unwrap_or("");
            s.starts_with(
                "reconnecting: Disconnected (code 1001): server shutting down · reconnecting in ",
            )
        }),
        "the panel said why and when: {states}"
    );
    // The room talks again, both ways, with a member on the other server.
    browser
        .type_and_enter("#room-input", "hello after the reconnect")
        .await;
    loop {
        if witness.recv_text().await == "💬 hello after the reconnect" {
            break;
        }
    }
    witness.send_text("welcome back").await;
    wait_for_entry(&browser, "#room-log", "💬 welcome back").await;
    // Every other panel came back too, all of them on the other server.
    browser
        .wait_until_within(
            patience,
            "document.querySelector('#showcase-status').textContent === '4 of 4 connected' && \
             document.querySelector('#system-status').dataset.state === 'open' && \
             document.querySelector('#job-status').dataset.state === 'open'",
            "every panel to reconnect",
        )
        .await;
    assert_eq!(servers[b].runtime().open_connections(), 7 + 1);
    browser.picture("step-05", 1280).await;
    browser.close().await;
}

/// Step 06's server binary, built by cargo if it is not yet (a no-op when
/// it is): the presence test kills a real process, which an in-process
/// server cannot stand in for.
fn step_06_binary() -> std::path::PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "step-06-presence-history",
            "--bin",
        ])
        .arg("step-06-presence-history")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build of step 06's server failed");
    let exe = std::env::current_exe().expect("the test's own path");
    // <target>/<profile>/deps/<test> → <target>/<profile>/<binary>
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("a target dir");
    profile.join("step-06-presence-history")
}

/// Step 06 behind nginx on one Redis: the presence panel lists who is in
/// the room, on either server; when the server that holds the page's room
/// is killed (SIGKILL), the page reconnects through nginx to the other one,
/// asks for what it missed with its last position, and shows it marked as
/// recovered; the killed server's other member leaves the list.
#[tokio::test]
async fn step_06_presence_list_and_recovery_after_its_server_is_killed() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let binary = step_06_binary();
    let env = [
        ("REDIS_URL", redis.url()),
        ("PRESENCE_HEARTBEAT_MS", "200".to_owned()),
        ("PRESENCE_TTL_MS", "1000".to_owned()),
        ("PRESENCE_FLUSH_MS", "50".to_owned()),
        ("RUST_LOG", "warn,step_06_presence_history=debug".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let binary = binary.to_str().expect("a UTF-8 path");
    let mut servers = [
        ServerProcess::start(binary, &env).await,
        ServerProcess::start(binary, &env).await,
    ];
    let addrs: Vec<_> = servers.iter().map(ServerProcess::addr).collect();
    let nginx = include_str!("../../steps/06-presence-history/deploy/nginx.conf");
    let Some(proxy) = ReverseProxy::start(nginx, &addrs).await else {
        return;
    };
    // The proxy's origin is the page's; the servers must accept it.
    browser.open(&format!("http://{}/", proxy.addr())).await;
    browser.wait_for_state("presence", "idle").await;
    browser.fill("#presence-room", "lobby").await;
    browser.fill("#presence-name", "alice").await;
    browser.click("#presence-connect").await;
    browser.wait_for_state("presence", "open").await;
    let members = |names: &str| {
        format!(
            "[...document.querySelectorAll('#presence-members li')].map(li => li.textContent).join(',') === '{names}'"
        )
    };
    browser
        .wait_until(&members("alice"), "alice in the list")
        .await;
    // The server that holds the page's room logs its join.
    let page = (0..2)
        .find(|&i| servers[i].output().contains("name=alice"))
        .expect("a server logged alice's join");
    let other = 1 - page;
    // Carol shares the page's server, and dies with it; bob is on the other.
    let transcript = Transcript::default();
    let carol = servers[page]
        .connect_as("carol", "/ws/presence/lobby?name=carol", &transcript)
        .await;
    let mut bob = servers[other]
        .connect_as("bob", "/ws/presence/lobby?name=bob", &transcript)
        .await;
    browser
        .wait_until(&members("alice,bob,carol"), "bob and carol in the list")
        .await;
    bob.send_text(r#"{"type":"message","text":"first"}"#).await;
    wait_for_entry(&browser, "#presence-log", "bob: first").await;

    // The page's first reconnect then waits its longest (495 ms of 500):
    // time for bob to say three things it must recover.
    browser.eval("(Math.random = () => 0.99, true)").await;
    servers[page].kill().await;
    browser
        .wait_until(
            "document.querySelector('#presence-status').dataset.state === 'reconnecting'",
            "the presence panel to notice",
        )
        .await;
    for n in 1..=3 {
        bob.send_text(&format!(r#"{{"type":"message","text":"while away {n}"}}"#))
            .await;
    }
    let patience = Duration::from_secs(30);
    browser
        .wait_until_within(
            patience,
            "document.querySelectorAll('#presence-log li.log-recovered').length === 3",
            "the three missed messages, marked as recovered",
        )
        .await;
    let log = browser.log("#presence-log").await;
    let away: Vec<&String> = log
        .iter()
        .filter(|l| l.starts_with("bob: while away"))
        .collect();
    assert_eq!(
        away,
        [
            "bob: while away 1",
            "bob: while away 2",
            "bob: while away 3"
        ],
        "{log:?}"
    );
    assert_eq!(
        log.iter().filter(|l| *l == "bob: first").count(),
        1,
        "{log:?}"
    );
    // Carol's server died with her in the room: she leaves the list.
    browser
        .wait_until_within(patience, &members("alice,bob"), "carol to leave the list")
        .await;
    drop(carol);
    browser.picture("step-06", 1280).await;
    browser.close().await;
}
