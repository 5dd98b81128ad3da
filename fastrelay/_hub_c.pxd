# cython: language_level=3
# Types for the compiled copy of fastrelay/hub.py (``_hub_c.py`` links to it).
# Cython reads this file beside the .py and turns Hub into an extension type:
# every attribute the .py assigns is declared here, and the per-batch and
# per-event methods become C calls.

cimport cython


cdef class Hub:
    cdef readonly str backend
    cdef readonly Py_ssize_t max_datagram
    cdef readonly Py_ssize_t max_depth
    cdef readonly Py_ssize_t batch_cap
    cdef readonly double write_delay
    cdef readonly object registry
    cdef readonly object history
    cdef public unsigned long long seq
    cdef readonly object peers
    cdef readonly set clients
    cdef readonly set stalled
    cdef readonly set firehose
    cdef readonly unsigned long long accepted
    cdef readonly unsigned long long relayed
    cdef readonly unsigned long long frames_sent
    cdef readonly unsigned long long bytes_sent
    cdef readonly unsigned long long batches
    cdef readonly dict rejects
    cdef readonly list batch_histogram
    cdef object _batch
    cdef list _keys
    cdef object _loop
    cdef int _fd
    cdef object _flush_handle
    cdef double _last_write
    cdef public object outbox

    @cython.locals(before=Py_ssize_t, count=Py_ssize_t, got=Py_ssize_t, i=Py_ssize_t,
                   framed=Py_ssize_t)
    cpdef Py_ssize_t drain(self) except -1

    @cython.locals(max_depth=Py_ssize_t, rejects=dict, seq=cython.ulonglong,
                   adds_previous=bint)
    cdef void _take(self, object batch, Py_ssize_t i) except *

    cdef void _schedule_write(self) except *

    @cython.locals(framed=Py_ssize_t)
    cpdef void flush(self) except *

    @cython.locals(index=Py_ssize_t, hist=list)
    cdef void _record_batch(self, Py_ssize_t n) except *

    @cython.locals(n=Py_ssize_t, clients=set, framed=Py_ssize_t, nbytes=Py_ssize_t)
    cdef void _send(self, object shared) except *

    cdef void _close_slow(self, list over) except *

    @cython.locals(n=Py_ssize_t, count=Py_ssize_t, members=set)
    cdef void _send_feeds(self, list frames, list keys) except *
