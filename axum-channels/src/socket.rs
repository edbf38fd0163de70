//! The handle a consumer uses to talk to its client.
//!
//! A [`Socket`] lives through two phases. While [`Consumer::connect`] runs,
//! the HTTP handshake has not been answered yet: the consumer decides whether
//! to [`accept`](Socket::accept) or to refuse, and whatever it sends is held
//! back until the handshake completes. That is what lets a consumer refuse a
//! connection *before* accepting it, with a plain HTTP 403, exactly as Django
//! Channels does. Once the handshake is answered, sends go straight to the
//! wire.
//!
//! [`Consumer::connect`]: crate::Consumer::connect

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use serde::Serialize;
use tokio::time::Instant;

use crate::close_code;
use crate::error::{Error, Result};
use crate::layer::{ChannelLayer, LayerEvent, to_layer_message};
use crate::membership::Membership;
use crate::runtime::{Runtime, after};
use crate::settings::ConnectionSettings;

/// A message from the client.
///
/// Deliberately exhaustive (not `#[non_exhaustive]`): RFC 6455 has these
/// two kinds of data frame and no other, and a consumer's `match` on them
/// should not need an arm that can never run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A text frame (always valid UTF-8: the runner checks).
    Text(String),
    /// A binary frame.
    Binary(Bytes),
}

/// The longest close reason the protocol allows, in bytes (RFC 6455, 5.5).
const MAX_CLOSE_REASON: usize = 123;

/// One client's WebSocket, as seen by its consumer.
#[derive(Debug)]
pub struct Socket {
    phase: Phase,
    /// Frames sent during `connect`, delivered once the handshake completes.
    outbox: Vec<Message>,
    /// The code of the close frame we sent, once we sent one.
    closing: Option<u16>,
    /// When a client that has not answered our close frame is dropped.
    close_deadline: Option<Instant>,
    /// This connection's channel and groups, when its consumer uses a layer.
    membership: Option<Membership>,
    /// How long one send may take before the client counts as not reading.
    write_timeout: Duration,
    /// How long the client has to answer our close frame.
    close_timeout: Duration,
    /// Data frames are gathered rather than written one by one (see
    /// [`Socket::gather`]).
    gathering: bool,
    /// Frames were gathered that have not been written yet.
    unflushed: bool,
}

// ANCHOR: inbox
/// A consumer's channel on its layer: the layer, shared by every connection,
/// and the name of this connection's own mailbox in it.
#[derive(Clone)]
pub(crate) struct Inbox {
    pub(crate) layer: Arc<dyn ChannelLayer>,
    /// Shared with the connection's [`Membership`], not copied: one copy of
    /// the name fewer for every connection.
    pub(crate) channel: Arc<str>,
}
// ANCHOR_END: inbox

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("channel", &self.channel)
            .finish()
    }
}

#[derive(Debug)]
enum Phase {
    /// `connect` is running; `accepted` says whether it has accepted yet.
    Connecting { accepted: bool },
    /// `connect` refused the connection before accepting it.
    Refused { reason: String },
    /// The handshake is done and the WebSocket is live. (Boxed: the stream
    /// is large, and every other phase is small.)
    Open(Box<WebSocket>),
    /// The connection is over; nothing more can be sent.
    Closed,
}

/// How `connect` left the handshake, for the runner to act on.
pub(crate) enum Handshake {
    Accepted,
    Refused(String),
    Undecided,
}

impl Socket {
    pub(crate) fn connecting(settings: &ConnectionSettings) -> Self {
        Socket {
            phase: Phase::Connecting { accepted: false },
            outbox: Vec::new(),
            closing: None,
            close_deadline: None,
            membership: None,
            write_timeout: settings.write_timeout,
            close_timeout: settings.close_timeout,
            gathering: false,
            unflushed: false,
        }
    }

    /// Accepts the connection. Call it in `connect` before sending anything;
    /// a consumer that never accepts refuses the client.
    pub async fn accept(&mut self) -> Result<()> {
        match &mut self.phase {
            Phase::Connecting { accepted } => {
                *accepted = true;
                Ok(())
            }
            Phase::Open(_) => Ok(()),
            Phase::Refused { .. } | Phase::Closed => Err(Error::Closed),
        }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<()> {
        self.send(Message::Text(text.into().into())).await
    }

    /// Sends a binary frame.
    pub async fn send_bytes(&mut self, bytes: impl Into<Bytes>) -> Result<()> {
        self.send(Message::Binary(bytes.into())).await
    }

    /// Serializes `value` to JSON and sends it as a text frame.
    pub async fn send_json<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        let text = serde_json::to_string(value)?;
        self.send_text(text).await
    }

