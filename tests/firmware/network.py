"""Stand-in for MicroPython's network module: a Wi-Fi link the test can drop, or take away for a while."""
import simclock

STA_IF = 0
MAC = b"\x6c\xef\x7a\x3b\x9d\xe8"
OUTAGES = []  # (from, to) world ms: the access point is gone


def in_outage():
    now = simclock.now_ms()
    return any(start <= now < end for start, end in OUTAGES)


class WLAN:
    up = False  # the station's association
    reachable = True  # whether the access point answers at all
    connects = 0
    refuse_next = 0  # connect attempts that fail before the link comes back

    def __init__(self, interface):
        self.interface = interface

    def active(self, on=None):
        return True

    def connect(self, ssid, password):
        WLAN.connects += 1
        if WLAN.refuse_next > 0:
            WLAN.refuse_next -= 1
            return
        WLAN.up = WLAN.reachable and not in_outage()

    def isconnected(self):
        if in_outage():
            WLAN.up = False
        return WLAN.up

    def disconnect(self):
        WLAN.up = False

    def config(self, name):
        assert name == "mac"
        return MAC

    def ifconfig(self):
        return ("192.0.2.10", "255.255.255.0", "192.0.2.1", "192.0.2.1")


def drop(failed_reconnects=0):
    """The access point goes away; the next ``failed_reconnects`` connects fail."""
    WLAN.up = False
    WLAN.refuse_next = failed_reconnects


def online():
    return WLAN.up and not in_outage()
