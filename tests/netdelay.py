"""Packet delay without sch_netem: an NFQUEUE listener that holds packets, then accepts them.

Some kernels (this project's VMs among them) are built without any qdisc, so
``tc netem`` cannot add latency. Netfilter's queue can: an iptables rule sends
the packets to delay to a numbered queue, the kernel keeps each queued packet
and tells this listener its id (metadata only, no payload is copied), and the
listener accepts it once ``delay`` seconds have passed. Packets leave in the
order they came, so one batch verdict releases every packet that is due.

This speaks nfnetlink_queue directly over a netlink socket (the message
layouts are those of <linux/netfilter/nfnetlink_queue.h>), so it needs no
library; it needs root and CONFIG_NETFILTER_NETLINK_QUEUE.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import struct
import threading
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 4
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NF_ACCEPT = 1


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(msg: int, queue: int, attrs: bytes, seq: int, flags: int = NLM_F_REQUEST) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0) + body


class Delayer:
    """Holds every packet of netfilter queue ``queue`` for ``delay`` seconds."""

    def __init__(self, queue: int, delay: float):
        self.queue = queue
        self.delay = delay
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))
        self._seq = 0
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)))
        self._config(
            _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
            + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 8192))
        )
        self._config(
            _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO))
            + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO))
        )
        self._held: collections.deque = collections.deque()
        self._stop = threading.Event()
        self.packets = 0
        self._thread = threading.Thread(target=self._run, name=f"nfqueue-{queue}", daemon=True)
        self._thread.start()

    def _config(self, attrs: bytes) -> None:
        self._seq += 1
        self.sock.send(_message(NFQNL_MSG_CONFIG, self.queue, attrs, self._seq, NLM_F_REQUEST | NLM_F_ACK))
        reply = self.sock.recv(65536)
        length, kind = struct.unpack_from("=IH", reply)
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", reply, 16)
            if err:
                raise OSError(-err, f"nfnetlink_queue config: {os.strerror(-err)}")

    def _release(self, packet_id: int) -> None:
        self._seq += 1
        self.sock.send(
            _message(
                NFQNL_MSG_VERDICT_BATCH,
                self.queue,
                _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id)),
                self._seq,
            )
        )

    def _receive(self) -> None:
        now = time.monotonic()
        data = self.sock.recv(1 << 20)
        offset = 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if length < 16:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                pos, end = offset + 20, offset + length
                while pos + 4 <= end:
                    alen, atype = struct.unpack_from("=HH", data, pos)
                    if atype & 0x7FFF == NFQA_PACKET_HDR:
                        (pid,) = struct.unpack_from("!I", data, pos + 4)
                        self._held.append((now + self.delay, pid))
                        self.packets += 1
                        break
                    pos += (alen + 3) & ~3
            offset += (length + 3) & ~3

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = 0.05
            if self._held:
                wait = max(0.0, self._held[0][0] - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], wait)
            if ready:
                try:
                    self._receive()
                except OSError:  # ENOBUFS under a burst: the kernel dropped some, go on
                    pass
            now = time.monotonic()
            due = None
            while self._held and self._held[0][0] <= now:
                due = self._held.popleft()[1]
            if due is not None:
                self._release(due)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        if self._held:  # let what is still held through rather than drop it
            self._release(self._held[-1][1])
            self._held.clear()
        self.sock.close()
