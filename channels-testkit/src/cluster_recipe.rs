//! How a throwaway Redis Cluster is made, std-only, so that the test
//! harness ([`RedisCluster`](crate::RedisCluster), async) and `cargo xtask
//! cluster --redis-cluster` (sync, which compiles this file with
//! `#[path]` rather than depend on this crate and its runtime) make the
//! same one: the nodes' settings, the `redis-cli --cluster create` command,
//! how to read whether it is ready, and which slots a node owns.

/// Masters, and one replica for each: six nodes.
pub const MASTERS: usize = 3;

/// Each node's settings besides a plain server's own (port, no saving). Its
/// `--cluster-config-file` is added per node: a node writes it, so two
/// nodes may not share one.
pub const NODE_ARGS: [&str; 8] = [
    "--cluster-enabled",
    "yes",
    // A short node timeout, so that a failover takes a second or two, not 15.
    "--cluster-node-timeout",
    "1000",
    // A replica takes over however long it was cut off from its master.
    "--cluster-replica-validity-factor",
    "0",
    // A replica's first copy of its master starts at once. Redis 7 waits
    // 5 s by default (for more replicas to share one diskless transfer):
    // a master killed in those 5 s left a replica with nothing, and a
    // test saw a room's members vanish, not a last moment's writes.
    "--repl-diskless-sync-delay",
    "0",
];

/// The arguments of `redis-cli` that form a cluster of the nodes on
/// `ports` (on 127.0.0.1), each master with one replica.
pub fn create_args(ports: &[u16]) -> Vec<String> {
    let mut args = vec!["--cluster".to_owned(), "create".to_owned()];
    args.extend(ports.iter().map(|port| format!("127.0.0.1:{port}")));
    args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(str::to_owned));
    args
}

/// Whether a node's `CLUSTER INFO` says it serves every slot.
pub fn serves(cluster_info: &str) -> bool {
    cluster_info.contains("cluster_state:ok")
}

/// Whether a node's `INFO replication` is a replica that has not copied its
/// master yet (or lost its link): `cluster_state:ok` does not wait for it.
pub fn replica_behind(info_replication: &str) -> bool {
    info_replication.contains("role:slave") && !info_replication.contains("master_link_status:up")
}

/// The slots a node owns, by its line of `CLUSTER NODES` (`id address
/// flags master-id ping pong epoch link-state slot...`), each range as
/// `(first, last)`: every field from the ninth on, `N` or `FROM-TO`. A
/// `[slot->-id]` or `[slot-<-id]` field marks a slot being moved, not one
/// owned.
pub fn owned_slots(line: &str) -> Vec<(u16, u16)> {
    line.split_whitespace()
        .skip(8)
        .filter(|range| !range.starts_with('['))
        .filter_map(|range| match range.split_once('-') {
            Some((first, last)) => Some((first.parse().ok()?, last.parse().ok()?)),
            None => range.parse().ok().map(|slot| (slot, slot)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_names_every_node_and_one_replica_each() {
        assert_eq!(
            create_args(&[7000, 7001]).join(" "),
            "--cluster create 127.0.0.1:7000 127.0.0.1:7001 --cluster-replicas 1 --cluster-yes"
        );
    }

    #[test]
    fn reads_a_nodes_slots() {
        let master = "b2 127.0.0.1:7002@17002 master - 0 1 2 connected 5461-10921 10922 \
                      [10922->-c3]";
        assert_eq!(owned_slots(master), [(5461, 10921), (10922, 10922)]);
        let replica = "d4 127.0.0.1:7004@17004 slave a1 0 1 1 connected";
        assert!(owned_slots(replica).is_empty());
    }

    #[test]
    fn reads_readiness() {
        assert!(serves("cluster_enabled:1\r\ncluster_state:ok\r\n"));
        assert!(!serves("cluster_state:fail\r\n"));
        assert!(replica_behind("role:slave\r\nmaster_link_status:down\r\n"));
        assert!(!replica_behind("role:slave\r\nmaster_link_status:up\r\n"));
        assert!(!replica_behind("role:master\r\nconnected_slaves:1\r\n"));
    }
}
