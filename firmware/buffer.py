"""Readings waiting for upload: a ring file on flash, its newest block in RTC memory.

    import buffer, machine
    buf = buffer.Buffer(machine.RTC(), capacity=960)
    buf.append(buffer.absolute(1767225600), (21.5, 1006.53, buffer.NAN))
    stamp, f1, f2, f3 = buf.entry(0)        # the oldest
    buf.drop(1)                             # stored by the server: gone

An entry is 16 bytes: a 32-bit stamp and three float32 values (fields 1-3, NaN for none).
The stamp counts seconds since 2020-01-01 UTC or, with the top bit set, seconds of the
station's own running clock (``mono_ms``, kept across resets and deep sleep) for readings
taken while the real time was not known.

New entries go to a block of BLOCK entries in RTC memory, which survives a reset, the
watchdog and deep sleep, but not a power loss. A full block goes to the ring file in one
write: while uploads keep up, flash is never written; during an outage, once per BLOCK
readings. When the ring holds ``capacity`` entries the oldest is dropped and counted.
"""
import struct

from micropython import const

#: Entries kept in RTC memory before they go to flash together: 32 + 24 * 16 = 416 of its 492 bytes.
BLOCK = const(24)
SIZE = const(16)
_ENTRY = "<Ifff"
_STATE = "<4sIIIIQB"  # magic, head, tail, flushed, dropped, mono_ms, clock_ok
_STATE_SIZE = const(32)
_FILE_HEAD = "<4sIIIIQ"  # magic, capacity, head, flushed, dropped, mono_ms
_FILE_HEAD_SIZE = const(32)
_RTC_MAGIC = b"iob1"
_FILE_MAGIC = b"iof1"
#: Unix time of 2020-01-01; stamps count from here (the server refuses anything earlier).
UNIX_2020 = 1577836800
#: The top bit of a stamp: the seconds are the station's running clock, not the real time.
RELATIVE = 0x80000000
#: The stamp of an entry the server refused: never sent again, dropped when it is the oldest.
GONE = 0xFFFFFFFF
NAN = float("nan")


def absolute(unix):
    return unix - UNIX_2020


def relative(mono_seconds):
    return RELATIVE | (mono_seconds & 0x7FFFFFFF)


