//! Privileged: the embedded TC program passes the verifier, attaches with
//! tcx to a veth inside a test namespace, and counts real traffic by class.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use anyhow::Result;
use ferry_common::counters::TrafficClass;
use ferry_tests::netns::VethLink;
use ferry_tests::Netns;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

#[test]
fn verifier_accepts_every_program() {
    ferry_tests::needs_ebpf!("verifier_accepts_every_program");
    let ns = Netns::new("verify").unwrap();
    let names = ns
        .run(|| {
            Ok(ferry_proxy::ebpf::verify_all(std::path::Path::new(
                "/sys/fs/bpf",
            ))?)
        })
        .unwrap();
    for p in ferry_proxy::ebpf::lb::SOCK_PROGRAMS {
        assert!(names.iter().any(|n| n == p), "{p} missing from {names:?}");
    }
    assert!(
        names
            .iter()
            .any(|n| n == ferry_common::counters::TC_INGRESS_PROGRAM),
        "programs: {names:?}"
    );
}

#[test]
fn tc_ingress_counts_tcp_udp_and_icmp() {
    ferry_tests::needs_ebpf!("tc_ingress_counts_tcp_udp_and_icmp");
    let server = Netns::new("tcsrv").unwrap();
    let client = Netns::new("tccli").unwrap();
    server
        .veth_to(
            &client,
            VethLink {
                local: "fv0",
                local_cidr: "198.18.0.1/24",
                remote: "fv1",
                remote_cidr: "198.18.0.2/24",
            },
        )
        .unwrap();

    // Load and attach inside the server namespace; the returned handle keeps
    // the tcx link alive until it is dropped.
    let pins = ferry_tests::bpf::PinDir::new("tc").unwrap();
    let pin_path = pins.path().to_path_buf();
    let ebpf = server
        .run(move || {
            let mut ebpf = ferry_proxy::ebpf::open(
                &pin_path,
                &ferry_proxy::datapath::MapCapacities::default(),
            )?;
            ferry_proxy::ebpf::load_program(&mut ebpf, ferry_common::counters::TC_INGRESS_PROGRAM)?;
            let prog: &mut aya::programs::SchedClassifier = ebpf
                .program_mut(ferry_common::counters::TC_INGRESS_PROGRAM)
                .expect("program exists")
                .try_into()?;
            prog.attach("fv0", aya::programs::TcAttachType::Ingress)?;
            Ok(ebpf)
        })
        .unwrap();

    // TCP: one connection with a short exchange.
    let listener = server
        .run(|| Ok(TcpListener::bind("198.18.0.1:18080")?))
        .unwrap();
    let accept = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
        Ok(())
    });
    client
        .run(|| {
            let mut s =
                TcpStream::connect_timeout(&"198.18.0.1:18080".parse()?, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"hello")?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf)?;
            assert_eq!(&buf, b"hello");
            Ok(())
        })
        .unwrap();
    accept.join().expect("accept thread").unwrap();

    // UDP: five datagrams of 100 bytes.
    let receiver = server
        .run(|| Ok(UdpSocket::bind("198.18.0.1:18081")?))
        .unwrap();
    client
        .run(|| {
            let s = UdpSocket::bind("198.18.0.2:0")?;
            for _ in 0..5 {
                s.send_to(&[7u8; 100], "198.18.0.1:18081")?;
            }
            Ok(())
        })
        .unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 200];
    for _ in 0..5 {
        assert_eq!(receiver.recv(&mut buf).unwrap(), 100);
    }

    // ICMP: three echo requests.
    client
        .run(|| ferry_tests::icmp::send_echo_requests("198.18.0.1".parse()?, 3))
        .unwrap();
    // Give the last echo request time to cross the veth.
    std::thread::sleep(Duration::from_millis(50));

    let counts = ferry_proxy::ebpf::counters::read(&ebpf).unwrap();
    let get = |class| {
        counts
            .iter()
            .find(|(c, _)| *c == class)
            .map(|(_, v)| *v)
            .unwrap()
    };
    let udp = get(TrafficClass::Udp);
    assert_eq!(udp.packets, 5, "udp: {udp:?}");
    // 14 Ethernet + 20 IPv4 + 8 UDP + 100 payload.
    assert_eq!(udp.bytes, 5 * 142, "udp: {udp:?}");
    let tcp = get(TrafficClass::Tcp);
    assert!(tcp.packets >= 4, "tcp: {tcp:?}");
    let icmp = get(TrafficClass::Icmp);
    assert_eq!(icmp.packets, 3, "icmp: {icmp:?}");
    assert!(get(TrafficClass::Arp).packets >= 1, "arp: {counts:?}");
    drop(ebpf);
}
