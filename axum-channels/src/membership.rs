//! [`Membership`]: what one connection holds in its channel layer, owned by
//! one value whose drop gives it all back.
//!
//! A connection gets a channel and joins groups before its consumer's
//! `connect` runs, and may join more while it lives. Any `.await` on the way
//! can be the last one: the client resets mid-handshake and hyper drops the
//! handler, an upgrade fails after the 101, a shutdown stops waiting. Clean-up
//! that only runs when the code reaches a `leave()` call would leak a member
//! on every such path, and every later group send would go to a channel
//! nobody reads. So the channel and every group joined are recorded here, and
//! dropping the `Membership` leaves them, as mini-redis's `DbDropGuard` shuts
//! its database down whatever way the server stops.
//!
//! Leaving takes network calls for a Redis layer, and `Drop` cannot await, so
//! a drop spawns the leaving as a task of the process's
//! [`Runtime`](crate::Runtime), which a graceful shutdown waits for. The
//! runner calls [`Membership::leave`] itself on the ordinary path, so that
//! "left the room" is sent before the groups are left, in that order.

use std::sync::Arc;

use crate::layer::{ChannelLayer, LayerError};
use crate::runtime::Runtime;

/// A connection's channel on its layer and the groups it joined.
pub(crate) struct Membership {
    layer: Arc<dyn ChannelLayer>,
    /// Shared with the runner's `Inbox`, which receives on it.
    channel: Arc<str>,
    /// Every group this channel may be in. A group is recorded before it is
    /// joined, so a join cut off halfway is still left.
    groups: Vec<String>,
    /// Where a drop spawns the leaving; `None` once it has been done.
    runtime: Option<Runtime>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("channel", &self.channel)
            .field("groups", &self.groups)
            .finish()
    }
}

impl Membership {
    /// Gets a new channel on `layer` and joins `groups`. On an error, what
    /// was taken so far is given back as the half-built value drops.
    pub(crate) async fn join(
        layer: Arc<dyn ChannelLayer>,
        groups: &[String],
        runtime: Runtime,
    ) -> Result<Membership, LayerError> {
        let channel = layer.new_channel("specific").await?;
        let mut membership = Membership {
            layer,
            channel: channel.into(),
            groups: Vec::new(),
            runtime: Some(runtime),
        };
        for group in groups {
            membership.add(group).await?;
        }
        Ok(membership)
    }

    pub(crate) fn layer(&self) -> &Arc<dyn ChannelLayer> {
        &self.layer
    }

    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    pub(crate) fn shared_channel(&self) -> &Arc<str> {
        &self.channel
    }

    /// Joins `group`.
    pub(crate) async fn add(&mut self, group: &str) -> Result<(), LayerError> {
        if !self.groups.iter().any(|joined| joined == group) {
            // Room for this one only: most connections join one group, and
            // a Vec's first push makes room for four.
            self.groups.reserve_exact(1);
            self.groups.push(group.to_owned());
        }
        let added = self.layer.group_add(group, &self.channel).await;
        if let Err(LayerError::InvalidName { .. }) = added {
            // Nothing was joined: there is nothing to leave or renew.
            self.groups.retain(|joined| joined != group);
        }
        added
    }

    /// Leaves `group`.
    pub(crate) async fn discard(&mut self, group: &str) -> Result<(), LayerError> {
        self.layer.group_discard(group, &self.channel).await?;
        self.groups.retain(|joined| joined != group);
        Ok(())
    }

    /// Joins every group again, which pushes its expiry back. A failure is
    /// retried at the next renewal, while the membership has half its life
    /// left; an outage is already reported by the layer, once.
    pub(crate) async fn renew(&self) {
        for group in &self.groups {
            match self.layer.group_add(group, &self.channel).await {
                Ok(()) => {}
                Err(err) if err.is_outage() => {
                    tracing::debug!(group, %err, "could not renew a group membership");
                }
                Err(err) => tracing::warn!(group, %err, "could not renew a group membership"),
            }
        }
    }

    /// Leaves every group and frees the channel, now.
    pub(crate) async fn leave(mut self) {
        self.runtime = None;
        let groups = std::mem::take(&mut self.groups);
        leave(&*self.layer, &self.channel, &groups).await;
    }
}

// ANCHOR: drop
impl Drop for Membership {
    fn drop(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        let layer = self.layer.clone();
        let channel = Arc::clone(&self.channel);
        let groups = std::mem::take(&mut self.groups);
        runtime.spawn_cleanup(async move { leave(&*layer, &channel, &groups).await });
    }
}
// ANCHOR_END: drop

/// Leaves `groups` and frees `channel`; failures are only logged, since the
/// connection is over either way.
async fn leave(layer: &dyn ChannelLayer, channel: &str, groups: &[String]) {
    for group in groups {
        if let Err(err) = layer.group_discard(group, channel).await {
            tracing::debug!(group, %err, "could not leave a group");
        }
    }
    if let Err(err) = layer.close_channel(channel).await {
        tracing::debug!(channel, %err, "could not close a channel");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::InMemoryLayer;

    #[tokio::test]
    async fn a_dropped_membership_leaves_its_groups_and_channel() {
        let memory = Arc::new(InMemoryLayer::default());
        let runtime = Runtime::default();
        let mut membership = Membership::join(memory.clone(), &["room".into()], runtime.clone())
            .await
            .unwrap();
        membership.add("later").await.unwrap();
        assert_eq!(memory.size().1, 2, "in two groups");
        drop(membership);
        assert_eq!(runtime.shut_down().await, 0);
        assert_eq!(memory.size(), (0, 0), "no channel and no member left");
    }

    #[tokio::test]
    async fn a_join_cut_off_halfway_is_undone() {
        let memory = Arc::new(InMemoryLayer::default());
        let runtime = Runtime::default();
        // An invalid group fails the join after the channel and the first
        // group were taken.
        let groups = ["room".to_owned(), "not a group!".to_owned()];
        let joined = Membership::join(memory.clone(), &groups, runtime.clone()).await;
        assert!(joined.is_err());
        assert_eq!(runtime.shut_down().await, 0);
        assert_eq!(memory.size(), (0, 0));
    }

    #[tokio::test]
    async fn leaving_on_purpose_leaves_at_once() {
        let memory = Arc::new(InMemoryLayer::default());
        let mut membership = Membership::join(memory.clone(), &[], Runtime::default())
            .await
            .unwrap();
        membership.add("room").await.unwrap();
        membership.add("other").await.unwrap();
        membership.discard("other").await.unwrap();
        membership.leave().await;
        assert_eq!(memory.size(), (0, 0));
    }
}