    /// Closes the connection with `code` and a human-readable `reason`.
    ///
    /// Before [`accept`](Socket::accept) this refuses the handshake (HTTP 403,
    /// with `reason` as the body). After it, the client gets a close frame it
    /// can show: browsers report `code` and `reason` in the `close` event, so
    /// use a code in the 4000-4999 range for your application's own reasons.
    /// The reason is cut to the 123 bytes the protocol allows. Closing twice
    /// is harmless.
    pub async fn close(&mut self, code: u16, reason: &str) -> Result<()> {
        if self.closing.is_some() {
            return Ok(());
        }
        let reason = truncate_reason(reason);
        match &mut self.phase {
            Phase::Connecting { accepted: false } => {
                self.phase = Phase::Refused {
                    reason: reason.to_owned(),
                };
                return Ok(());
            }
            Phase::Refused { .. } | Phase::Closed => return Ok(()),
            Phase::Connecting { accepted: true } | Phase::Open(_) => {}
        }
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let sent = self.send(Message::Close(Some(frame))).await;
        self.closing = Some(code);
        if matches!(self.phase, Phase::Open(_)) {
            self.start_close_deadline();
        }
        sent
    }

    /// From now on the client has `close_timeout` to answer our close frame,
    /// however many frames it sends meanwhile.
    fn start_close_deadline(&mut self) {
        self.close_deadline
            .get_or_insert_with(|| after(Instant::now(), self.close_timeout));
    }

    /// When a client that has not answered our close frame is dropped.
    pub(crate) fn close_deadline(&self) -> Option<Instant> {
        self.close_deadline
    }

    /// This connection's channel name on its layer, if its consumer uses one.
    /// Give it to others (a worker, say) so they can [`send_to`] it.
    ///
    /// [`send_to`]: Socket::send_to
    pub fn channel_name(&self) -> Option<&str> {
        self.membership.as_ref().map(Membership::channel)
    }

    /// Sends `event` to every channel in `group`, this one included if it is
    /// a member.
    ///
    /// Only a [`LayerEvent`] can be sent, so passing a plain string or a
    /// value of some other type does not compile. Sending works after the
    /// client has gone too: in [`disconnect`](crate::Consumer::disconnect)
    /// the layer is still attached.
    ///
    /// # Errors
    ///
    /// [`Error::NoLayer`] for a consumer without a layer,
    /// [`Error::Layer`] when the layer refuses (a bad group name, Redis
    /// away), and [`Error::Layer`] with [`LayerError::NotAnEvent`] if
    /// `event` does not serialize to a JSON object with a string `"type"`
    /// (a `LayerEvent` type without `#[serde(tag = "type")]`).
    ///
    /// [`LayerError::NotAnEvent`]: crate::layer::LayerError::NotAnEvent
    pub async fn group_send<E: LayerEvent>(&mut self, group: &str, event: &E) -> Result<()> {
        let message = to_layer_message(event)?;
        self.layer()?.group_send(group, message).await?;
        metrics::counter!("axum_channels_layer_sends_total", "to" => "group").increment(1);
        Ok(())
    }

    /// Sends `event` to one channel, e.g. one a worker was given as
    /// `reply_to`. The errors are those of [`group_send`](Socket::group_send),
    /// plus [`LayerError::ChannelFull`] when that channel is at capacity.
    ///
    /// [`LayerError::ChannelFull`]: crate::layer::LayerError::ChannelFull
    pub async fn send_to<E: LayerEvent>(&mut self, channel: &str, event: &E) -> Result<()> {
        let message = to_layer_message(event)?;
        self.layer()?.send(channel, message).await?;
        metrics::counter!("axum_channels_layer_sends_total", "to" => "channel").increment(1);
        Ok(())
    }

    /// Adds this connection's channel to `group`. The runner renews the
    /// membership while the connection lives and leaves the group when it
    /// ends, as it does for the groups of `Consumer::groups`.
    pub async fn group_add(&mut self, group: &str) -> Result<()> {
        self.membership_mut()?.add(group).await?;
        Ok(())
    }

    /// Removes this connection's channel from `group`.
    pub async fn group_discard(&mut self, group: &str) -> Result<()> {
        self.membership_mut()?.discard(group).await?;
        Ok(())
    }

    /// This connection's channel, or `NoLayer` for a consumer without one.
    fn membership_mut(&mut self) -> Result<&mut Membership> {
        self.membership.as_mut().ok_or(Error::NoLayer)
    }

