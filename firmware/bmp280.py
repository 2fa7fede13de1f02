"""BMP280 temperature and pressure sensor on I2C, compensated with its calibration data.

    from machine import I2C, Pin
    import bmp280
    sensor = bmp280.BMP280(I2C(scl=Pin(5), sda=Pin(4)))
    sensor.read()               # {'temperature': 25.08, 'pressure': 1006.5327}: C and hPa

The compensation is Bosch's integer one (datasheet 3.11.3, "32-bit" temperature and
"64-bit" pressure): exact on any port, unlike floating point on the ESP8266, whose floats
carry only 22 bits of mantissa. The BME280 (bme280.py) builds on this class.
"""
import time

from micropython import const

_REG_ID = const(0xD0)
_REG_CALIBRATION = const(0x88)
_REG_CTRL_MEAS = const(0xF4)
_REG_CONFIG = const(0xF5)
_REG_DATA = const(0xF7)
_FORCED = const(0x25)  # temperature x1, pressure x1, forced mode: one measurement, then sleep


def _u16(b, i):
    return b[i] | (b[i + 1] << 8)


def _s16(b, i):
    v = _u16(b, i)
    return v - 65536 if v & 0x8000 else v


def _div(a, b):
    """C's integer division (towards zero), which the reference code relies on."""
    q = abs(a) // abs(b)
    return -q if (a < 0) != (b < 0) else q


class BMP280:
    NAME = "BMP280"
    CHIP_ID = 0x58
    DATA_BYTES = 6  # pressure, temperature: 20 bits each

    def __init__(self, i2c, address=0x76):
        self.i2c = i2c
        self.address = address
        self._data = bytearray(self.DATA_BYTES)
        one = bytearray(1)
        try:
            i2c.readfrom_mem_into(address, _REG_ID, one)
        except OSError:
            raise OSError("%s not found at I2C 0x%02x: check wiring (SCL=GPIO5, SDA=GPIO4)" % (self.NAME, address))
        if one[0] != self.CHIP_ID:
            raise OSError("device at I2C 0x%02x is not a %s (id 0x%02x)" % (address, self.NAME, one[0]))
        cal = bytearray(24)
        i2c.readfrom_mem_into(address, _REG_CALIBRATION, cal)
        self._t = (_u16(cal, 0), _s16(cal, 2), _s16(cal, 4))
        self._p = (_u16(cal, 6),) + tuple(_s16(cal, i) for i in range(8, 24, 2))
        self._setup()
        i2c.writeto_mem(address, _REG_CONFIG, b"\x00")

    def _setup(self):
        """Hook for the BME280: its humidity calibration and control."""

    def _measure(self):
        """One forced measurement; the raw data registers from 0xF7."""
        self.i2c.writeto_mem(self.address, _REG_CTRL_MEAS, bytes([_FORCED]))
        time.sleep_ms(10)  # at most 9.3 ms with every oversampling at x1 (datasheet 9.1)
        self.i2c.readfrom_mem_into(self.address, _REG_DATA, self._data)
        return self._data

    def _t_fine(self, adc_t):
        t1, t2, t3 = self._t
        var1 = (((adc_t >> 3) - (t1 << 1)) * t2) >> 11
        var2 = (((((adc_t >> 4) - t1) * ((adc_t >> 4) - t1)) >> 12) * t3) >> 14
        return var1 + var2

    def _pressure(self, adc_p, t_fine):
        """Pascals times 256 (Q24.8)."""
        p1, p2, p3, p4, p5, p6, p7, p8, p9 = self._p
        var1 = t_fine - 128000
        var2 = var1 * var1 * p6
        var2 = var2 + ((var1 * p5) << 17)
        var2 = var2 + (p4 << 35)
        var1 = ((var1 * var1 * p3) >> 8) + ((var1 * p2) << 12)
        var1 = (((1 << 47) + var1) * p1) >> 33
        if var1 == 0:
            raise OSError("%s gave no pressure reading" % self.NAME)
        p = 1048576 - adc_p
        p = _div(((p << 31) - var2) * 3125, var1)
        var1 = (p9 * (p >> 13) * (p >> 13)) >> 25
        var2 = (p8 * p) >> 19
        return ((p + var1 + var2) >> 8) + (p7 << 4)

    def read(self):
        """{'temperature': degrees Celsius, 'pressure': hectopascals}, from one forced measurement."""
        d = self._measure()
        adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
        adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
        t_fine = self._t_fine(adc_t)
        return {"temperature": ((t_fine * 5 + 128) >> 8) / 100, "pressure": self._pressure(adc_p, t_fine) / 25600}
