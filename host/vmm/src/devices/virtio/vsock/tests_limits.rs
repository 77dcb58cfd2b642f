//! The per-VM limit on guest data buffered for slow host readers
//! (`MAX_BUFFERED_PER_VM`), with the device-level rig of `tests.rs`.

use super::connection::State;
use super::packet::*;
use super::tests::{host_connect, read_line, Rig};
use crate::devices::virtio::test_util;

/// Two host connections whose readers read nothing: the guest fills the
/// first until the VM's limit (small here) is passed. That resets the
/// connection holding the most (RST to the guest, its buffer dropped), the
/// total never stays over the limit, and the other connection still works.
#[test]
fn buffered_guest_data_is_capped_per_vm() {
    const CAP: usize = 64 * 1024;
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    rig.dev.muxer_mut().set_max_buffered(CAP);
    let (mut a, req_a) = host_connect(&mut rig, 1024);
    rig.send_pkt(OP_RESPONSE, 1024, req_a.src_port, &[]);
    assert_eq!(read_line(&mut a), format!("OK {}", req_a.src_port));
    let (mut b, req_b) = host_connect(&mut rig, 1025);
    rig.send_pkt(OP_RESPONSE, 1025, req_b.src_port, &[]);
    assert_eq!(read_line(&mut b), format!("OK {}", req_b.src_port));

    // 16 KiB at a time: the host socket takes what its buffer holds, the
    // muxer the rest, until the next packet would pass CAP. Credit (256
    // KiB beyond what reached the socket) is never the limit first.
    let chunk = vec![0x5au8; 16 * 1024];
    let mut sent = 0;
    let reset = loop {
        rig.post_rx();
        rig.send_pkt(OP_RW, 1024, req_a.src_port, &chunk);
        sent += chunk.len();
        assert!(rig.dev.muxer().buffered() <= CAP, "over the cap");
        let rsts: Vec<_> = rig
            .take_rx()
            .into_iter()
            .filter(|(h, _)| h.op == OP_RST && h.dst_port == 1024)
            .collect();
        if !rsts.is_empty() {
            break rsts[0].0;
        }
        assert!(sent < 4 << 20, "no reset after {sent} bytes");
    };
    assert_eq!(reset.src_port, req_a.src_port);
    assert!(
        rig.dev.muxer().stats().contains("buffer_cap_resets=1"),
        "{}",
        rig.dev.muxer().stats()
    );

    // The other connection is untouched: small data still flows (the
    // buffers freed by the reset make room).
    rig.send_pkt(OP_RW, 1025, req_b.src_port, b"still here");
    let mut got = [0u8; 10];
    std::io::Read::read_exact(&mut b, &mut got).unwrap();
    assert_eq!(&got, b"still here");
    assert!(rig.dev.muxer().buffered() <= CAP);
}

/// A stalled connection holds the VM's buffered data up to just below the
/// limit; a second connection whose host reader keeps up sends far more
/// than the room left. Its bytes go straight to its socket and are never
/// buffered, so it must not be reset (the limit counts what stays
/// buffered, not what passes through), and the stalled one keeps its data.
#[test]
fn healthy_connection_works_while_a_stalled_one_is_near_the_cap() {
    const CAP: usize = 64 * 1024;
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    rig.dev.muxer_mut().set_max_buffered(CAP);
    let (mut stalled, req_a) = host_connect(&mut rig, 2048);
    rig.send_pkt(OP_RESPONSE, 2048, req_a.src_port, &[]);
    assert_eq!(read_line(&mut stalled), format!("OK {}", req_a.src_port));
    let (mut healthy, req_b) = host_connect(&mut rig, 2049);
    rig.send_pkt(OP_RESPONSE, 2049, req_b.src_port, &[]);
    assert_eq!(read_line(&mut healthy), format!("OK {}", req_b.src_port));

    // Fill the stalled connection until one more chunk would pass CAP.
    let chunk = vec![0xa5u8; 16 * 1024];
    let mut sent = 0;
    while rig.dev.muxer().buffered() + chunk.len() <= CAP {
        rig.post_rx();
        rig.send_pkt(OP_RW, 2048, req_a.src_port, &chunk);
        sent += chunk.len();
        assert!(sent < 4 << 20, "the stalled socket never filled");
    }
    let held = rig.dev.muxer().buffered();
    assert!(held > CAP - chunk.len(), "{held} buffered");

    // The healthy connection moves 16 chunks (4x the limit) through.
    for i in 0..16u8 {
        rig.post_rx();
        let data = vec![i; chunk.len()];
        rig.send_pkt(OP_RW, 2049, req_b.src_port, &data);
        let mut got = vec![0u8; data.len()];
        std::io::Read::read_exact(&mut healthy, &mut got).unwrap();
        assert!(got == data, "chunk {i} arrived changed");
        let rsts: Vec<_> = rig
            .take_rx()
            .into_iter()
            .filter(|(h, _)| h.op == OP_RST)
            .collect();
        assert!(rsts.is_empty(), "chunk {i}: reset {:?}", rsts[0].0);
        assert!(rig.dev.muxer().buffered() <= CAP);
    }
    let m = rig.dev.muxer();
    assert_eq!(
        m.state_of(req_b.src_port, 2049),
        Some(State::Established),
        "{}",
        m.stats()
    );
    assert_eq!(m.state_of(req_a.src_port, 2048), Some(State::Established));
    assert_eq!(m.buffered(), held, "the stalled connection keeps its data");
    assert!(m.stats().contains("buffer_cap_resets=0"), "{}", m.stats());
}
