"""The station: every INTERVAL seconds read the sensor and post each field to iotserver.

    import app
    app.main()                  # what main.py does; runs until the board loses power

Network failures are retried with a growing wait; a 429 waits what Retry-After says;
any other refusal (400, 401, 403) is printed with the server's reason and the reading
is dropped rather than sent again and again. The API key is never printed.
"""
import asyncio
import gc
import time

#: Attempts per reading before it is dropped (the next cycle brings a fresh one).
ATTEMPTS = 6
#: After this many failed cycles in a row the board resets itself (a fresh Wi-Fi stack).
MAX_FAILED_CYCLES = 30


def log(*args):
    print("station:", *args)


def make_sensor(config, machine):
    """The sensor config.SENSOR names, on I2C with SCL = GPIO5 and SDA = GPIO4."""
    i2c_class = getattr(machine, "SoftI2C", None) or machine.I2C
    i2c = i2c_class(scl=machine.Pin(5), sda=machine.Pin(4), freq=100000)
    name = getattr(config, "SENSOR", "mcp9808").lower()
    if name == "mcp9808":
        import mcp9808

        return mcp9808.MCP9808(i2c)
    if name == "bmp280":
        import bmp280

        return bmp280.BMP280(i2c)
    raise ValueError("config.SENSOR must be 'mcp9808' or 'bmp280', not %r" % name)


class Station:
    def __init__(self, config, sensor, link, get, machine, backoff=5, max_backoff=300, timeout=10):
        self.server = config.SERVER.rstrip("/")
        self._key = config.API_KEY
        self.interval = getattr(config, "INTERVAL", 60)
        self.deep_sleep = getattr(config, "DEEP_SLEEP", False)
        self.sensor = sensor
        self.link = link
        self.get = get
        self.machine = machine
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.wdt = machine.WDT()
        self.failed_cycles = 0
        self.mac = None

    async def sleep(self, seconds):
        """Wait, feeding the watchdog: only a call that hangs (not our own waits) lets it fire."""
        end = time.ticks_add(time.ticks_ms(), int(seconds * 1000))
        while True:
            left = time.ticks_diff(end, time.ticks_ms())
            if left <= 0:
                return
            await asyncio.sleep_ms(min(left, 1000))
            self.wdt.feed()

    async def post(self, field, text):
        """Post one reading; True once the server stored it."""
        url = "%s/update/API_key=%s/mac=%s/field=%d/data=%s" % (self.server, self._key, self.mac, field, text)
        wait = self.backoff
        for _ in range(ATTEMPTS):
            if not self.link.isconnected():
                log("wifi: link lost, reconnecting")
                try:
                    await self.link.connect()
                except OSError as exc:
                    log(exc)
                    await self.sleep(wait)
                    wait = min(wait * 2, self.max_backoff)
                    continue
            try:
                resp = await self.get(url, self.timeout)
            except OSError as exc:
                log("field %d: network error %s; retry in %d s" % (field, exc, wait))
                await self.sleep(wait)
                wait = min(wait * 2, self.max_backoff)
                continue
            try:
                status = resp.status
                if status == 200:
                    log("field %d = %s stored" % (field, text))
                    return True
                if status == 429:
                    pause = min(resp.retry_after or wait, 3600)
                    log("field %d: server says wait %d s" % (field, pause))
                elif status < 500:
                    log("field %d: refused %d %s" % (field, status, resp.reason()))
                    return False  # sending it again would be refused again
                else:
                    pause = wait
                    wait = min(wait * 2, self.max_backoff)
                    log("field %d: server error %d; retry in %d s" % (field, status, pause))
            finally:
                resp.close()
            await self.sleep(pause)
        log("field %d: giving up on this reading" % field)
        return False

    async def cycle(self):
        """Read the sensor and post every field; True if all were stored."""
        try:
            readings = self.sensor.fields()
        except OSError as exc:
            log("sensor error:", exc)
            return False
        ok = True
        for field, value, decimals in readings:
            ok = await self.post(field, ("%." + str(decimals) + "f") % value) and ok
        return ok

    async def run(self, cycles=None):
        """Connect, then post every interval; forever unless ``cycles`` is given (tests)."""
        await self.link.connect()
        self.mac = self.link.mac()
        log("mac %s, posting every %d s to %s" % (self.mac, self.interval, self.server))
        done = 0
        while cycles is None or done < cycles:
            started = time.ticks_ms()
            if await self.cycle():
                self.failed_cycles = 0
                self.wdt.feed()
            else:
                self.failed_cycles += 1
                if self.failed_cycles >= MAX_FAILED_CYCLES:
                    log("%d failed cycles in a row: resetting" % self.failed_cycles)
                    self.machine.reset()
            done += 1
            gc.collect()
            left = self.interval - time.ticks_diff(time.ticks_ms(), started) / 1000
            if self.deep_sleep:
                log("deep sleep for %d s" % max(1, left))
                self.machine.deepsleep(int(max(1, left) * 1000))  # wakes as a reset: GPIO16 wired to RST
            await self.sleep(left)


def main():
    import config
    import httpc
    import machine
    import wifi

    sensor = make_sensor(config, machine)  # a missing sensor raises here: nothing is posted
    link = wifi.Link(config.SSID, config.WIFI_PASSWORD)
    asyncio.run(Station(config, sensor, link, httpc.get, machine).run())
