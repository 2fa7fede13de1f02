# boot.py: runs first on every boot; set up and leave (main.py runs the station).
import esp

esp.osdebug(None)  # keep the SDK's debug chatter off the serial console
