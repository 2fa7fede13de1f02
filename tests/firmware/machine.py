"""Stand-in for MicroPython's machine module in the tests: simulated I2C devices, a WDT that counts."""

DEVICES = {}  # I2C address -> {register: bytes}: what a read starting at that register returns


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


class Reset(Exception):
    pass


RESETS = []
DEEP_SLEEPS = []


def reset():
    RESETS.append(1)
    raise Reset("machine.reset()")


def deepsleep(ms):
    DEEP_SLEEPS.append(ms)
    raise Reset("machine.deepsleep(%d)" % ms)


def add_mcp9808(celsius, address=0x18):
    regs = DEVICES.setdefault(address, {})
    regs[0x06] = b"\x00\x54"  # manufacturer
    regs[0x07] = b"\x04\x00"  # device id, revision
    raw = int(round(celsius * 16)) & 0x1FFF  # 13-bit two's complement, sign in bit 12
    regs[0x05] = bytes([0xE0 | (raw >> 8), raw & 0xFF])  # alert flags set: the driver must mask them


def add_bmp280(address=0x76):
    """The worked example of the BMP280 datasheet: 25.08 C and 100653.27 Pa."""
    regs = DEVICES.setdefault(address, {})
    regs[0xD0] = b"\x58"
    cal = bytearray()
    for value in (27504, 26435, -1000, 36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000):
        value &= 0xFFFF
        cal += bytes([value & 0xFF, value >> 8])
    regs[0x88] = bytes(cal)
    adc_p, adc_t = 415148, 519888
    regs[0xF7] = bytes([adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0xF) << 4,
                             adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0xF) << 4])
