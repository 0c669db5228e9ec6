//! The control API between `meshctl` and `meshd`: one JSON object per line each way,
//! over a Unix socket (mode 0600, peer credentials checked by the daemon).
//!
//! Requests are tagged by `op`:
//! `{"op":"status"}`, `{"op":"peer_add","cert":"<pem>","endpoint":"198.18.0.2:51820"}`,
//! `{"op":"peer_remove","identity":"spiffe://t/b"}`, `{"op":"peer_list"}`,
//! `{"op":"policy_apply","source":"<toml>","name":"file.toml"}`, `{"op":"policy_get"}`,
//! `{"op":"explain", ...}`, `{"op":"log","follow":false,"lines":50}`,
//! `{"op":"workload_add","name":"web","cert":"/abs/web.crt","key":"/abs/web.key","veth":"p-web"}`,
//! `{"op":"workload_remove","name":"web"}`, `{"op":"workload_list"}`.
//!
//! Replies are `{"ok":true,"result":{...}}` or `{"ok":false,"error":"one line"}`.
//! Identities and keys travel as their canonical strings (SPIFFE ID, base64 key).

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::time::UnixTime;

/// Longest request line the daemon reads (a certificate PEM or policy file fits easily).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// A control request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status(NoArgs),
    PeerAdd {
        /// The peer's certificate, PEM.
        cert: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<SocketAddr>,
    },
    PeerRemove {
        identity: String,
    },
    PeerList(NoArgs),
    PolicyApply {
        source: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    PolicyGet(NoArgs),
    /// A described request for `policy explain`; its fields belong to the policy model.
    Explain(serde_json::Map<String, serde_json::Value>),
    Log {
        #[serde(default)]
        follow: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lines: Option<u32>,
    },
    /// Adds (or replaces) a local workload. `cert` and `key` are absolute paths on the
    /// daemon's host (the key never travels over the socket); `veth` is the host end
    /// of the pod's veth, absent for a workload whose addresses the operator routes.
    WorkloadAdd {
        name: String,
        cert: String,
        key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        veth: Option<String>,
    },
    WorkloadRemove {
        name: String,
    },
    WorkloadList(NoArgs),
}

/// The arguments of a request that takes none; any field is an error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

impl Request {
    /// Parses one request line. The error is one line that says what is wrong.
    pub fn parse(line: &str) -> Result<Request, String> {
        let v: serde_json::Value =
            serde_json::from_str(line.trim_end()).map_err(|e| format!("bad request: {e}"))?;
        if !v.is_object() {
            return Err("bad request: expected a JSON object with an \"op\" field".into());
        }
        serde_json::from_value(v).map_err(|e| format!("bad request: {e}"))
    }

    /// The request as one line of JSON (no newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// A control reply: `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(result: impl Serialize) -> Response {
        match serde_json::to_value(result) {
            Ok(v) => Response {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Response::error(format!("internal: cannot encode result: {e}")),
        }
    }

    /// An error reply; newlines in `message` are flattened so the reply stays one line.
    pub fn error(message: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            result: None,
            error: Some(message.to_string().replace('\n', " ")),
        }
    }

    pub fn parse(line: &str) -> Result<Response, String> {
        serde_json::from_str(line.trim_end()).map_err(|e| format!("bad reply from meshd: {e}"))
    }

    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            String::from(r#"{"ok":false,"error":"internal: cannot encode reply"}"#)
        })
    }

    /// The result decoded as `T`, or the daemon's error.
    pub fn into_result<T: serde::de::DeserializeOwned>(self) -> Result<T, String> {
        if !self.ok {
            return Err(self.error.unwrap_or_else(|| "meshd: unknown error".into()));
        }
        let v = self.result.unwrap_or(serde_json::Value::Null);
        serde_json::from_value(v).map_err(|e| format!("bad reply from meshd: {e}"))
    }
}

