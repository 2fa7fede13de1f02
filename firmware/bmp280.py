"""BMP280 temperature and pressure sensor on I2C, compensated with its calibration data.

    from machine import I2C, Pin
    import bmp280
    sensor = bmp280.BMP280(I2C(scl=Pin(5), sda=Pin(4)))
    sensor.read()               # (25.08, 100653.3): C and Pa
"""
import time

from micropython import const

_REG_ID = const(0xD0)
_REG_CALIBRATION = const(0x88)
_REG_CTRL_MEAS = const(0xF4)
_REG_CONFIG = const(0xF5)
_REG_DATA = const(0xF7)
_CHIP_ID = const(0x58)
_FORCED = const(0x25)  # temperature x1, pressure x1, forced mode: one measurement, then sleep


def _u16(b, i):
    return b[i] | (b[i + 1] << 8)


def _s16(b, i):
    v = _u16(b, i)
    return v - 65536 if v & 0x8000 else v


class BMP280:
    def __init__(self, i2c, address=0x76):
        self.i2c = i2c
        self.address = address
        self._data = bytearray(6)
        one = bytearray(1)
        try:
            i2c.readfrom_mem_into(address, _REG_ID, one)
        except OSError:
            raise OSError("BMP280 not found at I2C 0x%02x: check wiring (SCL=GPIO5, SDA=GPIO4)" % address)
        if one[0] != _CHIP_ID:
            raise OSError("device at I2C 0x%02x is not a BMP280 (id 0x%02x)" % (address, one[0]))
        cal = bytearray(24)
        i2c.readfrom_mem_into(address, _REG_CALIBRATION, cal)
        self._t = (_u16(cal, 0), _s16(cal, 2), _s16(cal, 4))
        self._p = (_u16(cal, 6),) + tuple(_s16(cal, i) for i in range(8, 24, 2))
        i2c.writeto_mem(address, _REG_CONFIG, b"\x00")

    def read(self):
        """(degrees Celsius, pascals), from one forced measurement."""
        self.i2c.writeto_mem(self.address, _REG_CTRL_MEAS, bytes([_FORCED]))
        time.sleep_ms(10)
        d = self._data
        self.i2c.readfrom_mem_into(self.address, _REG_DATA, d)
        adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
        adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
        t1, t2, t3 = self._t
        var1 = (adc_t / 16384 - t1 / 1024) * t2
        var2 = (adc_t / 131072 - t1 / 8192) ** 2 * t3
        t_fine = var1 + var2
        p1, p2, p3, p4, p5, p6, p7, p8, p9 = self._p
        var1 = t_fine / 2 - 64000
        var2 = var1 * var1 * p6 / 32768 + var1 * p5 * 2
        var2 = var2 / 4 + p4 * 65536
        var1 = (p3 * var1 * var1 / 524288 + p2 * var1) / 524288
        var1 = (1 + var1 / 32768) * p1
        if var1 == 0:
            raise OSError("BMP280 gave no pressure reading")
        p = 1048576 - adc_p
        p = (p - var2 / 4096) * 6250 / var1
        var1 = p9 * p * p / 2147483648
        var2 = p * p8 / 32768
        return t_fine / 5120, p + (var1 + var2 + p7) / 16

    def fields(self):
        """[(field, value, decimals)]: field 1 temperature in C, field 2 pressure in hPa."""
        t, p = self.read()
        return [(1, t, 2), (2, p / 100, 2)]