    fn layer(&self) -> Result<&Arc<dyn ChannelLayer>> {
        self.membership
            .as_ref()
            .map(Membership::layer)
            .ok_or(Error::NoLayer)
    }

    /// Gives the connection a channel on `layer` and joins `groups`. What
    /// it takes is given back when the socket drops, or by
    /// [`leave_layer`](Socket::leave_layer).
    pub(crate) async fn attach(
        &mut self,
        layer: Arc<dyn ChannelLayer>,
        groups: &[String],
        runtime: Runtime,
    ) -> Result<()> {
        self.membership = Some(Membership::join(layer, groups, runtime).await?);
        Ok(())
    }

    /// Leaves every group and frees the channel, now.
    pub(crate) async fn leave_layer(&mut self) {
        if let Some(membership) = self.membership.take() {
            membership.leave().await;
        }
    }

    /// Renews every group membership, declared or joined at run time.
    pub(crate) async fn renew_memberships(&mut self) {
        if let Some(membership) = &self.membership {
            membership.renew().await;
        }
    }

    /// The layer and channel to receive from, if the consumer has a layer.
    pub(crate) fn inbox(&self) -> Option<Inbox> {
        self.membership.as_ref().map(|membership| Inbox {
            layer: membership.layer().clone(),
            channel: Arc::clone(membership.shared_channel()),
        })
    }

    /// True once this side has sent its close frame, or the connection ended.
    pub fn is_closing(&self) -> bool {
        self.closing.is_some() || matches!(self.phase, Phase::Closed | Phase::Refused { .. })
    }

    async fn send(&mut self, message: Message) -> Result<()> {
        if self.closing.is_some() {
            return Err(Error::Closed);
        }
        match &mut self.phase {
            Phase::Connecting { accepted: false } => Err(Error::NotAccepted),
            Phase::Connecting { accepted: true } => {
                self.outbox.push(message);
                Ok(())
            }
            Phase::Open(ws) => {
                // While gathering, a data frame joins the others in the
                // write buffer (tungstenite writes it out once the buffer
                // passes `write_buffer_size`); anything else, a close frame
                // or a ping, goes out at once with everything before it.
                let gather =
                    self.gathering && matches!(message, Message::Text(_) | Message::Binary(_));
                let written = if gather {
                    timed(self.write_timeout, ws.feed(message)).await
                } else {
                    timed(self.write_timeout, ws.send(message)).await
                };
                self.unflushed = gather;
                let outcome = self.after_write(written);
                if outcome.is_ok() {
                    metrics::counter!("axum_channels_frames_out_total").increment(1);
                }
                outcome
            }
            Phase::Refused { .. } | Phase::Closed => Err(Error::Closed),
        }
    }

    /// From now on data frames are gathered and written together, until
    /// [`flush`](Socket::flush): the runner does this for a run of layer
    /// messages, so a member that has several waiting gets them in one
    /// write to its socket, not one write (one system call) each.
    pub(crate) fn gather(&mut self) {
        self.gathering = true;
    }

    /// Writes what was gathered, and stops gathering.
    pub(crate) async fn flush(&mut self) -> Result<()> {
        self.gathering = false;
        if !std::mem::take(&mut self.unflushed) {
            return Ok(());
        }
        match &mut self.phase {
            Phase::Open(ws) => {
                let written = timed(self.write_timeout, ws.flush()).await;
                self.after_write(written)
            }
            _ => Err(Error::Closed),
        }
    }

