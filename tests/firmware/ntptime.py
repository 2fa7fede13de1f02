"""Stand-in for MicroPython's ntptime: sets the board's simulated clock when the network is up."""
import network
import simclock

host = "pool.ntp.org"
REACHABLE = True  # False: no NTP server answers (a LAN without internet)
CALLS = 0


def settime():
    global CALLS
    CALLS += 1
    if not network.online() or not REACHABLE:
        simclock.advance(1000)  # ntptime's socket timeout is 1 s
        raise OSError(110)  # ETIMEDOUT
    simclock.advance(30)
    simclock.settime()
