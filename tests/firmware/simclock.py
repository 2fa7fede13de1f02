"""Stand-in for MicroPython's time module on the ESP8266, on a simulated clock.

    import simclock
    simclock.install(start_ms=..., ticks0=...)   # before the firmware is imported

Virtual mode (the default): the world's time moves only when the firmware waits
(asyncio.sleep_ms / time.sleep_ms, patched here) or a stand-in says an operation took time
(advance()), so a 30-minute outage runs in about a second and every run is the same.
Real mode (install(real=True)): the world's time is the host's; waits are real.

The board's clocks, modelled on the ESP8266 port:
- ticks_ms() counts from the last boot (from ``ticks0``, to test wrap-around) in 30 bits;
- time() counts seconds since 2000-01-01 from ``delta`` plus the time since boot. It starts
  at 2000-01-01 on power-up; settime() (what ntptime does) makes it right; deep sleep keeps it
  right (the port stores time + sleep before sleeping); any other reset sets it back to the
  last value stored (machine_rtc.c: "system_get_rtc_time() is always 0 after reset").
"""
import sys

_MASK = (1 << 30) - 1
UNIX_2000_MS = 946684800000

REAL = False
NOW = 0  # world time, Unix ms (virtual mode)
BOOT = 0  # world time of the last boot
TICKS0 = 0
DELTA = 0  # board clock (ms since 2000) at the last boot
EVENTS = []  # (world ms, callable): run when the world's time passes them
_real = None  # the real time module
_real_sleep_ms = None


class Stop(Exception):
    """Raised by an event to end a simulation."""


def install(start_ms=None, real=False, ticks0=0):
    global REAL, NOW, BOOT, TICKS0, DELTA, _real, _real_sleep_ms
    import asyncio  # first, with the real time module: its scheduler keeps real ticks

    _real = sys.modules.get("time") or __import__("time")
    if _real is sys.modules[__name__]:
        return
    REAL = real
    NOW = int(_real.time() * 1000) if start_ms is None or real else start_ms
    BOOT = now_ms()
    TICKS0 = ticks0
    DELTA = 0
    _real_sleep_ms = asyncio.sleep_ms
    asyncio.sleep_ms = _async_sleep_ms
    asyncio.sleep = _async_sleep
    sys.modules["time"] = sys.modules[__name__]


def now_ms():
    """The world's time, Unix ms."""
    return int(_real.time() * 1000) if REAL else NOW


def advance(ms):
    """Let ``ms`` of world time pass (virtual mode), running the events it passes."""
    global NOW
    if REAL:
        _real.sleep_ms(int(ms))
        _run_events()
        return
    end = NOW + int(ms)
    while True:
        EVENTS.sort(key=lambda e: e[0])
        if not EVENTS or EVENTS[0][0] > end:
            break
        when, action = EVENTS.pop(0)
        NOW = max(NOW, when)
        action()
    NOW = end


def _run_events():
    EVENTS.sort(key=lambda e: e[0])
    while EVENTS and EVENTS[0][0] <= now_ms():
        EVENTS.pop(0)[1]()


def at(world_ms, action):
    EVENTS.append((world_ms, action))


# -- what the board sees ---------------------------------------------------------------------

def ticks_ms():
    return (now_ms() - BOOT + TICKS0) & _MASK


def ticks_add(ticks, delta):
    return (ticks + delta) & _MASK


def ticks_diff(a, b):
    half = (_MASK + 1) // 2
    return ((a - b + half) & _MASK) - half


def time():
    return (DELTA + now_ms() - BOOT) // 1000


def gmtime(secs=None):
    """(year, month, mday, hour, minute, second, weekday, yearday), seconds since 2000 like the port."""
    if secs is None:
        secs = time()
    days, rest = divmod(int(secs), 86400)
    weekday = (days + 5) % 7  # 2000-01-01 was a Saturday (5, Monday = 0)
    year = 2000
    while True:
        length = 366 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 365
        if days < length:
            break
        days -= length
        year += 1
    yearday = days + 1
    months = [31, 29 if length == 366 else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    month = 0
    while days >= months[month]:
        days -= months[month]
        month += 1
    return (year, month + 1, days + 1, rest // 3600, rest // 60 % 60, rest % 60, weekday, yearday)


localtime = gmtime


def sleep_ms(ms):
    advance(ms)


def sleep(seconds):
    advance(seconds * 1000)


async def _async_sleep_ms(ms):
    if REAL:
        await _real_sleep_ms(int(ms))
        _run_events()
    else:  # no yield to JS: the firmware is one task, and each JS round trip keeps ~35 bytes in this port
        advance(ms)


async def _async_sleep(seconds):
    await _async_sleep_ms(seconds * 1000)


# -- what happens to the board ---------------------------------------------------------------

def settime():
    """The board's clock set right (ntptime.settime())."""
    global DELTA
    DELTA = now_ms() - UNIX_2000_MS - (now_ms() - BOOT)


def reboot(sleep_ms=0):
    """A reset: ticks start again; the clock keeps counting across deep sleep only."""
    global BOOT, DELTA
    if sleep_ms:
        DELTA = DELTA + now_ms() - BOOT + sleep_ms
        if not REAL:
            advance(sleep_ms)
    BOOT = now_ms()


def power_loss(off_ms=0):
    """Power gone and back: the clock starts again at 2000-01-01."""
    global BOOT, DELTA
    if off_ms and not REAL:
        advance(off_ms)
    BOOT = now_ms()
    DELTA = 0
