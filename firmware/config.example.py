# Copy to config.py (never commit config.py) or let firmware/flash.py write it.
SERVER = "https://iot.example.org"  # http:// or https://, no trailing path
API_KEY = "the key from: python3 iotserver.py --show-key"
SSID = "your Wi-Fi"
WIFI_PASSWORD = "your Wi-Fi password"
INTERVAL = 60  # seconds between readings
SENSOR = "mcp9808"  # or "bmp280" (temperature, pressure) or "bme280" (temperature, pressure, humidity)
DEEP_SLEEP = False  # battery stations: sleep between readings; needs GPIO16 wired to RST
# Optional:
# NTP_HOST = "pool.ntp.org"  # time server; on a LAN without internet, e.g. your router. Without an
#                            # answer the station sends relative times (the server places them on arrival)
# BUFFER_ENTRIES = 960       # readings kept while the server is unreachable (at most 960: 16 h at 1/min);
#                            # on flash, 16 bytes each; when full, the oldest is dropped