class Buffer:
    """Sequence numbers ``head`` <= ``flushed`` <= ``tail``: [head, flushed) is on flash, the rest in RTC memory."""

    def __init__(self, rtc=None, path="buffer.bin", capacity=960, log=print):
        self.path = path
        self.capacity = capacity
        self._rtc = rtc
        self._log = log
        self._img = bytearray(_STATE_SIZE + BLOCK * SIZE)
        self._one = bytearray(SIZE)
        self._file = None  # open for reading while an upload walks the entries; release() closes it
        self._stale = False  # the ring file's header is behind: uploads took entries it still lists
        self.head = self.tail = self.flushed = self.dropped = self.mono_ms = 0
        self.clock_ok = False  # for the station: the real-time clock was right when it last saved
        self.writes = 0  # flash writes by this Buffer since boot
        self._restore()

    def __len__(self):
        return self.tail - self.head

    # -- state ---------------------------------------------------------------------------------

    def _restore(self):
        on_flash = self._read_file_head()
        memory = self._rtc.memory() if self._rtc else b""
        if len(memory) == len(self._img) and memory[:4] == _RTC_MAGIC:
            self._img[:] = memory
            _, head, tail, flushed, dropped, mono, clock = struct.unpack_from(_STATE, self._img)
            if on_flash is None and head < flushed:
                self._log("buffer: the ring file was missing: %d readings lost" % (flushed - head))
                head = flushed
            where = "RTC memory"
        elif on_flash is not None:
            head, flushed, dropped, mono = on_flash
            tail, clock = flushed, 0
            where = "flash (RTC memory was empty: power loss)"
        else:
            head = tail = flushed = dropped = mono = clock = 0
            where = None
        if not (head <= tail and flushed <= tail and tail - flushed <= BLOCK and tail - head <= self.capacity):
            self._log("buffer: inconsistent state %d/%d/%d: starting empty" % (head, flushed, tail))
            head = tail = flushed = 0
        self.head, self.tail, self.flushed, self.dropped, self.mono_ms = head, tail, flushed, dropped, mono
        self.clock_ok = bool(clock)
        if on_flash is None:
            self._create_file()
        self.save()
        if where and len(self):
            self._log("buffer: %d readings waiting, restored from %s" % (len(self), where))

    def save(self):
        """State and the newest block into RTC memory (cheap: no flash)."""
        struct.pack_into(_STATE, self._img, 0, _RTC_MAGIC, self.head, self.tail, self.flushed, self.dropped,
                         self.mono_ms, 1 if self.clock_ok else 0)
        if self._rtc:
            self._rtc.memory(self._img)

    def _read_file_head(self):
        try:
            with open(self.path, "rb") as f:
                data = f.read(_FILE_HEAD_SIZE)
        except OSError:
            return None
        if len(data) < _FILE_HEAD_SIZE or data[:4] != _FILE_MAGIC:
            self._log("buffer: %s is not a ring file: starting a new one" % self.path)
            return None
        _, capacity, head, flushed, dropped, mono = struct.unpack_from(_FILE_HEAD, data)
        if capacity != self.capacity:
            self._log("buffer: ring file of %d entries, configured %d: starting a new one (%d readings lost)"
                      % (capacity, self.capacity, flushed - head))
            return None
        return head, flushed, dropped, mono

    def _create_file(self):
        zeros = bytearray(256)
        with open(self.path, "wb") as f:
            f.write(bytearray(_FILE_HEAD_SIZE))  # no magic until the whole file is written
            left = self.capacity * SIZE
            while left > 0:
                n = min(left, len(zeros))
                f.write(memoryview(zeros)[:n])
                left -= n
            self._write_head(f)

    def _write_head(self, f):
        f.seek(0)
        f.write(struct.pack(_FILE_HEAD, _FILE_MAGIC, self.capacity, self.head, self.flushed, self.dropped,
                            self.mono_ms))
        self.writes += 1

    # -- entries -------------------------------------------------------------------------------

    def append(self, stamp, values):
        """Add a reading; True if the buffer was full and its oldest entry was dropped for it."""
        full = len(self) >= self.capacity
        if full:
            self.head += 1
            self.dropped += 1
        n = self.tail - self.flushed
        struct.pack_into(_ENTRY, self._img, _STATE_SIZE + n * SIZE, stamp, values[0], values[1], values[2])
        self.tail += 1
        if n + 1 == BLOCK:
            self._flush()
        self.save()
        return full

    def _flush(self):
        """The RTC block to the ring file: one write (two where the ring wraps), then the header."""
        self.release()
        start = max(self.head, self.flushed)
        if start < self.tail:
            with open(self.path, "r+b") as f:
                seq = start
                while seq < self.tail:
                    slot = seq % self.capacity
                    n = min(self.tail - seq, self.capacity - slot)
                    at = _STATE_SIZE + (seq - self.flushed) * SIZE
                    f.seek(_FILE_HEAD_SIZE + slot * SIZE)
                    f.write(memoryview(self._img)[at:at + n * SIZE])
                    seq += n
                self.flushed = self.tail
                self._write_head(f)
            self._stale = False
        self.flushed = self.tail

    def entry(self, i):
        """(stamp, field1, field2, field3) of the i-th oldest entry."""
        seq = self.head + i
        if seq >= self.flushed:
            return struct.unpack_from(_ENTRY, self._img, _STATE_SIZE + (seq - self.flushed) * SIZE)
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(_FILE_HEAD_SIZE + (seq % self.capacity) * SIZE)
        self._file.readinto(self._one)
        return struct.unpack(_ENTRY, self._one)

    def drop(self, n):
        """Forget the n oldest entries (the server stored them), and any refused ones now oldest."""
        if self.head < self.flushed:
            self._stale = True
        self.head = min(self.head + n, self.tail)
        while self.head < self.tail and self.entry(0)[0] == GONE:
            self.head += 1
        if self.head > self.flushed:  # move what is left of the RTC block to its start
            keep = (self.tail - self.head) * SIZE
            at = _STATE_SIZE + (self.head - self.flushed) * SIZE
            self._img[_STATE_SIZE:_STATE_SIZE + keep] = self._img[at:at + keep]
            self.flushed = self.head
        self.save()

    def discard(self, i):
        """The server refused the i-th oldest entry: mark it, never to be sent again."""
        seq = self.head + i
        if seq >= self.flushed:
            struct.pack_into("<I", self._img, _STATE_SIZE + (seq - self.flushed) * SIZE, GONE)
        else:
            self.release()
            with open(self.path, "r+b") as f:
                f.seek(_FILE_HEAD_SIZE + (seq % self.capacity) * SIZE)
                f.write(struct.pack("<I", GONE))
            self.writes += 1
        self.drop(0)

    def release(self):
        """Close the file an upload read entries from."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def sync(self):
        """After an upload: close the file, and if uploads took entries from flash, update its header."""
        self.release()
        if self._stale:
            with open(self.path, "r+b") as f:
                self._write_head(f)
            self._stale = False
