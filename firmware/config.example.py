# Copy to config.py (never commit config.py) or let firmware/flash.py write it.
SERVER = "https://iot.example.org"  # http:// or https://, no trailing path
API_KEY = "the key from: python3 iotserver.py --show-key"
SSID = "your Wi-Fi"
WIFI_PASSWORD = "your Wi-Fi password"
INTERVAL = 60  # seconds between readings
SENSOR = "mcp9808"  # or "bmp280" (temperature and pressure)
DEEP_SLEEP = False  # battery stations: sleep between readings; needs GPIO16 wired to RST
