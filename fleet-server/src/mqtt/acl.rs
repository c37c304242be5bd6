//! The embedded broker's topic rules, as pure functions (no I/O): who may
//! publish and subscribe where, and the CONNACK code of each refusal. The
//! I/O around them is [`super::gate`] (docs/fleet-server.md, "Device isolation").
//!
//! The rules are those of docs/mosquitto.conf's ACL, checked on the packet
//! instead of on delivery:
//! - a device may publish only under `edgefleet/v1/devices/<its id>/up/`
//!   (its last will included) and subscribe only to filters inside its own
//!   `edgefleet/v1/devices/<its id>/down`;
//! - the server may do anything;
//! - a client may not send a second CONNECT or a packet only brokers send.

use edgefleet_protocol::topics;
use edgefleet_protocol::DeviceId;
use rumqttc::{ConnectReturnCode, LastWill, Packet};

use crate::credentials::{Principal, Refusal};

/// What a client tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// PUBLISH.
    Publish,
    /// SUBSCRIBE (one of its filters).
    Subscribe,
    /// The last will of a CONNECT.
    LastWill,
    /// Any other packet a client may not send.
    Packet,
}

impl Action {
    /// A short machine-readable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::LastWill => "last_will",
            Action::Packet => "packet",
        }
    }
}

/// A refused packet: what was tried, on which topic or filter (or the packet
/// kind for [`Action::Packet`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// What was tried.
    pub action: Action,
    /// The topic, filter or packet kind.
    pub topic: String,
}

/// The decision on one client packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it to the broker.
    Allow,
    /// Do not forward it; close the connection.
    Deny(Denial),
}

/// The topic prefix a device publishes under: `edgefleet/v1/devices/<id>/up/`.
fn own_up_prefix(id: &DeviceId) -> String {
    let mut p = topics::up_filter(id);
    p.pop(); // `#`
    p
}

/// The topic a device reads under: `edgefleet/v1/devices/<id>/down`.
fn own_down_root(id: &DeviceId) -> String {
    let mut p = topics::down_filter(id);
    p.truncate(p.len() - 2); // `/#`
    p
}

/// Whether device `id` may publish to `topic`: a topic under its own `up/`
/// without wildcards (which a publish topic must not contain anyway).
pub fn may_publish(id: &DeviceId, topic: &str) -> bool {
    topic
        .strip_prefix(own_up_prefix(id).as_str())
        .is_some_and(|rest| !rest.is_empty())
        && !topic.contains(['+', '#', '\0'])
}

/// Whether device `id` may subscribe to `filter`: its own `down` level or a
/// filter below it. The part up to and including the device id is literal
/// (device ids hold no wildcards), so such a filter matches no other
/// device's topics; `edgefleet/#`, `+/…`, `$share/…` and `$SYS/…` do not start
/// with that part.
pub fn may_subscribe(id: &DeviceId, filter: &str) -> bool {
    let root = own_down_root(id);
    filter
        .strip_prefix(root.as_str())
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        && !filter.contains('\0')
}

fn deny(action: Action, topic: &str) -> Verdict {
    Verdict::Deny(Denial {
        action,
        topic: topic.chars().take(200).collect(),
    })
}

/// Decides one packet a client sent after its CONNECT.
pub fn check_packet(principal: &Principal, packet: &Packet) -> Verdict {
    let unexpected = |kind: &str| deny(Action::Packet, kind);
    match packet {
        // Only brokers send these, and CONNECT comes once.
        Packet::Connect(_) => unexpected("CONNECT"),
        Packet::ConnAck(_) => unexpected("CONNACK"),
        Packet::SubAck(_) => unexpected("SUBACK"),
        Packet::UnsubAck(_) => unexpected("UNSUBACK"),
        Packet::PingResp => unexpected("PINGRESP"),
        Packet::Publish(p) => match principal {
            Principal::Server => Verdict::Allow,
            Principal::Device(id) if may_publish(id, &p.topic) => Verdict::Allow,
            Principal::Device(_) => deny(Action::Publish, &p.topic),
        },
        Packet::Subscribe(s) => match principal {
            Principal::Server => Verdict::Allow,
            Principal::Device(id) => s
                .filters
                .iter()
                .find(|f| !may_subscribe(id, &f.path))
                .map_or(Verdict::Allow, |f| deny(Action::Subscribe, &f.path)),
        },
        Packet::PubAck(_)
        | Packet::PubRec(_)
        | Packet::PubRel(_)
        | Packet::PubComp(_)
        | Packet::Unsubscribe(_)
        | Packet::PingReq
        | Packet::Disconnect => Verdict::Allow,
    }
}

/// Decides the last will of a CONNECT: a device's goes under its own `up/`.
pub fn check_will(principal: &Principal, will: Option<&LastWill>) -> Verdict {
    match (principal, will) {
        (Principal::Device(id), Some(w)) if !may_publish(id, &w.topic) => {
            deny(Action::LastWill, &w.topic)
        }
        _ => Verdict::Allow,
    }
}