    /// What a write's outcome means for the connection.
    fn after_write(
        &mut self,
        written: std::result::Result<
            std::result::Result<(), axum::Error>,
            tokio::time::error::Elapsed,
        >,
    ) -> Result<()> {
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => {
                // The peer is gone; the runner learns the details from
                // its next read, so there is nothing more to report here.
                self.phase = Phase::Closed;
                Err(Error::Closed)
            }
            Err(_) => {
                // Its socket buffers are full: the client stopped
                // reading. Waiting longer would hold this consumer (and
                // its channel's backlog) for as long as the client
                // pleases, so the connection ends here, with 1008.
                tracing::warn!(
                    timeout = ?self.write_timeout,
                    "closing a connection whose client stopped reading"
                );
                self.phase = Phase::Closed;
                self.closing = Some(close_code::POLICY_VIOLATION);
                Err(Error::Closed)
            }
        }
    }

    pub(crate) fn handshake(&self) -> Handshake {
        match &self.phase {
            Phase::Connecting { accepted: true } => Handshake::Accepted,
            Phase::Refused { reason } => Handshake::Refused(reason.clone()),
            _ => Handshake::Undecided,
        }
    }

    /// Completes the handshake; [`deliver_outbox`](Socket::deliver_outbox)
    /// then sends what `connect` sent.
    pub(crate) fn upgrade(&mut self, ws: WebSocket) {
        self.phase = Phase::Open(Box::new(ws));
    }

    /// Sends what `connect` sent, once the handshake is complete.
    pub(crate) async fn deliver_outbox(&mut self) {
        let closing = self.closing.take();
        for message in std::mem::take(&mut self.outbox) {
            if self.send(message).await.is_err() {
                break;
            }
        }
        self.closing = closing;
        if self.closing.is_some() {
            // The close frame `connect` sent went out just now.
            self.start_close_deadline();
        }
    }

    /// Pings the client; its pong (or any frame) shows it is still there.
    pub(crate) async fn ping(&mut self) -> Result<()> {
        self.send(Message::Ping(Bytes::new())).await
    }

    /// The next message from the client; `None` once the connection is over.
    pub(crate) async fn recv(&mut self) -> Option<Result<Message, axum::Error>> {
        match &mut self.phase {
            Phase::Open(ws) => ws.recv().await,
            _ => None,
        }
    }

    /// Sends a close frame after a read failed (the stream can no longer be
    /// read, so no reply is awaited) and ends the connection.
    pub(crate) async fn close_after_read_error(&mut self, code: u16, reason: &str) {
        let _ = self.close(code, reason).await;
        self.phase = Phase::Closed;
    }

    /// Ends the connection without a close frame (the peer already left).
    pub(crate) fn drop_connection(&mut self) {
        self.phase = Phase::Closed;
    }

    /// The code of the close frame this side sent, if any.
    pub(crate) fn sent_close_code(&self) -> Option<u16> {
        self.closing
    }
}

/// Runs `write` with `timeout`, starting the timer only if the write has to
/// wait. Nearly every write completes at once (into tungstenite's buffer,
/// or into the socket's), and a timer started for each would be put into
/// tokio's timer wheel and taken out again for every frame of every member
/// of a broadcast. A write that waits gets the whole `timeout` from then.
async fn timed<F: Future>(
    timeout: Duration,
    write: F,
) -> std::result::Result<F::Output, tokio::time::error::Elapsed> {
    let mut write = std::pin::pin!(write);
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(done) => Ok(done),
        Poll::Pending => tokio::time::timeout(timeout, write).await,
    }
}

/// Cuts `reason` to the protocol's limit without splitting a character.
fn truncate_reason(reason: &str) -> &str {
    if reason.len() <= MAX_CLOSE_REASON {
        return reason;
    }
    let mut end = MAX_CLOSE_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reasons_are_cut_on_a_character_boundary() {
        let reason = "é".repeat(100); // 200 bytes
        let cut = truncate_reason(&reason);
        assert!(cut.len() <= MAX_CLOSE_REASON);
        assert_eq!(cut, "é".repeat(61));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_is_timed_only_once_it_waits() {
        let limit = Duration::from_secs(10);
        assert_eq!(timed(limit, async { 5 }).await, Ok(5));
        let started = Instant::now();
        let waits = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            std::future::pending::<()>().await
        };
        assert!(timed(limit, waits).await.is_err());
        // The whole limit from when it first waited, not from a timer set
        // before it.
        assert_eq!(started.elapsed(), limit);
    }

    #[tokio::test]
    async fn sending_before_accept_is_an_error() {
        let mut socket = Socket::connecting(&ConnectionSettings::default());
        let err = socket.send_text("too early").await.unwrap_err();
        assert!(matches!(err, Error::NotAccepted));
    }

    #[tokio::test]
    async fn closing_before_accept_refuses_the_handshake() {
        let mut socket = Socket::connecting(&ConnectionSettings::default());
        socket.close(4000, "go away").await.unwrap();
        assert!(matches!(socket.handshake(), Handshake::Refused(reason) if reason == "go away"));
        assert!(matches!(socket.accept().await, Err(Error::Closed)));
    }

    #[tokio::test]
    async fn frames_sent_during_connect_wait_for_the_handshake() {
        let mut socket = Socket::connecting(&ConnectionSettings::default());
        socket.accept().await.unwrap();
        socket.send_text("welcome").await.unwrap();
        socket.close(4001, "bye").await.unwrap();
        assert!(matches!(socket.handshake(), Handshake::Accepted));
        assert_eq!(socket.outbox.len(), 2);
        assert!(matches!(socket.send_text("late").await, Err(Error::Closed)));
    }
}
