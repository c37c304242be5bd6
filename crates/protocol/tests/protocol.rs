//! Round-trips, bounds and rejections of the MQTT protocol.

use edgefleet_protocol::chunk::{ChunkData, HEADER_LEN, MAX_CHUNK_DATA};
use edgefleet_protocol::messages::*;
use edgefleet_protocol::telemetry::{LatencySummary, TelemetryRecord};
use edgefleet_protocol::topics::{self, DownKind, Topic, UpKind};
use edgefleet_protocol::{DeviceId, Down, Error, Up, MAX_MESSAGE_BYTES, MQTT_MAX_PACKET_BYTES};
use proptest::prelude::*;

fn dev(s: &str) -> DeviceId {
    DeviceId::new(s).expect("valid id")
}

#[test]
fn device_ids_reject_wildcards_separators_and_long_ids() {
    for bad in [
        "",
        "a+b",
        "a#",
        "a/b",
        "$SYS",
        "with space",
        ".hidden",
        "-x",
        "é",
        &"x".repeat(65),
        "nul\0",
    ] {
        assert!(DeviceId::new(bad).is_err(), "{bad:?} accepted");
    }
    for good in ["cam-01", "gw_7.lab", &"x".repeat(64), "A1"] {
        DeviceId::new(good).expect(good);
    }
    // Also through serde: a message cannot smuggle a bad id.
    let json = br#"{"v":1,"type":"status","device_id":"a/+/b","online":true}"#;
    assert!(Up::decode(json, &dev("a")).is_err());
}

#[test]
fn topics_round_trip_and_reject_foreign_layouts() {
    let d = dev("cam-01");
    for k in UpKind::ALL {
        assert_eq!(
            topics::parse(&topics::up(&d, k)).expect("parse"),
            Topic::Up(d.clone(), k)
        );
    }
    for k in [DownKind::Command, DownKind::Chunk] {
        assert_eq!(
            topics::parse(&topics::down(&d, k)).expect("parse"),
            Topic::Down(d.clone(), k)
        );
    }
    for bad in [
        "edgefleet/v2/devices/cam-01/up/hello",
        "edgefleet/v1/devices/cam-01/up/unknown",
        "edgefleet/v1/devices/cam-01/sideways/hello",
        "edgefleet/v1/devices/cam+01/up/hello",
        "edgefleet/v1/devices/cam-01/up/hello/extra",
        "other/topic",
    ] {
        assert!(topics::parse(bad).is_err(), "{bad} accepted");
    }
    assert_eq!(topics::up_filter(&d), "edgefleet/v1/devices/cam-01/up/#");
}

