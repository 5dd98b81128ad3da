# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The hub's primitives in C: the twin of ``fastrelay._core_py``, same API, same bytes.

Only what must be native is here; the hub's algorithm and policy are
``fastrelay.hub``, compiled for this backend as ``fastrelay._hub_c``.
- ``receive`` reads the datagram socket's raw descriptor with ``recvmmsg`` (one
  system call per batch on Linux; ``recvmsg`` elsewhere) into fixed slots, and
  ``view`` hands orjson a slot without making a bytes object;
- ``frame`` copies a slot into one batch buffer behind its frame header,
  splicing ``previous_state`` and the stream's ``seq`` into the emitter's bytes;
- ``send`` (and ``fan_out``, for any bytes: a filter's share of a batch)
  writes that buffer to each client's socket with one ``send()`` when
  nothing is waiting for that client, checked at that moment in its transport
  and its queue (exactly what picows's own fast path does); a client with a
  backlog, or a partial write, gets a Python bytes object, made once per batch.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

__all__ = ["SLOTS", "Batch", "fan_out", "frame_text"]

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

SLOTS = VLEN

cdef bytes _PREV_KEY = b',"previous_state":'
cdef Py_ssize_t _PREV_KEY_LEN = len(_PREV_KEY)
cdef bytes _SEQ_KEY = b',"seq":'
cdef Py_ssize_t _SEQ_KEY_LEN = len(_SEQ_KEY)


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


def frame_text(bytes payload not None):
    """One unmasked, final WebSocket text frame carrying ``payload`` (RFC 6455 §5.2)."""
    cdef unsigned char head[10]
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t h = _header(head, n)
    return PyBytes_FromStringAndSize(<char*>head, h) + payload


cdef class Batch:
    """Slots for received datagrams and the buffer of frames made from them.

    See ``fastrelay._core_py.Batch``: the same methods, in C.
    """

    cdef readonly Py_ssize_t max_datagram
    cdef readonly Py_ssize_t framed
    cdef readonly Py_ssize_t nbytes
    cdef int _fd
    cdef int _got
    cdef char* _slots
    cdef Py_ssize_t _sizes[VLEN]
    cdef char* _out
    cdef Py_ssize_t _cap
    cdef Py_ssize_t* _ends  # where each frame in _out ends
    cdef Py_ssize_t _ends_cap

    def __cinit__(self):
        self._slots = NULL
        self._out = NULL
        self._ends = NULL
        self._fd = -1

    def __init__(self, Py_ssize_t max_datagram):
        self.max_datagram = max_datagram
        self.framed = self.nbytes = 0
        self._got = 0
        self._slots = <char*>malloc(<size_t>VLEN * <size_t>max_datagram)
        self._cap = 64 * 1024
        self._out = <char*>malloc(self._cap)
        self._ends_cap = 64
        self._ends = <Py_ssize_t*>malloc(<size_t>self._ends_cap * sizeof(Py_ssize_t))
        if self._slots == NULL or self._out == NULL or self._ends == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self._slots)
        free(self._out)
        free(self._ends)

    # -- receiving ---------------------------------------------------------------

    def attach(self, sock):
        """Receive from ``sock`` (a non-blocking datagram socket) from now on; None stops."""
        self._fd = -1 if sock is None else sock.fileno()

    def receive(self, Py_ssize_t limit=VLEN):
        """Fill up to ``limit`` slots from the socket; returns how many (0 when it is empty or detached)."""
        if self._fd < 0 or limit <= 0:
            return 0
        cdef unsigned int vlen = <unsigned int>(limit if limit < VLEN else VLEN)
        cdef int got = fr_recv_batch(self._fd, self._slots, <size_t>self.max_datagram, vlen,
                                     self._sizes)
        self._got = got if got > 0 else 0
        return self._got

    cdef inline char* _slot(self, Py_ssize_t i) except NULL:
        if i < 0 or i >= self._got:
            raise IndexError("no such slot in this batch")
        return self._slots + i * self.max_datagram

    def size(self, Py_ssize_t i):
        """Slot ``i``'s datagram length, or -1 when it did not fit in ``max_datagram``."""
        self._slot(i)
        return self._sizes[i]

    def view(self, Py_ssize_t i):
        """Slot ``i``'s datagram, valid until the next receive()."""
        return PyMemoryView_FromMemory(self._slot(i), max(self._sizes[i], 0), PyBUF_READ)

    def raw(self, Py_ssize_t i):
        """Slot ``i``'s datagram as bytes."""
        return PyBytes_FromStringAndSize(self._slot(i), max(self._sizes[i], 0))

    def brackets(self, Py_ssize_t i):
        """Opening brackets in slot ``i``: an upper bound on how deeply it nests."""
        cdef const char* data = self._slot(i)
        cdef Py_ssize_t j, count = 0
        for j in range(self._sizes[i]):
            if data[j] == 91 or data[j] == 123:  # '[' or '{'
                count += 1
        return count

    # -- framing -----------------------------------------------------------------

    def frame(self, Py_ssize_t i, unsigned long long seq, bytes previous=None):
        """Append slot ``i`` (a JSON object) as one text frame, with ``,"previous_state":<previous>``
        (when given) and ``,"seq":<seq>`` added at its end."""
        cdef char* slot = self._slot(i)
        if self._sizes[i] < 0:
            raise ValueError("slot holds a datagram larger than max_datagram")
        self._splice(slot, self._sizes[i], seq, previous, "slot")

    def splice(self, bytes data not None, unsigned long long seq, bytes previous=None):
        """Append ``data`` (a JSON object, as a broker carried it) as one text frame, the
        same way :meth:`frame` appends a slot: the same input makes the same bytes."""
        self._splice(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), seq, previous, "data")

    cdef void _splice(self, const char* source, Py_ssize_t end, unsigned long long seq,
                      bytes previous, str what) except *:
        while end > 0 and source[end - 1] in b" \t\r\n":
            end -= 1
        end -= 1  # the closing brace
        if end < 0 or source[end] != 125:  # '}'
            raise ValueError(f"{what} is not a JSON object")
        cdef unsigned char digits[20]
        cdef Py_ssize_t ndigits = 0
        while True:
            digits[19 - ndigits] = <unsigned char>(48 + seq % 10)
            ndigits += 1
            seq //= 10
            if seq == 0:
                break
        cdef Py_ssize_t plen = end + _SEQ_KEY_LEN + ndigits + 1
        if previous is not None:
            plen += _PREV_KEY_LEN + PyBytes_GET_SIZE(previous)
        self._reserve(self.nbytes + plen + 10)
        self.nbytes += _header(<unsigned char*>self._out + self.nbytes, plen)
        self._copy(source, end)
        if previous is not None:
            self._copy(PyBytes_AS_STRING(_PREV_KEY), _PREV_KEY_LEN)
            self._copy(PyBytes_AS_STRING(previous), PyBytes_GET_SIZE(previous))
        self._copy(PyBytes_AS_STRING(_SEQ_KEY), _SEQ_KEY_LEN)
        self._copy(<char*>digits + 20 - ndigits, ndigits)
        self._copy(b"}", 1)
        self._end_frame()

    def add(self, bytes payload not None):
        """Append a relay-made message as one text frame."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        self._reserve(self.nbytes + n + 10)
        self.nbytes += _header(<unsigned char*>self._out + self.nbytes, n)
        self._copy(PyBytes_AS_STRING(payload), n)
        self._end_frame()

    cdef void _end_frame(self) except *:
        cdef Py_ssize_t* grown
        if self.framed >= self._ends_cap:
            grown = <Py_ssize_t*>realloc(self._ends, <size_t>(self._ends_cap * 2) * sizeof(Py_ssize_t))
            if grown == NULL:
                raise MemoryError()
            self._ends = grown
            self._ends_cap *= 2
        self._ends[self.framed] = self.nbytes
        self.framed += 1

    cdef void _reserve(self, Py_ssize_t need) except *:
        cdef char* grown
        cdef Py_ssize_t cap = self._cap
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        grown = <char*>realloc(self._out, cap)
        if grown == NULL:
            raise MemoryError()
        self._out = grown
        self._cap = cap

    cdef inline void _copy(self, const char* data, Py_ssize_t n) noexcept:
        # Capacity was reserved by the caller for the whole frame.
        memcpy(self._out + self.nbytes, data, n)
        self.nbytes += n

    def take(self):
        """The buffer's bytes (the batch stays in place)."""
        return PyBytes_FromStringAndSize(self._out, self.nbytes)

    def frames(self):
        """Each frame in the buffer as its own bytes, in order (what history keeps)."""
        cdef list out = []
        cdef Py_ssize_t k, start = 0
        for k in range(self.framed):
            out.append(PyBytes_FromStringAndSize(self._out + start, self._ends[k] - start))
            start = self._ends[k]
        return out

    def clear(self):
        self.framed = self.nbytes = 0

    # -- fan-out -------------------------------------------------------------------

    def send(self, clients, enqueue, bytes shared=None):
        """Write the buffer to every client; returns those it would put over their bound.

        See ``fan_out``; ``shared`` is the buffer's bytes when the caller has
        them already (else they are made once, for the first client that must queue).
        """
        return _fan_out(self._out, self.nbytes, shared, clients, enqueue)


def fan_out(bytes data not None, clients, enqueue):
    """Write ``data`` to every client; returns those it would put over their bound.

    A client gets the bytes straight on its socket when nothing waits for it
    in its transport or its queue, checked at this moment; otherwise they join
    its queue through ``enqueue``.
    """
    return _fan_out(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), data, clients, enqueue)


cdef list _fan_out(char* data, Py_ssize_t size, bytes shared, clients, enqueue):
    cdef Py_ssize_t sent
    cdef list over = None
    for client in clients:
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
    return over
