"""Stand-in for MicroPython's machine module in the tests: simulated I2C devices, RTC memory,
resets and deep sleep on the simulated clock (simclock), a WDT that counts."""
import simclock

DEVICES = {}  # I2C address -> {register: bytes or a function returning bytes}
SAMPLES = []  # (world ms, value) of every temperature a simulated sensor handed out

PWRON_RESET = 0
WDT_RESET = 1
SOFT_RESET = 4
DEEPSLEEP_RESET = 5
HARD_RESET = 6
CAUSE = PWRON_RESET
RTC_MEMORY = b""  # survives resets and deep sleep, not power loss
RTC_WRITES = 0


class Pin:
    def __init__(self, number, *args, **kwargs):
        self.number = number


class SoftI2C:
    def __init__(self, scl=None, sda=None, freq=None):
        self.scl, self.sda = scl.number, sda.number

    def readfrom_mem_into(self, address, register, buf):
        if address not in DEVICES:
            raise OSError(19)  # ENODEV: what the ESP8266 raises when nothing acknowledges
        data = DEVICES[address].get(register, b"")
        if callable(data):
            data = data()
        for i in range(len(buf)):
            buf[i] = data[i] if i < len(data) else 0

    def writeto_mem(self, address, register, data):
        if address not in DEVICES:
            raise OSError(19)
        DEVICES[address].setdefault("written", []).append((register, bytes(data)))


I2C = SoftI2C


class WDT:
    feeds = 0

    def feed(self):
        WDT.feeds += 1


class RTC:
    def memory(self, data=None):
        global RTC_MEMORY, RTC_WRITES
        if data is None:
            return RTC_MEMORY
        if len(data) > 492:
            raise ValueError("buffer too long")  # the ESP8266 port's limit
        RTC_MEMORY = bytes(data)
        RTC_WRITES += 1


class Reset(Exception):
    pass


RESETS = []
DEEP_SLEEPS = []


def reset_cause():
    return CAUSE


def reset(cause=SOFT_RESET):
    """machine.reset(), or (with a cause) a watchdog or the reset button: RAM is lost, RTC memory kept."""
    global CAUSE
    RESETS.append(simclock.now_ms())
    CAUSE = cause
    simclock.reboot()
    raise Reset("machine.reset()")


def deepsleep(ms):
    global CAUSE
    DEEP_SLEEPS.append(ms)
    CAUSE = DEEPSLEEP_RESET
    simclock.reboot(ms)
    raise Reset("machine.deepsleep(%d)" % ms)


def power_loss(off_ms=0):
    """Unplugged and plugged in again: RTC memory and the clock are gone, flash files stay."""
    global CAUSE, RTC_MEMORY
    CAUSE = PWRON_RESET
    RTC_MEMORY = b""
    simclock.power_loss(off_ms)
    raise Reset("power loss")


def add_mcp9808(celsius, address=0x18, step=0):
    """An MCP9808 reading ``celsius``, then ``step`` more at each reading (so each one can be told apart)."""
    regs = DEVICES.setdefault(address, {})
    regs[0x06] = b"\x00\x54"  # manufacturer
    regs[0x07] = b"\x04\x00"  # device id, revision
    count = [0]

    def temperature():
        value = celsius + step * count[0]
        count[0] += 1
        SAMPLES.append((simclock.now_ms(), value))
        raw = int(round(value * 16)) & 0x1FFF  # 13-bit two's complement, sign in bit 12
        return bytes([0xE0 | (raw >> 8), raw & 0xFF])  # alert flags set: the driver must mask them

    regs[0x05] = temperature


def _cal_bytes(values):
    cal = bytearray()
    for value in values:
        value &= 0xFFFF
        cal += bytes([value & 0xFF, value >> 8])
    return bytes(cal)


#: The worked example of the BMP280 datasheet (3.12): 25.08 C and 100653.27 Pa.
BOSCH_TP_CAL = (27504, 26435, -1000, 36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000)
BOSCH_ADC_T, BOSCH_ADC_P = 519888, 415148


def add_bmp280(address=0x76, chip_id=0x58):
    regs = DEVICES.setdefault(address, {})
    regs[0xD0] = bytes([chip_id])
    regs[0x88] = _cal_bytes(BOSCH_TP_CAL)
    adc_p, adc_t = BOSCH_ADC_P, BOSCH_ADC_T
    regs[0xF7] = bytes([adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0xF) << 4,
                        adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0xF) << 4])
    return regs


def add_bme280(h_cal, adc_h, address=0x76):
    """A BME280: the BMP280 example for temperature and pressure, the given humidity calibration
    (dig_H1..dig_H6) and raw humidity."""
    regs = add_bmp280(address, chip_id=0x60)
    h1, h2, h3, h4, h5, h6 = h_cal
    regs[0xA1] = bytes([h1])
    regs[0xE1] = bytes([h2 & 0xFF, (h2 >> 8) & 0xFF, h3, (h4 >> 4) & 0xFF, (h4 & 0x0F) | ((h5 & 0x0F) << 4),
                        (h5 >> 4) & 0xFF, h6 & 0xFF])
    regs[0xF7] = regs[0xF7] + bytes([adc_h >> 8, adc_h & 0xFF])
    return regs
