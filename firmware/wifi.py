"""Wi-Fi for the station: a bounded connect that raises on timeout, and the board's MAC.

    link = Link("ssid", "password")
    await link.connect()        # OSError after `timeout` seconds (or connect(seconds)) without a link
    link.mac()                  # '6c:ef:7a:3b:9d:e8'
"""
import asyncio

import network


class Link:
    def __init__(self, ssid, password, timeout=20):
        self.ssid = ssid
        self.password = password
        self.timeout = timeout
        self.wlan = network.WLAN(network.STA_IF)

    def mac(self):
        return ":".join("%02x" % b for b in self.wlan.config("mac"))

    def isconnected(self):
        return self.wlan.isconnected()

    async def connect(self, timeout=None):
        """Connect, or return at once if connected; OSError after ``timeout`` (default self.timeout) seconds."""
        if self.wlan.isconnected():
            return
        timeout = self.timeout if timeout is None else timeout
        self.wlan.active(True)
        self.wlan.connect(self.ssid, self.password)
        for _ in range(int(timeout * 10)):
            if self.wlan.isconnected():
                print("wifi: connected, address", self.wlan.ifconfig()[0])
                return
            await asyncio.sleep_ms(100)
        self.wlan.disconnect()
        raise OSError("wifi: no link to %r after %d s" % (self.ssid, timeout))