#[test]
fn unknown_versions_are_rejected_with_a_clear_error() {
    let json = br#"{"v":2,"type":"status","device_id":"a","online":true}"#;
    assert_eq!(
        Up::decode(json, &dev("a")),
        Err(Error::UnsupportedVersion {
            found: 2,
            supported: 1
        })
    );
    let e = Down::decode(br#"{"v":99,"type":"rollback","reason":"x"}"#).expect_err("v99");
    assert!(e.to_string().contains("version 99"), "{e}");
    assert!(Down::decode(br#"{"type":"rollback","reason":"x"}"#).is_err());
}

#[test]
fn oversized_messages_are_rejected_by_the_decoder_not_the_transport() {
    // The MQTT packet limit is larger than the message limit, so an oversized
    // message reaches the decoder and is refused there; the session survives.
    const { assert!(MQTT_MAX_PACKET_BYTES > MAX_MESSAGE_BYTES + 1024) };
    let mut big = br#"{"v":1,"type":"rollback","reason":""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', MAX_MESSAGE_BYTES));
    big.extend_from_slice(b"\"}");
    assert!(matches!(Down::decode(&big), Err(Error::TooLarge { .. })));
    // And the encoder refuses to produce one.
    let msg = Down::Rollback {
        reason: "x".repeat(MAX_MESSAGE_BYTES),
    };
    assert!(matches!(msg.encode(), Err(Error::TooLarge { .. })));
}

#[test]
fn a_device_cannot_speak_for_another() {
    let msg = Up::Status(Status {
        device_id: dev("victim"),
        online: false,
    });
    let bytes = msg.encode().expect("encode");
    assert_eq!(
        Up::decode(&bytes, &dev("attacker")),
        Err(Error::Impersonation {
            topic_device: "attacker".into(),
            claimed: "victim".into()
        })
    );
    assert_eq!(Up::decode(&bytes, &dev("victim")).expect("ok"), msg);
}

#[test]
fn chunk_framing_is_checked() {
    let c = ChunkData {
        body_sha256: [7; 32],
        index: 3,
        count: 10,
        data: vec![1, 2, 3],
    };
    let bytes = c.encode().expect("encode");
    assert_eq!(bytes.len(), HEADER_LEN + 3);
    assert_eq!(ChunkData::decode(&bytes).expect("decode"), c);
    assert!(
        ChunkData::decode(&bytes[..bytes.len() - 1]).is_err(),
        "short data"
    );
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(ChunkData::decode(&b).is_err(), "magic");
    let mut b = bytes.clone();
    b[4] = 2;
    assert!(matches!(
        ChunkData::decode(&b),
        Err(Error::UnsupportedVersion { .. })
    ));
    let bad = ChunkData {
        index: 10,
        ..c.clone()
    }
    .encode()
    .expect("encode");
    assert!(ChunkData::decode(&bad).is_err(), "index >= count");
    assert!(ChunkData {
        data: vec![0; MAX_CHUNK_DATA + 1],
        ..c
    }
    .encode()
    .is_err());
}

fn arb_release() -> impl Strategy<Value = ReleaseRef> {
    (
        "[a-z]{1,10}",
        any::<u64>(),
        "[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,2}",
    )
        .prop_map(|(model, release, version)| ReleaseRef {
            model,
            release,
            version,
        })
}

fn arb_record() -> impl Strategy<Value = TelemetryRecord> {
    (
        any::<u64>(),
        any::<u64>(),
        prop::option::of(arb_release()),
        0u64..1_000_000,
        0u64..1000,
        0.0f64..1e4,
    )
        .prop_map(
            |(seq, ts_ms, release, requests, errors, p)| TelemetryRecord {
                seq,
                ts_ms,
                release,
                interval_s: 10.0,
                requests,
                errors,
                rejected: errors / 2,
                latency: LatencySummary {
                    count: requests,
                    p50_ms: p,
                    p95_ms: p * 2.0,
                    p99_ms: p * 3.0,
                    max_ms: p * 4.0,
                },
                queue_depth: 3,
                rss_bytes: 1 << 20,
                cpu_percent: 12.5,
                uptime_s: 100,
                outbox_dropped: 0,
                feedback: None,
                shadow: None,
            },
        )
}

fn arb_up() -> impl Strategy<Value = Up> {
    let id = Just(dev("dev-1"));
    prop_oneof![
        (id.clone(), any::<bool>())
            .prop_map(|(device_id, online)| Up::Status(Status { device_id, online })),
        (
            id.clone(),
            prop::option::of(arb_release()),
            "[a-z]{1,10}",
            prop::collection::vec("[a-z]{1,5}", 0..3)
        )
            .prop_map(|(device_id, active, update_state, tags)| Up::Hello(Hello {
                device_id,
                agent_version: "0.1.0".into(),
                target: "rpi4".into(),
                active: active.clone(),
                previous: active,
                update_state,
                tags,
                boot_id: "b".into()
            })),
        (id.clone(), prop::collection::vec(arb_record(), 0..20))
            .prop_map(|(device_id, records)| Up::Telemetry(TelemetryBatch { device_id, records })),
        (
            id.clone(),
            arb_release(),
            any::<u64>(),
            prop::option::of("[a-z_]{1,20}")
        )
            .prop_map(|(device_id, release, seq, reason)| {
                Up::Event(UpdateEvent {
                    device_id,
                    rollout_id: Some("r1".into()),
                    release,
                    kind: EventKind::RolledBack,
                    reason,
                    detail: None,
                    seq,
                })
            }),
        (id, "[0-9a-f]{64}", any::<u32>(), 1u32..16).prop_map(
            |(device_id, body_sha256, first, count)| Up::ChunkRequest(ChunkRequest {
                device_id,
                body_sha256,
                first,
                count
            })
        ),
    ]
}

proptest! {
    #[test]
    fn up_messages_round_trip(msg in arb_up()) {
        let bytes = msg.encode().expect("encode");
        prop_assert_eq!(Up::decode(&bytes, &dev("dev-1")).expect("decode"), msg);
    }

    #[test]
    fn down_messages_round_trip(rel in arb_release(), m in prop::collection::vec(any::<u8>(), 0..2000), s in prop::collection::vec(any::<u8>(), 64)) {
        let offer = UpdateOffer::new("r-1".into(), rel, &m, &s, TrialPolicy::default());
        let msg = Down::UpdateOffer(offer);
        let back = Down::decode(&msg.encode().expect("encode")).expect("decode");
        prop_assert_eq!(&back, &msg);
        if let Down::UpdateOffer(o) = back {
            prop_assert_eq!(o.manifest_and_signature().expect("b64"), (m, s));
        }
    }

    #[test]
    fn chunk_round_trips(sha in any::<[u8; 32]>(), index in 0u32..1000, extra in 1u32..1000, data in prop::collection::vec(any::<u8>(), 0..4096)) {
        let c = ChunkData { body_sha256: sha, index, count: index + extra, data };
        prop_assert_eq!(ChunkData::decode(&c.encode().expect("encode")).expect("decode"), c);
    }

    #[test]
    fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Up::decode(&bytes, &dev("x"));
        let _ = Down::decode(&bytes);
        let _ = ChunkData::decode(&bytes);
        let _ = topics::parse(&String::from_utf8_lossy(&bytes));
    }
}
