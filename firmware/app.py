"""The station: measure every INTERVAL seconds, on time whatever the network does; upload in between.

    import app
    app.main()                  # what main.py does; runs until the board loses power

Each measurement is one entry (all of the sensor's quantities) in a buffer that survives resets
and deep sleep (buffer.py). Between measurements the station uploads what waits, oldest first,
many entries per request, to POST /update/API_key=KEY/mac=MAC (ThingSpeak's bulk CSV form). The
upload step ends before the next measurement is due. 2xx: the entries leave the buffer. 400: the
entry the server names is logged with its reason and dropped. 429: wait what Retry-After says.
Other refusals (401, 403, 404) keep the entries and wait the longest backoff; network errors and
5xx back off 5 s, 10 s, ... 5 min. The time comes from NTP; until it is known, entries carry the
station's running clock and are sent with relative times (delta_t). The API key is never printed.
"""
import asyncio
import gc
import time

import buffer

#: What each measured quantity becomes on the server: (field, decimals sent).
FIELDS = {"temperature": (1, 4), "pressure": (2, 2), "humidity": (3, 2)}
#: config.SENSOR: the driver module of that name, and its class.
SENSORS = {"mcp9808": "MCP9808", "bmp280": "BMP280", "bme280": "BME280"}
#: After this many failed upload attempts in a row the board resets itself (a fresh Wi-Fi stack).
MAX_FAILURES = 30
#: NTP: again after this many seconds when it worked (the ESP8266's clock drifts), sooner when not.
NTP_EVERY = 3600
NTP_RETRY = 600
#: The most entries per request: the server's limit, and the most the buffer holds.
MAX_BATCH = 960
#: The upload step stops this long before the next measurement is due (ms; a tenth of shorter intervals).
MARGIN_MS = 1000
#: A request is only started with at least this many seconds left (a quarter of shorter intervals).
MIN_CALL = 2
#: NTP is only tried with at least this many seconds more left: ntptime blocks up to 1 s.
NTP_COST = 1
#: A relative-time request must end with a reading at most this old (s): the server places it at arrival.
FRESH = 2
_UNIX_2000 = 946684800
_FORM = "application/x-www-form-urlencoded"


def log(*args):
    print("station:", *args)


def make_sensor(config, machine):
    """The sensor config.SENSOR names, on I2C with SCL = GPIO5 and SDA = GPIO4."""
    i2c_class = getattr(machine, "SoftI2C", None) or machine.I2C
    i2c = i2c_class(scl=machine.Pin(5), sda=machine.Pin(4), freq=100000)
    name = getattr(config, "SENSOR", "mcp9808").lower()
    if name not in SENSORS:
        raise ValueError("config.SENSOR must be one of %s, not %r" % (", ".join(sorted(SENSORS)), name))
    return getattr(__import__(name), SENSORS[name])(i2c)


class Backoff:
    """Waits that double after each failure, from ``first`` to at most ``most`` seconds."""

    def __init__(self, first, most):
        self.first = first
        self.most = most
        self._next = first

    def next(self):
        wait = self._next
        self._next = min(self._next * 2, self.most)
        return wait

    def reset(self):
        self._next = self.first


def _entry_number(reason):
    """N from the server's '400 entry N: ...', or None."""
    at = reason.find("entry ")
    if at < 0:
        return None
    digits = ""
    for ch in reason[at + 6:]:
        if not "0" <= ch <= "9":
            break
        digits += ch
    return int(digits) if digits else None


