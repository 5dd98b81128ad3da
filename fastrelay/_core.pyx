# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The hub in Cython: the same API as ``fastrelay._core_py``, with the hot path in C.

What is compiled, and why:
- intake reads the datagram socket's raw descriptor with ``recvmmsg`` (one
  system call per batch on Linux; ``recvmsg`` elsewhere) into fixed slots, and
  orjson parses each slot through a memoryview, with no per-event bytes object;
- each accepted event is framed straight from its slot into one batch buffer,
  splicing ``previous_state`` into the emitter's bytes instead of re-serialising;
- fan-out writes that buffer to each client's socket with one ``send()`` when
  nothing is waiting for that client, checked at that moment in its transport
  and its queue (exactly what picows's own fast path does); a client with a
  backlog, or a partial write, gets a Python bytes object, made once per batch.
The registry (``fastrelay.registry``) and what is owed to each client
(``fastrelay.clients``) are the same Python code as the pure hub's, so the two
behave identically.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

import time

import orjson

from ._hubdefs import BATCH_BUCKETS, REJECT_REASONS, classify_undecodable, hub_stats
from .clients import Client, Clients
from .listener import Listener
from .registry import Registry, nesting_depth

__all__ = ["Client", "Hub", "frame_text"]

cdef extern from "Python.h":
    object PyMemoryView_FromMemory(char* mem, Py_ssize_t size, int flags)
    int PyBUF_READ

cdef extern from *:
    """
    #include <errno.h>
    #include <sys/types.h>
    #include <sys/socket.h>
    #include <sys/uio.h>

    #define FR_MAX_VLEN 64

    /* Receive up to vlen datagrams into consecutive slots of slot_size bytes.
       sizes[i] gets each datagram's length, or -1 when it did not fit.
       Returns the count, 0 when the socket is empty, -1 on another error. */
    static int fr_recv_batch(int fd, char *slots, size_t slot_size, unsigned int vlen,
                             Py_ssize_t *sizes) {
        if (vlen > FR_MAX_VLEN) vlen = FR_MAX_VLEN;
    #if defined(__linux__)
        struct mmsghdr msgs[FR_MAX_VLEN];
        struct iovec iovs[FR_MAX_VLEN];
        unsigned int i;
        for (i = 0; i < vlen; i++) {
            iovs[i].iov_base = slots + (size_t)i * slot_size;
            iovs[i].iov_len = slot_size;
            memset(&msgs[i].msg_hdr, 0, sizeof(struct msghdr));
            msgs[i].msg_hdr.msg_iov = &iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n;
        do {
            n = recvmmsg(fd, msgs, vlen, MSG_DONTWAIT, NULL);
        } while (n < 0 && errno == EINTR);
        if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
        for (i = 0; i < (unsigned int)n; i++) {
            sizes[i] = (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) ? -1 : (Py_ssize_t)msgs[i].msg_len;
        }
        return n;
    #else
        unsigned int i;
        for (i = 0; i < vlen; i++) {
            struct iovec iov;
            struct msghdr msg;
            memset(&msg, 0, sizeof(msg));
            iov.iov_base = slots + (size_t)i * slot_size;
            iov.iov_len = slot_size;
            msg.msg_iov = &iov;
            msg.msg_iovlen = 1;
            ssize_t got;
            do {
                got = recvmsg(fd, &msg, MSG_DONTWAIT);
            } while (got < 0 && errno == EINTR);
            if (got < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK) return (int)i;
                return i ? (int)i : -1;
            }
            sizes[i] = (msg.msg_flags & MSG_TRUNC) ? -1 : (Py_ssize_t)got;
        }
        return (int)vlen;
    #endif
    }

    #ifndef MSG_NOSIGNAL
    #define MSG_NOSIGNAL 0
    #endif

    /* One non-blocking send; returns bytes written, 0 when it would block,
       -1 on an error the transport should see for itself. */
    static Py_ssize_t fr_send(int fd, const char *data, Py_ssize_t size) {
        ssize_t sent;
        do {
            sent = send(fd, data, (size_t)size, MSG_DONTWAIT | MSG_NOSIGNAL);
        } while (sent < 0 && errno == EINTR);
        if (sent < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
        return (Py_ssize_t)sent;
    }
    """
    int FR_MAX_VLEN
    int fr_recv_batch(int fd, char* slots, size_t slot_size, unsigned int vlen,
                      Py_ssize_t* sizes) nogil
    Py_ssize_t fr_send(int fd, const char* data, Py_ssize_t size) nogil

# Datagrams taken per system call. The kernel queue holds max_dgram_qlen
# (10 here, 512 on systemd hosts); 32 slots cover the first and keep the slot
# memory (32 x max_datagram, touched only as large datagrams land) modest.
cdef enum:
    VLEN = 32

cdef object _loads = orjson.loads
cdef object _dumps = orjson.dumps
cdef object _JSONDecodeError = orjson.JSONDecodeError
cdef object _monotonic = time.monotonic
cdef object _time = time.time
cdef bytes _PREV_KEY = b',"previous_state":'
cdef Py_ssize_t _PREV_KEY_LEN = len(_PREV_KEY)


cdef inline Py_ssize_t _header(unsigned char* out, Py_ssize_t n) noexcept:
    """Write an unmasked final text frame header for an n-byte payload; return its size."""
    out[0] = 0x81
    if n < 126:
        out[1] = <unsigned char>n
        return 2
    if n < 65536:
        out[1] = 126
        out[2] = <unsigned char>(n >> 8)
        out[3] = <unsigned char>(n & 0xFF)
        return 4
    out[1] = 127
    cdef int i
    for i in range(8):
        out[2 + i] = <unsigned char>((n >> (8 * (7 - i))) & 0xFF)
    return 10


def frame_text(bytes payload):
    """One unmasked, final WebSocket text frame carrying ``payload`` (RFC 6455 §5.2)."""
    cdef unsigned char head[10]
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t h = _header(head, n)
    return PyBytes_FromStringAndSize(<char*>head, h) + payload


cdef inline Py_ssize_t _count_brackets(const char* data, Py_ssize_t n) noexcept:
    """Opening brackets in ``data``: an upper bound on how deeply it nests."""
    cdef Py_ssize_t i, count = 0
    for i in range(n):
        if data[i] == 91 or data[i] == 123:  # '[' or '{'
            count += 1
    return count


cdef class Hub:
    """Datagram intake, machine registry and fan-out; one per RelayServer."""

    cdef readonly str backend
    cdef public Py_ssize_t max_datagram
    cdef public Py_ssize_t max_depth
    cdef public Py_ssize_t batch_cap
    cdef readonly object registry
    cdef readonly object peers
    cdef readonly set clients
    cdef readonly set stalled
    cdef public unsigned long long accepted
    cdef public unsigned long long relayed
    cdef public unsigned long long frames_sent
    cdef public unsigned long long bytes_sent
    cdef public unsigned long long batches
    cdef readonly dict rejects
    cdef readonly list batch_histogram
    cdef object _sock
    cdef object _loop
    cdef object _update
    cdef int _fd
    cdef char* _slots
    cdef Py_ssize_t _sizes[VLEN]
    cdef char* _out
    cdef Py_ssize_t _out_cap
    cdef Py_ssize_t _used
    cdef Py_ssize_t _framed
    cdef public double write_delay
    cdef double _last_write
    cdef object _flush_handle

    def __cinit__(self):
        self._slots = NULL
        self._out = NULL
        self._fd = -1

    def __init__(self, *, max_datagram=64 * 1024, max_client_buffer=4 * 1024 * 1024,
                 max_machines=100_000, max_depth=64, max_snapshots=4, batch_cap=1024,
                 write_delay=0.0):
        self.backend = "cython"
        self.write_delay = write_delay
        self._last_write = 0.0
        self._flush_handle = None
        self._used = self._framed = 0
        self.max_datagram = max_datagram
        self.max_depth = max_depth
        self.batch_cap = batch_cap
        # An OrderedDict: kept as a plain object so that Cython never applies
        # dict-only C calls to it, which would skip its recency links.
        self.registry = Registry(max_machines)
        self._update = self.registry.update
        self.peers = Clients(max_client_buffer=max_client_buffer, flush=self.flush,
                             snapshot_payload=self.registry.snapshot_payload,
                             max_snapshots=max_snapshots)
        self.clients = self.peers.members
        self.stalled = self.peers.stalled
        self.accepted = self.relayed = self.frames_sent = self.bytes_sent = 0
        self.batches = 0
        self.rejects = dict.fromkeys(REJECT_REASONS, 0)
        self.batch_histogram = [0] * (len(BATCH_BUCKETS) + 1)
        self._slots = <char*>malloc(<size_t>VLEN * <size_t>max_datagram)
        self._out_cap = 64 * 1024
        self._out = <char*>malloc(self._out_cap)
        if self._slots == NULL or self._out == NULL:
            raise MemoryError()
        self._sock = None
        self._loop = None

    def __dealloc__(self):
        free(self._slots)
        free(self._out)

    @property
    def machines(self):
        return self.registry.machines

    @property
    def evicted(self):
        return self.registry.evicted

    @property
    def closed(self):
        return self.peers.closed

    # -- intake ----------------------------------------------------------------

    def attach(self, sock, loop):
        """Start draining ``sock`` (a bound, non-blocking AF_UNIX SOCK_DGRAM socket) on ``loop``."""
        self._sock = sock
        self._loop = loop
        self._fd = sock.fileno()
        loop.add_reader(self._fd, self.drain)

    def detach(self):
        """Stop reading the datagram socket (the caller closes it)."""
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
        self._sock = None
        self._fd = -1
        self.flush()

    cdef inline void _reserve(self, Py_ssize_t need) except *:
        """Make the batch buffer hold at least ``need`` bytes."""
        cdef char* grown
        if need <= self._out_cap:
            return
        cap = self._out_cap
        while cap < need:
            cap *= 2
        grown = <char*>realloc(self._out, cap)
        if grown == NULL:
            raise MemoryError()
        self._out = grown
        self._out_cap = cap

    def drain(self):
        """Take one batch from the socket, update the registry, fan it out; returns datagrams read."""
        if self._fd < 0:
            return 0
        cdef Py_ssize_t count = 0, got, i
        cdef Py_ssize_t slot_size = self.max_datagram
        cdef Py_ssize_t before = self._framed
        while count < self.batch_cap:
            got = fr_recv_batch(self._fd, self._slots, <size_t>slot_size, VLEN, self._sizes)
            if got <= 0:
                break
            count += got
            for i in range(got):
                self._take(self._slots + i * slot_size, self._sizes[i])
            # No early exit on a short read: the kernel queue holds only
            # max_dgram_qlen datagrams, so emitters refill it while we parse,
            # and reading on until EAGAIN is what makes batches large.
        if self._framed > before:
            self.accepted += self._framed - before
            self._schedule_write()
        return count

    cdef void _schedule_write(self) except *:
        # Coalescing (--write-delay): a write to every client costs one system
        # call per client whatever it carries, so events arriving within
        # write_delay of the previous write share the next one; an event after
        # a quiet spell goes out at once. A full batch never waits.
        cdef bint full = self._framed >= self.batch_cap
        if self._flush_handle is not None and not full:
            return
        cdef double wait = self._last_write + self.write_delay - _monotonic()
        if wait <= 0 or full:
            self.flush()
        else:
            self._flush_handle = self._loop.call_later(wait, self.flush)

    def flush(self):
        """Write every accepted, not yet written event to every client now."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._framed:
            return
        cdef Py_ssize_t framed = self._framed, used = self._used
        self._framed = self._used = 0
        self._last_write = _monotonic()
        self._record_batch(framed)
        cdef object shared = None
        if self.peers.collecting:
            shared = PyBytes_FromStringAndSize(self._out, used)
            self.peers.record(shared)
        self._fanout(self._out, used, framed, shared)
        self.relayed += framed * len(self.clients)

    cdef void _take(self, char* slot, Py_ssize_t size) except *:
        """Validate one datagram, update the registry, and frame it onto the batch buffer."""
        cdef Py_ssize_t end, plen
        cdef bytes prev_json
        cdef dict event
        cdef object parsed, machine_id, previous
        if size < 0:
            self.rejects["too_large"] += 1
            return
        try:
            parsed = _loads(PyMemoryView_FromMemory(slot, size, PyBUF_READ))
        except _JSONDecodeError:
            self.rejects[classify_undecodable(slot[:size])] += 1
            return
        if type(parsed) is not dict:
            self.rejects["not_object"] += 1
            return
        event = <dict>parsed
        if type(event.get("type")) is not str:
            self.rejects["invalid_type"] += 1
            return
        # Counting brackets is a cheap bound on nesting: only a datagram with
        # that many is walked. orjson parses 1,024 levels but writes 254, so a
        # deeper one would break every snapshot that contains it.
        if (_count_brackets(slot, size) > self.max_depth
                and nesting_depth(event, self.max_depth) > self.max_depth):
            self.rejects["too_deep"] += 1
            return
        machine_id = event.get("machine_id")
        previous = None
        if type(machine_id) is str:
            previous = self._update(machine_id, event)
        if event["type"] == "state_change" and "previous_state" not in event:
            # Splice into the emitter's own bytes rather than re-serialising.
            end = size - 1
            while end > 0 and slot[end] in b" \t\r\n":
                end -= 1
            prev_json = _dumps(previous)
            plen = end + _PREV_KEY_LEN + PyBytes_GET_SIZE(prev_json) + 1
            self._reserve(self._used + plen + 10)
            self._used += _header(<unsigned char*>self._out + self._used, plen)
            self._append(slot, end)
            self._append(PyBytes_AS_STRING(_PREV_KEY), _PREV_KEY_LEN)
            self._append(PyBytes_AS_STRING(prev_json), PyBytes_GET_SIZE(prev_json))
            self._append(b"}", 1)
        else:
            self._reserve(self._used + size + 10)
            self._used += _header(<unsigned char*>self._out + self._used, size)
            self._append(slot, size)
        self._framed += 1

    cdef inline void _append(self, const char* data, Py_ssize_t n) noexcept:
        # Capacity was reserved by the caller for the whole frame.
        memcpy(self._out + self._used, data, n)
        self._used += n

    cdef void _record_batch(self, Py_ssize_t n) except *:
        self.batches += 1
        cdef Py_ssize_t index = 0
        cdef Py_ssize_t m = n - 1
        while m > 0:
            index += 1
            m >>= 1
        if index >= len(self.batch_histogram):
            index = len(self.batch_histogram) - 1
        self.batch_histogram[index] += 1

    # -- fan-out -----------------------------------------------------------------

    cdef void _fanout(self, char* data, Py_ssize_t size, Py_ssize_t nframes,
                      object shared) except *:
        cdef Py_ssize_t n = len(self.clients)
        if n == 0:
            return
        cdef Py_ssize_t sent
        cdef list over = None
        enqueue = self.peers.enqueue
        for client in self.clients:
            # Checked at the moment of writing, never through a flag: a byte may
            # go to the socket only when nothing waits ahead of it for this
            # client, in its transport or in its queue.
            if not client.queue and not client.buffered():
                sent = fr_send(client.fd, data, size)
                if sent == size:
                    continue
                if sent < 0:
                    sent = 0  # let the transport meet the error and close itself
                client.write(PyBytes_FromStringAndSize(data + sent, size - sent))
            else:
                if shared is None:
                    shared = PyBytes_FromStringAndSize(data, size)
                if not enqueue(client, shared):
                    if over is None:
                        over = []
                    over.append(client)
        self.frames_sent += nframes * n
        self.bytes_sent += size * n
        if over is not None:
            for client in over:
                self.peers.close_slow(client)

    def broadcast(self, bytes payload):
        """Send one relay-made message (a ping) to every client, framed once."""
        self.flush()
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        self._reserve(n + 10)
        cdef Py_ssize_t h = _header(<unsigned char*>self._out, n)
        memcpy(self._out + h, PyBytes_AS_STRING(payload), n)
        self._fanout(self._out, h + n, 1, None)

    # -- clients -------------------------------------------------------------------

    def make_listener(self):
        """A picows listener bound to this hub, for one new connection."""
        return Listener(self.peers)

    def close_client(self, client, code, bytes reason, str why):
        """Stop sending to ``client`` and close it gracefully with ``code``; ``why`` is counted."""
        self.peers.close_client(client, code, reason, why)

    def abort_client(self, client, str why):
        """Drop ``client``'s connection at once, discarding what it has not read."""
        self.peers.abort_client(client, why)

    # -- registry ------------------------------------------------------------------

    def snapshot_payload(self):
        return self.registry.snapshot_payload()

    def machines_payload(self):
        return self.registry.machines_payload()

    def stats(self):
        return hub_stats(self)
