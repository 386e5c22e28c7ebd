//! One netlink request and its replies (an I/O edge), for any protocol
//! whose messages the rust-netlink crates encode (rtnetlink's
//! netlink-packet-route, sock_diag's netlink-packet-sock-diag): send, then
//! read until the kernel's ACK, NACK or end of dump. Synchronous, on a
//! socket of the calling thread's network namespace.

use std::fmt::Debug;
use std::io;

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_ACK,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_sys::{Socket, SocketAddr};

/// Whether a request is a dump (many replies, then DONE) or a change
/// (acknowledged once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dump,
    /// A change; `flags` adds NLM_F_CREATE, NLM_F_EXCL and the like.
    Change {
        flags: u16,
    },
}

/// A socket of `protocol` (netlink_sys::protocols::NETLINK_*).
pub fn socket(protocol: isize) -> io::Result<Socket> {
    let mut s = Socket::new(protocol)?;
    s.bind_auto()?;
    s.connect(&SocketAddr::new(0, 0))?;
    Ok(s)
}

/// Sends `msg` and returns the replies: the dumped messages of a dump, none
/// for an acknowledged change. A NACK is the kernel's errno as an error.
pub fn request<M>(sock: &Socket, msg: M, kind: Kind, seq: u32) -> io::Result<Vec<M>>
where
    M: NetlinkSerializable + NetlinkDeserializable + Debug + Into<NetlinkPayload<M>>,
{
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST
        | match kind {
            Kind::Dump => NLM_F_DUMP,
            Kind::Change { flags } => NLM_F_ACK | flags,
        };
    req.header.sequence_number = seq;
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    sock.send(&buf, 0)?;
    let mut replies = Vec::new();
    loop {
        let (data, _) = sock.recv_from_full()?;
        let mut offset = 0;
        while offset < data.len() {
            let reply = NetlinkMessage::<M>::deserialize(&data[offset..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let len = reply.header.length as usize;
            if len == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a netlink reply of length 0",
                ));
            }
            offset += len.next_multiple_of(4);
            if reply.header.sequence_number != seq {
                continue;
            }
            match reply.payload {
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => return Ok(replies),
                NetlinkPayload::InnerMessage(m) => replies.push(m),
                _ => {}
            }
        }
    }
}
