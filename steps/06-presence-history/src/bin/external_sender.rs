//! The external sender: sends messages to the showcase's clients from a
//! program that is not a server, through the same four layers on Redis.
//!
//! It runs the original's six examples in order, with its pauses and its
//! console output. Start step 04 on Redis and open the page first; then, in
//! another terminal, with the server's `REDIS_URL`:
//!
//! ```console
//! $ REDIS_URL=redis://127.0.0.1:6379 cargo run -p step-06-presence-history --bin step-06-presence-history-external-sender
//! ```
//!
//! `cargo xtask step 06 --redis` prints this command with the right URL.
//! `SENDER_PAUSE_MS` replaces every pause (`config.rs`).

use std::process::ExitCode;
use std::time::Duration;

use axum_channels::LayerEvent;
use axum_channels::layer::{LayerError, Layers, to_layer_message};
use step_06_presence_history::{
    Analytics, AnalyticsEvent, Chat, ChatEvent, Config, Notification, NotificationEvent,
    Notifications, ReliableChat, ReliableChatEvent, setup_redis,
};
use tracing_subscriber::EnvFilter;

// ANCHOR: main
#[tokio::main]
async fn main() -> ExitCode {
    // Only the layers' warnings: the program's own output is its println!s.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let Some(url) = config.redis_url else {
        eprintln!(
            "error: REDIS_URL is not set: the sender reaches the server's clients through \
             Redis; set it to the server's (`cargo xtask step 06 --redis` prints the command)"
        );
        return ExitCode::FAILURE;
    };
    let layers = match setup_redis(
        &url,
        config.redis_cluster_url.as_deref(),
        config.group_expiry,
    )
    .await
    {
        Ok(layers) => layers,
        Err(err) => {
            eprintln!("error: {err}; start Redis, or set REDIS_URL to the server's");
            return ExitCode::FAILURE;
        }
    };
    let sender = Sender {
        layers,
        pause: config.sender_pause,
    };

    println!("=== External Messaging with Centralized Layers ===\n");
    let mut failed = 0;
    for example in Example::ALL {
        println!("🎯 Running: {}", example.name());
        if let Err(err) = sender.run(example).await {
            // As in the original: say so, and go on with the next example.
            println!("❌ Error in {}: {err}", example.name());
            failed += 1;
        }
        println!();
        sender.pause(Duration::from_millis(500)).await;
    }
    println!("=== All Examples Complete! ===");
    if failed > 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
// ANCHOR_END: main

// ANCHOR: examples
/// The original's six examples, in its order.
#[derive(Debug, Clone, Copy)]
enum Example {
    ChatMessage,
    ReliableMessage,
    Notification,
    AnalyticsEvents,
    MultiLayerBroadcast,
    PeriodicAnnouncements,
}

impl Example {
    const ALL: [Example; 6] = [
        Example::ChatMessage,
        Example::ReliableMessage,
        Example::Notification,
        Example::AnalyticsEvents,
        Example::MultiLayerBroadcast,
        Example::PeriodicAnnouncements,
    ];

    fn name(self) -> &'static str {
        match self {
            Example::ChatMessage => "Chat Message",
            Example::ReliableMessage => "Reliable Message",
            Example::Notification => "Notification",
            Example::AnalyticsEvents => "Analytics Events",
            Example::MultiLayerBroadcast => "Multi-layer Broadcast",
            Example::PeriodicAnnouncements => "Periodic Announcements",
        }
    }
}
// ANCHOR_END: examples

// ANCHOR: sender
/// The app's layers, and how long to pause.
struct Sender {
    layers: Layers,
    /// `SENDER_PAUSE_MS`, or `None` for the original's pauses.
    pause: Option<Duration>,
}

impl Sender {
    /// Sends `event` to `group` through the layer registered as `alias`:
    /// exactly what a consumer's `socket.group_send` does, without a socket.
    async fn group_send<E: LayerEvent>(
        &self,
        alias: &str,
        group: &str,
        event: &E,
    ) -> Result<(), LayerError> {
        let layer = self.layers.get(alias)?;
        layer.group_send(group, to_layer_message(event)?).await
    }

    /// Waits `original`, or the configured pause instead.
    async fn pause(&self, original: Duration) {
        tokio::time::sleep(self.pause.unwrap_or(original)).await;
    }
    // ANCHOR_END: sender

