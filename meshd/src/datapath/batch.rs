//! Reusable packet buffers for batched TUN writes (I/O shell).
//!
//! A [`TunBatch`] collects decrypted, policy-approved packets, each written in place
//! behind [`TUN_OFFSET`] free bytes, and hands them to the TUN in one call, where our
//! [`Coalescer`] merges consecutive segments of a flow (software GRO) into one write.
//! Buffers are allocated once, at the 64 KiB a coalesced packet can reach; memory the
//! kernel never touched stays unbacked, so the footprint follows the traffic.

use crate::datapath::device::{Tun, TUN_OFFSET};
use crate::datapath::gro::{Coalescer, Resizable};

/// Room for one coalesced packet: 64 KiB behind the virtio-net header.
const COALESCED_LEN: usize = 65_535 + 2 * TUN_OFFSET;

/// A fixed-capacity byte buffer whose length the coalescer may change without ever
/// reallocating.
pub struct PacketBuf {
    mem: Box<[u8]>,
    len: usize,
}

impl PacketBuf {
    pub fn new(capacity: usize) -> PacketBuf {
        PacketBuf {
            mem: vec![0u8; capacity].into_boxed_slice(),
            len: 0,
        }
    }

    /// The whole buffer, to write a packet into.
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.mem
    }

    /// Keeps the first `len` bytes (clamped to the capacity).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.mem.len());
    }
}

impl AsRef<[u8]> for PacketBuf {
    fn as_ref(&self) -> &[u8] {
        &self.mem[..self.len]
    }
}

impl AsMut<[u8]> for PacketBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.mem[..self.len]
    }
}

impl Resizable for PacketBuf {
    fn capacity(&self) -> usize {
        self.mem.len()
    }

    // The coalescer checks the capacity before growing a buffer; the clamp only
    // keeps a violated assumption from panicking.
    fn set_len(&mut self, len: usize) {
        PacketBuf::set_len(self, len);
    }
}

/// Packets on their way to the TUN, written in one batch.
pub struct TunBatch {
    bufs: Vec<PacketBuf>,
    count: usize,
    gro: Coalescer,
}

impl TunBatch {
    /// A batch of up to `capacity` packets.
    pub fn new(capacity: usize) -> TunBatch {
        let capacity = capacity.max(1);
        TunBatch {
            bufs: (0..capacity)
                .map(|_| PacketBuf::new(COALESCED_LEN))
                .collect(),
            count: 0,
            gro: Coalescer::new(capacity),
        }
    }

    pub fn is_full(&self) -> bool {
        self.count == self.bufs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Where the next packet goes (after the header space). Call [`TunBatch::commit`]
    /// with its length to keep it. The batch must not be full.
    pub fn slot(&mut self) -> &mut [u8] {
        &mut self.bufs[self.count].space()[TUN_OFFSET..]
    }

    /// Keeps the `len` bytes written at [`TunBatch::slot`].
    pub fn commit(&mut self, len: usize) {
        self.bufs[self.count].set_len(TUN_OFFSET + len);
        self.count += 1;
    }

    /// Copies `packet` into the batch, writing the batch first if it is full.
    pub fn push(&mut self, tun: &Tun, packet: &[u8]) {
        if self.is_full() {
            self.flush(tun);
        }
        let slot = self.slot();
        if packet.len() > slot.len() {
            tracing::debug!(len = packet.len(), "packet too large for the TUN batch");
            return;
        }
        slot[..packet.len()].copy_from_slice(packet);
        self.commit(packet.len());
    }

    /// Writes the batch to the TUN (coalescing where it can) and empties it.
    pub fn flush(&mut self, tun: &Tun) {
        if self.count == 0 {
            return;
        }
        if let Err(e) = tun.send_batch(&mut self.gro, &mut self.bufs[..self.count]) {
            tracing::debug!("write to TUN failed: {e}");
        }
        for b in &mut self.bufs[..self.count] {
            b.set_len(0);
        }
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_buf_grows_within_capacity_only() {
        let mut b = PacketBuf::new(8);
        b.space()[..3].copy_from_slice(b"abc");
        b.set_len(3);
        assert_eq!(b.as_ref(), b"abc");
        Resizable::set_len(&mut b, 20);
        assert_eq!(b.as_ref().len(), 8);
        b.as_mut()[3..].copy_from_slice(b"defgh");
        assert_eq!(b.as_ref(), b"abcdefgh");
        Resizable::set_len(&mut b, 2);
        assert_eq!(b.as_ref(), b"ab");
        assert_eq!(b.capacity(), 8);
    }

    #[test]
    fn a_full_batch_of_segments_merges_into_one_buffer() {
        use crate::datapath::gro::tests::{bulk, resegment};
        let segments = bulk(false, &[1400; 32]);
        let mut t = TunBatch::new(32);
        for s in &segments {
            t.slot()[..s.len()].copy_from_slice(s);
            t.commit(s.len());
        }
        assert!(t.is_full());
        let written = t
            .gro
            .coalesce(&mut t.bufs[..t.count], TUN_OFFSET, false)
            .to_vec();
        assert_eq!(written, vec![0]);
        assert_eq!(resegment(t.bufs[0].as_ref()), segments);
    }

    #[test]
    fn batch_slots_fill_in_order() {
        let mut t = TunBatch::new(2);
        assert!(t.is_empty());
        t.slot()[..2].copy_from_slice(&[0x45, 0]);
        t.commit(2);
        assert!(!t.is_full());
        t.slot()[0] = 0x60;
        t.commit(1);
        assert!(t.is_full());
        assert_eq!(t.bufs[0].as_ref().len(), TUN_OFFSET + 2);
        assert_eq!(t.bufs[1].as_ref()[TUN_OFFSET], 0x60);
    }
}