/// Why the gate refused a CONNECT (logged, and answered with
/// [`ConnectRefusal::code`] in a CONNACK).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// The credentials check failed.
    Auth(Refusal),
    /// The last will is outside the device's own `up/`.
    Will(Denial),
    /// Not MQTT 3.1.1 (the protocol level it asked for).
    Protocol(u8),
    /// The server is gone or its broker cannot be reached.
    Unavailable,
}

impl ConnectRefusal {
    /// The MQTT 3.1.1 CONNACK return code for it.
    pub fn code(&self) -> ConnectReturnCode {
        match self {
            ConnectRefusal::Auth(
                Refusal::UnknownUser | Refusal::NoCredentials | Refusal::WrongSecret,
            ) => ConnectReturnCode::BadUserNamePassword,
            ConnectRefusal::Auth(Refusal::ClientIdMismatch) => ConnectReturnCode::BadClientId,
            ConnectRefusal::Auth(Refusal::StoreError) | ConnectRefusal::Unavailable => {
                ConnectReturnCode::ServiceUnavailable
            }
            ConnectRefusal::Will(_) => ConnectReturnCode::NotAuthorized,
            ConnectRefusal::Protocol(_) => ConnectReturnCode::RefusedProtocolVersion,
        }
    }

    /// A short machine-readable reason.
    pub fn as_str(&self) -> &'static str {
        match self {
            ConnectRefusal::Auth(r) => r.as_str(),
            ConnectRefusal::Will(_) => "last_will_outside_own_up",
            ConnectRefusal::Protocol(_) => "unsupported_protocol_level",
            ConnectRefusal::Unavailable => "unavailable",
        }
    }
}

