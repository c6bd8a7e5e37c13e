"""Engine -> trainer transport: the pair control channel and the ring of slots."""

from colocate.transport.channel import (PairChannel, PeerDied, PeerError, PeerId,
                                        PeerReportedError, PeerTimeout, pair_address)
from colocate.transport.layout import Need, TensorSpec
from colocate.transport.ring import (Delivery, LayoutMismatch, RingConsumer, RingProducer,
                                     SlotOverflow, SlotWriter, layout_bytes)

__all__ = ["PairChannel", "PeerDied", "PeerError", "PeerId", "PeerReportedError", "PeerTimeout",
           "pair_address", "Need", "TensorSpec", "Delivery", "LayoutMismatch", "RingConsumer",
           "RingProducer", "SlotOverflow", "SlotWriter", "layout_bytes", "open_pair_channel"]


def open_pair_channel(*, engine: bool, me: str, peer_rank: int, peer_pid: int, job_token: str,
                      pair_index: int, timeout_s: float) -> PairChannel:
    """The engine listens, the trainer connects; both authenticate the peer's pid."""
    peer = PeerId("trainer" if engine else "engine", peer_rank, peer_pid)
    address = pair_address(job_token, pair_index)
    if engine:
        return PairChannel.listen(address, me, peer, timeout_s)
    return PairChannel.connect(address, me, peer, timeout_s)
