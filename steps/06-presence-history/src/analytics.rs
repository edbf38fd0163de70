//! `/ws/analytics`: a stream of analytics events, on the `"analytics"`
//! layer.
//!
//! The client connects in silence (nothing is announced) and joins the
//! group `analytics`; each event it sends, as text, goes to every member
//! as `📊 Analytics: <event>`. Programs outside the server send events of
//! their own to the same group. On Redis, `"analytics"` is a queue layer of
//! its own, with the prefix `analytics`, an hour's expiry and room for 5000
//! messages per channel: a burst of events waits instead of being lost.

use axum_channels::{Consumer, Frame, LayerEvent, Result, Scope, Socket};
use serde::{Deserialize, Serialize};

// ANCHOR: event
/// What travels through the layer: `{"type": "analytics_message",
/// "message": "📊 Analytics: page_view"}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AnalyticsEvent {
    AnalyticsMessage { message: String },
}

impl LayerEvent for AnalyticsEvent {}
// ANCHOR_END: event

/// One watcher of the analytics stream.
pub struct Analytics;

impl Analytics {
    /// The group every watcher joins, and anyone may send events to.
    pub const GROUP: &str = "analytics";
}

impl Consumer for Analytics {
    type Event = AnalyticsEvent;
    const LAYER: Option<&'static str> = Some("analytics");

    fn new(_scope: &Scope) -> Self {
        Analytics
    }

    fn groups(&self) -> Vec<String> {
        vec![Analytics::GROUP.to_owned()]
    }

    // ANCHOR: connect
    /// Accepts, and says nothing: watchers come and go unannounced.
    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await
    }
    // ANCHOR_END: connect

    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        match frame {
            Frame::Text(text) => {
                let message = format!("📊 Analytics: {text}");
                socket
                    .group_send(
                        Analytics::GROUP,
                        &AnalyticsEvent::AnalyticsMessage { message },
                    )
                    .await
            }
            // Only the sender hears about its mistake; the stream does not.
            Frame::Binary(bytes) => {
                let reply = format!(
                    "📊 Analytics events are text, e.g. page_view:/home (got {} bytes of binary data)",
                    bytes.len()
                );
                socket.send_text(reply).await
            }
        }
    }

    async fn event(&mut self, socket: &mut Socket, event: AnalyticsEvent) -> Result<()> {
        match event {
            AnalyticsEvent::AnalyticsMessage { message } => socket.send_text(message).await,
        }
    }
}