/// The CONNACK packet refusing with `code` (4 bytes, MQTT 3.1.1 section 3.2).
pub fn connack_bytes(code: ConnectReturnCode) -> [u8; 4] {
    [0x20, 0x02, 0x00, code as u8]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rumqttc::{
        ConnAck, Connect, PubAck, Publish, QoS, Subscribe, SubscribeFilter, Unsubscribe,
    };

    use super::*;

    fn dev(id: &str) -> Principal {
        Principal::Device(id.parse().unwrap())
    }

    fn publish(topic: &str) -> Packet {
        Packet::Publish(Publish::new(topic, QoS::AtLeastOnce, vec![1]))
    }

    fn subscribe(filters: &[&str]) -> Packet {
        Packet::Subscribe(Subscribe::new_many(
            filters
                .iter()
                .map(|f| SubscribeFilter::new((*f).to_string(), QoS::AtLeastOnce)),
        ))
    }

    fn denied(action: Action, topic: &str) -> Verdict {
        Verdict::Deny(Denial {
            action,
            topic: topic.into(),
        })
    }

    #[test]
    fn a_device_publishes_only_under_its_own_up() {
        let a = dev("cam-1");
        for ok in [
            "edgefleet/v1/devices/cam-1/up/hello",
            "edgefleet/v1/devices/cam-1/up/status",
            "edgefleet/v1/devices/cam-1/up/some/future/kind",
        ] {
            assert_eq!(check_packet(&a, &publish(ok)), Verdict::Allow, "{ok}");
        }
        for bad in [
            "edgefleet/v1/devices/cam-2/up/hello",
            "edgefleet/v1/devices/cam-1x/up/hello",
            "edgefleet/v1/devices/cam/up/hello",
            "edgefleet/v1/devices/cam-1/down/cmd",
            "edgefleet/v1/devices/cam-2/down/cmd",
            "edgefleet/v1/devices/cam-1/up/",
            "edgefleet/v1/devices/cam-1/up",
            "edgefleet/v1/devices/cam-1/up/+",
            "edgefleet/v1/devices/cam-1/up/#",
            "edgefleet/v1/devices/cam-1/up/a\0b",
            "edgefleet/v1/devices/cam-1",
            "other/topic",
            "$SYS/broker",
            "",
        ] {
            assert_eq!(
                check_packet(&a, &publish(bad)),
                denied(Action::Publish, bad),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_device_subscribes_only_inside_its_own_down() {
        let a = dev("cam-1");
        for ok in [
            "edgefleet/v1/devices/cam-1/down/#",
            "edgefleet/v1/devices/cam-1/down/cmd",
            "edgefleet/v1/devices/cam-1/down/+",
            "edgefleet/v1/devices/cam-1/down",
        ] {
            assert_eq!(check_packet(&a, &subscribe(&[ok])), Verdict::Allow, "{ok}");
        }
        for bad in [
            "edgefleet/#",
            "#",
            "+/v1/devices/cam-1/down/#",
            "edgefleet/v1/devices/+/down/#",
            "edgefleet/v1/devices/#",
            "edgefleet/v1/devices/cam-2/down/#",
            "edgefleet/v1/devices/cam-1x/down/#",
            "edgefleet/v1/devices/cam-1/down#",
            "edgefleet/v1/devices/cam-1/downx",
            "edgefleet/v1/devices/cam-1/up/#",
            "edgefleet/v1/devices/cam-1/#",
            "edgefleet/v1/devices/cam-1/+/cmd",
            "$share/g/edgefleet/v1/devices/cam-2/down/#",
            "$SYS/#",
        ] {
            assert_eq!(
                check_packet(&a, &subscribe(&[bad])),
                denied(Action::Subscribe, bad),
                "{bad:?}"
            );
        }
        // One bad filter among good ones denies the packet.
        assert_eq!(
            check_packet(
                &a,
                &subscribe(&["edgefleet/v1/devices/cam-1/down/#", "edgefleet/#"])
            ),
            denied(Action::Subscribe, "edgefleet/#")
        );
    }

    #[test]
    fn the_server_may_do_anything_and_nobody_sends_broker_packets() {
        let s = Principal::Server;
        assert_eq!(
            check_packet(&s, &publish("edgefleet/v1/devices/cam-2/down/cmd")),
            Verdict::Allow
        );
        assert_eq!(
            check_packet(&s, &subscribe(&["edgefleet/v1/devices/+/up/#"])),
            Verdict::Allow
        );
        for p in [&s, &dev("cam-1")] {
            assert_eq!(
                check_packet(p, &Packet::Connect(Connect::new("x"))),
                denied(Action::Packet, "CONNECT")
            );
            assert_eq!(
                check_packet(
                    p,
                    &Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))
                ),
                denied(Action::Packet, "CONNACK")
            );
            assert_eq!(
                check_packet(p, &Packet::PingResp),
                denied(Action::Packet, "PINGRESP")
            );
            for ok in [
                Packet::PingReq,
                Packet::Disconnect,
                Packet::PubAck(PubAck::new(1)),
                Packet::Unsubscribe(Unsubscribe::new("edgefleet/#")),
            ] {
                assert_eq!(check_packet(p, &ok), Verdict::Allow, "{ok:?}");
            }
        }
    }

    #[test]
    fn last_wills_and_connack_codes() {
        let a = dev("cam-1");
        let will = |t: &str| LastWill::new(t, vec![0], QoS::AtLeastOnce, true);
        assert_eq!(check_will(&a, None), Verdict::Allow);
        assert_eq!(
            check_will(&a, Some(&will("edgefleet/v1/devices/cam-1/up/status"))),
            Verdict::Allow
        );
        assert_eq!(
            check_will(&a, Some(&will("edgefleet/v1/devices/cam-2/up/status"))),
            denied(Action::LastWill, "edgefleet/v1/devices/cam-2/up/status")
        );
        assert_eq!(
            check_will(
                &Principal::Server,
                Some(&will("edgefleet/v1/devices/cam-2/up/status"))
            ),
            Verdict::Allow
        );
        use ConnectReturnCode as C;
        for (r, code, bytes) in [
            (
                ConnectRefusal::Auth(Refusal::WrongSecret),
                C::BadUserNamePassword,
                [0x20, 2, 0, 4],
            ),
            (
                ConnectRefusal::Auth(Refusal::UnknownUser),
                C::BadUserNamePassword,
                [0x20, 2, 0, 4],
            ),
            (
                ConnectRefusal::Auth(Refusal::NoCredentials),
                C::BadUserNamePassword,
                [0x20, 2, 0, 4],
            ),
            (
                ConnectRefusal::Auth(Refusal::ClientIdMismatch),
                C::BadClientId,
                [0x20, 2, 0, 2],
            ),
            (
                ConnectRefusal::Auth(Refusal::StoreError),
                C::ServiceUnavailable,
                [0x20, 2, 0, 3],
            ),
            (
                ConnectRefusal::Unavailable,
                C::ServiceUnavailable,
                [0x20, 2, 0, 3],
            ),
            (
                ConnectRefusal::Protocol(5),
                C::RefusedProtocolVersion,
                [0x20, 2, 0, 1],
            ),
            (
                ConnectRefusal::Will(Denial {
                    action: Action::LastWill,
                    topic: "t".into(),
                }),
                C::NotAuthorized,
                [0x20, 2, 0, 5],
            ),
        ] {
            assert_eq!(r.code(), code, "{r:?}");
            assert_eq!(connack_bytes(r.code()), bytes, "{r:?}");
        }
        // What a client decodes from those bytes.
        assert_eq!(
            Packet::read(&mut connack_bytes(C::BadUserNamePassword)[..].into(), 16).unwrap(),
            Packet::ConnAck(ConnAck::new(C::BadUserNamePassword, false))
        );
    }
}
