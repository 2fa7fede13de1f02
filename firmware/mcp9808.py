"""MCP9808 temperature sensor on I2C (0.0625 C resolution, -40 to +125 C).

    from machine import I2C, Pin
    import mcp9808
    sensor = mcp9808.MCP9808(I2C(scl=Pin(5), sda=Pin(4)))
    sensor.read()               # {'temperature': -3.0625}: C
"""
from micropython import const

_REG_TEMP = const(0x05)
_REG_MANUFACTURER = const(0x06)
_REG_DEVICE = const(0x07)
_MANUFACTURER_ID = const(0x0054)
_DEVICE_ID = const(0x04)


class MCP9808:
    def __init__(self, i2c, address=0x18):
        self.i2c = i2c
        self.address = address
        self._buf = bytearray(2)
        try:
            manufacturer = self._read(_REG_MANUFACTURER)
            device = self._read(_REG_DEVICE) >> 8  # the low byte is the revision
        except OSError:
            raise OSError("MCP9808 not found at I2C 0x%02x: check wiring (SCL=GPIO5, SDA=GPIO4)" % address)
        if manufacturer != _MANUFACTURER_ID or device != _DEVICE_ID:
            raise OSError("device at I2C 0x%02x is not an MCP9808 (id %04x/%02x)" % (address, manufacturer, device))

    def _read(self, register):
        self.i2c.readfrom_mem_into(self.address, register, self._buf)
        return (self._buf[0] << 8) | self._buf[1]

    def temperature(self):
        """Degrees Celsius, in steps of 0.0625."""
        raw = self._read(_REG_TEMP) & 0x1FFF  # 13-bit two's complement; the top 3 bits are alert flags
        if raw & 0x1000:
            raw -= 0x2000
        return raw / 16

    def read(self):
        """{'temperature': degrees Celsius}."""
        return {"temperature": self.temperature()}
