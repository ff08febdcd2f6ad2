"""Batched UDP I/O with Linux ``recvmmsg``/``sendmmsg`` through ctypes (the fast path's I/O).

Why: with plain ``recvfrom``/``sendto`` the pre-encoded fast path spends ~0.95 us of user
time per query, most of it CPython turning every source address into a ``(host, port)``
tuple and back and dropping the GIL twice per query. Here one call receives up to
``SLOTS`` datagrams into fixed buffers and one call sends every reply; a reply goes back to
the raw source address bytes the kernel gave us, never decoded. Measured on the 2-vCPU
test machine: ~0.70 us user per query instead of ~0.95 (+15% queries per CPU-second); the
kernel's own per-datagram work is unchanged.

Layout (one ``Batch`` per socket, all memory allocated once)::

    rbuf  SLOTS x SLOT bytes     received datagrams     riov[i] -> rbuf slot i
    names SLOTS x 128 bytes      their source addresses rmsg[i].msg_name -> names slot i
    sbuf  SLOTS x SLOT bytes     replies                siov[j] -> sbuf slot j
    smsg[j].msg_name points at the names slot of the query it answers

Fields are read and written through memoryviews cast over the ctypes arrays (offsets
taken from the ctypes Structures, not hard-coded), which costs ~40 ns per access where a
ctypes attribute costs ~150 ns. ``available()`` is False off Linux/glibc or when the
structures do not have the expected shape; the server then uses plain recvfrom/sendto.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket
import struct
import sys
from typing import Any, Callable

__all__ = ["Batch", "available", "decode_sockaddr", "SLOTS", "SLOT"]

SLOTS = 64
SLOT = 4096          # a query longer than this is cut (and then fails to parse: FORMERR)
_NAME = 128          # sizeof(struct sockaddr_storage)
_MSG_DONTWAIT = 0x40
_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def _load() -> tuple[Any, Any] | None:
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        recv, send = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    recv.restype = ctypes.c_int
    send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    send.restype = ctypes.c_int
    if ctypes.sizeof(_MMsgHdr) % 8 or _MsgHdr.msg_namelen.offset % 4 or _MMsgHdr.msg_len.offset % 4:
        return None
    return recv, send


_CALLS = _load()


def available() -> bool:
    return _CALLS is not None


def decode_sockaddr(raw: bytes) -> tuple[Any, ...] | None:
    """Raw ``sockaddr_in``/``sockaddr_in6`` bytes -> the tuple socket.sendto takes."""
    if len(raw) < 16:
        return None
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 28:
        flow, scope = struct.unpack_from("!I", raw, 4)[0], struct.unpack_from("=I", raw, 24)[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flow, scope
    return None


class Batch:
    """The buffers of one socket and ``drain``: receive a batch, answer it, send the replies."""

    def __init__(self) -> None:
        assert _CALLS is not None, "recvmmsg/sendmmsg are not available"
        self._recv, self._send = _CALLS
        self.rbuf = (ctypes.c_char * (SLOTS * SLOT))()
        self.sbuf = (ctypes.c_char * (SLOTS * SLOT))()
        self.names = (ctypes.c_char * (SLOTS * _NAME))()
        self.riov, self.siov = (_IOVec * SLOTS)(), (_IOVec * SLOTS)()
        self.rmsg, self.smsg = (_MMsgHdr * SLOTS)(), (_MMsgHdr * SLOTS)()
        rbase, sbase = ctypes.addressof(self.rbuf), ctypes.addressof(self.sbuf)
        self.nbase = ctypes.addressof(self.names)
        for i in range(SLOTS):
            self.riov[i].iov_base, self.riov[i].iov_len = rbase + i * SLOT, SLOT
            self.siov[i].iov_base = sbase + i * SLOT
            hdr = self.rmsg[i].msg_hdr
            hdr.msg_name, hdr.msg_namelen = self.nbase + i * _NAME, _NAME
            hdr.msg_iov, hdr.msg_iovlen = ctypes.addressof(self.riov[i]), 1
            out = self.smsg[i].msg_hdr
            out.msg_iov, out.msg_iovlen = ctypes.addressof(self.siov[i]), 1
        self.pristine = bytes(memoryview(self.rmsg).cast("B"))  # restores msg_namelen after a call
        stride = ctypes.sizeof(_MMsgHdr)
        self.si, self.sq = stride // 4, stride // 8
        self.len_i = _MMsgHdr.msg_len.offset // 4
        self.namelen_i = _MsgHdr.msg_namelen.offset // 4
        self.name_q = _MsgHdr.msg_name.offset // 8
        self.rmsg_i = memoryview(self.rmsg).cast("B").cast("I")
        self.rmsg_b = memoryview(self.rmsg).cast("B")
        self.smsg_i = memoryview(self.smsg).cast("B").cast("I")
        self.smsg_q = memoryview(self.smsg).cast("B").cast("Q")
        self.siov_q = memoryview(self.siov).cast("B").cast("Q")
        self.rb = memoryview(self.rbuf).cast("B")
        self.sb = memoryview(self.sbuf).cast("B")
        self.nb = memoryview(self.names).cast("B")
        self.slot_of = [0] * SLOTS  # reply j answers received slot slot_of[j]

    def source(self, i: int) -> tuple[Any, ...] | None:
        n = self.rmsg_i[i * self.si + self.namelen_i]
        return decode_sockaddr(bytes(self.nb[i * _NAME:i * _NAME + min(n, _NAME)]))

    def drain(self, fd: int, get: Callable[[bytes], Any],
              miss: Callable[[bytes, int], bytes | None],
              unsent: Callable[[bytes, Any], None]) -> int:
        """Receive up to SLOTS datagrams and send every reply. ``get`` looks a query (minus
        its ID) up in the pre-encoded answers; ``miss(query, slot)`` answers the rest
        (bytes to send, or None; ``source(slot)`` gives the sender when needed); ``unsent(reply, source)`` takes replies the kernel did
        not accept (socket buffer full). Returns how many datagrams came in (0: none)."""
        n = self._recv(fd, self.rmsg, SLOTS, _MSG_DONTWAIT, None)
        if n <= 0:
            if n < 0 and ctypes.get_errno() not in _RETRY:
                raise OSError(ctypes.get_errno(), "recvmmsg failed")
            return 0
        try:
            self._answer(fd, n, get, miss, unsent)
        finally:  # the kernel shrank msg_namelen of the used slots: restore them for the next call
            self.rmsg_b[:n * self.si * 4] = self.pristine[:n * self.si * 4]
        return n

    def _answer(self, fd: int, n: int, get: Callable[[bytes], Any],
                miss: Callable[[bytes, int], bytes | None], unsent: Callable[[bytes, Any], None]) -> None:
        rb, sb, rmsg_i, siov_q, smsg_q, smsg_i = self.rb, self.sb, self.rmsg_i, self.siov_q, self.smsg_q, self.smsg_i
        si, sq, len_i, namelen_i, name_q, nbase = self.si, self.sq, self.len_i, self.namelen_i, self.name_q, self.nbase
        slot_of = self.slot_of
        j = 0
        for i in range(n):
            off = i * SLOT
            ln = rmsg_i[i * si + len_i]
            hit = get(rb[off + 2:off + ln].tobytes())
            so = j * SLOT
            if hit is not None:
                body = next(hit)
                m = len(body) + 2
                sb[so:so + 2] = rb[off:off + 2]
                sb[so + 2:so + m] = body
            else:
                out = miss(rb[off:off + ln].tobytes(), i)
                if out is None:
                    continue
                m = len(out)
                if m > SLOT:
                    unsent(out, self.source(i))
                    continue
                sb[so:so + m] = out
            siov_q[j * 2 + 1] = m
            smsg_q[j * sq + name_q] = nbase + i * _NAME
            smsg_i[j * si + namelen_i] = rmsg_i[i * si + namelen_i]
            slot_of[j] = i
            j += 1
        if j:
            sent = self._send(fd, self.smsg, j, 0)
            for k in range(max(sent, 0), j):  # not taken by the kernel (buffer full): queue them
                src = self.source(slot_of[k])
                if src is not None:
                    unsent(bytes(sb[k * SLOT:k * SLOT + siov_q[k * 2 + 1]]), src)