/// Result of `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// True once the TUN is up and the UDP socket bound.
    pub ready: bool,
    pub identity: String,
    pub public_key: String,
    pub listen: SocketAddr,
    pub tun: String,
    pub addresses: Vec<IpNet>,
    pub peers: Vec<PeerStatus>,
    pub drops: NodeDrops,
    /// The local workloads (the node's own identity first, named `node`).
    #[serde(default)]
    pub workloads: Vec<WorkloadInfo>,
    /// Policy in force, enforcement counters (per reason, per rule, flows, layer 7)
    /// and decision-log counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<serde_json::Value>,
    /// The CPU wake-up latency request (`node.cpu_latency_us`); `None` without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_latency: Option<CpuLatencyStatus>,
    /// The host filter (nftables) that keeps the mesh addresses to meshd; `None` from
    /// a daemon that predates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_filter: Option<HostFilterStatus>,
    /// The fleet store: connection, revision, what was applied and refused; `None`
    /// without a `[store]` table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<crate::store::StoreStatus>,
}

/// meshd's host filter: nothing reaches a mesh address except through meshd (the
/// TUN) or loopback, and pods send only into the TUN, from their own addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFilterStatus {
    pub state: HostFilterState,
    /// The nftables table (`inet meshd-mesh0`); empty when disabled.
    #[serde(default)]
    pub table: String,
    /// The mesh addresses it keeps to meshd.
    #[serde(default)]
    pub protects: Vec<IpNet>,
    /// The pods' veths it holds to meshd.
    #[serde(default)]
    pub pods: Vec<String>,
    /// Packets it dropped that were addressed to a mesh address around meshd (from
    /// the underlay, or forwarded toward the TUN or a pod).
    #[serde(default)]
    pub underlay_drops: u64,
    /// Packets it dropped from pods: to the host itself, or anywhere but the TUN, or
    /// from an address not theirs.
    #[serde(default)]
    pub pod_drops: u64,
}

impl HostFilterStatus {
    /// The status of a daemon running without its filter (`host_filter = false`).
    pub fn disabled() -> HostFilterStatus {
        HostFilterStatus {
            state: HostFilterState::Disabled,
            table: String::new(),
            protects: Vec::new(),
            pods: Vec::new(),
            underlay_drops: 0,
            pod_drops: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostFilterState {
    /// In force (read back from the kernel).
    Installed,
    /// Switched off in the configuration (`[node] host_filter = false`).
    Disabled,
    /// meshd installed it but the kernel no longer has it (deleted by hand?): the
    /// mesh addresses are unprotected until meshd restarts.
    Missing,
}

/// meshd's CPU wake-up latency request: held while traffic flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuLatencyStatus {
    pub requested_us: u32,
    pub state: CpuLatencyState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuLatencyState {
    /// Held now (traffic in the last timer tick).
    Held,
    /// Not held: no recent traffic.
    Released,
    /// The kernel refused it (logged); not tried again until restart.
    Failed,
}

/// One session: a remote workload (`identity`) and the local workload it talks to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub identity: String,
    /// The local workload's identity (the node's own one on a host without workloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<String>,
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub addresses: Vec<IpNet>,
    /// Seconds since the epoch of the last completed handshake; `null` before one.
    pub latest_handshake: Option<UnixTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub drops: PeerDrops,
    /// The peer's certificate validity window (0 from a daemon that predates them).
    #[serde(default)]
    pub not_before: UnixTime,
    #[serde(default)]
    pub not_after: UnixTime,
}

/// Drops attributed to a peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerDrops {
    /// Decrypted packets whose source address is not in the sender's certificate.
    pub spoofed_source: u64,
}

/// Drops that no peer can be blamed for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeDrops {
    /// Datagrams or TUN packets that do not parse, or fail authentication.
    pub malformed: u64,
    /// Datagrams for no known peer (unknown static key or receiver index), and
    /// handshakes from peers whose certificate is no longer valid.
    pub unknown_peer: u64,
    /// TUN packets to an address no peer holds (or whose peer has no endpoint).
    pub no_route: u64,
    /// Packets from a local workload with a source address its certificate does not
    /// hold (a pod sending as its neighbour, or as no workload at all).
    pub forged_source: u64,
    /// Decrypted packets addressed to a local address other than the session's
    /// workload's.
    pub misdirected: u64,
    /// Writes to the TUN the kernel refused (one packet, or one merged run of a
    /// flow's segments, each).
    pub tun_write: u64,
    /// Datagrams to peers not sent: refused by the kernel, or the socket's send
    /// buffer stayed full past the backpressure wait.
    pub udp_send: u64,
}

