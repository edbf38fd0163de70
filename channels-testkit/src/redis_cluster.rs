//! [`RedisCluster`]: a throwaway Redis Cluster for tests, six
//! `redis-server` processes (three masters, three replicas) on free ports.
//!
//! It is what a managed "cluster mode" Redis looks like to a client: keys
//! spread over 16,384 slots, each slot owned by one master, `MOVED` when a
//! client asks the wrong node, and a replica that takes over when its
//! master dies. The tests of the cluster layers run against it, and kill,
//! fail over and reshard its nodes.
//!
//! Starting one takes about a second: the six servers, then `redis-cli
//! --cluster create ... --cluster-replicas 1 --cluster-yes`, then a wait
//! until every node says `cluster_state:ok`. Without `redis-server` and
//! `redis-cli`, [`RedisCluster::start`] skips loudly, or fails under `CI`,
//! as [`RedisServer::start`] does.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::time::sleep;

use crate::cluster_recipe::{self, MASTERS, NODE_ARGS};
use crate::{RedisServer, skip_or_fail};

/// How long the cluster may take to agree that every slot is served.
const FORMING: Duration = Duration::from_secs(20);

/// Six nodes of one Redis Cluster, every one killed on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// What `CLUSTER NODES` says of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's id in the cluster.
    pub id: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// True for a master, false for a replica.
    pub master: bool,
    /// The slot ranges it owns (a master), e.g. `[(0, 5460)]`.
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// Starts six nodes, forms the cluster, and waits until every node
    /// serves every slot. `None`, after a notice on stderr, without
    /// `redis-server` or `redis-cli` (a failure under `CI`).
    pub async fn start() -> Option<RedisCluster> {
        if !redis_cli_installed().await {
            skip_or_fail(
                "Redis Cluster test",
                "redis-cli is not installed (it comes with `apt-get install redis-server`)",
            );
            return None;
        }
        let mut nodes = Vec::new();
        // Each server runs in a directory of its own, where its relative
        // `nodes.conf` lands.
        let mut args = NODE_ARGS.to_vec();
        args.extend(["--cluster-config-file", "nodes.conf"]);
        for _ in 0..MASTERS * 2 {
            nodes.push(RedisServer::start_with(&args).await?);
        }
        let cluster = RedisCluster { nodes };
        let ports: Vec<u16> = cluster.nodes.iter().map(RedisServer::port).collect();
        let output = Command::new("redis-cli")
            .args(cluster_recipe::create_args(&ports))
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|err| panic!("cannot run redis-cli: {err}"));
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        cluster.wait_until_ok(FORMING).await;
        cluster.wait_for_replicas(FORMING).await;
        Some(cluster)
    }

    /// Every node's URL, comma-separated: what `REDIS_CLUSTER_URL` takes.
    /// A client needs only one of them to find the others; giving all
    /// lets it start while some are down.
    pub fn url(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(RedisServer::url).collect();
        urls.join(",")
    }

    /// Every node's URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// What the cluster says of its nodes now, as seen from the first node
    /// that answers.
    pub async fn nodes(&self) -> Vec<NodeInfo> {
        for node in &self.nodes {
            if let Ok(text) = cli(node.port(), &["cluster", "nodes"]).await {
                return parse_nodes(&text);
            }
        }
        panic!("no node of the cluster answers CLUSTER NODES");
    }

    /// The master that owns `slot` now.
    pub async fn master_of(&self, slot: u16) -> NodeInfo {
        self.nodes()
            .await
            .into_iter()
            .find(|node| {
                node.master
                    && !node.slots.is_empty()
                    && node.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
            })
            .unwrap_or_else(|| panic!("no master owns slot {slot}"))
    }

    /// Kills the node on `port` at once, as a crash would. Its replica takes
    /// over within a few node timeouts (see
    /// [`wait_for_takeover`](Self::wait_for_takeover)).
    pub async fn kill(&mut self, port: u16) {
        self.node_mut(port).kill().await;
    }

    /// Waits until the slots of the (killed) master on `port` are served by
    /// another node, its replica promoted; panics after `within`.
    pub async fn wait_for_takeover(&self, port: u16, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            // Taken over once every slot has a master again, none of them
            // the dead node (which drops out of the list once it is marked
            // as failed, before its replica is promoted).
            let nodes = self.nodes().await;
            let served: u32 = nodes
                .iter()
                .filter(|node| node.master && node.port != port)
                .flat_map(|node| &node.slots)
                .map(|(a, b)| u32::from(b - a) + 1)
                .sum();
            if served == 16_384 {
                self.wait_until_ok(deadline.saturating_duration_since(Instant::now()))
                    .await;
                return;
            }
            if Instant::now() >= deadline {
                panic!("no replica took over from the master on {port} within {within:?}");
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the killed node on `port` again, with its old identity (it
    /// rejoins, as a replica if it was failed over).
    pub async fn restart(&mut self, port: u16) {
        self.node_mut(port).restart().await;
    }

    /// Promotes a replica of the master on `master_port` with `CLUSTER
    /// FAILOVER`, as an operator does before maintenance, and waits until
    /// the old master is a replica.
    pub async fn failover(&self, master_port: u16) {
        let nodes = self.nodes().await;
        let master = nodes
            .iter()
            .find(|node| node.port == master_port)
            .unwrap_or_else(|| panic!("no node on port {master_port}"));
        let replica = self
            .replica_of(&master.id)
            .await
            .unwrap_or_else(|| panic!("the master on {master_port} has no replica"));
        cli(replica, &["cluster", "failover"])
            .await
            .expect("CLUSTER FAILOVER");
        let deadline = Instant::now() + FORMING;
        while Instant::now() < deadline {
            let now = self.nodes().await;
            if now.iter().any(|n| n.port == replica && n.master) {
                return;
            }
            sleep(Duration::from_millis(50)).await;
        }
        panic!("the replica on {replica} did not take over from {master_port}");
    }

    /// Keeps the replica of the master on `master_port` from taking over on
    /// its own (`cluster-replica-no-failover yes`), so that after the
    /// master is killed every node keeps naming it as its slots' owner for
    /// as long as a test wants; returns the replica's port, for
    /// [`take_over`](Self::take_over). What a client reads of the slot map
    /// meanwhile is stale, deterministically, not only in the first
    /// moments of a failover.
    pub async fn hold_failover(&self, master_port: u16) -> u16 {
        let replica = self
            .replica_port(master_port)
            .await
            .unwrap_or_else(|| panic!("the master on {master_port} has no replica"));
        cli(
            replica,
            &["config", "set", "cluster-replica-no-failover", "yes"],
        )
        .await
        .expect("CONFIG SET cluster-replica-no-failover");
        replica
    }

    /// Promotes the replica on `replica_port` without its master's
    /// agreement (`CLUSTER FAILOVER TAKEOVER`), as an operator does when
    /// the master is gone, and waits until every slot is served again;
    /// panics after `within`.
    pub async fn take_over(&self, replica_port: u16, within: Duration) {
        cli(replica_port, &["cluster", "failover", "takeover"])
            .await
            .expect("CLUSTER FAILOVER TAKEOVER");
        let deadline = Instant::now() + within;
        loop {
            let now = self.nodes().await;
            if now.iter().any(|n| n.port == replica_port && n.master) {
                self.wait_until_ok(deadline.saturating_duration_since(Instant::now()))
                    .await;
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the replica on {replica_port} did not take over within {within:?}: {now:?}"
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Moves `slot` from the master that owns it to the master on
    /// `to_port`, with its keys, as `redis-cli --cluster reshard` does one
    /// slot at a time: `SETSLOT IMPORTING/MIGRATING`, `MIGRATE` the keys,
    /// then `SETSLOT NODE` on every master.
    pub async fn move_slot(&self, slot: u16, to_port: u16) {
        self.begin_move(slot, to_port, &[]).await;
        self.finish_move(slot, to_port).await;
    }

    /// The first half of [`move_slot`](Self::move_slot): `slot` marked
    /// importing on the master on `to_port` and migrating on its owner,
    /// and only `keys` of it moved. Until
    /// [`finish_move`](Self::finish_move), a command on several keys of the
    /// slot, some moved and some not, meets `TRYAGAIN`.
    pub async fn begin_move(&self, slot: u16, to_port: u16, keys: &[&str]) {
        let (from, to) = self.move_ends(slot, to_port).await;
        if from.port == to.port {
            return;
        }
        let slot_text = slot.to_string();
        cli(
            to.port,
            &["cluster", "setslot", &slot_text, "importing", &from.id],
        )
        .await
        .expect("SETSLOT IMPORTING");
        cli(
            from.port,
            &["cluster", "setslot", &slot_text, "migrating", &to.id],
        )
        .await
        .expect("SETSLOT MIGRATING");
        if !keys.is_empty() {
            migrate(from.port, to.port, keys).await;
        }
    }

    /// The second half of [`move_slot`](Self::move_slot): the rest of the
    /// slot's keys moved, then `SETSLOT NODE` on every master.
    pub async fn finish_move(&self, slot: u16, to_port: u16) {
        let (from, to) = self.move_ends(slot, to_port).await;
        if from.port == to.port {
            return;
        }
        let slot_text = slot.to_string();
        loop {
            let keys = cli(from.port, &["cluster", "getkeysinslot", &slot_text, "100"])
                .await
                .expect("GETKEYSINSLOT");
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            migrate(from.port, to.port, &keys).await;
        }
        for node in self.nodes().await.iter().filter(|node| node.master) {
            cli(
                node.port,
                &["cluster", "setslot", &slot_text, "node", &to.id],
            )
            .await
            .expect("SETSLOT NODE");
        }
    }

    /// The owner of `slot` and the master on `to_port`.
    async fn move_ends(&self, slot: u16, to_port: u16) -> (NodeInfo, NodeInfo) {
        let from = self.master_of(slot).await;
        let to = self
            .nodes()
            .await
            .into_iter()
            .find(|node| node.port == to_port && node.master)
            .unwrap_or_else(|| panic!("no master on port {to_port}"));
        (from, to)
    }

    /// Waits until every running node says `cluster_state:ok`; panics after
    /// `within`.
    pub async fn wait_until_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut all_ok = true;
            for node in &self.nodes {
                let info = cli(node.port(), &["cluster", "info"]).await;
                // A killed node does not answer; the others must agree.
                if let Ok(info) = info
                    && !cluster_recipe::serves(&info)
                {
                    all_ok = false;
                }
            }
            if all_ok {
                return;
            }
            if Instant::now() >= deadline {
                panic!("the cluster is not ok after {within:?}");
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running replica has copied its master and
    /// follows it (`master_link_status:up`), so that a master killed from
    /// then on loses at most its last moment's writes (replication is
    /// asynchronous), not everything; panics after `within`.
    /// `cluster_state:ok` does not say this: a cluster serves every slot
    /// before any replica has synced.
    pub async fn wait_for_replicas(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut synced = true;
            for node in &self.nodes {
                if let Ok(info) = cli(node.port(), &["info", "replication"]).await
                    && cluster_recipe::replica_behind(&info)
                {
                    synced = false;
                }
            }
            if synced {
                return;
            }
            if Instant::now() >= deadline {
                panic!("the replicas have not synced with their masters after {within:?}");
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// The port of a replica of the master on `master_port`, if it has one
    /// (waiting, as the cluster forms, until some node knows of it).
    pub async fn replica_port(&self, master_port: u16) -> Option<u16> {
        let nodes = self.nodes().await;
        let master = nodes.iter().find(|node| node.port == master_port)?;
        self.replica_of(&master.id).await
    }

    /// Waits until every running node says `cluster_state:fail` (a slot
    /// has no live master, and `cluster-require-full-coverage` is on, as
    /// by default): from then on every command meets `CLUSTERDOWN`. Panics
    /// after `within`.
    pub async fn wait_until_down(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut all_down = true;
            for node in &self.nodes {
                if let Ok(info) = cli(node.port(), &["cluster", "info"]).await
                    && !info.contains("cluster_state:fail")
                {
                    all_down = false;
                }
            }
            if all_down {
                return;
            }
            if Instant::now() >= deadline {
                panic!("the cluster still serves after {within:?}");
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    async fn replica_of(&self, master_id: &str) -> Option<u16> {
        // Any node that knows of one: the first to answer may not have
        // heard of a replica yet on a busy machine, as gossip takes turns.
        let deadline = Instant::now() + FORMING;
        loop {
            for node in &self.nodes {
                let Ok(text) = cli(node.port(), &["cluster", "nodes"]).await else {
                    continue;
                };
                let replica = text.lines().find_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    (fields.get(3) == Some(&master_id)
                        && fields[2].split(',').any(|flag| flag == "slave"))
                    .then(|| port_of(fields[1]))
                    .flatten()
                });
                if replica.is_some() {
                    return replica;
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|node| node.port() == port)
            .unwrap_or_else(|| panic!("no node of this cluster on port {port}"))
    }
}

/// `redis-cli -p PORT ARGS...`, its output as text.
async fn cli(port: u16, args: &[&str]) -> Result<String, String> {
    let run = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .map_err(|_| format!("redis-cli -p {port} timed out"))?
        .map_err(|err| format!("cannot run redis-cli: {err}"))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() || text.starts_with("Could not connect") {
        return Err(text);
    }
    if text.starts_with("ERR") || text.starts_with("(error)") {
        return Err(text);
    }
    Ok(text)
}

/// `MIGRATE`s `keys` from the node on `from` to the node on `to`.
async fn migrate(from: u16, to: u16, keys: &[&str]) {
    let port = to.to_string();
    let mut args = vec!["migrate", "127.0.0.1", &port, "", "0", "5000", "keys"];
    args.extend(keys);
    cli(from, &args).await.expect("MIGRATE");
}

/// `127.0.0.1:7000@17000` → 7000.
fn port_of(address: &str) -> Option<u16> {
    address.split('@').next()?.rsplit(':').next()?.parse().ok()
}

/// The lines of `CLUSTER NODES`: `id address flags master-id ping pong
/// epoch link-state slot...`.
fn parse_nodes(text: &str) -> Vec<NodeInfo> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // `fail` or `fail?` among the flags; not `nofailover`.
            let flags: Vec<&str> = fields.get(2)?.split(',').collect();
            if fields.len() < 8 || flags.iter().any(|flag| flag.starts_with("fail")) {
                return None;
            }
            Some(NodeInfo {
                id: fields[0].to_owned(),
                port: port_of(fields[1])?,
                master: flags.contains(&"master"),
                slots: cluster_recipe::owned_slots(line),
            })
        })
        .collect()
}

async fn redis_cli_installed() -> bool {
    Command::new("redis-cli")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|status| status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cluster_nodes() {
        let text = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [5461->-67ed2db8]
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 master,fail - 1426238316232 1426238316232 5 connected
b8b2f03dfc20ec5969207c5ca95b1539e6b62f36 127.0.0.1:30006@31006 master,nofailover - 0 1796566822575 7 connected 10923-16383
";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 4, "the failed node is left out");
        assert!(
            nodes[3].master && nodes[3].port == 30006,
            "`nofailover` is not `fail`"
        );
        assert_eq!(nodes[0].port, 30004);
        assert!(!nodes[0].master);
        assert_eq!(nodes[1].slots, [(5461, 10922)]);
        assert_eq!(
            nodes[2].slots,
            [(0, 5460)],
            "a slot being moved is not owned"
        );
        assert!(nodes[2].master);
    }
}