class Station:
    def __init__(self, config, sensor, link, post, machine, backoff=5, max_backoff=300, timeout=10, store=None):
        self.server = config.SERVER.rstrip("/")
        self._key = config.API_KEY
        self.interval_ms = int(getattr(config, "INTERVAL", 60) * 1000)
        self.deep_sleep = getattr(config, "DEEP_SLEEP", False)
        self.ntp_host = getattr(config, "NTP_HOST", None)
        self.sensor = sensor
        self.link = link
        self.post = post
        self.machine = machine
        self.backoff = Backoff(backoff, max_backoff)
        self.timeout = timeout
        self.wdt = machine.WDT()
        if store is None:
            capacity = min(int(getattr(config, "BUFFER_ENTRIES", MAX_BATCH)), MAX_BATCH)
            store = buffer.Buffer(machine.RTC() if hasattr(machine, "RTC") else None, capacity=capacity, log=log)
        self.buffer = store
        self.batch = MAX_BATCH
        self._margin = min(MARGIN_MS, self.interval_ms // 10)
        self._min_call = min(MIN_CALL, self.interval_ms / 4000)
        self.failures = 0
        self.refused = 0
        self.mac = None
        self.retry_at = time.ticks_ms()
        self._ntp_at = self.retry_at
        self._formats = ["%.2f"] * 3
        for field, decimals in FIELDS.values():
            self._formats[field - 1] = "%." + str(decimals) + "f"
        self._offset = _UNIX_2000 if time.gmtime(0)[0] == 2000 else 0
        # the running clock: continues across resets and deep sleep (via RTC memory)
        self._mono_ms = self.buffer.mono_ms
        self._mono_ticks = time.ticks_ms()
        # the real-time clock survives deep sleep; after any other reset the ESP8266 port sets it
        # back to the last time it was set, so only NTP makes it right again
        woke = hasattr(machine, "reset_cause") and machine.reset_cause() == getattr(machine, "DEEPSLEEP_RESET", -1)
        self._trusted = woke and self.buffer.clock_ok
        self.buffer.clock_ok = self._trusted

    # -- time ----------------------------------------------------------------------------------

    def mono(self):
        """Milliseconds of the station's running clock."""
        now = time.ticks_ms()
        self._mono_ms += time.ticks_diff(now, self._mono_ticks)
        self._mono_ticks = now
        return self._mono_ms

    def unix(self):
        """The real time in Unix seconds, or None while the clock is not known to be right."""
        if not self._trusted:
            return None
        now = time.time() + self._offset
        return now if now >= buffer.UNIX_2020 else None

    def _set_clock(self):
        import ntptime

        if self.ntp_host:
            ntptime.host = self.ntp_host
        try:
            ntptime.settime()
        except (OSError, OverflowError) as exc:  # a timeout is an OSError
            self._ntp_at = time.ticks_add(time.ticks_ms(), NTP_RETRY * 1000)
            if not self._trusted:
                log("clock: NTP failed (%r); sending relative times until it works" % exc)
            return
        self._ntp_at = time.ticks_add(time.ticks_ms(), NTP_EVERY * 1000)
        if not self._trusted:
            t = time.gmtime()
            log("clock set by NTP: %04d-%02d-%02d %02d:%02d:%02d UTC" % t[:6])
        self._trusted = self.buffer.clock_ok = True
        self.buffer.save()

    async def sleep(self, seconds):
        """Wait, feeding the watchdog: only a call that hangs (not our own waits) lets it fire."""
        end = time.ticks_add(time.ticks_ms(), int(seconds * 1000))
        while True:
            left = time.ticks_diff(end, time.ticks_ms())
            if left <= 0:
                return
            await asyncio.sleep_ms(min(left, 1000))
            self.wdt.feed()
            self.buffer.mono_ms = self.mono()  # so that an unplanned reset loses at most a second of it
            self.buffer.save()

    # -- measuring -----------------------------------------------------------------------------

    def measure(self):
        """Read the sensor into one buffer entry."""
        try:
            quantities = self.sensor.read()
        except OSError as exc:
            log("sensor error:", exc)
            return
        values = [buffer.NAN] * 3
        for name in quantities:
            values[FIELDS[name][0] - 1] = quantities[name]
        unix = self.unix()
        self.buffer.mono_ms = mono = self.mono()
        stamp = buffer.absolute(unix) if unix is not None else buffer.relative(mono // 1000)
        if self.buffer.append(stamp, values):
            log("buffer full (%d readings): the oldest dropped, %d dropped so far"
                % (self.buffer.capacity, self.buffer.dropped))

    # -- uploading -----------------------------------------------------------------------------

    def _failed(self, what):
        wait = self.backoff.next()
        self.retry_at = time.ticks_add(time.ticks_ms(), int(wait * 1000))
        self.failures += 1
        log("%s; %d waiting, retry in %d s" % (what, len(self.buffer), wait))
        if self.failures >= MAX_FAILURES:
            log("%d failed attempts in a row: resetting" % self.failures)
            self.machine.reset()

    def _hold(self, seconds):
        self.retry_at = time.ticks_add(time.ticks_ms(), int(seconds * 1000))

    async def upload(self, due):
        """Send what waits, oldest first, until done or refused, ending a margin before ``due``."""
        self.retry_at = due  # unless an answer below says when
        deadline = time.ticks_add(due, -self._margin)
        if _left(deadline) < self._min_call:
            return
        if not self.link.isconnected():
            log("wifi: connecting")
            try:
                await self.link.connect(min(self.link.timeout, _left(deadline)))
            except OSError as exc:
                self._failed(str(exc))
                return
            self.backoff.reset()  # a new link: its first failure waits the shortest time again
        if time.ticks_diff(self._ntp_at, time.ticks_ms()) <= 0 and _left(deadline) > self._min_call + NTP_COST:
            self._set_clock()
        try:
            while len(self.buffer) and _left(deadline) >= self._min_call:
                count, relative = self._plan()
                if not count or not await self._send(count, relative, min(self.timeout, _left(deadline))):
                    break
        finally:
            self.buffer.sync()

    def _plan(self):
        """(entries, relative) for the next request: (0, _) when none can be sent now."""
        n = min(len(self.buffer), self.batch)
        if self.unix() is not None:
            return n, False  # every stamp can be made absolute
        relative = self.buffer.entry(0)[0] & buffer.RELATIVE
        count = 0
        for i in range(n):
            stamp = self.buffer.entry(i)[0]
            if stamp != buffer.GONE and stamp & buffer.RELATIVE != relative:
                break
            count += 1
        if not relative:
            return count, False  # taken when the time was known: absolute without a clock now
        # relative times: the server places the last entry at its arrival, so it must be the newest, just taken
        newest = self.buffer.entry(count - 1)[0]
        if count < len(self.buffer) or self.mono() // 1000 - (newest & 0x7FFFFFFF) > FRESH:
            return 0, True
        return count, True

    def _body(self, count, relative, unix, mono, write=None):
        """The form body for the ``count`` oldest entries, in pieces to ``write``; its length.

        ``unix`` and ``mono``: the real time and the running clock (s), to make running-clock stamps absolute.
        """
        total = 0
        prev = None
        for i in range(count):
            stamp, a, b, c = self.buffer.entry(i)
            if stamp == buffer.GONE:
                continue
            seconds = stamp & 0x7FFFFFFF
            if relative:
                when = 0 if prev is None else seconds - prev
                prev = seconds
            elif stamp & buffer.RELATIVE:
                when = unix - (mono - seconds)
            else:
                when = seconds + buffer.UNIX_2020
            piece = ("|" if total else "time_format=%s&updates=" % ("relative" if relative else "absolute")) + \
                str(when) + self._cells(a, b, c)
            total += len(piece)
            if write:
                write(piece)
        return total

    def _cells(self, *values):
        """',v1,v2,v3' with blank cells for fields without a value, trailing blanks left out."""
        cells = ""
        blanks = ""
        for i in range(3):
            v = values[i]
            if v != v:  # NaN: no value for this field
                blanks += ","
            else:
                cells += blanks + "," + self._formats[i] % v
                blanks = ""
        return cells

    def _sent(self, count, n):
        """Buffer index of the n-th entry (from 1) that went out among the ``count`` oldest."""
        for i in range(count):
            if self.buffer.entry(i)[0] != buffer.GONE:
                n -= 1
                if n == 0:
                    return i
        return 0

    async def _send(self, count, relative, timeout):
        """One request with the ``count`` oldest entries; True to go on with the next."""
        unix, mono = self.unix(), self.mono() // 1000
        length = self._body(count, relative, unix, mono)
        if not length:  # all of them refused before
            self.buffer.drop(count)
            return True
        url = "%s/update/API_key=%s/mac=%s" % (self.server, self._key, self.mac)
        try:
            resp = await self.post(url, lambda write: self._body(count, relative, unix, mono, write), length, _FORM,
                                   timeout)
        except OSError as exc:
            self._failed("upload: network error %r" % exc)
            return False
        try:
            status = resp.status
            if 200 <= status < 300:
                last = self.buffer.entry(count - 1)
                self.buffer.drop(count)
                self.backoff.reset()
                self.failures = 0
                log("stored %d reading%s (latest%s), %d waiting"
                    % (count, "" if count == 1 else "s", self._cells(*last[1:]).replace(",", " "), len(self.buffer)))
                return True
            reason = resp.reason()
            if status == 429:
                wait = min(resp.retry_after or self.backoff.first, 3600)
                self._hold(wait)
                log("server says wait %d s" % wait)
                return False
            if status == 413 and count > 1:
                self.batch = max(1, count // 2)
                log("refused %d %s: now %d entries per request" % (status, reason, self.batch))
                return True
            if status == 400 or status == 422:
                i = self._sent(count, _entry_number(reason) or 1)
                entry = self.buffer.entry(i)
                self.buffer.discard(i)
                self.refused += 1
                log("entry refused and dropped: %d %s (%s%s)"
                    % (status, reason, _when(entry[0]), self._cells(*entry[1:])))
                return True
            if status < 500:
                self._hold(self.backoff.most)
                log("refused %d %s; keeping %d readings, retry in %d s"
                    % (status, reason, len(self.buffer), self.backoff.most))
                return False
            self._failed("server error %d %s" % (status, reason))
            return False
        finally:
            resp.close()

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, cycles=None):
        """Measure every interval and upload in between; forever unless ``cycles`` (tests) is given."""
        self.mac = self.link.mac()
        log("mac %s, measuring every %d s, uploading to %s" % (self.mac, self.interval_ms // 1000, self.server))
        due = time.ticks_ms()
        done = 0
        while True:
            now = time.ticks_ms()
            if time.ticks_diff(due, now) <= 0:
                self.measure()
                done += 1
                due = time.ticks_add(due, self.interval_ms)
                if time.ticks_diff(due, now) <= 0:  # a blocking call overran a whole interval: skip ahead
                    due = time.ticks_add(now, self.interval_ms)
            if len(self.buffer) and time.ticks_diff(self.retry_at, time.ticks_ms()) <= 0:
                await self.upload(due)
            gc.collect()
            if cycles is not None and done >= cycles:
                return
            if self.deep_sleep:
                ms = max(1000, time.ticks_diff(due, time.ticks_ms()))
                self.buffer.mono_ms = self.mono() + ms
                self.buffer.save()
                log("deep sleep for %d s" % (ms // 1000))
                self.machine.deepsleep(ms)  # wakes as a reset: GPIO16 wired to RST
            wake = due
            if len(self.buffer) and time.ticks_diff(self.retry_at, due) < 0:
                wake = self.retry_at
            await self.sleep(max(0, time.ticks_diff(wake, time.ticks_ms())) / 1000)


def _when(stamp):
    """A stamp for the log: Unix seconds, or the running clock's."""
    if stamp & buffer.RELATIVE:
        return "running clock %d s" % (stamp & 0x7FFFFFFF)
    return "unix %d" % (stamp + buffer.UNIX_2020)


def _left(deadline):
    """Seconds until a ticks_ms deadline."""
    return time.ticks_diff(deadline, time.ticks_ms()) / 1000


def main():
    import config
    import httpc
    import machine
    import wifi

    sensor = make_sensor(config, machine)  # a missing sensor raises here: nothing is measured
    link = wifi.Link(config.SSID, config.WIFI_PASSWORD)
    asyncio.run(Station(config, sensor, link, httpc.post, machine).run())
