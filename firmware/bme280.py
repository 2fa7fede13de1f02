"""BME280 temperature, pressure and humidity sensor on I2C (a BMP280 with a humidity sensor).

    from machine import I2C, Pin
    import bme280
    sensor = bme280.BME280(I2C(scl=Pin(5), sda=Pin(4)))
    sensor.read()               # {'temperature': 25.08, 'pressure': 1006.5327, 'humidity': 46.333}

Temperature and pressure are compensated as on the BMP280 (same registers, same calibration);
humidity with Bosch's integer formula (BME280 datasheet 4.2.3), from calibration registers
0xA1 and 0xE1-0xE7. ctrl_hum (0xF2) is written before ctrl_meas: the chip applies it only
on the next ctrl_meas write, which every forced measurement makes.
"""
from micropython import const

from bmp280 import BMP280

_REG_H1 = const(0xA1)
_REG_H2 = const(0xE1)
_REG_CTRL_HUM = const(0xF2)
_HUMIDITY_X1 = const(0x01)


def _s8(v):
    return v - 256 if v & 0x80 else v


class BME280(BMP280):
    NAME = "BME280"
    CHIP_ID = 0x60
    DATA_BYTES = 8  # pressure, temperature: 20 bits each; humidity: 16 bits

    def _setup(self):
        one = bytearray(1)
        self.i2c.readfrom_mem_into(self.address, _REG_H1, one)
        e = bytearray(7)  # 0xE1..0xE7
        self.i2c.readfrom_mem_into(self.address, _REG_H2, e)
        h2 = e[0] | (e[1] << 8)
        self._h = (
            one[0],                                # dig_H1, unsigned 8 bit
            h2 - 65536 if h2 & 0x8000 else h2,     # dig_H2, signed 16 bit
            e[2],                                  # dig_H3, unsigned 8 bit
            (_s8(e[3]) << 4) | (e[4] & 0x0F),      # dig_H4, signed 12 bit: 0xE4[7:0] 0xE5[3:0]
            (_s8(e[5]) << 4) | (e[4] >> 4),        # dig_H5, signed 12 bit: 0xE6[7:0] 0xE5[7:4]
            _s8(e[6]),                             # dig_H6, signed 8 bit
        )
        self.i2c.writeto_mem(self.address, _REG_CTRL_HUM, bytes([_HUMIDITY_X1]))

    def _humidity(self, adc_h, t_fine):
        """Percent relative humidity times 1024 (Q22.10)."""
        h1, h2, h3, h4, h5, h6 = self._h
        v = t_fine - 76800
        v = ((((adc_h << 14) - (h4 << 20) - (h5 * v)) + 16384) >> 15) * (
            ((((((v * h6) >> 10) * (((v * h3) >> 11) + 32768)) >> 10) + 2097152) * h2 + 8192) >> 14)
        v = v - (((((v >> 15) * (v >> 15)) >> 7) * h1) >> 4)
        v = min(max(v, 0), 419430400)
        return v >> 12

    def read(self):
        """{'temperature': C, 'pressure': hPa, 'humidity': % relative}, from one forced measurement."""
        d = self._measure()
        adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
        adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
        adc_h = (d[6] << 8) | d[7]
        t_fine = self._t_fine(adc_t)
        return {"temperature": ((t_fine * 5 + 128) >> 8) / 100, "pressure": self._pressure(adc_p, t_fine) / 25600,
                "humidity": self._humidity(adc_h, t_fine) / 1024}