/// One local workload, in `status`, `workload_list` and the result of `workload_add`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// The operator's label; `node` is the node's own identity.
    pub name: String,
    pub identity: String,
    pub public_key: String,
    pub addresses: Vec<IpNet>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Start of its certificate's validity window (0 from a daemon that predates it).
    #[serde(default)]
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    /// How it is attached: `veth:<interface>`, or `tun` (addresses on, or routed to,
    /// meshd's TUN).
    pub attach: String,
    /// `node`, `config` (meshd.toml) or `runtime` (workload add).
    pub source: String,
}

/// Result of `workload_list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadList {
    pub workloads: Vec<WorkloadInfo>,
}

/// Result of `workload_remove`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRemoved {
    pub removed: String,
}

/// One entry of `peer_list`, and the result of `peer_add`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub identity: String,
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub addresses: Vec<IpNet>,
    #[serde(default)]
    pub groups: Vec<String>,
    pub not_after: UnixTime,
    /// Where this peer comes from: `"config"` (meshd.toml) or `"runtime"` (peer add).
    pub source: String,
}

/// Result of `peer_list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerList {
    pub peers: Vec<PeerInfo>,
}

/// Result of `peer_remove`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRemoved {
    pub removed: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_requests() {
        assert_eq!(
            Request::parse(r#"{"op":"status"}"#),
            Ok(Request::Status(NoArgs {}))
        );
        assert_eq!(
            Request::parse(r#"{"op":"peer_add","cert":"PEM","endpoint":"198.18.0.2:51820"}"#),
            Ok(Request::PeerAdd {
                cert: "PEM".into(),
                endpoint: Some("198.18.0.2:51820".parse().unwrap())
            })
        );
        assert_eq!(
            Request::parse(r#"{"op":"peer_add","cert":"PEM"}"#),
            Ok(Request::PeerAdd {
                cert: "PEM".into(),
                endpoint: None
            })
        );
        assert_eq!(
            Request::parse(r#"{"op":"peer_remove","identity":"spiffe://t/b"}"#),
            Ok(Request::PeerRemove {
                identity: "spiffe://t/b".into()
            })
        );
        assert_eq!(
            Request::parse("{\"op\":\"peer_list\"}\n"),
            Ok(Request::PeerList(NoArgs {}))
        );
        assert_eq!(
            Request::parse(r#"{"op":"log","follow":true,"lines":5}"#),
            Ok(Request::Log {
                follow: true,
                lines: Some(5)
            })
        );
        assert_eq!(
            Request::parse(
                r#"{"op":"workload_add","name":"web","cert":"/w.crt","key":"/w.key","veth":"p-web"}"#
            ),
            Ok(Request::WorkloadAdd {
                name: "web".into(),
                cert: "/w.crt".into(),
                key: "/w.key".into(),
                veth: Some("p-web".into()),
            })
        );
        assert_eq!(
            Request::parse(r#"{"op":"workload_remove","name":"web"}"#),
            Ok(Request::WorkloadRemove { name: "web".into() })
        );
        assert!(Request::parse(r#"{"op":"workload_add","name":"web","cert":"/w.crt"}"#).is_err());
        assert!(matches!(
            Request::parse(r#"{"op":"explain","src":"spiffe://t/a","port":80}"#),
            Ok(Request::Explain(m)) if m.len() == 2
        ));
    }

    #[test]
    fn round_trips() {
        for r in [
            Request::Status(NoArgs {}),
            Request::PeerList(NoArgs {}),
            Request::PeerAdd {
                cert: "x".into(),
                endpoint: Some("[fd00:198:18::2]:51820".parse().unwrap()),
            },
            Request::PeerRemove {
                identity: "spiffe://t/b".into(),
            },
        ] {
            assert_eq!(Request::parse(&r.to_line()), Ok(r));
        }
    }

    #[test]
    fn rejects_malformed_requests_with_one_line() {
        for bad in [
            "",
            "not json",
            "{}",
            r#"{"op":"reboot"}"#,
            r#"{"op":"status","extra":1}"#,
            r#"{"op":"peer_add"}"#,
            r#"{"op":"peer_add","cert":"x","endpoint":"nowhere"}"#,
            r#"{"op":"peer_remove","identity":5}"#,
            r#"["status"]"#,
        ] {
            let e = Request::parse(bad).expect_err(bad);
            assert!(e.starts_with("bad request: "), "{e}");
            let reply = Response::error(e).to_line();
            assert!(!reply.contains('\n'));
            assert!(
                reply.starts_with(r#"{"ok":false,"error":"bad request"#),
                "{reply}"
            );
        }
    }

    #[test]
    fn status_json_shape() {
        let s = Status {
            ready: true,
            identity: "spiffe://t/a".into(),
            public_key: "k".into(),
            listen: "198.18.0.1:51820".parse().unwrap(),
            tun: "mesh0".into(),
            addresses: vec!["100.64.0.1/32".parse().unwrap()],
            peers: vec![PeerStatus {
                identity: "spiffe://t/b".into(),
                local: Some("spiffe://t/a".into()),
                public_key: "k2".into(),
                endpoint: None,
                addresses: vec!["100.64.0.2/32".parse().unwrap()],
                latest_handshake: None,
                rx_bytes: 1,
                tx_bytes: 2,
                drops: PeerDrops { spoofed_source: 3 },
                not_before: UnixTime(10),
                not_after: UnixTime(20),
            }],
            drops: NodeDrops::default(),
            workloads: vec![],
            enforcement: None,
            cpu_latency: Some(CpuLatencyStatus {
                requested_us: 0,
                state: CpuLatencyState::Released,
            }),
            host_filter: Some(HostFilterStatus {
                state: HostFilterState::Installed,
                table: "inet meshd-mesh0".into(),
                protects: vec!["100.64.0.0/10".parse().unwrap()],
                pods: vec!["p-web".into()],
                underlay_drops: 4,
                pod_drops: 1,
            }),
            store: None,
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            v["cpu_latency"],
            serde_json::json!({"requested_us": 0, "state": "released"})
        );
        assert_eq!(
            v["host_filter"],
            serde_json::json!({"state": "installed", "table": "inet meshd-mesh0",
                "protects": ["100.64.0.0/10"], "pods": ["p-web"],
                "underlay_drops": 4, "pod_drops": 1})
        );
        assert_eq!(v["peers"][0]["latest_handshake"], serde_json::Value::Null);
        assert_eq!(v["peers"][0]["drops"]["spoofed_source"], 3);
        assert_eq!(v["drops"]["no_route"], 0);
        assert_eq!(v["addresses"][0], "100.64.0.1/32");
        let reply = Response::ok(&s).to_line();
        let back: Status = Response::parse(&reply).unwrap().into_result().unwrap();
        assert_eq!(back, s);
        assert_eq!(v["peers"][0]["not_before"], 10);
        assert_eq!(v["peers"][0]["not_after"], 20);
        // A daemon from before the validity fields: they read as 0, nothing fails.
        let mut old = v.clone();
        old["peers"][0]
            .as_object_mut()
            .unwrap()
            .remove("not_before");
        old["peers"][0].as_object_mut().unwrap().remove("not_after");
        old.as_object_mut().unwrap().remove("cpu_latency");
        old.as_object_mut().unwrap().remove("host_filter");
        let back: Status = serde_json::from_value(old).unwrap();
        assert_eq!(back.peers[0].not_after, UnixTime(0));
        assert_eq!(back.cpu_latency, None);
        assert_eq!(back.host_filter, None);
    }
}