    // ANCHOR: run
    /// Runs one example; an error ends that example, not the program.
    async fn run(&self, example: Example) -> Result<(), LayerError> {
        match example {
            Example::ChatMessage => self.chat_message().await,
            Example::ReliableMessage => self.reliable_message().await,
            Example::Notification => self.notification().await,
            Example::AnalyticsEvents => self.analytics_events().await,
            Example::MultiLayerBroadcast => self.multi_layer_broadcast().await,
            Example::PeriodicAnnouncements => self.periodic_announcements().await,
        }
    }
    // ANCHOR_END: run

    // ANCHOR: one_layer_each
    async fn chat_message(&self) -> Result<(), LayerError> {
        let message = "🔔 System announcement: Welcome to the chat!".to_owned();
        let event = ChatEvent::ChatMessage { message };
        self.group_send("chat", Chat::GROUP, &event).await?;
        println!("✅ Chat message sent!");
        Ok(())
    }

    async fn reliable_message(&self) -> Result<(), LayerError> {
        let message = "🔒 Important: System maintenance scheduled for tonight".to_owned();
        let event = ReliableChatEvent::ReliableChatMessage { message };
        self.group_send("queue", ReliableChat::GROUP, &event)
            .await?;
        println!("✅ Reliable message sent!");
        Ok(())
    }

    async fn notification(&self) -> Result<(), LayerError> {
        let data = Notification::new("system", "🚨 Alert: High CPU usage detected on server");
        let event = NotificationEvent::NotificationMessage { data };
        self.group_send("notifications", Notifications::GROUP, &event)
            .await?;
        println!("✅ Notification sent!");
        Ok(())
    }
    // ANCHOR_END: one_layer_each

    // ANCHOR: analytics_events
    async fn analytics_events(&self) -> Result<(), LayerError> {
        let events = [
            "user_login:john_doe",
            "page_view:/dashboard",
            "button_click:export_data",
            "session_duration:1234",
            "error:api_timeout",
        ];
        for name in events {
            let message = format!("📊 Event: {name}");
            let event = AnalyticsEvent::AnalyticsMessage { message };
            self.group_send("analytics", Analytics::GROUP, &event)
                .await?;
            self.pause(Duration::from_millis(100)).await;
        }
        println!("✅ Sent {} analytics events!", events.len());
        Ok(())
    }
    // ANCHOR_END: analytics_events

    // ANCHOR: multi_layer_broadcast
    async fn multi_layer_broadcast(&self) -> Result<(), LayerError> {
        println!("🚀 Broadcasting to multiple layers...");
        let message = "💬 Multi-layer broadcast: Chat message".to_owned();
        let chat = ChatEvent::ChatMessage { message };
        self.group_send("chat", Chat::GROUP, &chat).await?;

        let data = Notification::new("broadcast", "🔔 Multi-layer broadcast: Notification");
        let notification = NotificationEvent::NotificationMessage { data };
        self.group_send("notifications", Notifications::GROUP, &notification)
            .await?;

        let message = "📨 Multi-layer broadcast: Reliable message".to_owned();
        let reliable = ReliableChatEvent::ReliableChatMessage { message };
        self.group_send("queue", ReliableChat::GROUP, &reliable)
            .await?;
        println!("✅ Multi-layer broadcast complete!");
        Ok(())
    }
    // ANCHOR_END: multi_layer_broadcast

    // ANCHOR: periodic_announcements
    async fn periodic_announcements(&self) -> Result<(), LayerError> {
        println!("⏰ Starting periodic announcements...");
        for n in 1..=3 {
            // Odd ones go to the chat; even ones are notifications.
            if n % 2 == 1 {
                let message = format!("⏰ Hourly chat announcement #{n}");
                let event = ChatEvent::ChatMessage { message };
                self.group_send("chat", Chat::GROUP, &event).await?;
            } else {
                let message = format!("🔔 System status update #{n}");
                let data = Notification::new("periodic", message);
                let event = NotificationEvent::NotificationMessage { data };
                self.group_send("notifications", Notifications::GROUP, &event)
                    .await?;
            }
            println!("✅ Sent announcement #{n}");
            self.pause(Duration::from_secs(1)).await;
        }
        println!("✅ Periodic announcements complete!");
        Ok(())
    }
    // ANCHOR_END: periodic_announcements
}
